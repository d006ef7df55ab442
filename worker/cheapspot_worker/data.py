"""Datasets: JSONL records -> tokenized examples -> this shard's slice -> batches.

Formats (one per file, ``auto`` decides from the first record):

* ``text``: ``{"text": ...}``; loss on every token.
* ``prompt-completion``: ``{"prompt": ..., "completion": ...}``; loss on the completion only.
* ``chat``: ``{"messages": [{"role": ..., "content": ...}, ...]}`` rendered through the
  model's chat template; loss on the assistant turns only.

In sequences-mode distillation the training data is what the generation shards published
(:func:`read_generated`): prompt-completion records, the completions the teacher's.

Everything is a pure function of the data, the seed and the step number: the split into
shards, the order within a shard (a fresh seeded permutation per epoch) and so the batch of
any step. A checkpoint therefore needs only the step to resume the data exactly.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cheapspot.contract import DatasetFormat, Layout
from cheapspot.store import NotFoundError, PermissionStoreError, Store, split_store_uri
from cheapspot_worker.errors import PermanentError

IGNORE = -100


@dataclass(frozen=True)
class Example:
    input_ids: list[int]
    labels: list[int]

    @property
    def label_tokens(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE)


def read_dataset_bytes(uri: str) -> bytes:
    """The raw JSONL file from ``file://`` or ``s3://``; absent -> PermanentError."""
    if uri.startswith("file://"):
        path = Path(uri[len("file://") :])
        if not path.is_file():
            raise PermanentError(f"dataset {uri} not found: no such file")
        return path.read_bytes()
    store, name = split_store_uri(uri)
    try:
        return store.get_bytes(name)
    except NotFoundError as exc:
        raise PermanentError(f"dataset {uri} not found: no such object") from exc
    except PermissionStoreError as exc:
        raise PermanentError(f"dataset {uri} cannot be read: {exc}") from exc


def parse_jsonl(data: bytes, uri: str) -> list[tuple[int, dict[str, Any]]]:
    """(line number, record) for every non-blank line; bad lines -> PermanentError naming them."""
    records = []
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise PermanentError(f"dataset {uri} is not UTF-8 text: {exc}") from exc
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise PermanentError(
                f"dataset {uri} line {number}: not valid JSON ({exc.msg} at column {exc.colno}); "
                "each line must be one JSON object"
            ) from exc
        if not isinstance(record, dict):
            raise PermanentError(
                f"dataset {uri} line {number}: expected a JSON object, got {type(record).__name__}"
            )
        records.append((number, record))
    if not records:
        raise PermanentError(f"dataset {uri} is empty: it has no records")
    return records


def detect_format(record: dict[str, Any]) -> DatasetFormat:
    if "messages" in record:
        return DatasetFormat.CHAT
    if "prompt" in record and "completion" in record:
        return DatasetFormat.PROMPT_COMPLETION
    if "text" in record:
        return DatasetFormat.TEXT
    raise PermanentError(
        f"cannot tell the dataset format from the first record's keys {sorted(record)}: "
        "expected 'text', 'prompt' and 'completion', or 'messages'"
    )


class Tokenize:
    """Turns one record into an :class:`Example` for a given format and tokenizer."""

    def __init__(self, tokenizer: Any, fmt: DatasetFormat, max_len: int) -> None:
        self.tok = tokenizer
        self.fmt = fmt
        self.max_len = max_len
        self.eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []

    def __call__(self, number: int, record: dict[str, Any], uri: str) -> Example:
        where = f"dataset {uri} line {number}"
        if self.fmt is DatasetFormat.TEXT:
            text = _field(record, "text", where)
            ids = self._ids(text, special=True) + self.eos
            labels = list(ids)
        elif self.fmt is DatasetFormat.PROMPT_COMPLETION:
            prompt = self._ids(_field(record, "prompt", where), special=True)
            completion = self._ids(_field(record, "completion", where), special=False) + self.eos
            ids = prompt + completion
            labels = [IGNORE] * len(prompt) + completion
        else:
            ids, labels = self._chat(record, where)
        return Example(ids[: self.max_len], labels[: self.max_len])

    def _ids(self, text: str, *, special: bool) -> list[int]:
        return list(self.tok(text, add_special_tokens=special)["input_ids"])

    def _chat(self, record: dict[str, Any], where: str) -> tuple[list[int], list[int]]:
        messages = record.get("messages")
        if (
            not isinstance(messages, list)
            or not messages
            or not all(
                isinstance(m, dict)
                and isinstance(m.get("role"), str)
                and isinstance(m.get("content"), str)
                for m in messages
            )
        ):
            raise PermanentError(
                f"{where}: 'messages' must be a non-empty list of {{'role': str, 'content': str}}"
            )
        if getattr(self.tok, "chat_template", None) is None:
            raise PermanentError(
                f"{where}: chat records need a chat template, and the model's tokenizer has none"
            )

        def render(msgs: list[dict[str, Any]], gen: bool) -> str:
            out: str = self.tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)
            return out

        full = render(messages, False)
        # Character spans of the assistant turns: what the template adds for turn i.
        spans = []
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            before = render(messages[:i], True)
            after = render(messages[: i + 1], False)
            if not full.startswith(after) or not after.startswith(before):
                spans = [(0, len(full))]  # template not prefix-stable: train on everything
                break
            spans.append((len(before), len(after)))
        if not spans:
            raise PermanentError(f"{where}: a chat record needs at least one assistant message")
        enc = self.tok(full, add_special_tokens=False, return_offsets_mapping=True)
        ids = list(enc["input_ids"])
        labels = [
            t if any(a <= start < b for a, b in spans) else IGNORE
            for t, (start, _end) in zip(ids, enc["offset_mapping"], strict=True)
        ]
        return ids, labels


def _field(record: dict[str, Any], key: str, where: str) -> str:
    value = record.get(key)
    if not isinstance(value, str):
        raise PermanentError(f"{where}: expected a string field {key!r}, got {value!r:.60}")
    return value


def load_examples(uri: str, fmt: DatasetFormat, tokenizer: Any, max_len: int) -> list[Example]:
    """Every record of the dataset, tokenized; all lines are checked, not just this shard's."""
    records = parse_jsonl(read_dataset_bytes(uri), uri)
    chosen = detect_format(records[0][1]) if fmt is DatasetFormat.AUTO else fmt
    tokenize = Tokenize(tokenizer, chosen, max_len)
    return [tokenize(number, record, uri) for number, record in records]


GENERATED_FILE = "records.jsonl"
"""The records of one generated chunk (JSONL: prompt, completion, index)."""
GENERATED_INDEX = "chunks.json"
"""In a generation shard's ``done`` prefix: how many chunks and records it published."""


def read_generated(store: Store, layout: Layout, shard_count: int) -> bytes:
    """Every record the generation shards published, in dataset order (shard 0's chunks,
    then shard 1's, ...), each chunk checked against its manifest. Only a shard's ``done``
    prefix makes its chunks count: a half-finished generation is never trained on."""
    out = []
    for i in range(shard_count):
        done = layout.generated_done(i)
        manifest = store.read_manifest(done)
        if manifest is None:
            raise PermanentError(
                f"the generated dataset is incomplete: generation shard {i} has not published "
                f"{store.uri(done)}"
            )
        index = json.loads(store.fetch_bytes(done, GENERATED_INDEX, manifest))
        for k in range(int(index["chunks"])):
            prefix = layout.generated_chunk(i, k)
            chunk = store.read_manifest(prefix)
            if chunk is None:
                raise PermanentError(f"the generated dataset lacks {store.uri(prefix)}")
            out.append(store.fetch_bytes(prefix, GENERATED_FILE, chunk))
    return b"".join(out)


def load_generated_examples(
    store: Store, layout: Layout, shard_count: int, tokenizer: Any, max_len: int
) -> list[Example]:
    """The generated dataset (:func:`read_generated`), tokenized as prompt-completion."""
    uri = store.uri("generated/")
    records = parse_jsonl(read_generated(store, layout, shard_count), uri)
    tokenize = Tokenize(tokenizer, DatasetFormat.PROMPT_COMPLETION, max_len)
    return [tokenize(number, record, uri) for number, record in records]


def shard_slice(n: int, shard_index: int, shard_count: int, seed: int) -> list[int]:
    """Indices of shard ``shard_index``'s records: a seeded permutation cut into equal slices."""
    if n < shard_count:
        raise PermanentError(
            f"the dataset has {n} records, fewer than the {shard_count} shards; "
            "add data or lower shards"
        )
    order = list(range(n))
    random.Random(f"cheapspot-split-{seed}").shuffle(order)
    lo, hi = shard_index * n // shard_count, (shard_index + 1) * n // shard_count
    return sorted(order[lo:hi])


class Batches:
    """The micro-batches of every step, a pure function of the step number."""

    def __init__(
        self,
        examples: Sequence[Example],
        *,
        micro_batch: int,
        accumulation: int,
        seed: int,
        shard_index: int,
        pad_id: int,
    ) -> None:
        self.examples = list(examples)
        self.micro_batch = micro_batch
        self.accumulation = accumulation
        self.seed = seed
        self.shard_index = shard_index
        self.pad_id = pad_id
        self._orders: dict[int, list[int]] = {}

    def _order(self, epoch: int) -> list[int]:
        if epoch not in self._orders:
            order = list(range(len(self.examples)))
            random.Random(f"cheapspot-order-{self.seed}-{self.shard_index}-{epoch}").shuffle(order)
            self._orders = {epoch: order}  # steps move forward: one epoch cached is enough
        return self._orders[epoch]

    def step(self, step: int) -> list[list[Example]]:
        """The ``accumulation`` micro-batches (lists of examples) of optimizer step ``step``."""
        n = len(self.examples)
        out = []
        for m in range(self.accumulation):
            first = (step * self.accumulation + m) * self.micro_batch
            batch = []
            for c in range(first, first + self.micro_batch):
                batch.append(self.examples[self._order(c // n)[c % n]])
            out.append(batch)
        return out

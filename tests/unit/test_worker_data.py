"""Datasets: formats, loss masks, the shard split and batch order, and actionable errors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from cheapspot.contract import DatasetFormat
from cheapspot_worker.data import (
    IGNORE,
    Batches,
    detect_format,
    load_examples,
    parse_jsonl,
    shard_slice,
)
from cheapspot_worker.errors import PermanentError
from cheapspot_worker.tiny import build_tokenizer, learnable_records, write_jsonl


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    return build_tokenizer()


def _write(tmp_path: Path, lines: list[str]) -> str:
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return f"file://{path}"


def test_auto_detects_each_format(tmp_path: Path, tokenizer: Any) -> None:
    for fmt in ("text", "prompt-completion", "chat"):
        path = write_jsonl(tmp_path / f"{fmt}.jsonl", learnable_records(4, fmt))  # type: ignore[arg-type]
        assert detect_format(json.loads(path.read_text().splitlines()[0])) == DatasetFormat(fmt)
        examples = load_examples(f"file://{path}", DatasetFormat.AUTO, tokenizer, 64)
        assert len(examples) == 4
        assert all(e.label_tokens > 0 for e in examples)


def test_prompt_completion_loss_only_on_completion(tmp_path: Path, tokenizer: Any) -> None:
    uri = _write(
        tmp_path, [json.dumps({"prompt": "what colour is the sky", "completion": " blue"})]
    )
    (ex,) = load_examples(uri, DatasetFormat.AUTO, tokenizer, 64)
    prompt_len = len(tokenizer("what colour is the sky")["input_ids"])
    assert ex.labels[:prompt_len] == [IGNORE] * prompt_len
    trained = [t for t, lab in zip(ex.input_ids, ex.labels, strict=True) if lab != IGNORE]
    assert tokenizer.decode(trained) == " blue</s>"


def test_chat_loss_only_on_assistant_turns(tmp_path: Path, tokenizer: Any) -> None:
    record = {
        "messages": [
            {"role": "user", "content": "say hello"},
            {"role": "assistant", "content": "hello world"},
        ]
    }
    uri = _write(tmp_path, [json.dumps(record)])
    (ex,) = load_examples(uri, DatasetFormat.CHAT, tokenizer, 64)
    trained = [t for t, lab in zip(ex.input_ids, ex.labels, strict=True) if lab != IGNORE]
    assert tokenizer.decode(trained) == "hello world<|end|>"
    assert "<|user|>say hello" in tokenizer.decode(ex.input_ids)


def test_malformed_line_is_named(tmp_path: Path, tokenizer: Any) -> None:
    uri = _write(tmp_path, ['{"text": "a"}', "", '{"text": "b"', '{"text": "c"}'])
    with pytest.raises(PermanentError, match=r"line 3: not valid JSON"):
        load_examples(uri, DatasetFormat.AUTO, tokenizer, 64)


def test_record_of_the_wrong_shape_is_named(tmp_path: Path, tokenizer: Any) -> None:
    uri = _write(tmp_path, ['{"text": "a"}', '{"txt": "b"}'])
    with pytest.raises(PermanentError, match=r"line 2: expected a string field 'text'"):
        load_examples(uri, DatasetFormat.AUTO, tokenizer, 64)
    uri = _write(tmp_path, ["[1, 2]"])
    with pytest.raises(PermanentError, match=r"line 1: expected a JSON object"):
        parse_jsonl(Path(uri[7:]).read_bytes(), uri)


def test_empty_and_missing_datasets(tmp_path: Path, tokenizer: Any) -> None:
    with pytest.raises(PermanentError, match="is empty"):
        load_examples(_write(tmp_path, ["", "  "]), DatasetFormat.AUTO, tokenizer, 64)
    with pytest.raises(PermanentError, match="not found"):
        load_examples(f"file://{tmp_path}/nope.jsonl", DatasetFormat.AUTO, tokenizer, 64)
    with pytest.raises(PermanentError, match="cannot tell the dataset format"):
        load_examples(_write(tmp_path, ['{"q": 1}']), DatasetFormat.AUTO, tokenizer, 64)


def test_shard_split_is_a_deterministic_partition() -> None:
    slices = [shard_slice(103, i, 4, seed=1) for i in range(4)]
    assert sorted(i for s in slices for i in s) == list(range(103))
    assert [len(s) for s in slices] == [25, 26, 26, 26]
    assert slices == [shard_slice(103, i, 4, seed=1) for i in range(4)]
    assert slices != [shard_slice(103, i, 4, seed=2) for i in range(4)]
    with pytest.raises(PermanentError, match="fewer than the 4 shards"):
        shard_slice(3, 0, 4, seed=1)


def test_batches_are_a_function_of_the_step(tmp_path: Path, tokenizer: Any) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", learnable_records(10))
    examples = load_examples(f"file://{path}", DatasetFormat.AUTO, tokenizer, 64)

    def batches() -> Batches:
        return Batches(examples, micro_batch=3, accumulation=2, seed=5, shard_index=0, pad_id=0)

    a, b = batches(), batches()
    forward = [a.step(s) for s in range(8)]
    assert [b.step(s) for s in (7, 3, 0)] == [forward[7], forward[3], forward[0]]
    # One epoch is 10 examples: steps 0 and 1 (12 examples) cover all of them.
    first_epoch = [e for mb in forward[0] + forward[1] for e in mb][:10]
    assert sorted(map(id, first_epoch)) == sorted(map(id, examples))

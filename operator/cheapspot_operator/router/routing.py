"""The router's decisions, as pure functions: which pods are replicas to send to, which one
gets a request, and how a stream cut mid-way is resumed.

The rest of the router owns the I/O: :mod:`~cheapspot_operator.router.replicas` watches the
pool's pods and counts requests in flight, :mod:`~cheapspot_operator.router.relay` and
:mod:`~cheapspot_operator.router.streams` proxy HTTP, :mod:`~cheapspot_operator.router.server`
serves; everything it decides is here, so it is tested without sockets.

Resuming a stream: the router asks vLLM for the token ids of each streamed chunk
(``return_token_ids``, removed again before the chunk reaches the client). When a replica
dies mid-stream, the rest is asked of another replica as a *completion of token ids*: the
prompt's token ids (vLLM's ``/tokenize`` of the original prompt or chat messages, with the
chat template) followed by every token already sent, with ``max_tokens`` reduced by as many.
Working in tokens, not text, keeps the boundary exact: re-tokenising the text sent so far
can give other tokens (BPE merges across the cut, a multi-byte character split between two
tokens), and then a greedy continuation is no longer the one an undisturbed run produces.
vLLM decodes the continuation's text against the prompt tokens before it, so the text
deltas join up as in one run; the router rewrites the continuation's chunks into the shape
of the original stream (chat deltas, the first stream's id, created time and model name).
"""

from __future__ import annotations

import json
from array import array
from collections import OrderedDict
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from cheapspot.contract import (
    ADMIN_PORT,
    ANNOTATION_DRAINING,
    LABEL_POOL,
    LABEL_POOL_ROLE,
    SERVE_PORT,
)
from cheapspot_operator.router.resumability import CARRIED

COMPLETIONS = "/v1/completions"
CHAT = "/v1/chat/completions"
FORWARDED_POSTS = (COMPLETIONS, CHAT, "/v1/embeddings", "/tokenize", "/detokenize")
"""Client requests the router passes on. vLLM's runtime adapter API (``/v1/load_lora_adapter``,
``/v1/unload_lora_adapter``) and everything else on the replica is never reachable through
the router: adapters are the pool spec's to change."""
FORWARDED_GETS = ("/v1/models",)


@dataclass(frozen=True)
class Replica:
    """A replica pod as the router sees it."""

    name: str
    host: str
    port: int = SERVE_PORT
    ready: bool = False
    draining: bool = False
    admin_port: int | None = None  # the launcher's, for adapter versions; None: unknown

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def admin_url(self) -> str | None:
        return None if self.admin_port is None else f"http://{self.host}:{self.admin_port}"

    @property
    def usable(self) -> bool:
        return self.ready and not self.draining


def pool_selector(pool: str) -> str:
    return f"{LABEL_POOL}={pool},{LABEL_POOL_ROLE}=replica"


def replica_from_pod(
    pod: Mapping[str, Any], port: int = SERVE_PORT, admin_port: int | None = ADMIN_PORT
) -> Replica | None:
    """The replica a pod is, or None if it is not a replica pod with an IP yet.

    Draining: the operator's annotation, or the pod being deleted (``deletionTimestamp``).
    Ready: the pod's ``Ready`` condition (its readiness probe) and phase Running."""
    meta = pod.get("metadata") or {}
    labels = meta.get("labels") or {}
    if labels.get(LABEL_POOL_ROLE) != "replica":
        return None
    status = pod.get("status") or {}
    ip = status.get("podIP")
    if not ip:
        return None
    conditions = status.get("conditions") or []
    ready = status.get("phase") == "Running" and any(
        c.get("type") == "Ready" and c.get("status") == "True" for c in conditions
    )
    draining = bool((meta.get("annotations") or {}).get(ANNOTATION_DRAINING)) or bool(
        meta.get("deletionTimestamp")
    )
    return Replica(str(meta.get("name", "")), str(ip), port, ready, draining, admin_port)


MODELS_REMEMBERED = 256
"""Models remembered per replica, in each of :class:`Load`'s two records (least recently
seen out): a few hundred adapters is more than a pool serves, and a client sending random
model names must not grow the router's memory."""


@dataclass
class Load:
    """What the router knows of each replica's work and adapters.

    ``holds``: per replica, the models (base or adapter names) it has answered a request for
    (a 2xx: the adapter is loaded there). ``lacks``: per replica, the models it answered 404
    for, with when (monotonic seconds); a later success there forgets the 404. Both learned
    only from answers, never from the choice itself (a replica chosen and then failing holds
    nothing), and both bounded (:data:`MODELS_REMEMBERED` per replica, least recently seen
    out). ``chosen``: per replica, the turn it was last chosen on (``turns`` counts them),
    so ties on load go to the replica chosen longest ago."""

    in_flight: dict[str, int] = field(default_factory=dict)
    holds: dict[str, OrderedDict[str, None]] = field(default_factory=dict)
    lacks: dict[str, OrderedDict[str, float]] = field(default_factory=dict)
    chosen: dict[str, int] = field(default_factory=dict)
    turns: int = 0

    def take(self, name: str) -> None:
        """A request sent to ``name``: one more in flight, and its turn noted."""
        self.in_flight[name] = self.in_flight.get(name, 0) + 1
        self.turns += 1
        self.chosen[name] = self.turns

    def answered(self, name: str, model: str, status: int, now: float) -> None:
        """What replica ``name``'s answer to a request for ``model`` says of its adapters: a
        2xx, that it holds the model; a 404 (vLLM's unknown model), that it does not.
        Anything else (5xx, a cut connection, a 400 for the prompt) says nothing."""
        if not model:
            return
        if 200 <= status < 300:
            _remember(self.holds.setdefault(name, OrderedDict()), model, None)
            self.lacks.get(name, OrderedDict()).pop(model, None)
        elif status == 404:
            self.holds.get(name, OrderedDict()).pop(model, None)
            _remember(self.lacks.setdefault(name, OrderedDict()), model, now)

    def lacking(self, model: str, since: float) -> set[str]:
        """Replicas that answered 404 for ``model`` at or after ``since``."""
        return {n for n, seen in self.lacks.items() if seen.get(model, -1.0) >= since}

    def forget(self, keep: Iterable[str]) -> None:
        """Drop what is known of replicas not in ``keep`` (their pods are gone; a new pod of
        the same name is a new vLLM); their requests in flight still count until released."""
        names = set(keep)
        for record in (self.holds, self.lacks, self.chosen):
            for gone in set(record) - names:
                del record[gone]


def _remember(record: OrderedDict[str, Any], model: str, value: Any) -> None:
    record[model] = value
    record.move_to_end(model)
    while len(record) > MODELS_REMEMBERED:
        record.popitem(last=False)


def choose(
    replicas: Iterable[Replica],
    model: str,
    load: Load,
    *,
    capacity: int,
    exclude: Iterable[str] = (),
    lacking: Iterable[str] = (),
    only: Collection[str] | None = None,  # those holding the wanted version (versions.py)
) -> Replica | None:
    """The replica for a request for ``model``: usable (ready, not draining), not in
    ``exclude`` (replicas this request already failed on) and below ``capacity`` requests in
    flight. Among those: the fewest in flight, ties to the one chosen longest ago, so load
    spreads over the pool however few requests are in flight.

    Every replica loads every adapter of the pool spec before it is ready, so where it was
    loaded is no reason to prefer a replica. Only where a usable replica is known to lack the
    model (``lacking``: it answered 404 for it lately, e.g. an adapter added at runtime and
    still loading there) does the adapter decide first: a replica that has answered for it,
    then one not known either way, and a lacking one last (still better than queueing: the
    adapter may have loaded since). None: every replica is busy or none is usable (the
    caller queues)."""
    skip = set(exclude)
    pool = [r for r in replicas if r.usable and (only is None or r.name in only)]
    missing = set(lacking) & {r.name for r in pool}
    best: tuple[int, int, int, str] | None = None
    chosen: Replica | None = None
    for r in pool:
        if r.name in skip:
            continue
        busy = load.in_flight.get(r.name, 0)
        if busy >= capacity:
            continue
        if not missing:
            tier = 0
        elif r.name in missing:
            tier = 2
        else:
            tier = 0 if model in load.holds.get(r.name, {}) else 1
        key = (tier, busy, load.chosen.get(r.name, 0), r.name)
        if best is None or key < best:
            best, chosen = key, r
    return chosen


# -- resuming streams -------------------------------------------------------------------------


def upstream_body(body: Mapping[str, Any]) -> dict[str, Any]:
    """The request sent to a replica: the client's, asking for token ids when it streams
    (what a resume needs); the router strips them from what the client sees."""
    out = dict(body)
    if out.get("stream"):
        out["return_token_ids"] = True
    return out


def tokenize_body(path: str, body: Mapping[str, Any]) -> dict[str, Any] | None:
    """vLLM's ``/tokenize`` request giving the prompt token ids the original request had;
    None if the prompt is already token ids (they are used as they are)."""
    if path == CHAT:
        doc: dict[str, Any] = {
            "model": body.get("model"),
            "messages": body.get("messages") or [],
            "add_generation_prompt": body.get("add_generation_prompt", True),
        }
        for key in ("chat_template", "chat_template_kwargs", "continue_final_message"):
            if key in body:
                doc[key] = body[key]
        return doc
    prompt = body.get("prompt")
    if isinstance(prompt, list):
        return None
    return {
        "model": body.get("model"),
        "prompt": prompt or "",
        "add_special_tokens": body.get("add_special_tokens", True),
    }


def prompt_ids(body: Mapping[str, Any]) -> array[int] | None:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
        return token_ids(prompt)
    return None


def token_ids(ids: Iterable[int]) -> array[int]:
    """Token ids as a stream keeps them: 4 bytes each (a list of ints takes 36)."""
    return array("i", ids)


_KEPT_KEYS = (*CARRIED, "max_tokens", "max_completion_tokens", "stream", "stream_options")
"""What a stream keeps of its request once the prompt's token ids are known: what a
continuation, the text held back (``stop``) and the usage chunk need. The prompt, the
messages and the rest go (a resumed stream's other parameters are at their no-op values,
:mod:`cheapspot_operator.router.resumability`), so a stream holds its prompt once, as token
ids."""


def kept_body(body: Mapping[str, Any]) -> dict[str, Any]:
    return {k: body[k] for k in _KEPT_KEYS if k in body}


def hold_back(body: Mapping[str, Any]) -> int:
    """How many characters of its text vLLM holds back while it streams: with stop strings
    (not included in the output), the last (longest stop - 1) characters, which may turn out
    to begin a stop string. Their tokens' ids are in the chunks already."""
    stop = body.get("stop")
    stops = [stop] if isinstance(stop, str) else stop if isinstance(stop, list) else []
    lengths = [len(s) for s in stops if isinstance(s, str)]
    if not lengths or body.get("include_stop_str_in_output"):
        return 0
    return max(0, max(lengths) - 1)


def resume_point(state: StreamState) -> list[int]:
    """The tokens a continuation starts after: those whose text the client has. Tokens after
    them (text held back) are dropped, to be generated again."""
    del state.sent_ids[state.committed :]
    state.sure = state.committed
    return list(state.sent_ids)


def commit_candidates(state: StreamState) -> range:
    """The counts of sent tokens the client may have the whole text of, most first: from
    ``committed`` down to ``sure``. One count when no chunk merged tokens and no text was
    held back for stop strings."""
    return range(state.committed, state.sure - 1, -1)


def settles_at(state: StreamState, count: int, base: str, decoded: str) -> bool:
    """Whether a continuation may start after the first ``count`` tokens sent, given the
    replica's decoding of the prompt alone (``base``) and of the prompt followed by those
    tokens (``decoded``): their text must be whole (no character cut in two) and all of it
    with the client. If so, ``state`` is set to resume there: ``skip`` is the text the client
    has beyond those tokens, which the continuation generates again and the router drops."""
    if not decoded.startswith(base):
        return False
    text = decoded[len(base) :]
    if text.endswith("\ufffd") or not state.sent_text_starts_with(text):
        return False
    state.committed = state.sure = count
    state.skip = state.text_len - len(text)
    return True


def continuation_body(
    body: Mapping[str, Any], prompt: Sequence[int], sent: Sequence[int]
) -> dict[str, Any]:
    """The completions request that continues an interrupted stream on another replica:
    the prompt's tokens and the tokens already sent, the remaining token budget, the same
    sampling settings. Streamed, with token ids (it may be cut again)."""
    doc: dict[str, Any] = {k: body[k] for k in CARRIED if k in body}
    doc["prompt"] = [*prompt, *sent]
    limit = body.get("max_completion_tokens") or body.get("max_tokens")
    if limit is not None:
        doc["max_tokens"] = max(1, int(limit) - len(sent))
    if body.get("min_tokens"):
        doc["min_tokens"] = max(0, int(body["min_tokens"]) - len(sent))
    doc["stream"] = True
    doc["stream_options"] = {"include_usage": True}
    doc["return_token_ids"] = True
    return doc


TEXT_KEPT = 4096
"""Characters of a stream's text the router keeps (beyond what stop strings hold back): a
resume starts after the tokens whose text the client has whole, at most a few tokens and the
held-back text before the end, so the router checks the replica's decoding of them against
the text's end only, and a long answer costs no memory for its text."""


@dataclass
class StreamState:
    """What has gone to the client of one streamed request so far, kept small: one router
    carries a thousand streams, so token ids are 4-byte arrays, only the end of the text is
    kept, and the request is cut down to what a continuation needs once the prompt's token
    ids are known (:meth:`compact`)."""

    path: str
    body: Mapping[str, Any]
    sent_ids: array[int] = field(default_factory=lambda: array("i"))
    committed: int = 0
    """How many of ``sent_ids`` the client has the text of. vLLM holds back the text of a
    token that ends inside a multi-byte character (its chunk's text is empty) until the next
    token completes it; a continuation must generate such tokens again rather than start
    after them, or their text is lost with the cut."""
    sure: int = 0
    """How many of ``sent_ids`` the client surely has the text of. vLLM puts the tokens of
    several steps in one chunk when its server falls behind; the text of such a chunk may
    hold back its last tokens, so ``committed`` (every token of the last chunk with text) is
    then only an upper bound. The router settles on the true count with the replica's
    detokenizer before it resumes (`Router._settle`)."""
    text: str = ""
    """The end of the answer the client has been sent: its last :data:`TEXT_KEPT`
    characters and those stop strings hold back, at least (up to twice as many)."""
    text_len: int = 0
    """How many characters of the answer the client has been sent, in all."""
    skip: int = 0
    """Characters at the start of the continuation's text that the client already has: it
    starts after the last tokens whose text the client has whole, and the client may have
    part of the text of the tokens after them (text vLLM held back for stop strings, text
    cut inside a token)."""
    prompt_ids: array[int] | None = None
    first: dict[str, Any] | None = None
    """The first chunk sent (its id, created time, model, object: continuations reuse them)."""
    role_sent: bool = False
    finished: bool = False
    done: bool = False
    usage_sent: bool = False

    compacted: bool = False
    """The request is cut down to what a continuation needs (:meth:`compact`)."""

    @property
    def wants_usage(self) -> bool:
        opts = self.body.get("stream_options") or {}
        return bool(opts.get("include_usage"))

    def compact(self) -> bool:
        """Once the stream is under way (a retry before its first chunk sends the request
        again) and the prompt's token ids are known: the request without its prompt or
        messages (a continuation sends the token ids). Whether it is compact now."""
        if not self.compacted and self.prompt_ids is not None and self.first is not None:
            self.body = kept_body(self.body)
            self.compacted = True
        return self.compacted

    def add_text(self, text: str) -> None:
        """``text`` sent to the client: kept at the end of :attr:`text`, which is cut back
        to its last characters when it has grown to twice what is kept."""
        self.text_len += len(text)
        self.text += text
        keep = TEXT_KEPT + hold_back(self.body)
        if len(self.text) > 2 * keep:
            self.text = self.text[-keep:]

    def sent_text_starts_with(self, text: str) -> bool:
        """Whether the answer the client has been sent starts with ``text``, as far as the
        kept end of it shows: a ``text`` that ends before the kept end begins is not
        taken (nothing a resume needs; the caller tries a later point or gives up)."""
        start = self.text_len - len(self.text)
        if len(text) > self.text_len or len(text) < start:
            return False
        return self.text.startswith(text[start:])


def parse_sse(buffer: bytes) -> tuple[list[bytes], bytes]:
    """Complete server-sent events (their ``data:`` payloads) and the unfinished rest."""
    events: list[bytes] = []
    while True:
        cut = buffer.find(b"\n\n")
        if cut < 0:
            return events, buffer
        raw, buffer = buffer[:cut], buffer[cut + 2 :]
        data = [line[5:].lstrip() for line in raw.split(b"\n") if line.startswith(b"data:")]
        if data:
            events.append(b"\n".join(data))


def sse(payload: bytes) -> bytes:
    return b"data: " + payload + b"\n\n"


def _strip_ids(chunk: dict[str, Any]) -> list[int]:
    """Remove the token-id fields the router added; the ids of this chunk's tokens."""
    ids: list[int] = []
    chunk.pop("prompt_token_ids", None)
    chunk.pop("prompt_text", None)
    for choice in chunk.get("choices") or []:
        got = choice.pop("token_ids", None)
        choice.pop("prompt_token_ids", None)
        if isinstance(got, list):
            ids.extend(int(t) for t in got)
    return ids


def closing_events(state: StreamState) -> bytes:
    """The end of a stream whose answer the client already has whole (its finish_reason was
    sent) when the replica was lost before the closing events: the usage chunk if the client
    asked for it and has not had it, then ``[DONE]``. No replica is asked to continue: a
    continuation always generates at least one token, one more than the answer has."""
    out = b""
    if state.wants_usage and not state.usage_sent:
        first = state.first or {}
        prompt_len = len(state.prompt_ids or [])
        chunk: dict[str, Any] = {
            **{k: first.get(k) for k in ("id", "object", "created", "model")},
            "choices": [],
            "usage": {
                "prompt_tokens": prompt_len,
                "completion_tokens": len(state.sent_ids),
                "total_tokens": prompt_len + len(state.sent_ids),
            },
        }
        out += sse(json.dumps(chunk, separators=(",", ":")).encode())
        state.usage_sent = True
    state.done = True
    return out + sse(b"[DONE]")


def relay_chunk(state: StreamState, payload: bytes, *, resumed: bool) -> bytes | None:
    """One upstream event turned into what the client gets (None: nothing to send).

    From the first replica, chunks pass through with the router's token-id fields removed.
    From a continuation (a completions stream), the text becomes a chunk of the original
    kind (a chat ``delta`` or a completion ``text``) with the original id, created time and
    model; usage counts the original prompt and every token generated."""
    if payload.strip() == b"[DONE]":
        state.done = True
        return sse(b"[DONE]")
    chunk = json.loads(payload)
    if "error" in chunk and "choices" not in chunk:
        return sse(payload)
    if state.prompt_ids is None and isinstance(chunk.get("prompt_token_ids"), list):
        state.prompt_ids = token_ids(chunk["prompt_token_ids"])
    for choice in chunk.get("choices") or []:
        if state.prompt_ids is None and isinstance(choice.get("prompt_token_ids"), list):
            state.prompt_ids = token_ids(choice["prompt_token_ids"])
    before = len(state.sent_ids)
    ids = _strip_ids(chunk)
    state.sent_ids.extend(ids)
    text = "".join(
        c.get("text") or (c.get("delta") or {}).get("content") or ""
        for c in chunk.get("choices") or []
    )
    if text:
        state.committed = len(state.sent_ids)
        if hold_back(state.body):
            # The text lags the tokens by up to the hold-back: none is surely whole.
            state.sure = 0
        else:
            # Text at all means the chunk's first token is whole (a held-back token's text
            # comes out with the token that completes it); its later ones may be held back.
            state.sure = before + 1 if len(ids) > 1 else state.committed
    if resumed and state.skip:
        # A continuation starts with text the client already has: drop it.
        for choice in chunk.get("choices") or []:
            got = choice.get("text") or ""
            drop = min(state.skip, len(got))
            choice["text"] = got[drop:]
            state.skip -= drop
        text = "".join(c.get("text") or "" for c in chunk.get("choices") or [])
    state.add_text(text)
    usage = chunk.get("usage")
    if not resumed:
        if state.first is None:
            state.first = {k: chunk.get(k) for k in ("id", "object", "created", "model")}
        for choice in chunk.get("choices") or []:
            if (choice.get("delta") or {}).get("role"):
                state.role_sent = True
            if choice.get("finish_reason"):
                state.finished = True
        if usage:
            state.usage_sent = True
        return sse(json.dumps(chunk, separators=(",", ":")).encode())
    first = state.first or {}
    out: dict[str, Any] = {
        "id": first.get("id") or chunk.get("id"),
        "object": first.get("object") or chunk.get("object"),
        "created": first.get("created") or chunk.get("created"),
        "model": first.get("model") or chunk.get("model"),
    }
    choices = []
    for choice in chunk.get("choices") or []:
        text = choice.get("text") or ""
        reason = choice.get("finish_reason")
        if reason:
            state.finished = True
        if state.path == CHAT:
            delta: dict[str, Any] = {"content": text} if text or not reason else {}
            if not state.role_sent:
                delta = {"role": "assistant", **delta}
                state.role_sent = True
            choices.append({"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason})
        else:
            choices.append({"index": 0, "text": text, "logprobs": None, "finish_reason": reason})
    out["choices"] = choices
    if usage:
        if not state.wants_usage or state.usage_sent:
            if not choices:
                return None
        else:
            prompt_len = len(state.prompt_ids or [])
            out["usage"] = {
                "prompt_tokens": prompt_len,
                "completion_tokens": len(state.sent_ids),
                "total_tokens": prompt_len + len(state.sent_ids),
            }
            state.usage_sent = True
    elif not choices:
        return None
    if state.wants_usage and "usage" not in out:
        out["usage"] = None
    return sse(json.dumps(out, separators=(",", ":")).encode())

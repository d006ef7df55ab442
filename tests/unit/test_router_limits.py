"""The router's memory bounds as pure decisions (router/limits.py), and what a stream keeps
(routing.StreamState): bounded however long the answer. Through the real router's HTTP
server: tests/unit/test_router_relay.py."""

from __future__ import annotations

import json
import sys
from typing import Any

import pytest

from cheapspot_operator.api.inferencepool import RouterSpec
from cheapspot_operator.router import limits, routing
from cheapspot_operator.router.routing import StreamState


def test_the_pool_spec_and_the_router_share_their_defaults() -> None:
    spec = RouterSpec()
    assert limits.Limits() == limits.Limits(
        spec.max_request_bytes,
        spec.max_concurrent_requests,
        spec.max_queued_requests,
        spec.max_buffered_bytes,
    )


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ({"max_request_bytes": 0}, "max_request_bytes"),
        ({"max_concurrent_requests": 0}, "max_concurrent_requests"),
        ({"max_queued_requests": -1}, "max_queued_requests"),
        ({"max_request_bytes": 4096, "max_buffered_bytes": 1024}, "max_buffered_bytes"),
    ],
)
def test_bad_limits_name_their_field(fields: dict[str, int], named: str) -> None:
    with pytest.raises(ValueError, match=named):
        limits.Limits(**fields)


def test_each_bound_refuses_past_it_with_its_status_and_setting() -> None:
    lim = limits.Limits(
        max_request_bytes=100,
        max_concurrent_requests=2,
        max_queued_requests=1,
        max_buffered_bytes=250,
    )
    assert limits.too_large(lim, 100) is None
    big = limits.too_large(lim, 101)
    assert big is not None and big.status == 413
    assert "101 bytes" in big.message and "at most 100" in big.message
    assert "router.maxRequestBytes" in big.message
    assert big.error()["error"]["type"] == "invalid_request_error"
    assert limits.body_too_large(lim).status == 413

    assert limits.busy(lim, 2) is None
    over = limits.busy(lim, 3)
    assert over is not None and over.status == 429
    assert over.headers() == {"Retry-After": str(limits.RETRY_AFTER_SECONDS)}
    assert "router.maxConcurrentRequests" in over.message

    assert limits.queue_full(lim, 0) is None
    full = limits.queue_full(lim, 1)
    assert full is not None and full.status == 503 and "router.maxQueuedRequests" in full.message
    assert "Retry-After" in full.headers()
    # no queue at all: a request either finds a free replica or is refused
    assert limits.queue_full(limits.Limits(max_queued_requests=0), 0) is not None

    assert limits.buffer_full(lim, 150, 100) is None
    held = limits.buffer_full(lim, 151, 100)
    assert held is not None and held.status == 503 and "router.maxBufferedBytes" in held.message


def test_body_holds_are_counted_resized_and_released_once() -> None:
    buffered = limits.Buffered(limits.Limits(max_request_bytes=100, max_buffered_bytes=250))
    a = buffered.take(100)  # a reservation for a body of unknown length
    b = buffered.take(100)
    assert isinstance(a, limits.Hold) and isinstance(b, limits.Hold)
    refused = buffered.take(100)
    assert isinstance(refused, limits.Overload) and refused.status == 503
    a.resize(20)  # the body read was smaller
    assert buffered.held == 120
    c = buffered.take(100)
    assert isinstance(c, limits.Hold) and buffered.held == 220
    for hold in (a, a, b, c):  # released twice: counted once
        hold.release()
    assert buffered.held == 0


def _chunk(**fields: Any) -> bytes:
    return json.dumps(fields).encode()


def test_a_long_stream_keeps_4_bytes_a_token_and_the_end_of_its_text() -> None:
    """A stream of 20,000 tokens: its token ids in an array of 4 bytes each, its text cut to
    the end a resume needs, its request cut to what a continuation needs once the prompt's
    token ids came (the prompt's messages gone); a resume still starts at the right point."""
    body = {
        "model": "qa",
        "messages": [{"role": "user", "content": "x" * 100_000}],
        "stream": True,
        "max_tokens": 30_000,
        "temperature": 0,
        "stop": ["STOP"],
    }
    state = StreamState(routing.CHAT, body)
    assert not state.compact()  # no prompt token ids yet: a resume would need the messages
    routing.relay_chunk(
        state,
        _chunk(
            id="c",
            prompt_token_ids=list(range(50_000)),
            choices=[
                {"index": 0, "delta": {"role": "assistant", "content": "w0 "}, "token_ids": [0]}
            ],
        ),
        resumed=False,
    )
    assert state.compact()
    assert "messages" not in state.body
    assert {k: state.body[k] for k in ("max_tokens", "temperature", "stop", "stream")} == {
        "max_tokens": 30_000,
        "temperature": 0,
        "stop": ["STOP"],
        "stream": True,
    }
    sent = "w0 "
    for i in range(1, 20_000):
        piece = f"w{i} "
        sent += piece
        routing.relay_chunk(
            state,
            _chunk(id="c", choices=[{"index": 0, "delta": {"content": piece}, "token_ids": [i]}]),
            resumed=False,
        )
    assert list(state.sent_ids) == list(range(20_000))
    assert state.sent_ids.itemsize == 4 and state.prompt_ids is not None
    assert state.prompt_ids.itemsize == 4 and len(state.prompt_ids) == 50_000
    assert sys.getsizeof(state.sent_ids) < 20_000 * 4 * 1.2
    assert state.text_len == len(sent) > 100_000
    keep = routing.TEXT_KEPT + routing.hold_back(state.body)
    assert keep <= len(state.text) <= 2 * keep and sent.endswith(state.text)
    # stop strings hold text back: a resume settles on the replica's decoding near the end
    base = "P"
    assert not routing.settles_at(state, 20_000, base, base + sent + "w20000 ")
    assert routing.settles_at(state, 19_999, base, base + sent[: -len("w19999 ")])
    assert state.skip == len("w19999 ")
    # a decoding that ends before the kept text begins cannot be checked: not taken
    assert not routing.settles_at(state, 10, base, base + sent[:30])


def test_a_request_is_kept_whole_until_its_stream_is_under_way() -> None:
    """A prompt of token ids is known from the start, but until a chunk has reached the
    client a failure is retried with the request itself: it is cut down only then."""
    body = {"model": "qa", "prompt": list(range(1000)), "stream": True, "max_tokens": 5}
    state = StreamState(routing.COMPLETIONS, body, prompt_ids=routing.prompt_ids(body))
    assert not state.compact()
    error = {"error": {"message": "engine busy", "type": "server_error", "code": 503}}
    routing.relay_chunk(state, json.dumps(error).encode(), resumed=False)
    assert not state.compact() and routing.upstream_body(state.body)["prompt"] == body["prompt"]
    routing.relay_chunk(
        state, _chunk(id="c", choices=[{"index": 0, "text": "a", "token_ids": [7]}]), resumed=False
    )
    assert state.compact() and "prompt" not in state.body
    assert state.prompt_ids is not None and list(state.prompt_ids) == list(range(1000))
    doc = routing.continuation_body(state.body, state.prompt_ids, [7, 8])
    assert doc["prompt"] == [*range(1000), 7, 8] and doc["max_tokens"] == 3
    json.dumps(doc)  # the continuation is plain JSON

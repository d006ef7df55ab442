"""The router's memory bounds, as pure decisions: how large a request body may be, how many
requests one router carries at once, how many may wait for a replica, and how many bytes of
request bodies it holds whole. Past a bound the request is refused at once, in OpenAI's
error format, rather than held: 413 for a body over the size limit (the client must send
less), 429 when the router carries its most requests (TGI's "model is overloaded"), 503
when the queue or the body budget is full (OpenAI's "engine overloaded"), the last two with
``Retry-After``.

Why these defaults fit a router pod's 256Mi (its memory request and limit): the process idles
at 58 MiB RSS (Python, aiohttp, the Kubernetes client). A stream in flight costs about
35 KiB once open (its two connections, client and replica, and its compacted request) and
its resume state as it runs (:class:`~cheapspot_operator.router.routing.StreamState`): 4
bytes a token of prompt and answer (``array('i')``) and at most 8 KiB of text; for an 8k
context, about 75 KiB, so 1,024 streams take about 75 MiB. Request bodies held whole (while
they wait for a replica, and for the whole of a request that is not a resumable stream,
which may be retried) are bounded by :data:`MAX_BUFFERED_BYTES` (32 MiB; their parsed form
about as much again while they are read): 58 + 75 + 64 = 197 MiB, with room for the
allocator's slack. Measured: 1,000 streams of 4,096 tokens peak at 121 MiB
(``benchmarks/serving_router_memory.py``, docs/benchmarks.md).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from cheapspot_operator.router.validation import Refusal

MAX_REQUEST_BYTES = 2 * 1024 * 1024
"""A request body's limit (nginx's default is 1 MiB): a 128k-token prompt as text is about
512 KiB, as token ids about 800 KiB."""
MAX_CONCURRENT_REQUESTS = 1024
"""Client requests one router carries at once, streams until their last byte."""
MAX_QUEUED_REQUESTS = 256
"""Requests waiting for a free replica (every replica at its capacity, or none ready)."""
MAX_BUFFERED_BYTES = 32 * 1024 * 1024
"""Bytes of request bodies the router holds whole at once."""
RETRY_AFTER_SECONDS = 2
"""The ``Retry-After`` of a refusal for load: about a short request's time, so a client that
waits it (OpenAI's client does) finds room as requests end."""


@dataclass(frozen=True)
class Limits:
    """The bounds of one router (``router.*`` of the pool's spec, the router's flags)."""

    max_request_bytes: int = MAX_REQUEST_BYTES
    max_concurrent_requests: int = MAX_CONCURRENT_REQUESTS
    max_queued_requests: int = MAX_QUEUED_REQUESTS
    max_buffered_bytes: int = MAX_BUFFERED_BYTES

    def __post_init__(self) -> None:
        for name in (
            "max_request_bytes",
            "max_concurrent_requests",
            "max_buffered_bytes",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, not {getattr(self, name)}")
        if self.max_queued_requests < 0:
            raise ValueError(
                f"max_queued_requests must be at least 0, not {self.max_queued_requests}"
            )
        if self.max_buffered_bytes < self.max_request_bytes:
            raise ValueError(
                f"max_buffered_bytes ({self.max_buffered_bytes}) must be at least "
                f"max_request_bytes ({self.max_request_bytes}): a body of the largest size "
                "allowed could never be taken"
            )


@dataclass(frozen=True)
class Overload(Refusal):
    """A refusal for load: the client may send the same request again after ``retry_after``
    seconds."""

    retry_after: int = RETRY_AFTER_SECONDS

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after)}

    def body(self) -> bytes:
        return json.dumps(self.error()).encode()


def too_large(limits: Limits, size: int) -> Refusal | None:
    """A body of ``size`` bytes (its Content-Length) over the limit: 413."""
    return body_too_large(limits, size) if size > limits.max_request_bytes else None


def body_too_large(limits: Limits, size: int | None = None) -> Refusal:
    """The 413 for a body over the limit (``size`` None: read past it, its size unknown),
    naming the limit and the setting."""
    what = "larger than" if size is None else f"{size} bytes, more than"
    return Refusal(
        413,
        f"the request body is {what} this endpoint takes: at most "
        f"{limits.max_request_bytes} bytes (router.maxRequestBytes)",
    )


def busy(limits: Limits, active: int) -> Overload | None:
    """``active`` client requests carried, this one counted: 429 past the most."""
    if active <= limits.max_concurrent_requests:
        return None
    return Overload(
        429,
        f"this endpoint is carrying its most requests at once "
        f"({limits.max_concurrent_requests}, router.maxConcurrentRequests): retry shortly",
    )


def queue_full(limits: Limits, waiting: int) -> Overload | None:
    """A request that found no free replica, with ``waiting`` others already waiting: 503
    when the queue is full."""
    if waiting < limits.max_queued_requests:
        return None
    return Overload(
        503,
        f"every replica is busy and {waiting} requests are already waiting "
        f"(router.maxQueuedRequests {limits.max_queued_requests}): retry shortly",
    )


def buffer_full(limits: Limits, held: int, size: int) -> Overload | None:
    """A body of ``size`` bytes when ``held`` bytes of bodies are held: 503 past the budget."""
    if held + size <= limits.max_buffered_bytes:
        return None
    return Overload(
        503,
        f"this endpoint holds {held} bytes of request bodies and takes at most "
        f"{limits.max_buffered_bytes} (router.maxBufferedBytes): retry shortly",
    )


class Buffered:
    """The bytes of request bodies held whole, by the requests that hold them."""

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.held = 0

    def take(self, size: int) -> Hold | Overload:
        """Room for a body of ``size`` bytes, or the refusal when there is none."""
        refusal = buffer_full(self.limits, self.held, size)
        if refusal is not None:
            return refusal
        self.held += size
        return Hold(self, size)


class Hold:
    """One request's share of :class:`Buffered`: resized once its body's size is known,
    released (once) when the body is no longer held whole."""

    def __init__(self, buffered: Buffered, size: int) -> None:
        self._buffered = buffered
        self.size = size

    def resize(self, size: int) -> None:
        self._buffered.held += size - self.size
        self.size = size

    def release(self) -> None:
        self.resize(0)

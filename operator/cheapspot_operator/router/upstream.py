"""The router's HTTP side of the pool's replicas: one client session, the bounds a replica
must answer within, and what a failed request says of its replica (cooled down a moment, or
stalled and probed until it answers again). :mod:`~cheapspot_operator.router.relay` and
:mod:`~cheapspot_operator.router.streams` send requests through it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web

from cheapspot_operator.router import limits, routing, validation
from cheapspot_operator.router.replicas import ReplicaSet
from cheapspot_operator.router.routing import Replica

log = logging.getLogger("cheapspot.router")

RETRIES = 4
"""Replicas one request is tried on (first bytes failing, or a stream cut) before it fails."""
HOP_HEADERS = {"content-length", "transfer-encoding", "connection", "keep-alive", "host"}
NO_REPLICA = "no replica of this pool became ready within maxQueueSeconds"
FIRST_TOKEN_SECONDS = 60.0
"""How long a replica may take to send a stream's headers and first chunk (a continuation's
too) before the router counts it stalled. The router keeps at most ``--capacity`` (the
pool's maxNumSeqs) requests in flight on a replica, so the wait is a prefill, not a queue:
a long prompt, or a resume's prompt plus the answer so far, on a busy GPU takes seconds."""
STALL_SECONDS = 20.0
"""How long a replica may go silent between two chunks of a stream. A healthy one sends a
chunk every decode step (tens of milliseconds); its longest pauses are other requests'
prefills and a preempted request recomputed, seconds. A false alarm costs a resume (the
same answer under greedy decoding) and a health check; a missing one holds the client."""
PROBE_SECONDS = 1.0
"""How often a stalled replica's health is asked until it answers again."""


class Upstream(Exception):  # noqa: N818 (a replica's failure, handled by trying another)
    """The replica failed the request; ``status`` is its answer, 0 when there was none."""

    def __init__(self, message: str, status: int = 0) -> None:
        super().__init__(message)
        self.status = status


class Stalled(Upstream):
    """The replica sent nothing within the bound: frozen, its node gone silent, its engine
    hung. Handled as a cut, and the replica gets no request until it answers again."""


class ClientGone(Exception):  # noqa: N818
    """The client closed its connection: nothing more to send, nothing to retry."""


async def write(response: web.StreamResponse, data: bytes) -> None:
    try:
        await response.write(data)
    except (ConnectionResetError, aiohttp.ClientError, RuntimeError) as exc:
        raise ClientGone(str(exc)) from exc


def passed_headers(resp: aiohttp.ClientResponse) -> dict[str, str]:
    """The replica's response headers the client gets (not the hop-by-hop ones)."""
    return {k: v for k, v in resp.headers.items() if k.lower() not in HOP_HEADERS}


def error_event(message: str) -> bytes:
    """A stream's end when it fails part-way: the error as an event, then ``[DONE]``, as
    vLLM ends a stream whose generation failed (OpenAI's client raises the error), never an
    end that looks like a whole answer."""
    doc = validation.openai_error(message, 503)
    return routing.sse(json.dumps(doc).encode()) + routing.sse(b"[DONE]")


async def pieces(
    resp: aiohttp.ClientResponse, first: float, between: float
) -> AsyncIterator[bytes]:
    """A streamed response's body as it comes, each piece waited for at most ``first``
    seconds (the first) or ``between`` (the next ones); :class:`Stalled` past that."""
    wait = first
    while True:
        try:
            piece = await asyncio.wait_for(resp.content.readany(), wait)
        except TimeoutError as exc:
            raise Stalled(f"nothing sent for {wait:g}s") from exc
        if not piece:
            return
        yield piece
        wait = between


def refused(refusal: validation.Refusal) -> web.Response:
    """A request the router refuses itself, in OpenAI's error format; one refused for load
    says when to try again (``Retry-After``)."""
    headers = refusal.headers() if isinstance(refusal, limits.Overload) else None
    return web.json_response(refusal.error(), status=refusal.status, headers=headers)


def error(message: str, status: int) -> web.Response:
    kind = "invalid_request_error" if status < 500 else "server_error"
    return web.json_response(validation.openai_error(message, status, kind), status=status)


class ReplicaClient:
    """The session requests to the replicas go through, the bounds they are sent under, the
    router's counters, and the health checks of replicas that stalled."""

    def __init__(
        self,
        replicas: ReplicaSet,
        *,
        max_queue_seconds: float = 30.0,
        first_token_seconds: float = FIRST_TOKEN_SECONDS,
        stall_seconds: float = STALL_SECONDS,
    ) -> None:
        self.replicas = replicas
        self.max_queue_seconds = max_queue_seconds
        self.first_token_seconds = first_token_seconds
        self.stall_seconds = stall_seconds
        self.stats = {
            "requests": 0,
            "refused": 0,
            "retries": 0,
            "resumes": 0,
            "stalls": 0,
            "failed": 0,
            "overloaded": 0,
        }
        self._session: aiohttp.ClientSession | None = None
        self._probes: dict[str, asyncio.Task[None]] = {}
        self._poller: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=None, connect=3, sock_connect=3),
            connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=30),
            auto_decompress=False,
        )
        self._poller = asyncio.ensure_future(self.replicas.poll_versions(self._session))

    async def close(self) -> None:
        for task in [*self._probes.values(), *([self._poller] if self._poller else [])]:
            task.cancel()
        if self._session is not None:
            await self._session.close()

    @property
    def bounded(self) -> aiohttp.ClientTimeout:
        """A request's timeout where the replica must answer (headers, a read) within the
        first-token bound; not for plain completions, silent until they are whole."""
        return aiohttp.ClientTimeout(
            total=None, connect=3, sock_connect=3, sock_read=self.first_token_seconds
        )

    def failed(self, replica: Replica, exc: BaseException) -> None:
        """After a replica failed a request: a stalled one gets nothing until it answers its
        health check again; any other cools down a moment."""
        self.replicas.cool(replica.name)
        if not isinstance(exc, TimeoutError | Stalled):
            return
        self.stats["stalls"] += 1
        if replica.name not in self._probes:
            log.warning("replica %s stalled (%s): no requests until it answers", replica.name, exc)
            self.replicas.stalled.add(replica.name)
            self._probes[replica.name] = asyncio.ensure_future(self._probe(replica))

    async def _probe(self, replica: Replica) -> None:
        try:
            while replica.name in self.replicas.by_name:
                await asyncio.sleep(PROBE_SECONDS)
                with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                    timeout = aiohttp.ClientTimeout(total=2)
                    async with self.session.get(replica.url + "/health", timeout=timeout) as r:
                        if r.status == 200:
                            log.info("replica %s answers again", replica.name)
                            break
        finally:
            self._probes.pop(replica.name, None)
            await self.replicas.recovered(replica.name)

    @property
    def session(self) -> aiohttp.ClientSession:
        assert self._session is not None, "router app not started"
        return self._session

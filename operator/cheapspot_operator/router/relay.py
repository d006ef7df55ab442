"""Relaying one client request to the pool's replicas.

A request that fails before its first byte reaches the client is retried on another replica.
A resumable stream (:func:`cheapspot_operator.router.routing.resumable`) cut mid-way is
continued on another replica from the tokens already sent
(:mod:`cheapspot_operator.router.streams`). The session, the bounds and the replicas' health
are :class:`~cheapspot_operator.router.upstream.ReplicaClient`'s.
"""

from __future__ import annotations

import contextlib
import logging
import time

import aiohttp
from aiohttp import web

from cheapspot_operator.router import routing, streams
from cheapspot_operator.router.limits import Hold
from cheapspot_operator.router.replicas import QueueFull, ReplicaSet
from cheapspot_operator.router.routing import StreamState
from cheapspot_operator.router.upstream import (
    FIRST_TOKEN_SECONDS,
    NO_REPLICA,
    RETRIES,
    STALL_SECONDS,
    ClientGone,
    ReplicaClient,
    Upstream,
    error,
    error_event,
    passed_headers,
    pieces,
    refused,
    write,
)

log = logging.getLogger("cheapspot.router")


class Relay:
    """The router's request handlers: a request sent on and retried (:meth:`get`,
    :meth:`once`), or a resumable stream (:meth:`stream`)."""

    def __init__(
        self,
        replicas: ReplicaSet,
        *,
        max_queue_seconds: float = 30.0,
        first_token_seconds: float = FIRST_TOKEN_SECONDS,
        stall_seconds: float = STALL_SECONDS,
    ) -> None:
        self.replicas = replicas
        self.client = ReplicaClient(
            replicas,
            max_queue_seconds=max_queue_seconds,
            first_token_seconds=first_token_seconds,
            stall_seconds=stall_seconds,
        )

    @property
    def stats(self) -> dict[str, int]:
        return self.client.stats

    async def start(self) -> None:
        await self.client.start()

    async def close(self) -> None:
        await self.client.close()

    async def get(self, request: web.Request) -> web.Response:
        deadline = time.monotonic() + self.client.max_queue_seconds
        tried: set[str] = set()
        for attempt in range(RETRIES):
            try:
                replica = await self.replicas.acquire("", tried, deadline, queue=attempt == 0)
            except QueueFull as full:
                self.client.stats["overloaded"] += 1
                return refused(full.refusal)
            if replica is None:
                break
            try:
                async with self.client.session.get(
                    replica.url + request.path, timeout=self.client.bounded
                ) as resp:
                    data = await resp.read()
                    return web.Response(
                        body=data, status=resp.status, content_type=resp.content_type
                    )
            except (aiohttp.ClientError, TimeoutError) as exc:
                self.client.failed(replica, exc)
                tried.add(replica.name)
                deadline = time.monotonic() + self.client.max_queue_seconds
            finally:
                await self.replicas.release(replica.name)
        return error("no replica of this pool is ready", 503)

    async def once(
        self, request: web.Request, raw: bytes, model: str, *, streamed: bool
    ) -> web.StreamResponse:
        """Non-resumable requests: retried on another replica while nothing has reached the
        client; a plain (non-streamed) answer reaches the client only when it is complete.
        A stream cut part-way ends with an error event (:func:`error_event`). The body is
        sent as the client sent it (``raw``), held until the answer is whole for a retry.
        May raise :class:`~cheapspot_operator.router.replicas.QueueFull` before any byte."""
        deadline = time.monotonic() + self.client.max_queue_seconds
        tried: set[str] = set()
        last = NO_REPLICA
        for attempt in range(RETRIES):
            replica = await self.replicas.acquire(model, tried, deadline, queue=attempt == 0)
            if replica is None:
                break
            response: web.StreamResponse | None = None
            try:
                async with self.client.session.post(
                    replica.url + request.path,
                    data=raw,
                    headers={"Content-Type": "application/json"},
                    # A plain completion is silent until whole: only a stream has a bound.
                    timeout=self.client.bounded if streamed else self.client.session.timeout,
                ) as resp:
                    self.replicas.answered(replica.name, model, resp.status)
                    if resp.status >= 500:
                        raise Upstream(f"{replica.name} answered {resp.status}", resp.status)
                    if not streamed or resp.status != 200:
                        data = await resp.read()
                        return web.Response(
                            body=data, status=resp.status, content_type=resp.content_type
                        )
                    response = web.StreamResponse(status=resp.status, headers=passed_headers(resp))
                    await response.prepare(request)
                    # Whole events only, so that an error event after a cut is not glued
                    # to half of one.
                    buffer = b""
                    async for piece in pieces(
                        resp, self.client.first_token_seconds, self.client.stall_seconds
                    ):
                        events, buffer = routing.parse_sse(buffer + piece)
                        if events:
                            await write(response, b"".join(routing.sse(e) for e in events))
                    if buffer.strip():
                        raise Upstream(f"{replica.name} ended the stream inside an event")
                    await response.write_eof()
                    return response
            except ClientGone:
                assert response is not None
                return response
            except (aiohttp.ClientError, TimeoutError, Upstream) as exc:
                last = f"replica {replica.name} failed: {exc}"
                self.client.failed(replica, exc)
                if response is not None:
                    # Bytes already went out and this stream cannot be resumed: the client
                    # is told it failed, not left with what looks like a whole answer.
                    self.client.stats["failed"] += 1
                    log.warning("unresumable stream cut: %s", last)
                    with contextlib.suppress(ClientGone):
                        await write(response, error_event(last))
                        await response.write_eof()
                    return response
                tried.add(replica.name)
                # A retry waits for a replica up to maxQueueSeconds from the failure.
                deadline = time.monotonic() + self.client.max_queue_seconds
                if attempt + 1 < RETRIES:
                    self.client.stats["retries"] += 1
            finally:
                await self.replicas.release(replica.name)
        self.client.stats["failed"] += 1
        return error(last, 503)

    async def stream(
        self, request: web.Request, state: StreamState, model: str, hold: Hold
    ) -> web.StreamResponse:
        """A resumable stream: :func:`cheapspot_operator.router.streams.relay_stream`."""
        return await streams.relay_stream(self.client, request, state, model, hold)

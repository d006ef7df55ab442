"""Relaying one client request to the pool's replicas.

A request that fails before its first byte reaches the client is retried on another replica.
A resumable stream (:func:`cheapspot_operator.router.routing.resumable`) cut mid-way is
continued on another replica from the tokens already sent; the decisions for that are in
:mod:`cheapspot_operator.router.routing`, the calls to the replicas here.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
from aiohttp import web

from cheapspot_operator.router import routing, validation
from cheapspot_operator.router.replicas import ReplicaSet
from cheapspot_operator.router.routing import Replica, StreamState

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


def error(message: str, status: int) -> web.Response:
    kind = "invalid_request_error" if status < 500 else "server_error"
    return web.json_response(validation.openai_error(message, status, kind), status=status)


class Relay:
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
        }
        self._session: aiohttp.ClientSession | None = None
        self._probes: dict[str, asyncio.Task[None]] = {}

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=None, connect=3, sock_connect=3),
            connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=30),
            auto_decompress=False,
        )

    async def close(self) -> None:
        for task in self._probes.values():
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

    async def get(self, request: web.Request) -> web.Response:
        deadline = time.monotonic() + self.max_queue_seconds
        tried: set[str] = set()
        for _ in range(RETRIES):
            replica = await self.replicas.acquire("", tried, deadline)
            if replica is None:
                break
            try:
                async with self.session.get(
                    replica.url + request.path, timeout=self.bounded
                ) as resp:
                    data = await resp.read()
                    return web.Response(
                        body=data, status=resp.status, content_type=resp.content_type
                    )
            except (aiohttp.ClientError, TimeoutError) as exc:
                self.failed(replica, exc)
                tried.add(replica.name)
                deadline = time.monotonic() + self.max_queue_seconds
            finally:
                await self.replicas.release(replica.name)
        return error("no replica of this pool is ready", 503)

    async def once(
        self, request: web.Request, raw: bytes, body: dict[str, Any], model: str
    ) -> web.StreamResponse:
        """Non-resumable requests: retried on another replica while nothing has reached the
        client; a plain (non-streamed) answer reaches the client only when it is complete.
        A stream cut part-way ends with an error event (:func:`error_event`)."""
        deadline = time.monotonic() + self.max_queue_seconds
        streamed = bool(body.get("stream"))
        tried: set[str] = set()
        last = NO_REPLICA
        for attempt in range(RETRIES):
            replica = await self.replicas.acquire(model, tried, deadline)
            if replica is None:
                break
            response: web.StreamResponse | None = None
            try:
                async with self.session.post(
                    replica.url + request.path,
                    data=raw,
                    headers={"Content-Type": "application/json"},
                    # A plain completion is silent until whole: only a stream has a bound.
                    timeout=self.bounded if streamed else self.session.timeout,
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
                    async for piece in pieces(resp, self.first_token_seconds, self.stall_seconds):
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
                self.failed(replica, exc)
                if response is not None:
                    # Bytes already went out and this stream cannot be resumed: the client
                    # is told it failed, not left with what looks like a whole answer.
                    self.stats["failed"] += 1
                    log.warning("unresumable stream cut: %s", last)
                    with contextlib.suppress(ClientGone):
                        await write(response, error_event(last))
                        await response.write_eof()
                    return response
                tried.add(replica.name)
                # A retry waits for a replica up to maxQueueSeconds from the failure.
                deadline = time.monotonic() + self.max_queue_seconds
                if attempt + 1 < RETRIES:
                    self.stats["retries"] += 1
            finally:
                await self.replicas.release(replica.name)
        self.stats["failed"] += 1
        return error(last, 503)

    async def stream(
        self, request: web.Request, body: dict[str, Any], model: str
    ) -> web.StreamResponse:
        """A resumable stream: token ids tracked, continued elsewhere when cut."""
        deadline = time.monotonic() + self.max_queue_seconds
        state = StreamState(request.path, body, prompt_ids=routing.prompt_ids(body))
        tried: set[str] = set()
        response: web.StreamResponse | None = None
        last = NO_REPLICA
        for attempt in range(RETRIES):
            replica = await self.replicas.acquire(model, tried, deadline)
            if replica is None:
                break
            resumed = state.first is not None
            try:
                if resumed:
                    if state.prompt_ids is None:
                        state.prompt_ids = await tokenize(self, replica, request.path, body)
                    if state.sure < state.committed:
                        await settle(self, replica, state)
                    path = routing.COMPLETIONS
                    doc = routing.continuation_body(
                        body, state.prompt_ids, routing.resume_point(state)
                    )
                else:
                    path, doc = request.path, routing.upstream_body(body)
                async with self.session.post(
                    replica.url + path, json=doc, timeout=self.bounded
                ) as resp:
                    self.replicas.answered(replica.name, model, resp.status)
                    if resp.status >= 500:
                        raise Upstream(f"{replica.name} answered {resp.status}", resp.status)
                    if resp.status != 200:
                        data = await resp.read()
                        if response is None:
                            return web.Response(
                                body=data, status=resp.status, content_type=resp.content_type
                            )
                        raise Upstream(f"{replica.name} refused the continuation: {data[:300]!r}")
                    if response is None:
                        response = web.StreamResponse(status=200, headers=passed_headers(resp))
                        await response.prepare(request)
                    await relay_events(
                        pieces(resp, self.first_token_seconds, self.stall_seconds),
                        response,
                        state,
                        resumed=resumed,
                    )
                if state.done:
                    await response.write_eof()
                    return response
                raise Upstream(f"{replica.name} ended the stream early")
            except ClientGone:
                assert response is not None
                return response
            except (aiohttp.ClientError, TimeoutError, Upstream) as exc:
                last = f"replica {replica.name} failed: {exc}"
                self.failed(replica, exc)
                tried.add(replica.name)
                # The next replica is waited for up to maxQueueSeconds from the cut (or the
                # failure): a long stream cut while the survivors are full queues like a
                # new request instead of failing on a deadline set when it began.
                deadline = time.monotonic() + self.max_queue_seconds
                if response is not None and state.finished:
                    # The answer is whole (its finish_reason sent): only the closing events
                    # were lost. A continuation would add a token, so the router ends it.
                    log.info("a stream cut after its last token, closed here: %s", last)
                    with contextlib.suppress(ClientGone):
                        await write(response, routing.closing_events(state))
                        await response.write_eof()
                    return response
                if attempt + 1 < RETRIES:
                    if response is not None:
                        self.stats["resumes"] += 1
                        log.info("resuming a stream after %d tokens: %s", len(state.sent_ids), last)
                    else:
                        self.stats["retries"] += 1
            finally:
                await self.replicas.release(replica.name)
        self.stats["failed"] += 1
        if response is None:
            return error(last, 503)
        with contextlib.suppress(ClientGone):
            await write(response, error_event(last))
            await response.write_eof()
        return response


async def relay_events(
    body: AsyncIterator[bytes],
    response: web.StreamResponse,
    state: StreamState,
    *,
    resumed: bool,
) -> None:
    """A replica's server-sent events to the client, rewritten chunk by chunk, until the
    stream is done or the replica's response ends."""
    buffer = b""
    async for piece in body:
        events, buffer = routing.parse_sse(buffer + piece)
        for payload in events:
            out = routing.relay_chunk(state, payload, resumed=resumed)
            if out is not None:
                await write(response, out)
            if state.done:
                return


async def settle(relay: Relay, replica: Replica, state: StreamState) -> None:
    """How many of the tokens sent the client has the whole text of, when the chunks do not
    say (vLLM merged several tokens into the last chunk, or held text back for stop strings):
    the most whose text, decoded after the prompt, is whole and no more than the text sent
    (:func:`~cheapspot_operator.router.routing.settles_at`). A continuation after a token
    whose text was held back would lose that text, or start inside a character."""
    prompt = state.prompt_ids or []
    base = await detokenize(relay, replica, prompt)
    for count in routing.commit_candidates(state):
        decoded = await detokenize(relay, replica, [*prompt, *state.sent_ids[:count]])
        if routing.settles_at(state, count, base, decoded):
            return
    log.warning("no count of tokens decodes to the text sent; resuming after %d", state.committed)


async def detokenize(relay: Relay, replica: Replica, ids: list[int]) -> str:
    async with relay.session.post(
        replica.url + "/detokenize", json={"tokens": ids}, timeout=relay.bounded
    ) as resp:
        if resp.status != 200:
            raise Upstream(f"{replica.name} could not detokenize: {resp.status}")
        text: str = (await resp.json())["prompt"]
        return text


async def tokenize(relay: Relay, replica: Replica, path: str, body: dict[str, Any]) -> list[int]:
    """The prompt's token ids, from the replica's tokenizer (with the chat template)."""
    doc = routing.tokenize_body(path, body)
    if doc is None:
        return routing.prompt_ids(body) or []
    async with relay.session.post(
        replica.url + "/tokenize", json=doc, timeout=relay.bounded
    ) as resp:
        if resp.status != 200:
            raise Upstream(f"{replica.name} could not tokenize the prompt: {resp.status}")
        tokens: list[int] = (await resp.json())["tokens"]
        return tokens

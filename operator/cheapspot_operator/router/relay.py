"""Relaying one client request to the pool's replicas.

A request that fails before its first byte reaches the client is retried on another replica.
A resumable stream (:func:`cheapspot_operator.router.routing.resumable`) cut mid-way is
continued on another replica from the tokens already sent; the decisions for that are in
:mod:`cheapspot_operator.router.routing`, the calls to the replicas here.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
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


class Upstream(Exception):  # noqa: N818 (a replica's failure, handled by trying another)
    """The replica failed the request; ``status`` is its answer, 0 when there was none."""

    def __init__(self, message: str, status: int = 0) -> None:
        super().__init__(message)
        self.status = status


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


def error(message: str, status: int) -> web.Response:
    kind = "invalid_request_error" if status < 500 else "server_error"
    return web.json_response(validation.openai_error(message, status, kind), status=status)


class Relay:
    def __init__(self, replicas: ReplicaSet, *, max_queue_seconds: float = 30.0) -> None:
        self.replicas = replicas
        self.max_queue_seconds = max_queue_seconds
        self.stats = {"requests": 0, "refused": 0, "retries": 0, "resumes": 0, "failed": 0}
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=None, connect=3, sock_connect=3),
            connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=30),
            auto_decompress=False,
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

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
                async with self.session.get(replica.url + request.path) as resp:
                    data = await resp.read()
                    return web.Response(
                        body=data, status=resp.status, content_type=resp.content_type
                    )
            except (aiohttp.ClientError, TimeoutError):
                tried.add(replica.name)
            finally:
                await self.replicas.release(replica.name)
        return error("no replica of this pool is ready", 503)

    async def once(
        self, request: web.Request, raw: bytes, body: dict[str, Any], model: str
    ) -> web.StreamResponse:
        """Non-resumable requests: retried on another replica while nothing has reached the
        client; a plain (non-streamed) answer reaches the client only when it is complete."""
        deadline = time.monotonic() + self.max_queue_seconds
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
                ) as resp:
                    self.replicas.answered(replica.name, model, resp.status)
                    if resp.status >= 500:
                        raise Upstream(f"{replica.name} answered {resp.status}", resp.status)
                    if not body.get("stream"):
                        data = await resp.read()
                        return web.Response(
                            body=data, status=resp.status, content_type=resp.content_type
                        )
                    response = web.StreamResponse(status=resp.status, headers=passed_headers(resp))
                    await response.prepare(request)
                    async for piece in resp.content.iter_any():
                        await write(response, piece)
                    await response.write_eof()
                    return response
            except ClientGone:
                assert response is not None
                return response
            except (aiohttp.ClientError, TimeoutError, Upstream) as exc:
                last = f"replica {replica.name} failed: {exc}"
                self.replicas.cool(replica.name)
                if response is not None:
                    # Bytes already went out: a stream the router cannot resume ends here.
                    self.stats["failed"] += 1
                    log.warning("unresumable stream cut: %s", last)
                    return response
                tried.add(replica.name)
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
                        state.prompt_ids = await tokenize(self.session, replica, request.path, body)
                    if state.sure < state.committed:
                        await settle(self.session, replica, state)
                    path = routing.COMPLETIONS
                    doc = routing.continuation_body(
                        body, state.prompt_ids, routing.resume_point(state)
                    )
                else:
                    path, doc = request.path, routing.upstream_body(body)
                async with self.session.post(replica.url + path, json=doc) as resp:
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
                    await relay_events(resp, response, state, resumed=resumed)
                if state.done:
                    await response.write_eof()
                    return response
                raise Upstream(f"{replica.name} ended the stream early")
            except ClientGone:
                assert response is not None
                return response
            except (aiohttp.ClientError, TimeoutError, Upstream) as exc:
                last = f"replica {replica.name} failed: {exc}"
                self.replicas.cool(replica.name)
                tried.add(replica.name)
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
        with contextlib.suppress(ConnectionResetError):
            await response.write(
                routing.sse(json.dumps(validation.openai_error(last, 503)).encode())
            )
            await response.write_eof()
        return response


async def relay_events(
    resp: aiohttp.ClientResponse,
    response: web.StreamResponse,
    state: StreamState,
    *,
    resumed: bool,
) -> None:
    """A replica's server-sent events to the client, rewritten chunk by chunk, until the
    stream is done or the replica's response ends."""
    buffer = b""
    async for piece in resp.content.iter_any():
        events, buffer = routing.parse_sse(buffer + piece)
        for payload in events:
            out = routing.relay_chunk(state, payload, resumed=resumed)
            if out is not None:
                await write(response, out)
            if state.done:
                return


async def settle(session: aiohttp.ClientSession, replica: Replica, state: StreamState) -> None:
    """How many of the tokens sent the client has the whole text of, when the chunks do not
    say (vLLM merged several tokens into the last chunk, or held text back for stop strings):
    the most whose text, decoded after the prompt, is whole and no more than the text sent
    (:func:`~cheapspot_operator.router.routing.settles_at`). A continuation after a token
    whose text was held back would lose that text, or start inside a character."""
    prompt = state.prompt_ids or []
    base = await detokenize(session, replica, prompt)
    for count in routing.commit_candidates(state):
        decoded = await detokenize(session, replica, [*prompt, *state.sent_ids[:count]])
        if routing.settles_at(state, count, base, decoded):
            return
    log.warning("no count of tokens decodes to the text sent; resuming after %d", state.committed)


async def detokenize(session: aiohttp.ClientSession, replica: Replica, ids: list[int]) -> str:
    async with session.post(replica.url + "/detokenize", json={"tokens": ids}) as resp:
        if resp.status != 200:
            raise Upstream(f"{replica.name} could not detokenize: {resp.status}")
        text: str = (await resp.json())["prompt"]
        return text


async def tokenize(
    session: aiohttp.ClientSession, replica: Replica, path: str, body: dict[str, Any]
) -> list[int]:
    """The prompt's token ids, from the replica's tokenizer (with the chat template)."""
    doc = routing.tokenize_body(path, body)
    if doc is None:
        return routing.prompt_ids(body) or []
    async with session.post(replica.url + "/tokenize", json=doc) as resp:
        if resp.status != 200:
            raise Upstream(f"{replica.name} could not tokenize the prompt: {resp.status}")
        tokens: list[int] = (await resp.json())["tokens"]
        return tokens

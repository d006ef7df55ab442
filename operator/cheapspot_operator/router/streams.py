"""A resumable stream (:func:`cheapspot_operator.router.resumability.resumable`) relayed to the
client: token ids tracked, and the stream continued on another replica from the tokens
already sent when it is cut or stalls. The decisions for that are in
:mod:`cheapspot_operator.router.routing`, the calls to the replicas here.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any

import aiohttp
from aiohttp import web

from cheapspot_operator.router import routing
from cheapspot_operator.router.limits import Hold
from cheapspot_operator.router.routing import Replica, StreamState
from cheapspot_operator.router.upstream import (
    NO_REPLICA,
    RETRIES,
    ClientGone,
    ReplicaClient,
    Upstream,
    error,
    error_event,
    passed_headers,
    pieces,
    write,
)
from cheapspot_operator.router.versions import Pin

log = logging.getLogger("cheapspot.router")


async def relay_stream(
    client: ReplicaClient, request: web.Request, state: StreamState, model: str, hold: Hold
) -> web.StreamResponse:
    """A resumable stream: token ids tracked, continued elsewhere when cut. ``state`` holds
    the only reference to the request's body, which ``hold`` counts until the stream has cut
    it down (:meth:`StreamState.compact`). May raise
    :class:`~cheapspot_operator.router.replicas.QueueFull` before any byte."""
    deadline = time.monotonic() + client.max_queue_seconds
    tried: set[str] = set()
    response: web.StreamResponse | None = None
    last = NO_REPLICA
    pin: Pin | None = None
    for attempt in range(RETRIES):
        resumed = state.first is not None
        # A resume continues on the version the stream started on, or not at all.
        replica = await client.replicas.acquire(
            model, tried, deadline, pin if resumed else None, queue=attempt == 0
        )
        if replica is None:
            if pin is not None and resumed and not client.replicas.holds(model, pin):
                last = (
                    f"no replica serves the version of {model!r} this stream started on any "
                    "more (the adapter changed): it cannot be resumed without mixing versions"
                )
            break
        if not resumed:
            pin = Pin(client.replicas.version_of(replica.name, model))
        try:
            if resumed:
                if state.prompt_ids is None:
                    state.prompt_ids = routing.token_ids(
                        await tokenize(client, replica, request.path, state.body)
                    )
                if state.compact():
                    hold.release()
                if state.sure < state.committed:
                    await settle(client, replica, state)
                path = routing.COMPLETIONS
                doc = routing.continuation_body(
                    state.body, state.prompt_ids, routing.resume_point(state)
                )
            else:
                path, doc = request.path, routing.upstream_body(state.body)
            async with client.session.post(
                replica.url + path, json=doc, timeout=client.bounded
            ) as resp:
                client.replicas.answered(replica.name, model, resp.status)
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
                del doc  # sent: a continuation is built anew from the state
                await relay_events(
                    pieces(resp, client.first_token_seconds, client.stall_seconds),
                    response,
                    state,
                    hold,
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
            client.failed(replica, exc)
            tried.add(replica.name)
            # The next replica is waited for up to maxQueueSeconds from the cut (or the
            # failure): a long stream cut while the survivors are full queues like a
            # new request instead of failing on a deadline set when it began.
            deadline = time.monotonic() + client.max_queue_seconds
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
                    client.stats["resumes"] += 1
                    log.info("resuming a stream after %d tokens: %s", len(state.sent_ids), last)
                else:
                    client.stats["retries"] += 1
        finally:
            await client.replicas.release(replica.name)
    client.stats["failed"] += 1
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
    hold: Hold,
    *,
    resumed: bool,
) -> None:
    """A replica's server-sent events to the client, rewritten chunk by chunk, until the
    stream is done or the replica's response ends. Once the prompt's token ids are known
    (vLLM sends them with the first chunk) the request's body is cut down and released."""
    buffer = b""
    async for piece in body:
        events, buffer = routing.parse_sse(buffer + piece)
        for payload in events:
            out = routing.relay_chunk(state, payload, resumed=resumed)
            if state.compact():
                hold.release()
            if out is not None:
                await write(response, out)
            if state.done:
                return


async def settle(client: ReplicaClient, replica: Replica, state: StreamState) -> None:
    """How many of the tokens sent the client has the whole text of, when the chunks do not
    say (vLLM merged several tokens into the last chunk, or held text back for stop strings):
    the most whose text, decoded after the prompt, is whole and no more than the text sent
    (:func:`~cheapspot_operator.router.routing.settles_at`). A continuation after a token
    whose text was held back would lose that text, or start inside a character."""
    prompt = list(state.prompt_ids or [])
    base = await detokenize(client, replica, prompt)
    for count in routing.commit_candidates(state):
        decoded = await detokenize(client, replica, [*prompt, *state.sent_ids[:count]])
        if routing.settles_at(state, count, base, decoded):
            return
    log.warning("no count of tokens decodes to the text sent; resuming after %d", state.committed)


async def detokenize(client: ReplicaClient, replica: Replica, ids: Sequence[int]) -> str:
    async with client.session.post(
        replica.url + "/detokenize", json={"tokens": list(ids)}, timeout=client.bounded
    ) as resp:
        if resp.status != 200:
            raise Upstream(f"{replica.name} could not detokenize: {resp.status}")
        text: str = (await resp.json())["prompt"]
        return text


async def tokenize(
    client: ReplicaClient, replica: Replica, path: str, body: Mapping[str, Any]
) -> list[int]:
    """The prompt's token ids, from the replica's tokenizer (with the chat template)."""
    doc = routing.tokenize_body(path, body)
    if doc is None:
        return list(routing.prompt_ids(body) or [])
    async with client.session.post(
        replica.url + "/tokenize", json=doc, timeout=client.bounded
    ) as resp:
        if resp.status != 200:
            raise Upstream(f"{replica.name} could not tokenize the prompt: {resp.status}")
        tokens: list[int] = (await resp.json())["tokens"]
        return tokens

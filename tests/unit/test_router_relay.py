"""The router's relay through its real code against fake replicas (aiohttp servers in the
test's loop that stream token ids as vLLM does): what it does when a replica cuts or stalls a
stream and the others are full."""

from __future__ import annotations

import asyncio
import json
import string
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
from aiohttp import web

from cheapspot_operator.router import limits
from cheapspot_operator.router.routing import Replica
from cheapspot_operator.router.server import Router

Hook = Callable[[int, dict[str, Any], web.Request], Awaitable[None]]


def letter(token: int) -> str:
    return string.ascii_lowercase[token % 26]


class FakeReplica:
    """A replica whose answer to a prompt of token ids is the ids counting on from its
    length (so a continuation from any point gives the rest of the same answer), one token
    a chunk. ``hook(i, body, request)`` runs before token i of each stream: to hold, cut, stall."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.hook: Hook | None = None
        self.healthy = True
        self.requests = 0
        self.runner: web.AppRunner | None = None
        self.port = 0

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_get("/health", self.health)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.port = self.runner.addresses[0][1]

    @property
    def replica(self) -> Replica:
        return Replica(self.name, "127.0.0.1", self.port, ready=True)

    async def health(self, request: web.Request) -> web.Response:
        while not self.healthy:
            await asyncio.sleep(0.05)
        return web.Response(text="")

    async def completions(self, request: web.Request) -> web.StreamResponse:
        self.requests += 1
        body = await request.json()
        prompt: list[int] = body["prompt"]
        n = int(body.get("n") or 1)
        count = int(body["max_tokens"])
        if not body.get("stream"):
            if self.hook is not None:
                await self.hook(0, body, request)
            text = "".join(letter(len(prompt) + i) for i in range(count))
            return web.json_response({"choices": [{"index": 0, "text": text}]})
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for i in range(count):
            if self.hook is not None:
                await self.hook(i, body, request)
            token = len(prompt) + i
            last = i == count - 1
            for index in range(n):
                chunk: dict[str, Any] = {
                    "id": "cmpl-1",
                    "object": "text_completion",
                    "created": 1,
                    "model": body["model"],
                    "choices": [
                        {
                            "index": index,
                            "text": letter(token),
                            "logprobs": None,
                            "finish_reason": "length" if last else None,
                        }
                    ],
                }
                if body.get("return_token_ids"):
                    chunk["choices"][0]["token_ids"] = [token]
                    if i == 0:
                        chunk["choices"][0]["prompt_token_ids"] = prompt
                await resp.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp

    async def close(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()


async def cut(request: web.Request) -> None:
    """The replica lost: its connection reset mid-stream."""
    assert request.transport is not None
    request.transport.abort()
    raise ConnectionResetError("cut")


async def router_on(fakes: list[FakeReplica], **settings: Any) -> tuple[web.AppRunner, str, Router]:
    router = Router(**settings)
    runner = web.AppRunner(router.app())
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    await router.replicas.update([f.replica for f in fakes])
    return runner, f"http://127.0.0.1:{runner.addresses[0][1]}", router


async def events(session: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> list[Any]:
    """A streamed answer's events (parsed JSON, or the string "[DONE]")."""
    out: list[Any] = []
    async with session.post(url + "/v1/completions", json=body) as resp:
        assert resp.status == 200, await resp.text()
        raw = await resp.read()
    for event in raw.split(b"\n\n"):
        if event.startswith(b"data: "):
            data = event[6:]
            out.append("[DONE]" if data == b"[DONE]" else json.loads(data))
    return out


def text_of(got: list[Any]) -> str:
    return "".join(c["choices"][0]["text"] for c in got if isinstance(c, dict) and c.get("choices"))


async def with_fakes(
    names: list[str], scenario: Callable[[list[FakeReplica]], Awaitable[Any]]
) -> Any:
    fakes = [FakeReplica(n) for n in names]
    for f in fakes:
        await f.start()
    try:
        return await scenario(fakes)
    finally:
        for f in fakes:
            f.healthy = True
            await f.close()


PROMPT = [1, 2, 3]
TOKENS = 8
WHOLE = "".join(letter(len(PROMPT) + i) for i in range(TOKENS))


def long_stream(**extra: Any) -> dict[str, Any]:
    return {"model": "m", "prompt": PROMPT, "max_tokens": TOKENS, "stream": True, **extra}


def test_a_resume_waits_for_a_full_replica_from_the_cut() -> None:
    """Capacity 1 a replica. A stream on A is cut after its queue wait (counted from its
    start) is over, while B is busy with another request that ends a moment after the cut:
    the resume waits for B, up to maxQueueSeconds from the cut, and the answer is whole."""
    queue = 1.0

    async def scenario(fakes: list[FakeReplica]) -> tuple[str, Any, dict[str, int]]:
        a, b = fakes
        runner, url, router = await router_on([b], capacity=1, max_queue_seconds=queue)
        cut_done = asyncio.Event()

        async def b_busy(i: int, body: dict[str, Any], request: web.Request) -> None:
            if not body.get("stream"):  # the request keeping B full
                await cut_done.wait()
                await asyncio.sleep(0.5)  # the resume is already waiting for B by now

        async def a_cuts(i: int, body: dict[str, Any], request: web.Request) -> None:
            if i == 3:
                await asyncio.sleep(queue + 0.5)  # the stream's first queue wait is over
                cut_done.set()
                await cut(request)

        b.hook, a.hook = b_busy, a_cuts
        async with aiohttp.ClientSession() as session:
            busy = asyncio.ensure_future(
                session.post(
                    url + "/v1/completions",
                    json={"model": "m", "prompt": [9], "max_tokens": 2},
                )
            )
            while router.replicas.load.in_flight.get("b", 0) == 0:
                await asyncio.sleep(0.01)
            await router.replicas.update([a.replica, b.replica])  # A joins; B is full
            got = await events(session, url, long_stream())
            (await busy).release()
        await runner.cleanup()
        return text_of(got), got[-1], dict(router.stats)

    text, last, stats = asyncio.run(with_fakes(["a", "b"], scenario))
    assert (text, last) == (WHOLE, "[DONE]")
    assert stats["resumes"] == 1 and stats["failed"] == 0


def test_an_unresumable_stream_cut_part_way_ends_with_an_error_event() -> None:
    """n=2 and logprobs streams are passed through, not resumed: cut part-way, the client
    gets an OpenAI error event (then [DONE], as vLLM ends a stream that failed), never an
    end that looks like a whole answer."""

    async def scenario(fakes: list[FakeReplica]) -> list[list[Any]]:
        (a,) = fakes

        async def a_cuts(i: int, body: dict[str, Any], request: web.Request) -> None:
            if i == 3:
                await cut(request)

        a.hook = a_cuts
        runner, url, _ = await router_on([a])
        out = []
        async with aiohttp.ClientSession() as session:
            for extra in ({"n": 2}, {"logprobs": 1}):
                out.append(await events(session, url, long_stream(**extra)))
        await runner.cleanup()
        return out

    for got in asyncio.run(with_fakes(["a"], scenario)):
        assert len(text_of(got)) > 0, got
        assert got[-1] == "[DONE]", got
        error = got[-2]["error"]
        assert error["code"] == 503 and "replica a failed" in error["message"], got


def test_a_stalled_replica_is_left_until_it_answers_again() -> None:
    """A goes silent (its health check too) mid-stream: the stream resumes on B within the
    stall bound, the whole answer; a new request goes to B while A is silent; once A answers
    its health check again, it takes requests again."""
    stall = 0.5

    async def scenario(fakes: list[FakeReplica]) -> dict[str, Any]:
        a, b = fakes
        thawed = asyncio.Event()

        async def a_freezes(i: int, body: dict[str, Any], request: web.Request) -> None:
            if i == 3 and body.get("stream") and not thawed.is_set():
                a.healthy = False
                await thawed.wait()

        a.hook = a_freezes
        runner, url, router = await router_on([a], first_token_seconds=stall, stall_seconds=stall)
        seen: dict[str, Any] = {}
        async with aiohttp.ClientSession() as session:
            loop = asyncio.get_running_loop()
            await router.replicas.update([a.replica])
            started = loop.time()
            stream = asyncio.ensure_future(events(session, url, long_stream()))
            while a.healthy:  # A froze with the stream on it
                await asyncio.sleep(0.01)
            seen["in_flight"] = router.replicas.load.in_flight.get("a", 0)
            await router.replicas.update([a.replica, b.replica])
            got = await stream
            seen["took"] = loop.time() - started
            seen["text"], seen["last"] = text_of(got), got[-1]
            seen["stalled"] = [r["stalled"] for r in router.replicas.describe()]
            before = a.requests, b.requests
            await events(session, url, long_stream())
            seen["during"] = (a.requests - before[0], b.requests - before[1])
            thawed.set()
            a.healthy = True
            while "a" in router.replicas.stalled:
                await asyncio.sleep(0.05)
            before = a.requests, b.requests
            await events(session, url, long_stream())  # both idle: A is first by name
            seen["after"] = (a.requests - before[0], b.requests - before[1])
        await runner.cleanup()
        seen["stats"] = dict(router.stats)
        return seen

    seen = asyncio.run(with_fakes(["a", "b"], scenario))
    assert seen["in_flight"] == 1
    assert (seen["text"], seen["last"]) == (WHOLE, "[DONE]")
    assert seen["took"] < stall + 10  # generous: the bound is 0.5 s
    assert seen["stalled"] == [True, False]
    assert seen["during"] == (0, 1) and seen["after"] == (1, 0)
    assert seen["stats"]["stalls"] == 1 and seen["stats"]["resumes"] == 1


# -- the router's memory bounds, through its HTTP server (pure decisions: test_router_limits.py)


async def answer(
    session: aiohttp.ClientSession, url: str, body: dict[str, Any] | bytes
) -> tuple[int, dict[str, str], Any]:
    """Status, headers and body (JSON, or the raw text of a stream) of one POST."""
    kwargs: dict[str, Any] = {"data": body} if isinstance(body, bytes) else {"json": body}
    async with session.post(url + "/v1/completions", **kwargs) as resp:
        raw = await resp.read()
        try:
            doc: Any = json.loads(raw)
        except ValueError:
            doc = raw.decode()
        return resp.status, dict(resp.headers), doc


def openai_error(doc: Any, status: int) -> dict[str, Any]:
    error: dict[str, Any] = doc["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == status, doc
    return error


def held_until(release: asyncio.Event) -> Hook:
    async def hook(i: int, body: dict[str, Any], request: web.Request) -> None:
        if i == 1 or not body.get("stream"):
            await release.wait()

    return hook


async def until(check: Callable[[], bool]) -> None:
    for _ in range(500):
        if check():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the router never got there")


def test_a_body_over_the_limit_gets_a_413_naming_it_and_never_reaches_a_replica() -> None:
    """A body over maxRequestBytes is refused with OpenAI's error naming the limit, whether
    its length is announced (Content-Length) or not (chunked); one at the limit is served."""
    limit = 4096

    async def scenario(fakes: list[FakeReplica]) -> None:
        (a,) = fakes
        runner, url, router = await router_on(
            [a], bounds=limits.Limits(max_request_bytes=limit, max_buffered_bytes=4 * limit)
        )

        def body(size: int) -> bytes:
            doc = json.dumps({"model": "m", "prompt": [1], "max_tokens": 2, "user": ""})
            return doc.replace('"user": ""', '"user": "' + "u" * (size - len(doc)) + '"').encode()

        async def chunked(data: bytes) -> Any:
            yield data[:100]
            yield data[100:]

        async with aiohttp.ClientSession() as session:
            for over in (body(limit + 1), chunked(body(limit + 1))):
                async with session.post(url + "/v1/completions", data=over) as resp:
                    status, doc = resp.status, await resp.json()
                error = openai_error(doc, 413)
                assert status == 413 and error["type"] == "invalid_request_error"
                assert f"at most {limit} bytes" in error["message"]
                assert "router.maxRequestBytes" in error["message"]
            assert a.requests == 0 and router.buffered.held == 0
            status, _, _ = await answer(session, url, body(limit))
            assert status == 200 and a.requests == 1
        await runner.cleanup()

    asyncio.run(with_fakes(["a"], scenario))


def test_past_its_most_requests_the_router_answers_429_with_retry_after() -> None:
    """maxConcurrentRequests 2: with two streams held on the replica, a third request gets a
    429 with Retry-After at once; the two streams end whole, and then requests are served."""

    async def scenario(fakes: list[FakeReplica]) -> None:
        (a,) = fakes
        release = asyncio.Event()
        a.hook = held_until(release)
        runner, url, router = await router_on([a], bounds=limits.Limits(max_concurrent_requests=2))
        async with aiohttp.ClientSession() as session:
            held = [asyncio.ensure_future(events(session, url, long_stream())) for _ in range(2)]
            await until(lambda: router.active == 2)
            status, headers, doc = await answer(session, url, long_stream())
            assert status == 429 and headers["Retry-After"] == str(limits.RETRY_AFTER_SECONDS)
            assert "router.maxConcurrentRequests" in openai_error(doc, 429)["message"]
            assert a.requests == 2  # the refused request reached no replica
            release.set()
            for got in await asyncio.gather(*held):
                assert (text_of(got), got[-1]) == (WHOLE, "[DONE]")
            assert text_of(await events(session, url, long_stream())) == WHOLE
        await runner.cleanup()
        assert router.stats["overloaded"] == 1

    asyncio.run(with_fakes(["a"], scenario))


def test_a_full_queue_gets_a_503_with_retry_after_and_the_queued_request_is_served() -> None:
    """Capacity 1, maxQueuedRequests 1: one stream on the replica, one request waiting; a
    third (a POST, a GET) gets a 503 with Retry-After at once; the first two end whole."""

    async def scenario(fakes: list[FakeReplica]) -> None:
        (a,) = fakes
        release = asyncio.Event()
        a.hook = held_until(release)
        runner, url, router = await router_on(
            [a], capacity=1, bounds=limits.Limits(max_queued_requests=1)
        )
        async with aiohttp.ClientSession() as session:
            first = asyncio.ensure_future(events(session, url, long_stream()))
            await until(lambda: router.replicas.load.in_flight.get("a") == 1)
            queued = asyncio.ensure_future(events(session, url, long_stream()))
            await until(lambda: router.replicas.waiting == 1)
            status, headers, doc = await answer(session, url, long_stream())
            assert status == 503 and headers["Retry-After"] == str(limits.RETRY_AFTER_SECONDS)
            assert "router.maxQueuedRequests" in openai_error(doc, 503)["message"]
            async with session.get(url + "/v1/models") as resp:  # a GET waits in the queue too
                assert resp.status == 503 and "Retry-After" in resp.headers
            release.set()
            for got in (await first, await queued):
                assert (text_of(got), got[-1]) == (WHOLE, "[DONE]")
            assert a.requests == 2 and router.replicas.waiting == 0
        await runner.cleanup()

    asyncio.run(with_fakes(["a"], scenario))


def test_bodies_held_whole_are_bounded_and_a_stream_lets_go_of_its_body() -> None:
    """maxBufferedBytes 8 KiB: a plain request with a 5 KiB body held on the replica keeps
    its body (for a retry); a second such request gets a 503 with Retry-After. A stream's
    body is let go once the replica has sent the prompt's token ids: with one held
    mid-stream, the plain request's body fits."""
    kib = 1024

    async def scenario(fakes: list[FakeReplica]) -> None:
        (a,) = fakes
        release = asyncio.Event()
        a.hook = held_until(release)
        runner, url, router = await router_on(
            [a], bounds=limits.Limits(max_request_bytes=6 * kib, max_buffered_bytes=8 * kib)
        )
        prompt = list(range(1000))  # about 5 KiB as JSON
        plain = {"model": "m", "prompt": prompt, "max_tokens": 2}
        async with aiohttp.ClientSession() as session:
            stream = asyncio.ensure_future(events(session, url, long_stream(prompt=prompt)))
            await until(lambda: a.requests == 1 and router.buffered.held == 0)
            first = asyncio.ensure_future(answer(session, url, plain))
            await until(lambda: a.requests == 2)
            assert 4 * kib < router.buffered.held < 6 * kib
            status, headers, doc = await answer(session, url, plain)
            assert status == 503 and headers["Retry-After"] == str(limits.RETRY_AFTER_SECONDS)
            assert "router.maxBufferedBytes" in openai_error(doc, 503)["message"]
            release.set()
            got = await stream
            assert got[-1] == "[DONE]" and len(text_of(got)) == TOKENS
            assert (await first)[0] == 200
        await runner.cleanup()
        assert router.buffered.held == 0

    asyncio.run(with_fakes(["a"], scenario))

"""``cheapspot router``: the inference pool's one OpenAI-compatible endpoint.

    cheapspot router --pool NAME [--namespace NS] [--port 8080] [--max-queue-seconds 30]
                     [--capacity 32] [--drain-seconds 30] [--drain-linger-seconds 3]
                     [--kubeconfig FILE]
    cheapspot router --replica http://HOST:PORT ...     (fixed replicas, no Kubernetes)

It watches the pool's replica pods (labels ``cheapspot.dev/pool=NAME``,
``cheapspot.dev/pool-role=replica``) and sends each request straight to a chosen replica's
pod IP (:func:`cheapspot_operator.router.routing.choose`): ready, not draining, preferring one
that has served the request's adapter, then the fewest requests in flight. When every
replica is at ``--capacity`` requests in flight, or none is ready, the request waits (up to
``--max-queue-seconds``) instead of failing. A request that fails before its first byte
reaches the client is retried on another replica; a stream cut mid-way continues on another
replica from the tokens already sent (:mod:`cheapspot_operator.router.routing`).

It is Ready (``/readyz``) once it has listed the pool's replica pods. On SIGTERM it turns
not Ready at once, so the Service stops sending it requests, keeps serving for
``--drain-linger-seconds`` (endpoints take a moment to drop it) and until the requests in
flight have finished, at most ``--drain-seconds``, then exits: a rolling update of the router,
or its node drained, cuts no answer.

HTTP is aiohttp, server and client: the operator already depends on it (kopf is built on
it), it streams both ways without buffering, and one event loop carries thousands of open
streams, which is what a router spends its time on.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import aiohttp
from aiohttp import web

from cheapspot.contract import ROUTER_PORT, ROUTER_READY_PATH, SERVE_PORT
from cheapspot_operator.router import routing
from cheapspot_operator.router.routing import Load, Replica, StreamState

log = logging.getLogger("cheapspot.router")

COOL_DOWN_SECONDS = 3.0
RETRIES = 4
"""Replicas one request is tried on (first bytes failing, or a stream cut) before it fails."""
_OWN_PATHS = frozenset({"/healthz", ROUTER_READY_PATH, "/cheapspot/router"})
_HOP_HEADERS = {"content-length", "transfer-encoding", "connection", "keep-alive", "host"}


class Upstream(Exception):  # noqa: N818 (a replica's failure, handled by trying another)
    """The replica failed the request; ``status`` is its answer, 0 when there was none."""

    def __init__(self, message: str, status: int = 0) -> None:
        super().__init__(message)
        self.status = status


class ClientGone(Exception):  # noqa: N818
    """The client closed its connection: nothing more to send, nothing to retry."""


async def _write(response: web.StreamResponse, data: bytes) -> None:
    try:
        await response.write(data)
    except (ConnectionResetError, aiohttp.ClientError, RuntimeError) as exc:
        raise ClientGone(str(exc)) from exc


class Router:
    def __init__(self, *, capacity: int = 32, max_queue_seconds: float = 30.0) -> None:
        self.capacity = capacity
        self.max_queue_seconds = max_queue_seconds
        self.replicas: dict[str, Replica] = {}
        self.load = Load()
        self._changed = asyncio.Condition()
        self._session: aiohttp.ClientSession | None = None
        self.stats = {"requests": 0, "retries": 0, "resumes": 0, "failed": 0}
        self.cooling: dict[str, float] = {}
        """Replica -> until when no request is sent to it: it just refused a connection or
        failed a request before its first byte (until the pod watch says more)."""
        self.listed = False
        """The replica set is known (the first pod list, or fixed replicas): Ready from here."""
        self.stopping = False
        """SIGTERM came: not Ready, draining the requests in flight."""
        self.active = 0
        """Client requests in flight through this router (streams until their last byte)."""

    # -- the replica set -----------------------------------------------------------------

    async def set_replicas(self, replicas: Sequence[Replica]) -> None:
        async with self._changed:
            self.replicas = {r.name: r for r in replicas}
            self.listed = True
            self._changed.notify_all()

    async def _release(self, name: str) -> None:
        async with self._changed:
            self.load.in_flight[name] = max(0, self.load.in_flight.get(name, 0) - 1)
            self._changed.notify_all()

    async def acquire(self, model: str, exclude: set[str], deadline: float) -> Replica | None:
        """A replica for the request, counted in flight; waits while all are busy or none
        is ready, until ``deadline``."""
        async with self._changed:
            while True:
                now = time.monotonic()
                avoid = exclude | {n for n, t in self.cooling.items() if t > now}
                chosen = routing.choose(
                    self.replicas.values(), model, self.load, capacity=self.capacity, exclude=avoid
                )
                if chosen is None and not any(
                    r.usable and r.name not in avoid for r in self.replicas.values()
                ):
                    # Every usable replica failed this request or just failed another one:
                    # better to try one of those again than to wait for nothing.
                    for fallback in (exclude, set()):
                        chosen = routing.choose(
                            self.replicas.values(),
                            model,
                            self.load,
                            capacity=self.capacity,
                            exclude=fallback,
                        )
                        if chosen is not None:
                            break
                if chosen is not None:
                    self.load.in_flight[chosen.name] = self.load.in_flight.get(chosen.name, 0) + 1
                    self.load.served.setdefault(chosen.name, set()).add(model)
                    return chosen
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._changed.wait(), min(left, 1.0))

    # -- shutting down -------------------------------------------------------------------

    async def drain(self, linger: float, limit: float) -> int:
        """Stop being Ready, keep serving at least ``linger`` seconds and until no request is
        in flight, at most ``limit`` seconds; returns the requests still in flight then."""
        self.stopping = True
        start = time.monotonic()
        log.info("draining: %d requests in flight, up to %gs", self.active, limit)
        while time.monotonic() - start < limit:
            if self.active == 0 and time.monotonic() - start >= linger:
                break
            await asyncio.sleep(0.1)
        if self.active:
            log.warning("drain time up after %gs: %d requests cut", limit, self.active)
        else:
            log.info("drained in %.1fs", time.monotonic() - start)
        return self.active

    @web.middleware
    async def _count(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        if request.path in _OWN_PATHS:
            return await handler(request)
        self.active += 1
        try:
            return await handler(request)
        finally:
            self.active -= 1

    # -- HTTP ----------------------------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024, middlewares=[self._count])
        for path in routing.FORWARDED_POSTS:
            app.router.add_post(path, self.handle_post)
        for path in routing.FORWARDED_GETS:
            app.router.add_get(path, self.handle_get)
        app.router.add_get("/healthz", self.healthz)
        app.router.add_get(ROUTER_READY_PATH, self.readyz)
        app.router.add_get("/cheapspot/router", self.status)
        app.on_startup.append(self._start)
        app.on_cleanup.append(self._stop)
        return app

    async def _start(self, app: web.Application) -> None:
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=None, connect=3, sock_connect=3),
            connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=30),
            auto_decompress=False,
        )

    async def _stop(self, app: web.Application) -> None:
        if self._session is not None:
            await self._session.close()

    @property
    def session(self) -> aiohttp.ClientSession:
        assert self._session is not None, "router app not started"
        return self._session

    async def healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    async def readyz(self, request: web.Request) -> web.Response:
        """Ready once the replica set is known, until SIGTERM. Not tied to a replica being
        ready: with none ready the router queues requests, better than no endpoint at all."""
        if self.stopping:
            return web.json_response({"ready": False, "reason": "shutting down"}, status=503)
        if not self.listed:
            return web.json_response(
                {"ready": False, "reason": "the pool's replica pods are not listed yet"},
                status=503,
            )
        return web.json_response({"ready": True, "replicas": len(self.replicas)})

    async def status(self, request: web.Request) -> web.Response:
        return web.json_response(
            {
                "replicas": [
                    {
                        "name": r.name,
                        "url": r.url,
                        "ready": r.ready,
                        "draining": r.draining,
                        "in_flight": self.load.in_flight.get(r.name, 0),
                    }
                    for r in sorted(self.replicas.values(), key=lambda r: r.name)
                ],
                **self.stats,
            }
        )

    def _error(self, message: str, status: int) -> web.Response:
        kind = "invalid_request_error" if status < 500 else "server_error"
        return web.json_response(routing.openai_error(message, status, kind), status=status)

    async def handle_get(self, request: web.Request) -> web.Response:
        deadline = time.monotonic() + self.max_queue_seconds
        tried: set[str] = set()
        for _ in range(RETRIES):
            replica = await self.acquire("", tried, deadline)
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
                await self._release(replica.name)
        return self._error("no replica of this pool is ready", 503)

    async def handle_post(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        try:
            body = json.loads(raw)
            if not isinstance(body, dict):
                raise ValueError("the body is not a JSON object")
        except ValueError as exc:
            return self._error(f"request body is not valid JSON: {exc}", 400)
        self.stats["requests"] += 1
        model = str(body.get("model") or "")
        if body.get("stream") and routing.resumable(body):
            return await self._stream(request, body, model)
        return await self._once(request, raw, body, model)

    async def _once(
        self, request: web.Request, raw: bytes, body: dict[str, Any], model: str
    ) -> web.StreamResponse:
        """Non-resumable requests: retried on another replica while nothing has reached the
        client; a plain (non-streamed) answer reaches the client only when it is complete."""
        deadline = time.monotonic() + self.max_queue_seconds
        tried: set[str] = set()
        last = "no replica of this pool became ready within maxQueueSeconds"
        for attempt in range(RETRIES):
            replica = await self.acquire(model, tried, deadline)
            if replica is None:
                break
            response: web.StreamResponse | None = None
            try:
                async with self.session.post(
                    replica.url + request.path,
                    data=raw,
                    headers={"Content-Type": "application/json"},
                ) as resp:
                    if resp.status >= 500:
                        raise Upstream(f"{replica.name} answered {resp.status}", resp.status)
                    if not body.get("stream"):
                        data = await resp.read()
                        return web.Response(
                            body=data, status=resp.status, content_type=resp.content_type
                        )
                    response = web.StreamResponse(status=resp.status, headers=_copy(resp))
                    await response.prepare(request)
                    async for piece in resp.content.iter_any():
                        await _write(response, piece)
                    await response.write_eof()
                    return response
            except ClientGone:
                assert response is not None
                return response
            except (aiohttp.ClientError, TimeoutError, Upstream) as exc:
                last = f"replica {replica.name} failed: {exc}"
                self.cooling[replica.name] = time.monotonic() + COOL_DOWN_SECONDS
                if response is not None:
                    # Bytes already went out: a stream the router cannot resume ends here.
                    self.stats["failed"] += 1
                    log.warning("unresumable stream cut: %s", last)
                    return response
                tried.add(replica.name)
                if attempt + 1 < RETRIES:
                    self.stats["retries"] += 1
            finally:
                await self._release(replica.name)
        self.stats["failed"] += 1
        return self._error(last, 503)

    async def _stream(
        self, request: web.Request, body: dict[str, Any], model: str
    ) -> web.StreamResponse:
        """A resumable stream: token ids tracked, continued elsewhere when cut."""
        deadline = time.monotonic() + self.max_queue_seconds
        state = StreamState(request.path, body, prompt_ids=routing.prompt_ids(body))
        tried: set[str] = set()
        response: web.StreamResponse | None = None
        last = "no replica of this pool became ready within maxQueueSeconds"
        for attempt in range(RETRIES):
            replica = await self.acquire(model, tried, deadline)
            if replica is None:
                break
            resumed = state.first is not None
            try:
                if resumed:
                    if state.prompt_ids is None:
                        state.prompt_ids = await self._tokenize(replica, request.path, body)
                    if state.sure < state.committed:
                        await self._settle(replica, state)
                    path = routing.COMPLETIONS
                    doc = routing.continuation_body(
                        body, state.prompt_ids, routing.resume_point(state)
                    )
                else:
                    path, doc = request.path, routing.upstream_body(body)
                async with self.session.post(replica.url + path, json=doc) as resp:
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
                        response = web.StreamResponse(status=200, headers=_copy(resp))
                        await response.prepare(request)
                    await self._relay(resp, response, state, resumed=resumed)
                if state.done:
                    await response.write_eof()
                    return response
                raise Upstream(f"{replica.name} ended the stream early")
            except ClientGone:
                assert response is not None
                return response
            except (aiohttp.ClientError, TimeoutError, Upstream) as exc:
                last = f"replica {replica.name} failed: {exc}"
                self.cooling[replica.name] = time.monotonic() + COOL_DOWN_SECONDS
                tried.add(replica.name)
                if response is not None and state.finished:
                    # The answer is whole (its finish_reason sent): only the closing events
                    # were lost. A continuation would add a token, so the router ends it.
                    log.info("a stream cut after its last token, closed here: %s", last)
                    with contextlib.suppress(ClientGone):
                        await _write(response, routing.closing_events(state))
                        await response.write_eof()
                    return response
                if attempt + 1 < RETRIES:
                    if response is not None:
                        self.stats["resumes"] += 1
                        log.info("resuming a stream after %d tokens: %s", len(state.sent_ids), last)
                    else:
                        self.stats["retries"] += 1
            finally:
                await self._release(replica.name)
        self.stats["failed"] += 1
        if response is None:
            return self._error(last, 503)
        with contextlib.suppress(ConnectionResetError):
            await response.write(routing.sse(json.dumps(routing.openai_error(last, 503)).encode()))
            await response.write_eof()
        return response

    async def _relay(
        self,
        resp: aiohttp.ClientResponse,
        response: web.StreamResponse,
        state: StreamState,
        *,
        resumed: bool,
    ) -> None:
        buffer = b""
        async for piece in resp.content.iter_any():
            events, buffer = routing.parse_sse(buffer + piece)
            for payload in events:
                out = routing.relay_chunk(state, payload, resumed=resumed)
                if out is not None:
                    await _write(response, out)
                if state.done:
                    return

    async def _settle(self, replica: Replica, state: StreamState) -> None:
        """How many of the last chunk's tokens the client has the text of, when vLLM merged
        several tokens into that chunk: the most whose text, decoded after the prompt, is
        exactly the text sent. A continuation after a token whose text was held back would
        start inside a character."""
        prompt = state.prompt_ids or []
        base = await self._detokenize(replica, prompt)
        for count in routing.commit_candidates(state):
            decoded = await self._detokenize(replica, [*prompt, *state.sent_ids[:count]])
            if decoded == base + state.text:
                state.committed = state.sure = count
                return
        log.warning(
            "no count of tokens decodes to the text sent; resuming after %d", state.committed
        )

    async def _detokenize(self, replica: Replica, ids: list[int]) -> str:
        async with self.session.post(replica.url + "/detokenize", json={"tokens": ids}) as resp:
            if resp.status != 200:
                raise Upstream(f"{replica.name} could not detokenize: {resp.status}")
            text: str = (await resp.json())["prompt"]
            return text

    async def _tokenize(self, replica: Replica, path: str, body: dict[str, Any]) -> list[int]:
        doc = routing.tokenize_body(path, body)
        if doc is None:
            return routing.prompt_ids(body) or []
        async with self.session.post(replica.url + "/tokenize", json=doc) as resp:
            if resp.status != 200:
                raise Upstream(f"{replica.name} could not tokenize the prompt: {resp.status}")
            tokens: list[int] = (await resp.json())["tokens"]
            return tokens


def _copy(resp: aiohttp.ClientResponse) -> dict[str, str]:
    return {k: v for k, v in resp.headers.items() if k.lower() not in _HOP_HEADERS}


# -- watching the pool's pods ------------------------------------------------------------------


def watch_pods(
    router: Router,
    loop: asyncio.AbstractEventLoop,
    namespace: str,
    pool: str,
    stop: threading.Event,
    *,
    kubeconfig: str | None = None,
    port: int = SERVE_PORT,
) -> None:
    """List and watch the pool's replica pods (in a thread), handing each new view of the
    replica set to the router's loop. Relists after a watch ends or fails."""
    from kubernetes import client, watch

    from cheapspot_operator.runtime.kubeapi import KubeApi

    api = KubeApi.from_config(kubeconfig)
    core = client.CoreV1Api(api._client)
    selector = routing.pool_selector(pool)
    pods: dict[str, dict[str, Any]] = {}

    def publish() -> None:
        view = [r for p in pods.values() if (r := routing.replica_from_pod(p, port)) is not None]
        asyncio.run_coroutine_threadsafe(router.set_replicas(view), loop)

    while not stop.is_set():
        try:
            listed = api.request(
                "GET", f"/api/v1/namespaces/{namespace}/pods", query={"labelSelector": selector}
            )
            pods = {p["metadata"]["name"]: p for p in listed.get("items") or []}
            publish()
            version = listed["metadata"]["resourceVersion"]
            w = watch.Watch()  # type: ignore[no-untyped-call]
            for ev in w.stream(  # type: ignore[no-untyped-call]
                core.list_namespaced_pod,
                namespace,
                label_selector=selector,
                resource_version=version,
                timeout_seconds=30,
                allow_watch_bookmarks=False,
            ):
                if stop.is_set():
                    w.stop()  # type: ignore[no-untyped-call]
                    break
                obj = ev.get("raw_object") or {}
                name = (obj.get("metadata") or {}).get("name")
                if ev.get("type") == "ERROR" or not name:
                    break
                if ev["type"] == "DELETED":
                    pods.pop(name, None)
                else:
                    pods[name] = obj
                publish()
        except Exception as exc:
            log.warning("pod watch failed (%s); relisting", exc)
            stop.wait(1.0)


# -- command line ------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cheapspot router", description=__doc__.split("\n")[0])
    p.add_argument("--pool", help="the CheapInferencePool whose replica pods to watch")
    p.add_argument("--namespace", default=None, help="the pool's namespace (default: the pod's)")
    p.add_argument(
        "--replica",
        action="append",
        default=[],
        help="a fixed replica URL instead of watching pods (repeatable; tests, benchmarks)",
    )
    p.add_argument(
        "--host",
        default=None,
        help="listen address (default: all interfaces; the pod's IP where it is a loopback "
        "address, as on the local cluster, where every pod has its own 127.0.0.N)",
    )
    p.add_argument("--port", type=int, default=ROUTER_PORT)
    p.add_argument("--replica-port", type=int, default=SERVE_PORT)
    p.add_argument("--capacity", type=int, default=32, help="requests in flight per replica")
    p.add_argument("--max-queue-seconds", type=float, default=30.0)
    p.add_argument(
        "--drain-seconds",
        type=float,
        default=30.0,
        help="on SIGTERM: how long requests in flight may take to finish before the router exits",
    )
    p.add_argument(
        "--drain-linger-seconds",
        type=float,
        default=3.0,
        help="on SIGTERM: keep accepting requests at least this long, while the Service's "
        "endpoints drop this pod",
    )
    p.add_argument("--kubeconfig", default=None)
    return p


def _namespace(given: str | None) -> str:
    if given:
        return given
    path = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"
    with contextlib.suppress(OSError), open(path) as f:
        return f.read().strip()
    return "default"


def fixed_replicas(urls: Sequence[str]) -> list[Replica]:
    out = []
    for i, url in enumerate(urls):
        hostport = url.split("://", 1)[-1].rstrip("/")
        host, _, port = hostport.rpartition(":")
        out.append(Replica(f"replica-{i}", host, int(port), ready=True))
    return out


def listen_host(given: str | None) -> str:
    if given:
        return given
    pod_ip = os.environ.get("POD_IP", "")
    return pod_ip if pod_ip.startswith("127.") else "0.0.0.0"


async def serve(args: argparse.Namespace, stop: asyncio.Event | None = None) -> None:
    router = Router(capacity=args.capacity, max_queue_seconds=args.max_queue_seconds)
    runner = web.AppRunner(router.app(), access_log=None)
    await runner.setup()
    host = listen_host(args.host)
    await web.TCPSite(runner, host, args.port).start()
    log.info("router listening on %s:%d", host, args.port)
    halt = threading.Event()
    watcher: threading.Thread | None = None
    if args.replica:
        await router.set_replicas(fixed_replicas(args.replica))
    else:
        watcher = threading.Thread(
            target=watch_pods,
            args=(router, asyncio.get_running_loop(), _namespace(args.namespace), args.pool, halt),
            kwargs={"kubeconfig": args.kubeconfig, "port": args.replica_port},
            daemon=True,
        )
        watcher.start()
    stop = stop or asyncio.Event()
    with contextlib.suppress(NotImplementedError, RuntimeError):  # not the main thread
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    try:
        await stop.wait()
        log.info("SIGTERM: no longer Ready")
        await router.drain(args.drain_linger_seconds, args.drain_seconds)
    finally:
        halt.set()
        await runner.cleanup()


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(list(argv or []))
    if not args.replica and not args.pool:
        _parser().error("give --pool (watch its pods) or --replica URL")
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("aiohttp").setLevel(logging.WARNING)
    try:
        asyncio.run(serve(args))
    except KeyboardInterrupt:
        return 130
    return 0

"""``cheapspot router``: the inference pool's one OpenAI-compatible endpoint.

    cheapspot router --pool NAME [--namespace NS] [--port 8080] [--max-queue-seconds 30]
                     [--first-token-seconds 60] [--stall-seconds 20] [--capacity 32] [--drain-seconds 30] [--drain-linger-seconds 3]
                     [--max-request-bytes 2097152] [--max-concurrent-requests 1024]
                     [--max-queued-requests 256] [--max-buffered-bytes 33554432]
                     [--api-keys FILE] [--kubeconfig FILE]
    cheapspot router --replica http://HOST:PORT ...     (fixed replicas, no Kubernetes)

It watches the pool's replica pods (labels ``cheapspot.dev/pool=NAME``,
``cheapspot.dev/pool-role=replica``) and sends each request straight to a chosen replica's
pod IP (:func:`cheapspot_operator.router.routing.choose`): ready, not draining, the fewest
requests in flight, ties to the one chosen longest ago (the adapter decides first only where
a replica answered 404 for it lately, e.g. one still loading it). An adapter name goes only
to replicas holding its wanted version, and a cut stream resumes only on its own version
(:mod:`cheapspot_operator.router.versions`). When every
replica is at ``--capacity`` requests in flight, or none is ready, the request waits (up to
``--max-queue-seconds``) instead of failing, unless ``--max-queued-requests`` others wait
already. A request that fails before its first byte
reaches the client is retried on another replica; a stream cut mid-way continues on another
replica from the tokens already sent (:mod:`cheapspot_operator.router.routing`).

With ``--api-keys`` every client request needs one of the pool's keys
(``Authorization: Bearer``): 401 without or with an unknown one, 403 for a model its key may
not use, both in OpenAI's error shape (:mod:`cheapspot_operator.router.keys`); the file is
read again when it changes. vLLM's runtime adapter endpoints are never forwarded.

It is Ready (``/readyz``) once it has listed the pool's replica pods. On SIGTERM it turns
not Ready at once, so the Service stops sending it requests, keeps serving for
``--drain-linger-seconds`` (endpoints take a moment to drop it) and until the requests in
flight have finished, at most ``--drain-seconds``, then exits: a rolling update of the router,
or its node drained, cuts no answer.

Its memory is bounded (:mod:`cheapspot_operator.router.limits`): a body over
``--max-request-bytes`` gets a 413, a request past ``--max-concurrent-requests`` a 429, one
that would wait behind ``--max-queued-requests`` others or hold more than
``--max-buffered-bytes`` of bodies a 503, the last two with ``Retry-After``.

Here: the endpoints, readiness, draining and the command line. Which replica takes a request
and where the replicas come from: :mod:`cheapspot_operator.router.replicas`; sending the
request and retrying: :mod:`cheapspot_operator.router.relay`; resuming a stream:
:mod:`cheapspot_operator.router.streams`.

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

from aiohttp import web

from cheapspot.contract import ROUTER_PORT, ROUTER_READY_PATH, SERVE_PORT
from cheapspot_operator.router import keys, limits, resumability, routing, validation
from cheapspot_operator.router.keyfile import API_KEYS_ENV, KeyFile
from cheapspot_operator.router.relay import Relay
from cheapspot_operator.router.replicas import QueueFull, ReplicaSet, fixed_replicas, watch_pods
from cheapspot_operator.router.routing import StreamState
from cheapspot_operator.router.upstream import FIRST_TOKEN_SECONDS, STALL_SECONDS, refused

log = logging.getLogger("cheapspot.router")

API_KEY = web.RequestKey("api_key", keys.ApiKey)
"""The client's key, on a request the key check let through."""

OWN_PATHS = frozenset({"/healthz", ROUTER_READY_PATH, "/cheapspot/router"})
"""The router's own endpoints: not client requests, not waited for when draining, never
asked for a key."""


class Router:
    """The router's HTTP face: its endpoints, readiness and draining; each client request is
    handed to the :class:`Relay`, which sends it to one of the :class:`ReplicaSet`."""

    def __init__(
        self,
        *,
        capacity: int = 32,
        max_queue_seconds: float = 30.0,
        first_token_seconds: float = FIRST_TOKEN_SECONDS,
        stall_seconds: float = STALL_SECONDS,
        bounds: limits.Limits | None = None,
        api_keys: KeyFile | None = None,
    ) -> None:
        self.api_keys = api_keys
        """Client authentication; None: every request is taken."""
        self.limits = bounds or limits.Limits()
        self.buffered = limits.Buffered(self.limits)
        self.replicas = ReplicaSet(capacity, self.limits)
        self.relay = Relay(
            self.replicas,
            max_queue_seconds=max_queue_seconds,
            first_token_seconds=first_token_seconds,
            stall_seconds=stall_seconds,
        )
        self.stopping = False
        """SIGTERM came: not Ready, draining the requests in flight."""
        self.active = 0
        """Client requests in flight through this router (streams until their last byte)."""

    @property
    def stats(self) -> dict[str, int]:
        return self.relay.stats

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
        if request.path in OWN_PATHS:
            return await handler(request)
        if self.api_keys is not None:
            key = keys.authenticate(
                self.api_keys.current(), request.headers.get("Authorization", "")
            )
            if isinstance(key, keys.Denied):
                self.stats["refused"] += 1
                return web.json_response(
                    key.error(),
                    status=key.status,
                    headers={"WWW-Authenticate": 'Bearer realm="cheapspot"'},
                )
            request[API_KEY] = key
        self.active += 1
        try:
            busy = limits.busy(self.limits, self.active)
            if busy is not None:
                return self.refuse(busy)
            return await handler(request)
        finally:
            self.active -= 1

    def refuse(self, refusal: validation.Refusal) -> web.Response:
        """A request refused by the router itself (OpenAI's error format); a refusal for
        load says when to try again."""
        self.stats["overloaded" if isinstance(refusal, limits.Overload) else "refused"] += 1
        return refused(refusal)

    # -- HTTP ----------------------------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application(
            client_max_size=self.limits.max_request_bytes, middlewares=[self._count]
        )
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
        await self.relay.start()

    async def _stop(self, app: web.Application) -> None:
        await self.relay.close()

    async def healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    async def readyz(self, request: web.Request) -> web.Response:
        """Ready once the replica set is known, until SIGTERM. Not tied to a replica being
        ready: with none ready the router queues requests, better than no endpoint at all."""
        if self.stopping:
            return web.json_response({"ready": False, "reason": "shutting down"}, status=503)
        if not self.replicas.listed:
            return web.json_response(
                {"ready": False, "reason": "the pool's replica pods are not listed yet"},
                status=503,
            )
        return web.json_response({"ready": True, "replicas": len(self.replicas.by_name)})

    async def status(self, request: web.Request) -> web.Response:
        return web.json_response(
            {
                "replicas": self.replicas.describe(),
                **self.stats,
                "active": self.active,
                "waiting": self.replicas.waiting,
                "buffered_bytes": self.buffered.held,
            }
        )

    async def handle_get(self, request: web.Request) -> web.Response:
        """A GET for a replica; the model list shows only what the client's key may use."""
        response = await self.relay.get(request)
        key = request.get(API_KEY)
        if key is None or key.models is None or response.status != 200 or response.body is None:
            return response
        with contextlib.suppress(ValueError, TypeError):
            doc = keys.visible_models(json.loads(bytes(response.body)), key)  # type: ignore[arg-type]
            return web.json_response(doc, status=200)
        return response

    async def handle_post(self, request: web.Request) -> web.StreamResponse:
        """A client's POST: its body read within the bounds, checked, and relayed. The body
        is held whole (and counted in :attr:`buffered`) only as long as it is needed: a
        resumable stream keeps what a continuation needs once its replica has sent the
        prompt's token ids; another request keeps the bytes it may be sent again with."""
        refusal = limits.too_large(self.limits, request.content_length or 0)
        if refusal is not None:
            return self.refuse(refusal)
        length = request.content_length
        hold = self.buffered.take(self.limits.max_request_bytes if length is None else length)
        if isinstance(hold, limits.Overload):
            return self.refuse(hold)
        try:
            raw = await read_body(request, self.limits.max_request_bytes)
            if raw is None:
                return self.refuse(limits.body_too_large(self.limits))
            hold.resize(len(raw))
            body = validation.read_request(request.path, raw)
            if isinstance(body, validation.Refusal):
                return self.refuse(body)
            model = str(body.get("model") or "")
            key = request.get(API_KEY)
            denied = keys.authorize(key, model) if key is not None else None
            if denied is not None:
                self.stats["refused"] += 1
                return web.json_response(denied.error(), status=denied.status)
            self.stats["requests"] += 1
            why = resumability.unresumable(body)
            if why is None:
                # The stream's state holds the only reference to the body from here on.
                state = StreamState(request.path, body, prompt_ids=routing.prompt_ids(body))
                del raw, body
                return await self.relay.stream(request, state, model, hold)
            streamed = bool(body.get("stream"))
            del body
            return await self.relay.once(request, raw, model, streamed=streamed, unresumable=why)
        except QueueFull as full:
            return self.refuse(full.refusal)
        finally:
            hold.release()


async def read_body(request: web.Request, limit: int) -> bytes | None:
    """The request's body, or None once it is over ``limit`` bytes (the rest unread).
    Read here rather than by ``request.read()``, which keeps a copy on the request for as
    long as it lives (a stream's whole length)."""
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.content.iter_any():
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


# -- command line ------------------------------------------------------------------------------


def parser() -> argparse.ArgumentParser:
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
        "--first-token-seconds",
        type=float,
        default=FIRST_TOKEN_SECONDS,
        help="a stream's replica must send its headers and first chunk within this, else it "
        "counts as stalled: the request goes to another replica",
    )
    p.add_argument(
        "--stall-seconds",
        type=float,
        default=STALL_SECONDS,
        help="a stream's replica must send its next chunk within this, else it counts as "
        "stalled: the stream resumes on another replica",
    )
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
    p.add_argument(
        "--max-request-bytes",
        type=int,
        default=limits.MAX_REQUEST_BYTES,
        help="a request body's limit in bytes: larger gets a 413",
    )
    p.add_argument(
        "--max-concurrent-requests",
        type=int,
        default=limits.MAX_CONCURRENT_REQUESTS,
        help="client requests this router carries at once (streams until their last byte): "
        "more get a 429 with Retry-After",
    )
    p.add_argument(
        "--max-queued-requests",
        type=int,
        default=limits.MAX_QUEUED_REQUESTS,
        help="requests that may wait for a free replica: more get a 503 with Retry-After",
    )
    p.add_argument(
        "--max-buffered-bytes",
        type=int,
        default=limits.MAX_BUFFERED_BYTES,
        help="bytes of request bodies this router holds whole at once (while they wait, or "
        "for a retry): a request that would pass it gets a 503 with Retry-After",
    )
    p.add_argument(
        "--api-keys",
        default=os.environ.get(API_KEYS_ENV) or None,
        help="a YAML file of client API keys (keys: [{name, key, models}]), read again when "
        f"it changes; default ${API_KEYS_ENV}; none: every request is taken",
    )
    p.add_argument("--kubeconfig", default=None)
    return p


def bounds_from(args: argparse.Namespace) -> limits.Limits:
    return limits.Limits(
        max_request_bytes=args.max_request_bytes,
        max_concurrent_requests=args.max_concurrent_requests,
        max_queued_requests=args.max_queued_requests,
        max_buffered_bytes=args.max_buffered_bytes,
    )


def _namespace(given: str | None) -> str:
    if given:
        return given
    path = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"
    with contextlib.suppress(OSError), open(path) as f:
        return f.read().strip()
    return "default"


def listen_host(given: str | None) -> str:
    if given:
        return given
    pod_ip = os.environ.get("POD_IP", "")
    return pod_ip if pod_ip.startswith("127.") else "0.0.0.0"


async def serve(args: argparse.Namespace, stop: asyncio.Event | None = None) -> None:
    router = Router(
        capacity=args.capacity,
        max_queue_seconds=args.max_queue_seconds,
        first_token_seconds=args.first_token_seconds,
        stall_seconds=args.stall_seconds,
        api_keys=KeyFile(args.api_keys) if args.api_keys else None,
        bounds=bounds_from(args),
    )
    runner = web.AppRunner(router.app(), access_log=None)
    await runner.setup()
    host = listen_host(args.host)
    await web.TCPSite(runner, host, args.port).start()
    log.info("router listening on %s:%d", host, args.port)
    halt = threading.Event()
    watcher: threading.Thread | None = None
    if args.replica:
        await router.replicas.update(fixed_replicas(args.replica))
    else:
        watcher = threading.Thread(
            target=watch_pods,
            args=(
                router.replicas,
                asyncio.get_running_loop(),
                _namespace(args.namespace),
                args.pool,
                halt,
            ),
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
    args = parser().parse_args(list(argv or []))
    if not args.replica and not args.pool:
        parser().error("give --pool (watch its pods) or --replica URL")
    if args.api_keys:
        try:
            KeyFile(args.api_keys)
        except (OSError, ValueError) as exc:
            parser().error(f"--api-keys: {exc}")
    try:
        bounds_from(args)
    except ValueError as exc:
        parser().error(str(exc))
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("aiohttp").setLevel(logging.WARNING)
    try:
        asyncio.run(serve(args))
    except KeyboardInterrupt:
        return 130
    return 0

"""``cheapspot router``: the inference pool's one OpenAI-compatible endpoint.

    cheapspot router --pool NAME [--namespace NS] [--port 8080] [--max-queue-seconds 30]
                     [--first-token-seconds 60] [--stall-seconds 20] [--capacity 32] [--drain-seconds 30] [--drain-linger-seconds 3]
                     [--kubeconfig FILE]
    cheapspot router --replica http://HOST:PORT ...     (fixed replicas, no Kubernetes)

It watches the pool's replica pods (labels ``cheapspot.dev/pool=NAME``,
``cheapspot.dev/pool-role=replica``) and sends each request straight to a chosen replica's
pod IP (:func:`cheapspot_operator.router.routing.choose`): ready, not draining, the fewest
requests in flight, ties to the one chosen longest ago (the adapter decides first only where
a replica answered 404 for it lately, e.g. one still loading it). An adapter name goes only
to replicas holding its wanted version, and a cut stream resumes only on its own version
(:mod:`cheapspot_operator.router.versions`). When every
replica is at ``--capacity`` requests in flight, or none is ready, the request waits (up to
``--max-queue-seconds``) instead of failing. A request that fails before its first byte
reaches the client is retried on another replica; a stream cut mid-way continues on another
replica from the tokens already sent (:mod:`cheapspot_operator.router.routing`).

It is Ready (``/readyz``) once it has listed the pool's replica pods. On SIGTERM it turns
not Ready at once, so the Service stops sending it requests, keeps serving for
``--drain-linger-seconds`` (endpoints take a moment to drop it) and until the requests in
flight have finished, at most ``--drain-seconds``, then exits: a rolling update of the router,
or its node drained, cuts no answer.

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
import logging
import os
import signal
import threading
import time
from collections.abc import Awaitable, Callable, Sequence

from aiohttp import web

from cheapspot.contract import ROUTER_PORT, ROUTER_READY_PATH, SERVE_PORT
from cheapspot_operator.router import routing, validation
from cheapspot_operator.router.relay import Relay
from cheapspot_operator.router.replicas import ReplicaSet, fixed_replicas, watch_pods
from cheapspot_operator.router.upstream import FIRST_TOKEN_SECONDS, STALL_SECONDS

log = logging.getLogger("cheapspot.router")

OWN_PATHS = frozenset({"/healthz", ROUTER_READY_PATH, "/cheapspot/router"})
"""The router's own endpoints: not client requests, not waited for when draining."""


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
    ) -> None:
        self.replicas = ReplicaSet(capacity)
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
            app.router.add_get(path, self.relay.get)
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
        return web.json_response({"replicas": self.replicas.describe(), **self.stats})

    async def handle_post(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        body = validation.read_request(request.path, raw)
        if isinstance(body, validation.Refusal):
            self.stats["refused"] += 1
            return web.json_response(body.error(), status=body.status)
        self.stats["requests"] += 1
        model = str(body.get("model") or "")
        if routing.resumable(body):
            return await self.relay.stream(request, body, model)
        return await self.relay.once(request, raw, body, model)


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
    p.add_argument("--kubeconfig", default=None)
    return p


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
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("aiohttp").setLevel(logging.WARNING)
    try:
        asyncio.run(serve(args))
    except KeyboardInterrupt:
        return 130
    return 0

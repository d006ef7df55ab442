"""The replicas a router sends to: where they come from and which one takes the next request.

:class:`ReplicaSet` is the router's live view of the pool's replicas and what it has sent to
each (requests in flight, the adapters each answered for or not, replicas cooling down after a failure); a request
waits in :meth:`ReplicaSet.acquire` while every replica is busy or none is ready.
:func:`watch_pods` keeps that view up to date from the pool's replica pods; ``--replica``
URLs (:func:`fixed_replicas`) stand in for them where there is no Kubernetes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
import time
from collections.abc import Sequence
from typing import Any

import aiohttp
from kubernetes import client, watch

from cheapspot.contract import ADMIN_PORT, SERVE_PORT
from cheapspot_operator.router import limits, routing, versions
from cheapspot_operator.router.routing import Load, Replica
from cheapspot_operator.router.versions import Pin, Version, VersionReport
from cheapspot_operator.runtime.kubeapi import api_client

log = logging.getLogger("cheapspot.router")

COOL_DOWN_SECONDS = 3.0
LACKS_SECONDS = 30.0
"""How long a replica's 404 for a model steers that model's requests to other replicas. The
404 is remembered no longer because the replica is then rarely asked again: an adapter
added at runtime loads within this (fetch, checks, vLLM's load), and a client asking a
replica still loading it gets at most one 404 from it per period."""
LIST_TIMEOUT = (5.0, 30.0)
"""(connect, read) seconds for the pod list: a hung API server must not hang the watch."""


class QueueFull(Exception):  # noqa: N818 (a refusal, answered to the client)
    """A new request found every replica busy and the queue full."""

    def __init__(self, refusal: limits.Overload) -> None:
        super().__init__(refusal.message)
        self.refusal = refusal


class ReplicaSet:
    def __init__(self, capacity: int = 32, bounds: limits.Limits | None = None) -> None:
        self.capacity = capacity
        """Requests in flight one replica takes before another request waits."""
        self.limits = bounds or limits.Limits()
        self.waiting = 0
        """Requests waiting in :meth:`acquire` for a replica."""
        self.by_name: dict[str, Replica] = {}
        self.load = Load()
        self.cooling: dict[str, float] = {}
        """Replica -> until when no request is sent to it: it just refused a connection or
        failed a request before its first byte (until the pod watch says more)."""
        self.stalled: set[str] = set()
        """Replicas that went silent mid-request: no request until they answer their health
        check again (the relay asks), however long that takes."""
        self.reports: dict[str, VersionReport] = {}
        """Each replica's last adapter-version report (:mod:`versions`), polled."""
        self.listed = False
        """The replica set is known (the first pod list, or fixed replicas)."""
        self._changed = asyncio.Condition()

    async def update(self, replicas: Sequence[Replica]) -> None:
        async with self._changed:
            self.by_name = {r.name: r for r in replicas}
            self.load.forget(self.by_name)
            for gone in set(self.reports) - set(self.by_name):
                del self.reports[gone]
            self.listed = True
            self._changed.notify_all()

    def cool(self, name: str) -> None:
        self.cooling[name] = time.monotonic() + COOL_DOWN_SECONDS

    async def recovered(self, name: str) -> None:
        """A stalled replica answers again: it takes requests at once (its cool-down was a
        guess; the answer is news)."""
        async with self._changed:
            self.stalled.discard(name)
            self.cooling.pop(name, None)
            self._changed.notify_all()

    async def release(self, name: str) -> None:
        async with self._changed:
            self.load.in_flight[name] = max(0, self.load.in_flight.get(name, 0) - 1)
            self._changed.notify_all()

    async def acquire(
        self,
        model: str,
        exclude: set[str],
        deadline: float,
        pin: Pin | None = None,
        *,
        queue: bool = False,
    ) -> Replica | None:
        """A replica for the request, counted in flight; waits while all are busy or none
        is ready (or none holds the wanted version yet), until ``deadline``. A resumed
        stream (``pin``) gets None at once when no usable replica holds its version.
        ``queue``: a new request, which raises :class:`QueueFull` rather than wait behind
        ``maxQueuedRequests`` others; a retry or a resume (a request the router has taken
        on) always waits its turn."""
        waiting = False
        try:
            async with self._changed:
                while True:
                    now = time.monotonic()
                    only = versions.allowed(self.by_name, self.reports, model, now, pin)
                    if pin is not None and not self.holds(model, pin):
                        return None
                    chosen = self._pick(model, exclude, only)
                    if chosen is not None:
                        self.load.take(chosen.name)
                        return chosen
                    if not waiting:
                        full = limits.queue_full(self.limits, self.waiting) if queue else None
                        if full is not None:
                            raise QueueFull(full)
                        waiting = True
                        self.waiting += 1
                    left = deadline - time.monotonic()
                    if left <= 0:
                        return None
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._changed.wait(), min(left, 1.0))
        finally:
            if waiting:
                self.waiting -= 1

    def _pick(self, model: str, exclude: set[str], only: set[str] | None) -> Replica | None:
        now = time.monotonic()
        avoid = exclude | self.stalled | {n for n, t in self.cooling.items() if t > now}
        chosen = self._choose(model, avoid, only)
        if chosen is None and not any(
            r.usable and r.name not in avoid and (only is None or r.name in only)
            for r in self.by_name.values()
        ):
            # Every usable replica failed this request or just failed another one: better
            # to try one of those again than to wait for nothing. Not a stalled one: it
            # would hold the request a first-token bound for nothing; waiting for it to
            # answer again (or another) is better.
            for fallback in (exclude | self.stalled, self.stalled):
                chosen = self._choose(model, fallback, only)
                if chosen is not None:
                    break
        return chosen

    def answered(self, name: str, model: str, status: int) -> None:
        """Replica ``name`` answered a request for ``model`` with ``status`` (its headers):
        what that says of the adapters it holds (:meth:`routing.Load.answered`)."""
        self.load.answered(name, model, status, time.monotonic())

    def _choose(self, model: str, exclude: set[str], only: set[str] | None) -> Replica | None:
        lacking = self.load.lacking(model, time.monotonic() - LACKS_SECONDS)
        return routing.choose(
            self.by_name.values(),
            model,
            self.load,
            capacity=self.capacity,
            exclude=exclude,
            lacking=lacking,
            only=only,
        )

    def version_of(self, name: str, model: str) -> Version | None:
        """The version of ``model`` replica ``name`` holds, by its fresh report."""
        report = versions.fresh(self.reports, time.monotonic()).get(name)
        return versions.version_of(report, model)

    def holds(self, model: str, pin: Pin) -> bool:
        """Some usable replica holds the pinned version of ``model``."""
        only = versions.allowed(self.by_name, self.reports, model, time.monotonic(), pin)
        return any(r.usable and (only is None or r.name in only) for r in self.by_name.values())

    async def poll_versions(self, session: aiohttp.ClientSession) -> None:
        """Ask every replica with a known admin port for its adapter versions, every
        :data:`~versions.POLL_SECONDS`, until cancelled. A replica that does not answer
        keeps its last report, which ages out of use (:data:`~versions.REPORT_MAX_AGE_SECONDS`)."""
        timeout = aiohttp.ClientTimeout(total=1.0)

        async def ask(replica: Replica, url: str) -> None:
            with contextlib.suppress(aiohttp.ClientError, TimeoutError, ValueError):
                async with session.get(url + "/cheapspot/adapters", timeout=timeout) as resp:
                    if resp.status == 200:
                        report = versions.parse_report(await resp.json(), time.monotonic())
                        if report is not None and replica.name in self.by_name:
                            self.reports[replica.name] = report

        while True:
            asks = [
                ask(r, url) for r in list(self.by_name.values()) if (url := r.admin_url) is not None
            ]
            if asks:
                await asyncio.gather(*asks)
                async with self._changed:
                    self._changed.notify_all()
            await asyncio.sleep(versions.POLL_SECONDS)

    def describe(self) -> list[dict[str, Any]]:
        """Each replica, by name, as the router's status page shows it."""
        return [
            {
                "name": r.name,
                "url": r.url,
                "ready": r.ready,
                "draining": r.draining,
                "stalled": r.name in self.stalled,
                "in_flight": self.load.in_flight.get(r.name, 0),
            }
            for r in sorted(self.by_name.values(), key=lambda r: r.name)
        ]


def fixed_replicas(urls: Sequence[str]) -> list[Replica]:
    out = []
    for i, url in enumerate(urls):
        hostport = url.split("://", 1)[-1].rstrip("/")
        host, _, port = hostport.rpartition(":")
        out.append(Replica(f"replica-{i}", host, int(port), ready=True))
    return out


def watch_pods(
    replicas: ReplicaSet,
    loop: asyncio.AbstractEventLoop,
    namespace: str,
    pool: str,
    stop: threading.Event,
    *,
    kubeconfig: str | None = None,
    port: int = SERVE_PORT,
    admin_port: int = ADMIN_PORT,
) -> None:
    """List and watch the pool's replica pods (in a thread), handing each new view of the
    replica set to the router's loop. Relists after a watch ends or fails."""
    core = client.CoreV1Api(api_client(kubeconfig))
    selector = routing.pool_selector(pool)
    pods: dict[str, dict[str, Any]] = {}

    def publish() -> None:
        view = [
            r
            for p in pods.values()
            if (r := routing.replica_from_pod(p, port, admin_port)) is not None
        ]
        asyncio.run_coroutine_threadsafe(replicas.update(view), loop)

    while not stop.is_set():
        try:
            # The raw JSON (the HTTP response, which the typed signature does not say), as
            # the watch's raw_object is: replica_from_pod reads API dicts.
            resp: Any = core.list_namespaced_pod(
                namespace,
                label_selector=selector,
                _preload_content=False,
                _request_timeout=LIST_TIMEOUT,
            )
            listed = json.loads(resp.data)
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

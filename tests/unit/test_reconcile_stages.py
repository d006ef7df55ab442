"""Where a reconciliation's time goes (issue 24): queued (from the event that woke it),
planning and writing, as the operator's histograms."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from prometheus_client import REGISTRY

from cheapspot_operator.runtime.kubeapi import request_kind
from cheapspot_operator.runtime.loops import Loops
from cheapspot_operator.runtime.watchcache import WatchCache

pytestmark = pytest.mark.unit


def _sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_an_event_during_a_busy_pass_is_queued_until_the_pass_ends() -> None:
    release = threading.Event()
    passes: list[float] = []

    class Slow:
        def reconcile(self, namespace: str, name: str) -> list[Any]:
            passes.append(time.monotonic())
            if len(passes) == 1:
                release.wait(5)
            return []

        def finished(self, namespace: str, name: str) -> bool:
            return False

    queued = "cheapspot_reconcile_queued_seconds"
    before_count = _sample(f"{queued}_count", trigger="event")
    before_sum = _sample(f"{queued}_sum", trigger="event")

    async def run() -> None:
        pool = ThreadPoolExecutor(max_workers=1)
        loops = Loops(Slow(), 60.0, pool, pool)  # type: ignore[arg-type]
        loops.ensure(("ns", "job"))
        while not passes:
            await asyncio.sleep(0.01)
        loops.poke(("ns", "job"))  # a reclaim notice while the first pass is still busy
        await asyncio.sleep(0.3)
        release.set()
        while len(passes) < 2:
            await asyncio.sleep(0.01)
        await loops.stop_all()
        loops.shutdown()

    asyncio.run(run())
    assert _sample(f"{queued}_count", trigger="event") - before_count == 2
    # The second pass waited for the first: at least the 0.3 s it was held.
    assert _sample(f"{queued}_sum", trigger="event") - before_sum >= 0.3


@pytest.mark.parametrize(
    ("method", "path", "kind"),
    [
        ("GET", "/api/v1/namespaces/ns/pods", ("LIST", "pods")),
        ("POST", "/api/v1/namespaces/ns/pods", ("POST", "pods")),
        ("DELETE", "/api/v1/namespaces/ns/pods/p-0", ("DELETE", "pods")),
        ("GET", "/api/v1/nodes", ("LIST", "nodes")),
        ("GET", "/api/v1/nodes/n1", ("GET", "nodes")),
        (
            "PATCH",
            "/apis/cheapspot.dev/v1alpha1/namespaces/ns/cheaptrainjobs/j/status",
            ("PATCH", "cheaptrainjobs/status"),
        ),
        ("POST", "/api/v1/namespaces/ns/events", ("POST", "events")),
        ("GET", "/api/v1/namespaces/ns/configmaps/prices?x=1", ("GET", "configmaps")),
    ],
)
def test_requests_are_named_as_the_api_server_counts_them(
    method: str, path: str, kind: tuple[str, str]
) -> None:
    assert request_kind(method, path) == kind


def test_the_events_of_one_pods_start_make_one_pass() -> None:
    class Count:
        passes = 0

        def reconcile(self, namespace: str, name: str) -> list[Any]:
            Count.passes += 1
            return []

        def finished(self, namespace: str, name: str) -> bool:
            return False

    async def run() -> int:
        pool = ThreadPoolExecutor(max_workers=1)
        loops = Loops(Count(), 60.0, pool, pool)  # type: ignore[arg-type]
        loops.ensure(("ns", "job"))
        while Count.passes < 1:
            await asyncio.sleep(0.01)
        for _ in range(3):  # created, bound, running
            loops.poke_soon(("ns", "job"), delay=0.1)
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.4)
        await loops.stop_all()
        loops.shutdown()
        return Count.passes

    assert asyncio.run(run()) == 2


def test_our_own_write_coming_back_on_the_watch_is_no_news() -> None:
    cache = WatchCache()
    written = {"metadata": {"namespace": "ns", "name": "j", "resourceVersion": "7"}}
    cache.wrote(written)
    assert cache.observe("MODIFIED", written) is False
    newer = {"metadata": {"namespace": "ns", "name": "j", "resourceVersion": "8"}}
    assert cache.observe("MODIFIED", newer) is True
    assert cache.observe("DELETED", newer) is True

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

from cheapspot_operator.runtime.loops import Loops

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

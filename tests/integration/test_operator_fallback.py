"""No spot capacity: shards move to on-demand after the configured time and return to spot at
a round boundary once capacity is back."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from operator_harness import FALLBACK_SECONDS, Harness, make_harness, wait_for

from cheapspot.contract import Phase


@pytest.fixture
def h(local_cluster: Any, s3_endpoint: Any, tmp_path: Path) -> Iterator[Harness]:
    yield from make_harness(local_cluster, s3_endpoint, tmp_path)


def _capacities(h: Harness, job: str) -> list[str]:
    return sorted(
        h.node_capacity(p["spec"]["nodeName"])
        for p in h.live_pods(job)
        if p["metadata"]["labels"].get("cheapspot.dev/role") == "train"
        and (p.get("status") or {}).get("phase") == "Running"
    )


def test_shards_fall_back_to_on_demand_and_return_at_a_round_boundary(h: Harness) -> None:
    # The default pools have two on-demand GPU nodes: two shards fit there.
    h.apply("fb", shards=2)
    wait_for("all running", lambda: h.running_on_nodes("fb", 3), timeout_s=60)
    h.cluster.spot_off(notice_s=0)
    wait_for(
        "both shards running on on-demand",
        lambda: _capacities(h, "fb") == ["on-demand", "on-demand"],
        timeout_s=FALLBACK_SECONDS + 60,
    )
    status = h.status("fb")
    assert status["restarts"] == 0
    assert {s["fallbackReason"] for s in status["shards"]} == {"SpotUnavailable"}
    onspot = h.condition("fb", "OnSpot") or {}
    assert (onspot["status"], onspot["reason"]) == ("False", "SpotUnavailable")
    assert h.table("fb")["Spot/OD"] == "0/2"
    h.wait_event("fb", "FellBackToOnDemand")

    h.cluster.spot_on()
    for i in range(2):
        h.write_progress("fb", i, phase=Phase.TRAINING, round=1, step=150)
    time.sleep(3)
    assert _capacities(h, "fb") == ["on-demand", "on-demand"], "moved mid-round"
    for i in range(2):
        h.write_progress("fb", i, phase=Phase.WAITING, round=1, step=200)
    wait_for(
        "both shards back on spot",
        lambda: _capacities(h, "fb") == ["spot", "spot"],
        timeout_s=60,
    )
    assert h.table("fb")["Spot/OD"] == "2/0"
    h.wait_event("fb", "ReturnedToSpot")
    assert h.status("fb")["restarts"] == 0

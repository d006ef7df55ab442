"""A deadline on the real control plane: when spot is taken away, a shard the deadline cannot
afford to wait for goes to on-demand at once (not after spot.fallbackAfterSeconds), and the
job finishes before its deadline."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from operator_harness import Harness, make_harness, wait_for

from cheapspot.contract import ExitCode, Phase


@pytest.fixture
def h(local_cluster: Any, s3_endpoint: Any, tmp_path: Path) -> Iterator[Harness]:
    yield from make_harness(local_cluster, s3_endpoint, tmp_path)


def _shard_capacity(h: Harness, job: str) -> str | None:
    for p in h.shard_pods(job, 0):
        if (p.get("status") or {}).get("phase") == "Running":
            return h.node_capacity(p["spec"]["nodeName"])
    return None


def test_a_deadline_moves_a_shard_to_on_demand_when_spot_is_taken_away(h: Harness) -> None:
    h.apply(
        "dl",
        shards=1,
        # Only the deadline may move the shard: the unschedulable fallback waits an hour.
        spot={"fallbackAfterSeconds": 3600, "maxPreemptionsPerHour": 100},
        deadline={"maxDuration": "20m", "changeoverSeconds": 30, "policy": "CheapSpot"},
    )
    wait_for("all running", lambda: h.running_on_nodes("dl", 2), timeout_s=90)
    assert _shard_capacity(h, "dl") == "spot"
    # The shard reports one step of 300: at its measured pace the work no longer fits
    # comfortably before the deadline, so it must not wait for spot.
    h.write_progress("dl", 0, phase=Phase.TRAINING, step=1)
    wait_for(
        "the deadline sees the shard's pace",
        lambda: (h.status("dl").get("deadline") or {}).get("onDemandShards") == [0],
        timeout_s=60,
    )
    assert _shard_capacity(h, "dl") == "spot", "moved mid-round"
    h.cluster.spot_off(notice_s=0)
    wait_for(
        "the shard running on on-demand",
        lambda: _shard_capacity(h, "dl") == "on-demand",
        timeout_s=120,
    )
    slot = h.status("dl")["shards"][0]
    assert slot["fallbackReason"] == "Deadline"
    onspot = h.condition("dl", "OnSpot") or {}
    assert (onspot["status"], onspot["reason"]) == ("False", "Deadline")

    # The workers finish: shard, then anchor.
    h.write_progress("dl", 0, phase=Phase.DONE, step=300)
    for p in h.shard_pods("dl", 0):
        h.set_outcome(p["metadata"]["name"], ExitCode.DONE)
    for p in h.live_pods("dl"):
        if p["metadata"]["labels"].get("cheapspot.dev/role") == "anchor":
            h.set_outcome(p["metadata"]["name"], ExitCode.DONE)
    wait_for("Succeeded", lambda: h.status("dl").get("phase") == "Succeeded", timeout_s=60)
    status = h.status("dl")
    done = datetime.fromisoformat(status["completionTime"].replace("Z", "+00:00"))
    deadline = datetime.fromisoformat(status["deadline"]["completeBy"].replace("Z", "+00:00"))
    assert done < deadline

"""Reclaims on the real control plane: a notice gets a replacement before the node is gone,
a hard node loss is replaced within seconds, and neither spends the restart budget."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from operator_harness import NOTICE_SECONDS, Harness, make_harness, wait_for


@pytest.fixture
def h(local_cluster: Any, s3_endpoint: Any, tmp_path: Path) -> Iterator[Harness]:
    yield from make_harness(local_cluster, s3_endpoint, tmp_path)


def _shard_node(h: Harness, job: str, shard: int) -> tuple[str, str]:
    def find() -> tuple[str, str] | None:
        for p in h.shard_pods(job, shard):
            if (p.get("status") or {}).get("phase") == "Running" and p["spec"].get("nodeName"):
                return p["metadata"]["name"], p["spec"]["nodeName"]
        return None

    return wait_for(f"shard {shard} running", find, timeout_s=60)


def _replacement(
    h: Harness, job: str, shard: int, old_pod: str, old_node: str
) -> dict[str, Any] | None:
    for p in h.shard_pods(job, shard):
        if p["metadata"]["name"] != old_pod and p["spec"].get("nodeName"):
            assert p["spec"]["nodeName"] != old_node, "replacement landed on the doomed node"
            return p
    return None


def test_a_notice_gets_a_replacement_before_the_node_is_gone(h: Harness) -> None:
    h.apply("pre", shards=3)
    wait_for("all running", lambda: h.running_on_nodes("pre", 4), timeout_s=60)
    pod, node = _shard_node(h, "pre", 1)
    reclaim = h.cluster.preempt_in_background(node, notice_s=NOTICE_SECONDS)
    replacement = wait_for(
        "a scheduled replacement",
        lambda: _replacement(h, "pre", 1, pod, node),
        timeout_s=NOTICE_SECONDS,
    )
    assert h.node(node) is not None, "the replacement came only after the node was gone"
    assert h.node_capacity(replacement["spec"]["nodeName"]) == "spot"
    reclaim.result(timeout=120)
    status = h.status("pre")
    assert status["preemptions"] == 1 and status["restarts"] == 0
    assert status["shards"][1]["preemptions"] == 1
    wait_for("a Preempted event", lambda: any(e["reason"] == "Preempted" for e in h.events("pre")))
    assert h.table("pre")["Preemptions"] == "1"


def test_a_hard_node_loss_is_replaced_within_seconds(h: Harness) -> None:
    h.apply("hard", shards=2)
    wait_for("all running", lambda: h.running_on_nodes("hard", 3), timeout_s=60)
    pod, node = _shard_node(h, "hard", 0)
    lost = time.monotonic()
    h.api.delete(f"/api/v1/nodes/{node}")  # the machine vanished, no notice at all
    wait_for("a scheduled replacement", lambda: _replacement(h, "hard", 0, pod, node), timeout_s=10)
    elapsed = time.monotonic() - lost
    assert elapsed < 10, f"replacement after {elapsed:.1f}s"
    assert h.status("hard")["restarts"] == 0


def test_a_node_going_not_ready_is_a_preemption(h: Harness) -> None:
    from cheapspot_localcluster.reclaim import NodeOps

    h.apply("nr", shards=1)
    wait_for("all running", lambda: h.running_on_nodes("nr", 2), timeout_s=60)
    pod, node = _shard_node(h, "nr", 0)
    NodeOps(h.cluster.core()).switch_off(node)  # kubelet stops; the node goes NotReady
    wait_for("a scheduled replacement", lambda: _replacement(h, "nr", 0, pod, node), timeout_s=60)
    assert h.status("nr")["restarts"] == 0
    assert h.status("nr")["preemptions"] == 1

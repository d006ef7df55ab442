"""Failures a real cluster produces, on the real control plane: a store outage that stops
every shard at once, pods the API server refuses to create, a crash on a node that then gets
a reclaim notice."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from operator_harness import Harness, make_harness, wait_for

from cheapspot.contract import ExitCode


@pytest.fixture
def h(local_cluster: Any, s3_endpoint: Any, tmp_path: Path) -> Iterator[Harness]:
    yield from make_harness(local_cluster, s3_endpoint, tmp_path)


def _running_shards(h: Harness, job: str, shards: int) -> list[str]:
    def find() -> list[str] | None:
        pods = [
            p["metadata"]["name"]
            for p in h.live_pods(job)
            if p["metadata"]["labels"].get("cheapspot.dev/role") == "train"
            and (p.get("status") or {}).get("phase") == "Running"
        ]
        return pods if len(pods) == shards else None

    return wait_for(f"{shards} shards running", find, timeout_s=60)


def test_a_store_outage_stopping_every_shard_does_not_fail_the_job(h: Harness) -> None:
    h.apply(
        "outage",
        shards=3,
        maxRestarts=0,
        failurePolicy={"transientBackoffSeconds": 3, "transientRetrySeconds": 600},
    )
    first = _running_shards(h, "outage", 3)
    for pod in first:
        h.set_outcome(pod, ExitCode.TRANSIENT, "object store unreachable after 8 attempts")

    def backing_off() -> dict[str, Any] | None:
        c = h.condition("outage", "Progressing")
        return c if c and c["reason"] == "BackingOff" else None

    cond = wait_for("the job to say it backs off", backing_off, timeout_s=20)
    assert "object store unreachable" in cond["message"]
    assert h.status("outage")["phase"] != "Failed"
    second = _running_shards(h, "outage", 3)
    assert not set(second) & set(first)

    # The status follows the pods within a pass (a pod's events are taken together, 0.5 s).
    def running() -> dict[str, Any] | None:
        status = h.status("outage")
        return status if status.get("phase") == "Running" else None

    status = wait_for("the job Running again", running, timeout_s=10)
    assert status["restarts"] == 0
    wait_for(
        "three TransientFailure events",
        lambda: sum(e["reason"] == "TransientFailure" for e in h.events("outage")) >= 3,
        timeout_s=10,
    )


def test_a_crash_whose_node_then_gets_a_notice_spends_the_restart_budget(h: Harness) -> None:
    h.apply("crash", shards=1, maxRestarts=2)
    (pod,) = _running_shards(h, "crash", 1)
    node = next(p["spec"]["nodeName"] for p in h.live_pods("crash") if p["metadata"]["name"] == pod)
    # The operator sees both at once: the container's exit 1, and the node's reclaim notice.
    h.operator.kill()
    h.set_outcome(pod, 1, "Traceback: a bug")
    taints = (h.node(node) or {}).get("spec", {}).get("taints") or []
    taints = [*taints, {"key": "cheapspot.dev/interruption", "effect": "NoSchedule"}]
    h.api.merge_patch(f"/api/v1/nodes/{node}", {"spec": {"taints": taints}})
    h.operator.start()
    wait_for("the restart", lambda: h.status("crash").get("restarts") == 1, timeout_s=30)
    assert h.status("crash")["preemptions"] == 0
    h.wait_event("crash", "ShardFailed")


@pytest.fixture
def refused(local_cluster: Any, s3_endpoint: Any, tmp_path: Path) -> Iterator[Harness]:
    worker = {"image": "cheapspot-worker:test", "serviceAccount": "no-such-account"}
    yield from make_harness(local_cluster, s3_endpoint, tmp_path, worker=worker)


def test_pods_the_api_server_refuses_are_reported_then_fail_the_job(refused: Harness) -> None:
    h = refused
    h.apply("nosa", shards=1, failurePolicy={"startTimeoutSeconds": 10})

    def reported() -> dict[str, Any] | None:
        c = h.condition("nosa", "Progressing")
        return c if c and c["reason"] == "CreateRefused" else None

    cond = wait_for("the refusal on the Progressing condition", reported, timeout_s=30)
    assert "no-such-account" in cond["message"]
    assert "no-such-account" in h.wait_event("nosa", "PodNotStarting")["message"]
    wait_for("the job to fail", lambda: h.status("nosa").get("phase") == "Failed", timeout_s=40)
    done = h.condition("nosa", "Succeeded") or {}
    assert done["reason"] == "CreateRefused" and "no-such-account" in done["message"]
    assert h.pods("nosa") == []


def test_a_second_job_on_the_same_output_prefix_is_refused(h: Harness) -> None:
    h.apply("owner", shards=1)
    _running_shards(h, "owner", 1)
    h.apply("intruder", shards=1, output={"uri": h.output_uri("owner")})
    wait_for("the refusal", lambda: h.status("intruder").get("phase") == "Failed", timeout_s=30)
    done = h.condition("intruder", "Succeeded") or {}
    assert done["reason"] == "OutputInUse"
    assert f"{h.namespace}/owner" in done["message"] and h.output_uri("owner") in done["message"]
    h.wait_event("intruder", "OutputInUse")
    assert h.pods("intruder") == []
    assert h.status("owner")["phase"] in ("Pending", "Running")

"""A 3-shard job on the real control plane: where the scheduler puts it, what the user sees,
and how it ends (success, permanent error, restarts, suspend, delete)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from operator_harness import Harness, make_harness, wait_for

from cheapspot.contract import ExitCode, Phase


@pytest.fixture
def h(local_cluster: Any, s3_endpoint: Any, tmp_path: Path) -> Iterator[Harness]:
    yield from make_harness(local_cluster, s3_endpoint, tmp_path)


def _running(h: Harness, job: str, pods: int) -> list[dict[str, Any]]:
    running: list[dict[str, Any]] = wait_for(
        f"{pods} running pods", lambda: h.running_on_nodes(job, pods), timeout_s=60
    )
    return running


def test_anchor_on_demand_shards_on_spot_and_the_columns_tell_the_story(h: Harness) -> None:
    h.apply("qa", shards=3)
    pods = _running(h, "qa", 4)
    by_role: dict[str, list[dict[str, Any]]] = {}
    for p in pods:
        by_role.setdefault(p["metadata"]["labels"]["cheapspot.dev/role"], []).append(p)
    (anchor,) = by_role["anchor"]
    assert h.node_capacity(anchor["spec"]["nodeName"]) == "on-demand"
    shards = by_role["train"]
    assert len(shards) == 3
    for p in shards:
        assert h.node_capacity(p["spec"]["nodeName"]) == "spot"
        node = h.node(p["spec"]["nodeName"]) or {}
        assert node["status"]["allocatable"].get("nvidia.com/gpu") == "1"
    assert len({p["spec"]["nodeName"] for p in shards}) == 3  # one GPU each

    wait_for("phase Running", lambda: h.status("qa").get("phase") == "Running")
    for i in range(3):
        h.write_progress("qa", i, round=1, step=150, loss=1.25, last_checkpoint_step=140)

    def progressed() -> dict[str, str] | None:
        row = h.table("qa")
        return row if row["Progress"].startswith("50%") else None

    row = wait_for("progress in the columns", progressed)
    assert row["Phase"] == "Running"
    assert row["Spot/OD"] == "3/0"
    assert row["Preemptions"] == "0"
    assert row["Cost"].startswith("$")
    progressing = h.condition("qa", "Progressing") or {}
    assert (progressing.get("status"), progressing.get("reason")) == ("True", "AllPodsRunning")
    status = h.status("qa")
    assert status["observedGeneration"] == h.job("qa")["metadata"]["generation"]
    assert status["lastCheckpoint"]["step"] == 140
    assert status["progress"]["loss"] == 1.25
    assert {s["capacityType"] for s in status["shards"]} == {"spot"}


def test_the_anchor_finishing_succeeds_the_job(h: Harness) -> None:
    h.apply("done", shards=1)
    pods = _running(h, "done", 2)
    for p in pods:
        h.set_outcome(p["metadata"]["name"], ExitCode.DONE)
    h.write_progress("done", -1, phase=Phase.DONE, round=3, step=300)
    wait_for("Succeeded", lambda: h.status("done").get("phase") == "Succeeded")
    cond = h.condition("done", "Succeeded") or {}
    assert (cond["status"], cond["reason"]) == ("True", "Completed")
    assert h.status("done")["completionTime"]
    assert h.table("done")["Progress"].startswith("100%")
    wait_for("a Completed event", lambda: any(e["reason"] == "Completed" for e in h.events("done")))


def test_a_permanent_worker_error_fails_the_job_with_its_reason_and_is_not_retried(
    h: Harness,
) -> None:
    h.apply("bad", shards=2)
    pods = _running(h, "bad", 3)
    shard = next(p for p in pods if p["metadata"]["labels"].get("cheapspot.dev/shard") == "1")
    h.set_outcome(shard["metadata"]["name"], ExitCode.PERMANENT, "dataset line 7: no 'text' field")
    wait_for("Failed", lambda: h.status("bad").get("phase") == "Failed")
    cond = h.condition("bad", "Succeeded") or {}
    assert (cond["status"], cond["reason"]) == ("False", "PermanentError")
    assert "dataset line 7: no 'text' field" in cond["message"]
    wait_for("the other pods to be stopped", lambda: not h.live_pods("bad"))
    names_before = {p["metadata"]["name"] for p in h.pods("bad")}
    time.sleep(3)  # several reconciliations: nothing is retried
    assert {p["metadata"]["name"] for p in h.pods("bad")} <= names_before
    assert h.status("bad")["restarts"] == 0
    h.wait_event("bad", "PermanentError")


def test_other_failures_are_retried_within_max_restarts(h: Harness) -> None:
    h.apply("flaky", shards=1, maxRestarts=1)
    pods = _running(h, "flaky", 2)
    shard = next(p for p in pods if p["metadata"]["labels"]["cheapspot.dev/role"] == "train")
    h.set_outcome(shard["metadata"]["name"], 1, "Traceback: a bug")
    retry = wait_for(
        "a retry",
        lambda: [p for p in h.shard_pods("flaky", 0) if p["metadata"]["name"].endswith("-1")],
    )
    assert retry[0]["metadata"]["name"] == "flaky-shard-0-1"
    assert h.status("flaky")["restarts"] == 1
    _running(h, "flaky", 2)
    h.set_outcome("flaky-shard-0-1", 1, "Traceback: a bug")
    wait_for("Failed", lambda: h.status("flaky").get("phase") == "Failed")
    assert (h.condition("flaky", "Succeeded") or {})["reason"] == "BackoffLimitExceeded"


def test_suspend_stops_pods_and_resume_brings_them_back(h: Harness) -> None:
    h.apply("nap", shards=2)
    _running(h, "nap", 3)
    h.api.merge_patch(
        f"/apis/cheapspot.dev/v1alpha1/namespaces/{h.namespace}/cheaptrainjobs/nap",
        {"spec": {"suspend": True}},
    )
    wait_for("Suspended", lambda: h.status("nap").get("phase") == "Suspended")
    wait_for("no pods", lambda: not h.pods("nap"), timeout_s=60)
    h.api.merge_patch(
        f"/apis/cheapspot.dev/v1alpha1/namespaces/{h.namespace}/cheaptrainjobs/nap",
        {"spec": {"suspend": False}},
    )
    _running(h, "nap", 3)
    wait_for("Running again", lambda: h.status("nap").get("phase") == "Running")
    assert [s["attempt"] for s in h.status("nap")["shards"]] == [1, 1]


def test_deleting_a_job_removes_its_pods_and_keeps_its_output(h: Harness) -> None:
    h.apply("gone", shards=1)
    _running(h, "gone", 2)
    h.write_progress("gone", 0, step=10)
    h.api.delete(f"/apis/cheapspot.dev/v1alpha1/namespaces/{h.namespace}/cheaptrainjobs/gone")
    wait_for(
        "the job to go (no finalizer holds it)",
        lambda: (
            h.api.get(f"/apis/cheapspot.dev/v1alpha1/namespaces/{h.namespace}/cheaptrainjobs/gone")
            is None
        ),
        timeout_s=10,
    )
    wait_for("garbage collection of its pods", lambda: not h.pods("gone"), timeout_s=60)
    from cheapspot.store import Store

    assert Store(h.output_uri("gone")).get_bytes_or_none("progress/shard-0000.json")

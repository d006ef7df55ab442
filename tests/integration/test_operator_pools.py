"""CheapInferencePools on the real control plane (kwok nodes; replica pods do not run vLLM).

What a user of a pool relies on, from the operator's side: replicas placed where they belong
(anchors on on-demand, the rest on spot), the router and its Service created with least
RBAC, the scale subresource working with ``kubectl scale``, and a reclaim notice turned into
a draining mark and a replacement at once, before the node goes.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from operator_harness import (
    NOTICE_SECONDS,
    Harness,
    apply_pool,
    make_harness,
    pools_path,
    replicas,
    wait_for,
)

from cheapspot.contract import ANNOTATION_DRAINING
from cheapspot_localcluster import build
from cheapspot_operator.app import costview


@pytest.fixture
def h(local_cluster: Any, s3_endpoint: Any, tmp_path: Path) -> Iterator[Harness]:
    yield from make_harness(local_cluster, s3_endpoint, tmp_path)


def pool_status(h: Harness, name: str) -> dict[str, Any]:
    got = h.api.get(pools_path(h.namespace, name)) or {}
    status: dict[str, Any] = got.get("status") or {}
    return status


def running(h: Harness, pool: str, n: int) -> list[dict[str, Any]] | None:
    pods = [
        p
        for p in replicas(h, pool)
        if (p.get("status") or {}).get("phase") == "Running" and p["spec"].get("nodeName")
    ]
    return pods if len(pods) == n else None


def kubectl_run(h: Harness, *args: str) -> subprocess.CompletedProcess[str]:
    binary = build.bin_dir() / "kubectl"
    return subprocess.run(
        [str(binary), "--kubeconfig", str(h.cluster.kubeconfig_path), "-n", h.namespace, *args],
        check=False,
        capture_output=True,
        text=True,
        timeout=30,
    )


def kubectl(h: Harness, *args: str) -> str:
    out = kubectl_run(h, *args)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_a_pool_places_anchor_and_spot_replicas_and_creates_its_router(h: Harness) -> None:
    apply_pool(h, "qa")
    pods = wait_for("3 replicas running", lambda: running(h, "qa", 3), timeout_s=60)
    by_slot = {p["metadata"]["labels"]["cheapspot.dev/replica"]: p for p in pods}
    assert h.node_capacity(by_slot["0"]["spec"]["nodeName"]) == "on-demand"
    assert {h.node_capacity(by_slot[i]["spec"]["nodeName"]) for i in ("1", "2")} == {"spot"}
    ns = h.namespace
    deployment = wait_for(
        "the router Deployment",
        lambda: h.api.get(f"/apis/apps/v1/namespaces/{ns}/deployments/qa-router"),
    )
    assert deployment["metadata"]["ownerReferences"][0]["kind"] == "CheapInferencePool"
    assert h.api.get(f"/api/v1/namespaces/{ns}/services/qa") is not None
    role = h.api.get(f"/apis/rbac.authorization.k8s.io/v1/namespaces/{ns}/roles/qa-router")
    assert role is not None and role["rules"][0]["resources"] == ["pods"]
    # Strangers kept out: the replicas' admin token (which their pods read) and the
    # NetworkPolicy in front of their ports, both the pool's.
    secret = h.api.get(f"/api/v1/namespaces/{ns}/secrets/qa-admin")
    assert secret is not None and secret["metadata"]["ownerReferences"][0]["kind"] == (
        "CheapInferencePool"
    )
    env = {e["name"]: e for e in by_slot["0"]["spec"]["containers"][0]["env"]}
    assert env["CHEAPSPOT_ADMIN_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == "qa-admin"
    policy = h.api.get(f"/apis/networking.k8s.io/v1/namespaces/{ns}/networkpolicies/qa-replicas")
    assert policy is not None and policy["spec"]["podSelector"]["matchLabels"] == {
        "cheapspot.dev/pool": "qa",
        "cheapspot.dev/pool-role": "replica",
    }
    wait_for(
        "a router pod on on-demand",
        lambda: [
            p
            for p in h.api.list(f"/api/v1/namespaces/{ns}/pods", "cheapspot.dev/pool-role=router")
            if p["spec"].get("nodeName") and h.node_capacity(p["spec"]["nodeName"]) == "on-demand"
        ],
        timeout_s=60,
    )
    status = wait_for(
        "status with the selector and endpoint",
        lambda: (st := pool_status(h, "qa")).get("replicas") == 3 and st,
    )
    assert status["selector"] == "cheapspot.dev/pool=qa,cheapspot.dev/pool-role=replica"
    assert status["endpoint"] == f"http://qa.{ns}.svc/v1"
    assert status["placementDisplay"] == "2/1"
    table = kubectl(h, "get", "cip", "qa")
    assert "SPOT/OD" in table and "2/1" in table


def test_kubectl_scale_adds_spot_replicas_and_removes_them_never_the_anchor(h: Harness) -> None:
    apply_pool(h, "sc", replicas=2)
    wait_for("2 replicas running", lambda: running(h, "sc", 2), timeout_s=60)
    kubectl(h, "scale", "cip", "sc", "--replicas=4")
    pods = wait_for("4 replicas running", lambda: running(h, "sc", 4), timeout_s=60)
    assert sorted(p["metadata"]["labels"]["cheapspot.dev/replica"] for p in pods) == [
        "0",
        "1",
        "2",
        "3",
    ]
    scale = json.loads(kubectl(h, "get", "--raw", f"{pools_path(h.namespace, 'sc')}/scale"))
    wait_for("status.replicas 4", lambda: pool_status(h, "sc").get("replicas") == 4)
    assert scale["spec"]["replicas"] == 4
    kubectl(h, "scale", "cip", "sc", "--replicas=1")
    left = wait_for("only the anchor left", lambda: running(h, "sc", 1), timeout_s=60)
    assert left[0]["metadata"]["labels"]["cheapspot.dev/replica"] == "0"
    assert h.node_capacity(left[0]["spec"]["nodeName"]) == "on-demand"
    refused = kubectl_run(h, "scale", "cip", "sc", "--replicas=0")
    assert refused.returncode != 0 and "anchor" in refused.stderr


def test_a_notice_marks_the_replica_draining_and_starts_its_replacement_at_once(
    h: Harness,
) -> None:
    apply_pool(h, "dr")
    pods = wait_for("3 replicas running", lambda: running(h, "dr", 3), timeout_s=60)
    victim = next(p for p in pods if p["metadata"]["labels"]["cheapspot.dev/replica"] == "1")
    node = victim["spec"]["nodeName"]
    name = victim["metadata"]["name"]
    started = time.monotonic()
    reclaim = h.cluster.preempt_in_background(node, notice_s=NOTICE_SECONDS)

    def replacement() -> dict[str, Any] | None:
        for p in replicas(h, "dr"):
            labels = p["metadata"]["labels"]
            if labels["cheapspot.dev/replica"] == "1" and p["metadata"]["name"] != name:
                return p
        return None

    new = wait_for("the replacement", replacement, timeout_s=NOTICE_SECONDS)
    created_after = time.monotonic() - started
    marked = h.api.get(f"/api/v1/namespaces/{h.namespace}/pods/{name}") or {}
    annotations = marked.get("metadata", {}).get("annotations") or {}
    assert ANNOTATION_DRAINING in annotations, "the old replica was not marked draining"
    assert h.node(node) is not None, "the replacement came only after the node was gone"
    assert created_after < 5, f"replacement created {created_after:.1f}s after the notice"
    scheduled = wait_for(
        "the replacement scheduled",
        lambda: (p := replacement()) and p["spec"].get("nodeName") and p,
        timeout_s=30,
    )
    assert scheduled["spec"]["nodeName"] != node
    assert h.node_capacity(scheduled["spec"]["nodeName"]) == "spot"
    assert new["metadata"]["annotations"]["cheapspot.dev/attempt"] == "1"
    status = pool_status(h, "dr")
    assert status["preemptions"] == 1
    assert [d["pod"] for d in status.get("draining") or []] in ([name], [])
    reclaim.result(timeout=120)
    wait_for(
        "the drained replica gone",
        lambda: h.api.get(f"/api/v1/namespaces/{h.namespace}/pods/{name}") is None,
        timeout_s=60,
    )


def test_spot_off_falls_back_to_on_demand_and_spot_on_returns(h: Harness) -> None:
    apply_pool(h, "fb", replicas=2)
    wait_for("2 replicas running", lambda: running(h, "fb", 2), timeout_s=60)
    h.cluster.spot_off()
    try:

        def on_demand_only() -> list[dict[str, Any]] | None:
            pods = running(h, "fb", 2)
            if pods and all(h.node_capacity(p["spec"]["nodeName"]) == "on-demand" for p in pods):
                return pods
            return None

        wait_for("both replicas on on-demand", on_demand_only, timeout_s=90)
        cond = wait_for(
            "SpotUnavailable",
            lambda: (c := _condition(h, "fb", "SpotUnavailable")) and c["status"] == "True" and c,
            timeout_s=30,
        )
        assert cond["reason"] == "FellBackToOnDemand"
    finally:
        h.cluster.spot_on()

    def back_on_spot() -> list[dict[str, Any]] | None:
        pods = running(h, "fb", 2)
        caps = sorted(h.node_capacity(p["spec"]["nodeName"]) for p in pods or [])
        return pods if caps == ["on-demand", "spot"] else None

    wait_for("the spot slot back on spot", back_on_spot, timeout_s=90)
    wait_for(
        "SpotUnavailable cleared",
        lambda: (c := _condition(h, "fb", "SpotUnavailable")) and c["status"] == "False",
        timeout_s=30,
    )


def _condition(h: Harness, pool: str, type_: str) -> dict[str, Any] | None:
    for c in pool_status(h, pool).get("conditions") or []:
        if c["type"] == type_:
            cond: dict[str, Any] = c
            return cond
    return None


def test_an_operator_killed_during_a_drain_makes_no_second_replacement(h: Harness) -> None:
    apply_pool(h, "ok", replicas=2)
    pods = wait_for("2 replicas running", lambda: running(h, "ok", 2), timeout_s=60)
    victim = next(p for p in pods if p["metadata"]["labels"]["cheapspot.dev/replica"] == "1")
    name, node = victim["metadata"]["name"], victim["spec"]["nodeName"]
    reclaim = h.cluster.preempt_in_background(node, notice_s=NOTICE_SECONDS)
    wait_for(
        "the victim marked draining",
        lambda: (
            ANNOTATION_DRAINING
            in (
                (h.api.get(f"/api/v1/namespaces/{h.namespace}/pods/{name}") or {})
                .get("metadata", {})
                .get("annotations")
                or {}
            )
        ),
        timeout_s=NOTICE_SECONDS,
        poll_s=0.05,
    )
    h.operator.kill()
    time.sleep(1)
    h.operator.start()
    reclaim.result(timeout=120)
    wait_for(
        "the drained replica gone",
        lambda: h.api.get(f"/api/v1/namespaces/{h.namespace}/pods/{name}") is None,
        timeout_s=60,
    )
    time.sleep(3)  # a few reconciliations of the restarted operator
    slot1 = [
        p["metadata"]["name"]
        for p in h.api.list(f"/api/v1/namespaces/{h.namespace}/pods", "cheapspot.dev/pool=ok")
        if p["metadata"]["labels"].get("cheapspot.dev/replica") == "1"
    ]
    assert slot1 == ["ok-replica-1-1"], slot1
    assert pool_status(h, "ok")["preemptions"] == 1


def pool_events(h: Harness, name: str) -> set[str]:
    return {
        e["reason"]
        for e in h.api.list(f"/api/v1/namespaces/{h.namespace}/events")
        if e.get("involvedObject", {}).get("name") == name
        and e.get("involvedObject", {}).get("kind") == "CheapInferencePool"
    }


def test_a_budget_keeps_only_the_anchor_and_raising_it_brings_the_replicas_back(
    h: Harness, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Running replicas cost a few cents an hour at table prices; the verdict adds their next
    # 5 minutes to what was spent, so $0.0001 is reached as soon as they run.
    apply_pool(h, "bud", budget={"limitUSD": 0.0001})

    def budget_condition() -> tuple[str, str] | None:
        for c in pool_status(h, "bud").get("conditions") or []:
            if c["type"] == "WithinBudget":
                return c["status"], c["reason"]
        return None

    wait_for("over budget", lambda: budget_condition() == ("False", "BudgetExceeded"), 120)
    (anchor,) = wait_for(
        "only the anchor left",
        lambda: pods if len(pods := replicas(h, "bud")) == 1 else None,
        timeout_s=60,
    )
    assert anchor["metadata"]["labels"]["cheapspot.dev/replica"] == "0"
    status = pool_status(h, "bud")
    assert status["budget"]["exceededAtLimitUSD"] == 0.0001
    assert status["replicasDisplay"].endswith("/1")
    assert "BudgetExceeded" in pool_events(h, "bud")
    wait_for("costs accrued", lambda: pool_status(h, "bud")["cost"]["dollars"] > 0, timeout_s=60)
    assert "table" in pool_status(h, "bud")["cost"]["sources"]
    kubeconfig = str(h.cluster.kubeconfig_path)
    monkeypatch.setenv("COLUMNS", "250")  # rich fits its table to the terminal
    assert costview.main(["--kubeconfig", kubeconfig, "-n", h.namespace]) == 0
    printed = capsys.readouterr().out
    assert "pool" in printed and "bud" in printed and "BudgetExceeded" in printed, printed

    h.api.merge_patch(pools_path(h.namespace, "bud"), {"spec": {"budget": {"limitUSD": 50}}})
    pods = wait_for("3 replicas running again", lambda: running(h, "bud", 3), timeout_s=60)
    assert sorted(p["metadata"]["labels"]["cheapspot.dev/replica"] for p in pods) == [
        "0",
        "1",
        "2",
    ]
    wait_for("within budget", lambda: (budget_condition() or ("",))[0] == "True", 30)


def test_a_replica_a_quota_refuses_is_reported_and_created_once_the_quota_allows(
    h: Harness,
) -> None:
    quotas = f"/api/v1/namespaces/{h.namespace}/resourcequotas"
    h.api.create(
        quotas, {"metadata": {"name": "gpus"}, "spec": {"hard": {"requests.nvidia.com/gpu": "1"}}}
    )
    # Until the quota controller has counted the namespace, admission refuses every pod.
    wait_for(
        "the quota counted",
        lambda: ((h.api.get(f"{quotas}/gpus") or {}).get("status") or {}).get("used"),
        timeout_s=30,
    )
    apply_pool(h, "rq", replicas=2)

    def refused() -> dict[str, Any] | None:
        c = _condition(h, "rq", "Degraded")
        return c if c and c["reason"] == "CreateRefused" else None

    cond = wait_for("the refusal on the Degraded condition", refused, timeout_s=30)
    assert cond["status"] == "True" and "exceeded quota: gpus" in cond["message"]
    # The event follows the status write by a few milliseconds.
    wait_for("a PodNotStarting event", lambda: "PodNotStarting" in pool_events(h, "rq"), 10)
    wait_for("one replica running", lambda: running(h, "rq", 1), timeout_s=60)
    h.api.merge_patch(f"{quotas}/gpus", {"spec": {"hard": {"requests.nvidia.com/gpu": "2"}}})
    wait_for("2 replicas running", lambda: running(h, "rq", 2), timeout_s=60)
    wait_for("the refusal cleared", lambda: refused() is None, timeout_s=30)


def test_a_router_setting_change_rolls_out_and_the_pool_has_disruption_budgets(
    h: Harness,
) -> None:
    apply_pool(h, "qa", replicas=1)
    ns = h.namespace
    path = f"/apis/apps/v1/namespaces/{ns}/deployments/qa-router"
    deployment = wait_for("the router Deployment", lambda: h.api.get(path))
    grace = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace == 600 + 10, "the default router.drainSeconds and the margin to exit"
    pdbs = f"/apis/policy/v1/namespaces/{ns}/poddisruptionbudgets"
    anchors = h.api.get(f"{pdbs}/qa-anchors")
    router = h.api.get(f"{pdbs}/qa-router")
    assert anchors is not None and anchors["spec"]["maxUnavailable"] == 0
    assert router is not None and router["spec"]["minAvailable"] == 1
    assert anchors["metadata"]["ownerReferences"][0]["kind"] == "CheapInferencePool"
    # A router setting changes: the Deployment's pod template follows (a rolling update),
    # not only its replica count.
    h.api.merge_patch(pools_path(ns, "qa"), {"spec": {"router": {"drainSeconds": 900}}})
    wait_for(
        "the new grace period in the router's template",
        lambda: (
            (d := h.api.get(path))
            and d["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] == 910
        ),
        timeout_s=30,
    )

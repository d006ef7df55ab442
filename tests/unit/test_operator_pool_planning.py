"""The pool planner, table-driven: observed state + a fake clock in, actions out."""

from __future__ import annotations

from dataclasses import replace
from datetime import timedelta

import pytest

from cheapspot.contract import ExitCode
from cheapspot_operator.api.common import CapacityType
from cheapspot_operator.api.inferencepool import InferencePoolStatus
from cheapspot_operator.inferencepool.actions import EnsureRouter
from cheapspot_operator.inferencepool.controller import PoolReconciler
from cheapspot_operator.inferencepool.observed import ReplicaReport
from cheapspot_operator.inferencepool.plan import (
    DEADLINE_MARGIN,
    DRAIN_SETTLE,
    ReplicaState,
    replica_pod_name,
    replica_state,
)
from cheapspot_operator.runtime.reconciler import apply_order
from cheapspot_operator.testing.pool import POOL_NAME, PoolWorld, make_pool, make_replica
from cheapspot_operator.testing.world import EPOCH, make_node


def name(index: int, attempt: int = 0) -> str:
    return replica_pod_name(POOL_NAME, index, attempt)


def test_a_new_pool_gets_anchors_on_demand_spot_replicas_and_a_router() -> None:
    w = PoolWorld(spec=make_pool(replicas=3, anchor={"replicas": 1}))
    w.step()
    assert {(c.index, c.attempt, c.capacity) for c in w.creates()} == {
        (0, 0, CapacityType.ON_DEMAND),
        (1, 0, CapacityType.SPOT),
        (2, 0, CapacityType.SPOT),
    }
    assert EnsureRouter(1) in w.last
    assert w.status.selector == "cheapspot.dev/pool=qa-serve,cheapspot.dev/pool-role=replica"
    assert w.status.endpoint == "http://qa-serve.default.svc/v1"
    assert w.condition("Ready") == ("False", "NoReplicaReady")
    assert w.status.placement_display == "2/1"


def test_ready_replicas_make_the_pool_ready_and_a_quiet_world_plans_nothing() -> None:
    w = PoolWorld().started()
    assert w.status.ready_replicas == 3 and w.status.replicas == 3
    assert w.status.replicas_display == "3/3"
    assert w.condition("Ready") == ("True", "Serving")
    assert w.condition("SpotUnavailable") == ("False", "OnSpot")
    assert w.condition("Degraded") == ("False", "AsExpected")
    assert w.step(1) == []


def test_a_reclaim_notice_drains_the_replica_and_creates_its_replacement_in_the_same_pass() -> None:
    w = PoolWorld().started()
    victim = w.of_slot(1)[0]
    w.reports[victim.name] = ReplicaReport(ready=True, adapters=frozenset({"qa"}), running=2)
    w.taint(victim.pod.node_name)
    w.step(1)
    (create,) = w.creates()
    assert (create.index, create.attempt, create.capacity) == (1, 1, CapacityType.SPOT)
    assert victim.pod.node_name in create.avoid_nodes
    (mark,) = w.marks()
    assert mark.pod == victim.name
    # The runtime applies a pass's actions in one order for every kind (its stages).
    applied = sorted(w.last, key=lambda a: apply_order(a, PoolReconciler.STAGES))
    assert applied.index(mark) < applied.index(create), "the router must stop choosing it first"
    assert mark.deadline == w.clock.now + timedelta(seconds=w.profile.notice_seconds)
    assert w.deletes() == []
    assert w.status.draining[0].pod == victim.name
    assert w.status.draining_replicas == 1
    assert w.events("Preempted")[0].cause == "InterruptionNotice"
    # Busy: kept. Idle, but not settled: kept. Idle and settled: deleted (SIGTERM drains).
    w.step(0.5)
    assert w.deletes() == []
    w.reports[victim.name] = replace(w.reports[victim.name], running=0)
    w.step(0.5)
    assert w.deletes() == []
    w.step(DRAIN_SETTLE.total_seconds())
    assert [d.name for d in w.deletes()] == [victim.name]
    assert w.deletes()[0].grace_seconds is None
    # The other replicas were never touched.
    assert all(p.draining_until is None for p in w.pods.values() if p.index != 1)


def test_a_busy_draining_replica_is_deleted_near_its_deadline() -> None:
    w = PoolWorld().started()
    victim = w.of_slot(2)[0]
    w.reports[victim.name] = ReplicaReport(ready=True, adapters=frozenset({"qa"}), waiting=5)
    w.taint(victim.pod.node_name)
    w.step()
    deadline = w.deadline_of(victim.name)
    assert deadline is not None
    early = (deadline - DEADLINE_MARGIN - w.clock.now).total_seconds() - 0.5
    w.step(early)
    assert w.deletes() == []
    w.step(0.5)
    assert [d.name for d in w.deletes()] == [victim.name]


@pytest.mark.parametrize(
    ("how", "grace"),
    [("node gone", 0), ("node NotReady", 0), ("pod vanished", None)],
)
def test_a_replica_lost_without_notice_is_replaced_at_once(how: str, grace: int | None) -> None:
    w = PoolWorld().started()
    victim = w.of_slot(1)[0]
    node = victim.pod.node_name
    if how == "node gone":
        del w.nodes[node]
    elif how == "node NotReady":
        w.nodes[node] = replace(w.nodes[node], ready=False)
    else:
        del w.pods[victim.name]
    w.step(1)
    assert [(c.index, c.attempt) for c in w.creates()] == [(1, 1)]
    assert w.marks() == []
    if grace is not None:
        assert [(d.name, d.grace_seconds) for d in w.deletes()] == [(victim.name, 0)]
    assert w.status.preemptions == 1


def test_the_anchor_is_on_demand_and_never_drained_by_a_spot_reclaim() -> None:
    w = PoolWorld().started()
    anchor = w.of_slot(0)[0]
    assert anchor.pod.capacity == "on-demand"
    for node in ("spot-1", "spot-2"):
        w.taint(node)
    w.step(1)
    assert anchor.name not in {m.pod for m in w.marks()}
    assert {c.index for c in w.creates()} == {1, 2}


def test_spot_missing_falls_back_to_on_demand_and_returns_when_a_spot_gpu_is_free() -> None:
    w = PoolWorld(spec=make_pool(replicas=2)).started()
    spot = w.of_slot(1)[0]
    del w.nodes[spot.pod.node_name]
    w.nodes = {k: v for k, v in w.nodes.items() if not k.startswith("spot")}
    w.step(1)
    pending = w.of_slot(1)[-1]
    w.set_pod(pending.name, unschedulable_since=w.clock.now)
    w.step(119)
    assert w.creates() == []
    w.step(1)
    (create,) = w.creates()
    assert (create.index, create.capacity) == (1, CapacityType.ON_DEMAND)
    assert w.condition("SpotUnavailable") == ("True", "FellBackToOnDemand")
    assert [d.name for d in w.deletes()] == [pending.name]  # it never served
    w.run_all()
    w.step(1)
    assert w.status.placement_display == "0/2"
    # Spot is back, but its GPU is taken by another workload: stay.
    w.nodes["spot-3"] = make_node("spot-3")
    w.other_gpus = {"spot-3": 1}
    w.step(5)
    assert w.creates() == []
    # A free GPU: a new spot replica first; the on-demand one keeps serving until it is Ready.
    w.other_gpus = {}
    w.step(5)
    (back,) = w.creates()
    assert (back.index, back.capacity) == (1, CapacityType.SPOT)
    assert w.events("ReturnedToSpot")
    on_demand = w.of_slot(1)[-2]
    w.step(5)
    assert w.marks() == [] and w.deletes() == [] and w.creates() == []
    assert replica_state(w.pods[on_demand.name], current=False) is ReplicaState.RETIRING
    w.run_all({name(1, back.attempt): "spot-3"})
    w.step(1)
    assert [m.pod for m in w.marks()] == [on_demand.name]
    assert w.condition("SpotUnavailable") == ("False", "OnSpot")


def test_scaling_down_removes_fallback_then_spot_replicas_never_the_anchor() -> None:
    w = PoolWorld(spec=make_pool(replicas=4)).started()
    w.status = w.status.model_copy(
        update={
            "slots": [
                s.model_copy(update={"capacity_type": CapacityType.ON_DEMAND})
                if s.index == 3
                else s
                for s in w.status.slots
            ]
        }
    )
    w.spec = make_pool(replicas=2)
    w.generation += 1
    w.step(1)
    assert sorted(m.pod for m in w.marks()) == [name(2), name(3)]
    assert w.status.replicas == 2
    assert [s.index for s in w.status.slots] == [0, 1]
    assert w.marks()[0].deadline == w.clock.now + timedelta(seconds=30)
    w.spec = make_pool(replicas=1)
    w.step(1)
    assert name(1) in {m.pod for m in w.marks()}
    assert name(0) not in {m.pod for m in w.marks()}
    with pytest.raises(ValueError, match="anchor"):
        make_pool(replicas=0, anchor={"replicas": 1})


def test_scaling_up_does_not_reuse_the_index_of_a_pod_still_draining() -> None:
    w = PoolWorld(spec=make_pool(replicas=3)).started()
    w.reports[name(2)] = ReplicaReport(ready=True, adapters=frozenset({"qa"}), running=1)
    w.spec = make_pool(replicas=2)
    w.step(1)
    assert [m.pod for m in w.marks()] == [name(2)]
    w.spec = make_pool(replicas=3)
    w.step(1)
    (create,) = w.creates()
    assert create.index == 3
    assert name(2) in w.live()


def test_adapters_added_or_removed_are_pushed_to_serving_replicas_without_a_restart() -> None:
    w = PoolWorld().started()
    adapters = [
        {"name": "qa", "uri": "s3://ckpt/qa/final/"},
        {"name": "sql", "uri": "s3://ckpt/sql/final/"},
    ]
    w.spec = make_pool(adapters=adapters)
    w.generation += 1
    w.step(1)
    assert sorted(s.pod for s in w.syncs()) == sorted(w.live())
    assert all([a.name for a in s.adapters] == ["qa", "sql"] for s in w.syncs())
    assert w.creates() == [] and w.deletes() == [] and w.marks() == []
    assert w.step(1) == [] or w.syncs() == []
    w.spec = make_pool(adapters=[])
    w.step(1)
    assert all(s.adapters == () for s in w.syncs()) and len(w.syncs()) == 3


def test_an_adapter_a_replica_cannot_load_shows_as_degraded_with_its_message() -> None:
    w = PoolWorld().started()
    w.reports[name(1)] = replace(w.reports[name(1)], message="qa: MANIFEST.json not found")
    w.step(1)
    assert w.condition("Degraded") == ("True", "AdapterError")
    assert "MANIFEST.json not found" in w.condition_message("Degraded")
    assert w.events("AdapterError")
    w.step(1)
    assert w.events("AdapterError") == []  # once, not every pass


def test_a_permanent_replica_error_holds_the_slot_with_its_message_no_crash_loop() -> None:
    w = PoolWorld().started()
    w.set_pod(
        name(1),
        phase="Failed",
        exit_code=int(ExitCode.PERMANENT),
        termination_message="model s3://models/tiny/ not found",
    )
    w.step(1)
    assert w.creates() == []
    assert w.condition("Degraded") == ("True", "ReplicaFailed")
    assert "s3://models/tiny/ not found" in w.condition_message("Degraded")
    assert "not found" in w.events("ReplicaFailed")[0].message
    for _ in range(5):
        w.step(10)
        assert w.creates() == []
    # The user fixes the spec: the slot is tried again.
    w.generation += 1
    w.step(1)
    assert [(c.index, c.attempt) for c in w.creates()] == [(1, 1)]


def test_failures_are_retried_then_held_as_a_crash_loop() -> None:
    w = PoolWorld().started()
    for attempt in range(3):
        w.set_pod(name(2, attempt), phase="Failed", exit_code=1, termination_message="boom")
        w.step(1)
        if attempt < 2:
            assert [(c.index, c.attempt) for c in w.creates()] == [(2, attempt + 1)]
            w.run_all()
            w.set_pod(name(2, attempt + 1), ready=False)
    assert w.creates() == []
    assert w.events("ReplicaCrashLoop")
    assert w.condition("Degraded") == ("True", "ReplicaFailed")


def test_an_operator_that_lost_its_status_adopts_the_pods_and_creates_no_duplicates() -> None:
    w = PoolWorld().started()
    w.taint(w.of_slot(1)[0].pod.node_name)
    w.step(1)
    w.run_all({name(1, 1): "spot-2"})
    w.status = InferencePoolStatus()
    w.step(1)
    assert w.creates() == []
    assert {s.index: s.attempt for s in w.status.slots} == {0: 0, 1: 1, 2: 0}


def test_replica_states() -> None:
    rp = make_replica(1)
    assert replica_state(rp, current=True) is ReplicaState.SERVING
    assert replica_state(replace(rp, ready=False), current=True) is ReplicaState.STARTING
    assert replica_state(rp, current=False) is ReplicaState.RETIRING
    draining = replace(rp, draining_until=EPOCH)
    assert replica_state(draining, current=False) is ReplicaState.DRAINING
    gone = make_replica(1, phase="Failed")
    assert replica_state(gone, current=True) is ReplicaState.GONE
    assert ReplicaState.GONE.is_terminal() and not ReplicaState.DRAINING.is_terminal()

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
from cheapspot_operator.inferencepool.draining import DEADLINE_MARGIN, DRAIN_SETTLE
from cheapspot_operator.inferencepool.observed import ReplicaReport, RouterView
from cheapspot_operator.inferencepool.replicas import ReplicaState, replica_pod_name, replica_state
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
    w.reports[victim.name] = ReplicaReport(
        ready=True, adapters={"qa": "s3://ckpt/qa/final/"}, running=2
    )
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
    w.reports[victim.name] = ReplicaReport(
        ready=True, adapters={"qa": "s3://ckpt/qa/final/"}, waiting=5
    )
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
    w.reports[name(2)] = ReplicaReport(
        ready=True, adapters={"qa": "s3://ckpt/qa/final/"}, running=1
    )
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


def test_a_new_uri_under_an_adapters_name_is_pushed_with_the_pools_generation() -> None:
    """The sync compares names and URIs: ``qa`` moved to a new URI (a new version) reaches
    the running replicas, with the generation that routers take as the newest list."""
    w = PoolWorld().started()
    w.spec = make_pool(adapters=[{"name": "qa", "uri": "s3://ckpt/qa-v2/final/"}])
    w.generation += 1
    w.step(1)
    syncs = w.syncs()
    assert sorted(s.pod for s in syncs) == sorted(w.live())
    assert all(
        [(a.name, a.uri) for a in s.adapters] == [("qa", "s3://ckpt/qa-v2/final/")]
        and s.generation == w.generation
        for s in syncs
    )
    assert w.step(1) == [] or w.syncs() == []  # the replicas report v2: nothing more


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


# --- failures: transient, permanent, never a serving replica for a replacement not Ready ---


def test_a_transient_exit_backs_off_and_retries_without_counting_as_a_failure() -> None:
    w = PoolWorld(spec=make_pool(failurePolicy={"transientBackoffSeconds": 10})).started()
    for attempt in range(5):
        w.set_pod(
            name(2, attempt),
            phase="Failed",
            exit_code=int(ExitCode.TRANSIENT),
            termination_message="adapter s3://ckpt/qa/final/ not published yet",
        )
        w.step(1)
        assert w.creates() == [], "a transient failure waits before the next pod"
        (event,) = w.events("TransientFailure")
        assert "not published yet" in event.message
        slot = w.status.slots[2]
        assert slot.failures == 0 and not slot.held
        delay = min(10 * 2**attempt, 100)
        w.step(delay - 1)
        assert w.creates() == []
        w.step(1)
        assert [(c.index, c.attempt) for c in w.creates()] == [(2, attempt + 1)]
        w.run_all()
        w.set_pod(name(2, attempt + 1), ready=False)
    assert w.events("ReplicaCrashLoop") == []
    assert w.condition("Degraded") == ("False", "AsExpected")
    # Ready again: the streak is over.
    w.set_pod(name(2, 5), ready=True)
    w.step(1)
    assert w.status.slots[2].transient_failures == 0


def test_transient_failures_past_the_retry_window_count_as_failures() -> None:
    policy = {"transientBackoffSeconds": 10, "transientRetrySeconds": 30}
    w = PoolWorld(spec=make_pool(failurePolicy=policy)).started()
    attempt = 0
    for _ in range(10):
        w.set_pod(name(2, attempt), phase="Failed", exit_code=int(ExitCode.TRANSIENT))
        w.step(1)
        if w.status.slots[2].held:
            break
        w.step(200)
        attempt = w.status.slots[2].attempt
        w.run_all()
        w.set_pod(name(2, attempt), ready=False)
    assert w.status.slots[2].held
    assert "transientRetrySeconds" in w.condition_message("Degraded")


def test_a_held_slot_never_drains_its_predecessor_that_still_serves() -> None:
    w = PoolWorld(spec=make_pool(replicas=2)).started()
    old = w.of_slot(1)[0]
    # The slot moves (a return to spot, say); its new pod crash-loops on the anchor's side.
    w.status = w.status.model_copy(
        update={
            "slots": [
                s.model_copy(update={"attempt": 1, "pod": "", "pod_phase": ""})
                if s.index == 1
                else s
                for s in w.status.slots
            ]
        }
    )
    for attempt in range(1, 4):
        w.step(1)
        w.run_all()
        w.set_pod(name(1, attempt), phase="Failed", exit_code=1, termination_message="boom")
        w.set_pod(name(1, attempt), ready=False)
    w.step(1)
    w.step(1)
    assert w.status.slots[1].held
    assert old.name not in {m.pod for m in w.marks()}
    assert old.name in w.live() and w.pods[old.name].draining_until is None
    assert old.name not in {d.name for d in w.deletes()}


def test_a_failed_return_to_spot_keeps_the_on_demand_replica_serving() -> None:
    w = PoolWorld(spec=make_pool(replicas=2)).started()
    w.nodes = {k: v for k, v in w.nodes.items() if not k.startswith("spot")}
    w.step(1)
    w.set_pod(w.of_slot(1)[-1].name, unschedulable_since=w.clock.now)
    w.step(120)
    w.run_all()
    w.step(1)
    on_demand = w.of_slot(1)[-1]
    assert on_demand.pod.capacity == "on-demand" and w.pods[on_demand.name].ready
    w.nodes["spot-3"] = make_node("spot-3")
    w.step(5)
    (back,) = w.creates()
    assert back.capacity is CapacityType.SPOT
    spot = name(1, back.attempt)
    # The spot pod fails, again and again: the on-demand one is never drained for it.
    w.run_all({spot: "spot-3"})
    w.set_pod(spot, phase="Failed", exit_code=1, termination_message="CUDA error", ready=False)
    w.step(1)
    assert w.events("SpotReturnFailed")
    (again,) = w.creates()
    assert again.capacity is CapacityType.ON_DEMAND
    assert on_demand.name not in {m.pod for m in w.marks()}
    assert on_demand.name not in {d.name for d in w.deletes()}
    assert w.status.slots[1].failures == 0
    # No new return to spot for spot.fallbackAfterSeconds.
    w.step(60)
    assert w.creates() == [] and w.pods[on_demand.name].draining_until is None
    # The new on-demand pod Ready: only now is the old one drained.
    w.run_all()
    w.step(1)
    assert [m.pod for m in w.marks()] == [on_demand.name]


# --- replicas that never start ----------------------------------------------------------


@pytest.mark.parametrize(
    ("waiting", "reason"),
    [
        ("ImagePullBackOff", "ImagePullBackOff"),
        ("ErrImagePull", "ImagePullBackOff"),
        ("CreateContainerConfigError", "CreateContainerConfigError"),
    ],
)
def test_a_replica_that_cannot_start_is_reported_then_held_past_the_start_timeout(
    waiting: str, reason: str
) -> None:
    w = PoolWorld(spec=make_pool(failurePolicy={"startTimeoutSeconds": 300})).started()
    w.set_pod(
        name(2),
        phase="Pending",
        ready=False,
        waiting_reason=waiting,
        waiting_message="secret hf-token not found",
    )
    w.step(1)
    (event,) = w.events("PodNotStarting")
    assert reason in event.message and "hf-token" in event.message
    w.step(100)
    assert w.events("PodNotStarting") == [] and not w.status.slots[2].held
    w.step(200)
    assert w.status.slots[2].held
    assert w.condition("Degraded") == ("True", "ReplicaFailed")
    assert "startTimeoutSeconds" in w.condition_message("Degraded")
    assert name(2) in {d.name for d in w.deletes()}, "a pod that never starts holds no node"
    w.step(10)
    assert w.creates() == []


def test_a_refused_create_is_reported_then_held_past_the_start_timeout() -> None:
    w = PoolWorld(spec=make_pool(replicas=1, failurePolicy={"startTimeoutSeconds": 60}))
    w.refused = {0: 'pods "qa-serve-replica-0-0" is forbidden: exceeded quota'}
    w.step(apply_pods=False)
    # (Its event comes from the act layer, in the API server's words: test_operator_handlers.)
    assert w.status.slots[0].blocked_reason == "CreateRefused"
    assert not w.status.slots[0].held
    w.step(60, apply_pods=False)
    assert w.status.slots[0].held
    assert "CreateRefused" in w.condition_message("Degraded")


def test_a_pending_pod_bound_to_a_node_is_costed() -> None:
    w = PoolWorld(spec=make_pool(replicas=1)).started()
    w.set_pod(name(0), phase="Pending", ready=False, waiting_reason="ImagePullBackOff")
    before = w.status.cost.dollars
    w.step(3600)
    assert w.status.cost.dollars > before + 0.1, "its node's GPU is held and billed"


def test_a_router_built_from_another_template_is_ensured_again() -> None:
    w = PoolWorld().started()
    w.router = RouterView(1, 1, template_hash="aaaa")
    w.router_template_hash = "aaaa"
    assert w.step(1) == []
    w.router_template_hash = "bbbb"  # a new router image in the operator's settings
    w.step(1)
    assert EnsureRouter(1) in w.last

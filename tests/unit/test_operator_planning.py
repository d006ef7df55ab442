"""The planner, table-driven: observed state + a fake clock in, actions out."""

from __future__ import annotations

from dataclasses import replace
from datetime import timedelta
from typing import Any

import pytest

from cheapspot.contract import ExitCode, Phase
from cheapspot_operator.api.common import CapacityType
from cheapspot_operator.api.phases import IllegalTransitionError, JobPhase, transition
from cheapspot_operator.planning.preemption import Outcome, classify
from cheapspot_operator.testing.train import World, make_job, make_pod, make_progress
from cheapspot_operator.testing.world import EPOCH, make_node
from cheapspot_operator.trainjob.observed import ANCHOR_INDEX
from cheapspot_operator.trainjob.plan import plan

INTERRUPTION = "cheapspot.dev/interruption"


def test_a_new_job_gets_an_on_demand_anchor_and_one_spot_pod_per_shard() -> None:
    w = World(spec=make_job(shards=4))
    w.step()
    creates = {(c.index, c.capacity) for c in w.creates()}
    assert creates == {(ANCHOR_INDEX, CapacityType.ON_DEMAND)} | {
        (i, CapacityType.SPOT) for i in range(4)
    }
    assert w.status.phase is JobPhase.PENDING
    assert w.condition("Progressing") == ("True", "WaitingForPods")
    assert w.status.shards_display == "4/0"
    assert w.status.start_time == EPOCH


def test_running_pods_make_the_job_running_and_a_quiet_world_plans_nothing() -> None:
    w = World().started()
    assert w.status.phase is JobPhase.RUNNING
    assert w.condition("Progressing") == ("True", "AllPodsRunning")
    assert w.condition("Succeeded") == ("Unknown", "InProgress")
    assert w.condition("OnSpot") == ("True", "AllShardsOnSpot")
    assert w.step(1) == []  # level-based and idempotent: nothing changed, nothing to do


# (description, change to shard 0's pod, change to its node, outcome, grace of the old pod)
PREEMPTIONS: list[tuple[str, dict[str, Any], dict[str, Any] | None, str, int | None]] = [
    (
        "interruption taint",
        {},
        {"taint_keys": frozenset({INTERRUPTION})},
        "InterruptionNotice",
        None,
    ),
    ("node NotReady", {}, {"ready": False}, "NodeNotReady", 0),
    ("DisruptionTarget", {"disruption_target": True}, {}, "DisruptionTarget", None),
    ("evicted", {"phase": "Failed", "reason": "Evicted"}, {}, "Evicted", None),
    (
        "rejected by the kubelet",
        {"phase": "Failed", "reason": "OutOfnvidia.com/gpu"},
        {},
        "RejectedByNode",
        None,
    ),
    (
        "SIGTERM exit",
        {"phase": "Failed", "exit_code": ExitCode.INTERRUPTED},
        {},
        "Interrupted",
        None,
    ),
    ("deleted by someone", {"deleting": True}, {}, "PodDeleted", None),
]


@pytest.mark.parametrize(
    ("pod_change", "node_change", "reason", "grace"),
    [p[1:] for p in PREEMPTIONS],
    ids=[p[0] for p in PREEMPTIONS],
)
def test_a_preemption_is_replaced_at_once_without_spending_the_restart_budget(
    pod_change: dict[str, Any], node_change: dict[str, Any] | None, reason: str, grace: int | None
) -> None:
    w = World(
        nodes={
            "spot-1": make_node("spot-1"),
            "spot-2": make_node("spot-2"),
            "on-demand-1": make_node("on-demand-1", "on-demand"),
        }
    )
    w.started()
    w.set_pod("qa-lora-shard-0-0", node_name="spot-2", **pod_change)
    if node_change:
        w.nodes["spot-2"] = replace(w.nodes["spot-2"], **node_change)
    w.step(1)
    (create,) = w.creates()
    assert (create.index, create.attempt, create.capacity) == (0, 1, CapacityType.SPOT)
    if node_change:
        assert "spot-2" in create.avoid_nodes
    assert w.status.preemptions == 1 and w.status.restarts == 0
    assert w.status.shards[0].preemptions == 1
    (event,) = w.events("Preempted")
    assert reason in event.message
    live = w.pods.get("qa-lora-shard-0-0")
    if live is not None and not live.terminated and not pod_change.get("deleting"):
        (delete,) = w.deletes()
        assert delete.grace_seconds == grace


def test_a_node_that_vanished_is_a_preemption_and_its_pod_is_force_deleted() -> None:
    w = World().started()
    w.set_pod("qa-lora-shard-1-0", node_name="spot-2")
    del w.nodes["spot-2"]
    w.step(1)
    assert [(c.index, c.attempt) for c in w.creates()] == [(1, 1)]
    assert [(d.name, d.grace_seconds) for d in w.deletes()] == [("qa-lora-shard-1-0", 0)]
    assert w.status.restarts == 0 and w.status.preemptions == 1


def test_a_pod_that_disappeared_after_it_ran_is_replaced() -> None:
    w = World().started()
    del w.pods["qa-lora-shard-0-0"]
    w.step(1)
    assert [(c.index, c.attempt) for c in w.creates()] == [(0, 1)]
    assert "PodGone" in w.events("Preempted")[0].message


def test_the_replacement_never_targets_a_node_being_reclaimed() -> None:
    w = World().started()
    w.nodes["spot-1"] = replace(w.nodes["spot-1"], taint_keys=frozenset({INTERRUPTION}))
    w.step(1)
    assert w.creates() and all(c.avoid_nodes == ("spot-1",) for c in w.creates())


def test_a_permanent_worker_error_fails_the_job_with_the_workers_message_and_no_retry() -> None:
    w = World().started()
    w.set_pod(
        "qa-lora-shard-1-0",
        phase="Failed",
        exit_code=ExitCode.PERMANENT,
        termination_message="dataset record 3: no 'text' field",
    )
    w.step(1)
    assert w.creates() == []
    assert w.status.phase is JobPhase.FAILED
    assert w.condition("Succeeded") == ("False", "PermanentError")
    assert "shard 1: dataset record 3: no 'text' field" in w.status.message
    assert w.status.restarts == 0
    assert {d.name for d in w.deletes()} == {"qa-lora-anchor-0", "qa-lora-shard-0-0"}
    assert w.events("PermanentError")
    # and it stays failed: nothing is recreated later
    w.pods.clear()
    assert w.step(5) == [] or not w.creates()


def test_the_permanent_message_falls_back_to_the_progress_record() -> None:
    w = World().started()
    w.progress[0] = make_progress(0, phase=Phase.FAILED, message="unknown target module qkv")
    w.set_pod("qa-lora-shard-0-0", phase="Failed", exit_code=ExitCode.PERMANENT)
    w.step(1)
    assert "unknown target module qkv" in w.status.message


@pytest.mark.parametrize("exit_code", [1, 137])
def test_other_failures_spend_the_restart_budget(exit_code: int) -> None:
    w = World(spec=make_job(maxRestarts=1)).started()
    w.set_pod("qa-lora-shard-0-0", phase="Failed", exit_code=exit_code)
    w.step(1)
    assert [(c.index, c.attempt) for c in w.creates()] == [(0, 1)]
    assert w.status.restarts == 1 and w.status.preemptions == 0
    w.run_all()
    w.step(1)
    w.set_pod("qa-lora-shard-0-1", phase="Failed", exit_code=exit_code)
    w.step(1)
    assert w.creates() == []
    assert w.status.phase is JobPhase.FAILED
    assert w.condition("Succeeded") == ("False", "BackoffLimitExceeded")


def test_a_finished_shard_is_not_replaced_and_the_anchor_finishing_succeeds_the_job() -> None:
    w = World().started()
    w.set_pod("qa-lora-shard-0-0", phase="Succeeded", exit_code=0)
    w.step(1)
    assert w.creates() == [] and w.status.shards[0].done
    w.set_pod("qa-lora-shard-1-0", phase="Succeeded", exit_code=0)
    w.set_pod("qa-lora-anchor-0", phase="Succeeded", exit_code=0)
    w.step(1)
    assert w.status.phase is JobPhase.SUCCEEDED
    assert w.condition("Succeeded") == ("True", "Completed")
    assert w.status.completion_time == w.clock.now
    assert w.status.progress.percent == 100
    assert w.events("Completed")


def test_a_shard_without_spot_falls_back_after_the_configured_time() -> None:
    w = World(spec=make_job(spot={"fallbackAfterSeconds": 300}))
    w.step()
    w.run_all()
    since = w.clock.now
    w.set_pod("qa-lora-shard-0-0", phase="Pending", node_name="", unschedulable_since=since)
    w.step(299)
    assert w.creates() == []
    w.step(1)
    (create,) = w.creates()
    assert (create.index, create.capacity) == (0, CapacityType.ON_DEMAND)
    assert [d.name for d in w.deletes()] == ["qa-lora-shard-0-0"]
    assert w.status.shards[0].fallback_reason == "SpotUnavailable"
    assert w.status.restarts == 0 and w.status.preemptions == 0
    assert w.condition("OnSpot") == ("False", "SpotUnavailable")
    assert w.events("FellBackToOnDemand")
    assert w.status.shards_display == "1/1"


def _on_demand_after_fallback() -> World:
    w = World(spec=make_job(spot={"fallbackAfterSeconds": 10, "returnAfterSeconds": 0}))
    w.step()
    w.run_all()
    w.set_pod("qa-lora-shard-0-0", phase="Pending", node_name="", unschedulable_since=w.clock.now)
    w.step(10)
    w.run_all()
    w.step(1)
    assert w.pods["qa-lora-shard-0-1"].capacity == "on-demand"
    return w


def test_a_fallen_back_shard_returns_to_spot_only_at_a_round_boundary() -> None:
    w = _on_demand_after_fallback()
    w.progress[0] = make_progress(0, phase=Phase.TRAINING, round=2, step=250)
    w.step(1)
    assert w.creates() == []  # mid-round: moving now would throw work away
    w.progress[0] = make_progress(0, phase=Phase.WAITING, round=2, step=300)
    w.step(1)
    (create,) = w.creates()
    assert (create.index, create.capacity) == (0, CapacityType.SPOT)
    assert w.events("ReturnedToSpot")
    assert w.status.restarts == 0 and w.status.preemptions == 0


def test_no_return_to_spot_while_no_spot_node_is_usable() -> None:
    w = _on_demand_after_fallback()
    for name in ("spot-1", "spot-2"):  # cordoned: running pods stay, nothing new fits
        w.nodes[name] = replace(w.nodes[name], unschedulable=True)
    w.progress[0] = make_progress(0, phase=Phase.WAITING)
    w.step(1)
    assert w.creates() == []


def test_too_many_preemptions_per_hour_move_the_job_to_on_demand() -> None:
    w = World(spec=make_job(shards=1, spot={"maxPreemptionsPerHour": 1})).started()
    for attempt in range(2):
        w.set_pod(f"qa-lora-shard-0-{attempt}", disruption_target=True)
        w.step(60)
        w.run_all()
        w.step(1)
    assert w.pods["qa-lora-shard-0-2"].capacity == "on-demand"
    assert w.status.shards[0].fallback_reason == "PreemptionRate"
    # an hour later the rate is low again: back to spot at the next round boundary
    w.progress[0] = make_progress(0, phase=Phase.WAITING)
    w.step(3600)
    assert [(c.index, c.capacity) for c in w.creates()] == [(0, CapacityType.SPOT)]


def test_suspend_deletes_pods_and_resume_creates_new_attempts() -> None:
    w = World().started()
    w.spec = make_job(suspend=True)
    w.step(1)
    assert w.status.phase is JobPhase.SUSPENDED
    assert {d.name for d in w.deletes()} == set(w.pods)
    assert w.creates() == []
    assert w.condition("Suspended") == ("True", "SuspendRequested")
    w.pods.clear()
    w.step(10)
    assert w.creates() == []
    w.spec = make_job(suspend=False)
    w.step(1)
    assert str(w.status.phase) == "Pending"  # (mypy keeps the earlier narrowing)
    assert sorted((c.index, c.attempt) for c in w.creates()) == [(-1, 1), (0, 1), (1, 1)]
    assert w.events("Resumed")


def test_a_failed_create_is_retried_under_the_same_name() -> None:
    w = World()
    w.step(apply_pods=False)
    first = {(c.index, c.attempt) for c in w.creates()}
    w.step(1)
    assert {(c.index, c.attempt) for c in w.creates()} == first


def test_a_pod_newer_than_the_status_is_adopted_not_duplicated() -> None:
    # The operator created attempt 1 and died before the status recorded it.
    w = World().started()
    w.pods["qa-lora-shard-0-1"] = make_pod(0, 1)
    w.set_pod("qa-lora-shard-0-0", phase="Failed", exit_code=1)
    w.step(1)
    assert w.creates() == []
    assert w.status.shards[0].attempt == 1 and w.status.restarts == 0


def test_a_finished_job_only_removes_stray_pods() -> None:
    w = World().started()
    w.set_pod("qa-lora-anchor-0", phase="Succeeded", exit_code=0)
    w.step(1)
    w.pods["qa-lora-shard-0-7"] = make_pod(0, 7)
    w.step(1)
    assert w.creates() == []
    assert "qa-lora-shard-0-7" in {d.name for d in w.deletes()}


def test_progress_comes_from_the_records() -> None:
    w = World(spec=make_job(shards=2, training={"steps": 1000}, rounds={"localSteps": 100}))
    w.started()
    w.progress[0] = make_progress(0, round=3, step=350, loss=1.5, last_checkpoint_step=340)
    w.progress[1] = make_progress(1, round=3, step=300, loss=2.5, last_checkpoint_step=300)
    w.step(1)
    p = w.status.progress
    assert (p.round, p.rounds, p.step, p.total_steps, p.loss, p.percent) == (
        3,
        10,
        300,
        1000,
        2.0,
        30,
    )
    assert w.status.progress_display == "30% r4/10"
    assert w.status.last_checkpoint is not None
    assert w.status.last_checkpoint.uri == "s3://ckpt/qa-lora/shards/0000/checkpoints/00000340/"
    assert (w.status.shards[1].step, w.status.shards[1].loss) == (300, 2.5)


def test_cost_accrues_from_running_pods_at_table_prices() -> None:
    w = World(spec=make_job(shards=2)).started()
    w.step(3600)
    # two g5.xlarge shards on spot (0.40/h) and the anchor on an on-demand g5.xlarge (1.006/h)
    assert w.status.cost.dollars == pytest.approx(2 * 0.40 + 1.006, abs=1e-3)
    assert w.status.cost.on_demand_dollars == pytest.approx(3 * 1.006, abs=1e-3)
    assert w.status.cost.display == "$1.81"


def test_conditions_keep_their_transition_time_while_unchanged() -> None:
    w = World().started()
    since = next(c for c in w.status.conditions if c.type == "Progressing").last_transition_time
    w.step(3600)
    now = next(c for c in w.status.conditions if c.type == "Progressing").last_transition_time
    assert now == since
    assert all(c.observed_generation == 1 for c in w.status.conditions)


def test_recent_preemptions_older_than_an_hour_are_forgotten() -> None:
    w = World().started()
    w.status = w.status.model_copy(
        update={"recent_preemptions": [EPOCH - timedelta(hours=2), EPOCH]}
    )
    w.step(1)
    assert w.status.recent_preemptions == [EPOCH]


def test_classify_prefers_the_workers_permanent_error_over_a_node_signal() -> None:
    w = World().started()
    w.nodes["spot-1"] = replace(w.nodes["spot-1"], ready=False)
    pod = make_pod(0, phase="Failed", exit_code=ExitCode.PERMANENT, termination_message="bad")
    assert classify(pod, w.observed()).outcome is Outcome.PERMANENT
    assert classify(make_pod(0), w.observed()).outcome is Outcome.PREEMPTED


def test_plan_is_pure_same_inputs_same_actions() -> None:
    w = World()
    obs = w.observed()
    assert plan(w.spec, obs, EPOCH) == plan(w.spec, obs, EPOCH)


@pytest.mark.parametrize(
    ("src", "dst", "ok"),
    [
        (JobPhase.PENDING, JobPhase.RUNNING, True),
        (JobPhase.RUNNING, JobPhase.SUCCEEDED, True),
        (JobPhase.SUSPENDED, JobPhase.PENDING, True),
        (JobPhase.RUNNING, JobPhase.PENDING, False),
        (JobPhase.SUCCEEDED, JobPhase.RUNNING, False),
        (JobPhase.FAILED, JobPhase.PENDING, False),
        (JobPhase.SUSPENDED, JobPhase.RUNNING, False),
    ],
)
def test_phase_transitions(src: JobPhase, dst: JobPhase, ok: bool) -> None:
    if ok:
        assert transition(src, dst) is dst
    else:
        with pytest.raises(IllegalTransitionError):
            transition(src, dst)
    assert JobPhase.SUCCEEDED.is_terminal() and JobPhase.FAILED.is_terminal()
    assert not JobPhase.RUNNING.is_terminal()


def test_a_shard_reclaimed_after_its_last_result_is_done_not_replaced() -> None:
    w = World().started()
    w.progress[0] = make_progress(0, phase=Phase.DONE)
    del w.nodes["spot-2"]
    w.set_pod("qa-lora-shard-0-0", node_name="spot-2")
    w.step(1)
    assert [c.index for c in w.creates()] == []
    assert w.status.shards[0].done and w.status.preemptions == 0


# --- failures judged by what the container itself did (issue: misclassified failures) ------


def test_a_crash_whose_node_later_got_a_notice_is_a_failure_not_a_preemption() -> None:
    w = World(spec=make_job(maxRestarts=3)).started()
    w.set_pod("qa-lora-shard-0-0", node_name="spot-2", phase="Failed", exit_code=1)
    w.nodes["spot-2"] = replace(w.nodes["spot-2"], taint_keys=frozenset({INTERRUPTION}))
    w.step(1)
    assert w.status.restarts == 1 and w.status.preemptions == 0
    assert w.events("ShardFailed") and not w.events("Preempted")


def test_an_oom_kill_is_a_failure_that_says_so() -> None:
    w = World(spec=make_job(maxRestarts=0)).started()
    w.set_pod(
        "qa-lora-shard-0-0",
        node_name="spot-2",
        phase="Failed",
        exit_code=137,
        exit_reason="OOMKilled",
    )
    w.nodes["spot-2"] = replace(w.nodes["spot-2"], ready=False)
    w.step(1)
    assert w.status.phase is JobPhase.FAILED
    assert w.status.preemptions == 0
    assert "OOMKilled" in w.status.message and "resources.memory" in w.status.message


def test_a_sigkill_on_a_node_being_reclaimed_is_still_a_preemption() -> None:
    w = World().started()
    w.set_pod("qa-lora-shard-0-0", node_name="spot-2", phase="Failed", exit_code=137)
    w.nodes["spot-2"] = replace(w.nodes["spot-2"], taint_keys=frozenset({INTERRUPTION}))
    w.step(1)
    assert w.status.preemptions == 1 and w.status.restarts == 0


def test_an_eviction_the_job_caused_is_a_failure_with_the_kubelets_message() -> None:
    message = 'Usage of EmptyDir volume "tmp" exceeds the limit "20Gi". '
    w = World(spec=make_job(maxRestarts=0)).started()
    w.set_pod(
        "qa-lora-shard-1-0",
        phase="Failed",
        reason="Evicted",
        exit_code=137,
        termination_message=message,
    )
    w.step(1)
    assert w.status.phase is JobPhase.FAILED
    assert w.status.preemptions == 0
    assert "shard 1" in w.status.message and "exceeds the limit" in w.status.message


def test_preemptions_past_the_cap_move_the_job_to_on_demand_for_good() -> None:
    spot = {"maxPreemptions": 2, "maxPreemptionsPerHour": 0, "onMaxPreemptions": "OnDemand"}
    w = World(spec=make_job(shards=1, spot=spot)).started()
    for attempt in range(3):
        w.set_pod(f"qa-lora-shard-0-{attempt}", disruption_target=True)
        w.step(60)
        w.run_all()
        w.step(1)
    assert w.pods["qa-lora-shard-0-3"].capacity == "on-demand"
    assert w.status.shards[0].fallback_reason == "PreemptionLimit"
    # Days later, at a round boundary with spot free, it stays on on-demand.
    w.progress[0] = make_progress(0, phase=Phase.WAITING)
    w.step(86400)
    assert w.creates() == []
    assert w.status.phase is JobPhase.RUNNING


def test_preemptions_past_the_cap_fail_the_job_when_the_spec_says_so() -> None:
    spot = {"maxPreemptions": 1, "maxPreemptionsPerHour": 0, "onMaxPreemptions": "Fail"}
    w = World(spec=make_job(shards=1, spot=spot)).started()
    w.set_pod("qa-lora-shard-0-0", disruption_target=True)
    w.step(60)
    w.run_all()
    w.step(1)
    assert w.status.phase is JobPhase.RUNNING
    w.set_pod("qa-lora-shard-0-1", disruption_target=True)
    w.step(60)
    assert w.status.phase is JobPhase.FAILED
    assert w.condition("Succeeded") == ("False", "PreemptionLimitExceeded")
    assert "spot.maxPreemptions" in w.status.message


# --- transient failures back off instead of spending the restart budget ----------------------


def _all_shards_exit(w: World, code: int, attempt: int = 0, message: str = "") -> None:
    for i in range(w.spec.shards):
        w.set_pod(
            f"qa-lora-shard-{i}-{attempt}",
            phase="Failed",
            exit_code=code,
            termination_message=message,
        )


def test_a_store_outage_stopping_every_shard_backs_off_and_retries_without_spending_budget() -> (
    None
):
    policy = {"transientBackoffSeconds": 10, "transientRetrySeconds": 600}
    w = World(spec=make_job(shards=4, maxRestarts=0, failurePolicy=policy)).started()
    _all_shards_exit(w, ExitCode.TRANSIENT, message="object store unreachable")
    w.step(1)
    assert w.status.phase is JobPhase.RUNNING
    assert w.status.restarts == 0
    assert w.creates() == []  # waiting first
    assert len(w.events("TransientFailure")) == 4
    status, reason = w.condition("Progressing")
    assert (status, reason) == ("True", "BackingOff")
    message = next(c.message for c in w.status.conditions if c.type == "Progressing")
    assert "object store unreachable" in message and "shard 3" in message
    w.step(5)
    assert w.creates() == []
    w.step(5)
    assert sorted((c.index, c.attempt) for c in w.creates()) == [(i, 1) for i in range(4)]
    # a second failure in a row waits twice as long
    w.run_all()
    w.step(1)
    _all_shards_exit(w, ExitCode.TRANSIENT, attempt=1)
    w.step(1)
    w.step(19)
    assert w.creates() == []
    w.step(1)
    assert len(w.creates()) == 4
    assert w.status.restarts == 0 and w.status.phase is JobPhase.RUNNING


def test_transient_failures_past_the_retry_window_count_as_failures() -> None:
    policy = {"transientBackoffSeconds": 10, "transientRetrySeconds": 60}
    w = World(spec=make_job(shards=1, maxRestarts=0, failurePolicy=policy)).started()
    attempt = 0
    while w.status.phase is not JobPhase.FAILED and attempt < 20:
        w.set_pod(f"qa-lora-shard-0-{attempt}", phase="Failed", exit_code=ExitCode.TRANSIENT)
        w.step(1)
        w.step(200)  # past any backoff
        w.run_all()
        attempt += 1
    assert w.status.phase is JobPhase.FAILED
    assert w.condition("Succeeded") == ("False", "BackoffLimitExceeded")
    assert "transientRetrySeconds" in w.status.message
    assert attempt < 5  # 0 s, then > 60 s after the first: the second failure ends it


def test_a_slot_back_at_work_starts_a_new_transient_streak() -> None:
    policy = {"transientBackoffSeconds": 10, "transientRetrySeconds": 60}
    w = World(spec=make_job(shards=1, maxRestarts=0, failurePolicy=policy)).started()
    w.set_pod("qa-lora-shard-0-0", phase="Failed", exit_code=ExitCode.TRANSIENT)
    w.step(1)
    w.step(10)
    w.run_all()
    w.progress[0] = make_progress(
        0, phase=Phase.TRAINING, updated_at=w.clock.now + timedelta(seconds=5)
    )
    w.step(30)
    assert w.status.shards[0].transient_since is None
    w.step(3600)
    w.set_pod("qa-lora-shard-0-1", phase="Failed", exit_code=ExitCode.TRANSIENT)
    w.step(1)
    assert w.status.phase is JobPhase.RUNNING and w.status.restarts == 0


def test_the_restart_budget_is_per_slot() -> None:
    w = World(spec=make_job(shards=3, maxRestarts=1)).started()
    for i in range(3):
        w.set_pod(f"qa-lora-shard-{i}-0", phase="Failed", exit_code=1)
    w.step(1)
    assert w.status.phase is JobPhase.RUNNING
    assert w.status.restarts == 3 and [s.restarts for s in w.status.shards] == [1, 1, 1]
    w.run_all()
    w.step(1)
    w.set_pod("qa-lora-shard-1-1", phase="Failed", exit_code=1)
    w.step(1)
    assert w.status.phase is JobPhase.FAILED
    assert "shard 1" in w.status.message


# --- pods that never start -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("waiting", "reported"),
    [
        ("ImagePullBackOff", "ImagePullBackOff"),
        ("ErrImagePull", "ImagePullBackOff"),
        ("CreateContainerConfigError", "CreateContainerConfigError"),
    ],
)
def test_a_pod_that_cannot_start_is_reported_then_fails_the_job(
    waiting: str, reported: str
) -> None:
    w = World(spec=make_job(failurePolicy={"startTimeoutSeconds": 300}))
    w.step()
    w.run_all()
    w.step(1)
    detail = 'secret "s3-keys" not found' if "Config" in waiting else "pull access denied"
    w.set_pod(
        "qa-lora-shard-1-0",
        phase="Pending",
        node_name="spot-2",
        waiting_reason=waiting,
        waiting_message=detail,
    )
    w.step(1)
    (event,) = w.events("PodNotStarting")
    assert reported in event.message and detail in event.message and "shard 1" in event.message
    assert w.condition("Progressing") == ("False", reported)
    w.step(100)
    assert w.events("PodNotStarting") == []  # said once
    assert w.status.phase is JobPhase.RUNNING
    w.step(200)
    assert w.status.phase is JobPhase.FAILED
    assert w.condition("Succeeded") == ("False", reported)
    assert detail in w.status.message and "startTimeoutSeconds" in w.status.message


def test_a_refused_pod_creation_is_reported_and_fails_the_job_after_the_timeout() -> None:
    w = World(spec=make_job(failurePolicy={"startTimeoutSeconds": 60}))
    w.step()
    w.run_all()
    del w.pods["qa-lora-shard-0-0"]
    w.status = w.status.model_copy(
        update={
            "shards": [
                w.status.shards[0].model_copy(update={"pod_phase": ""}),
                *w.status.shards[1:],
            ]
        }
    )
    quota = (
        'pods "qa-lora-shard-0-0" is forbidden: exceeded quota: gpus, requested: nvidia.com/gpu=1'
    )
    w.create_refused[0] = quota
    w.step(1, apply_pods=False)
    assert [c.index for c in w.creates()] == [0]  # still tried: the quota may be raised
    assert w.condition("Progressing") == ("False", "CreateRefused")
    assert "exceeded quota" in w.events("PodNotStarting")[0].message
    w.step(60, apply_pods=False)
    assert w.status.phase is JobPhase.FAILED
    assert "exceeded quota" in w.status.message


def test_a_pod_that_starts_after_all_clears_the_report() -> None:
    w = World(spec=make_job(failurePolicy={"startTimeoutSeconds": 300})).started()
    w.set_pod("qa-lora-shard-0-0", phase="Pending", waiting_reason="ImagePullBackOff")
    w.step(1)
    w.set_pod("qa-lora-shard-0-0", phase="Running", waiting_reason="")
    w.step(1)
    assert w.condition("Progressing") == ("True", "AllPodsRunning")
    assert w.status.shards[0].blocked_since is None
    w.step(600)
    assert w.status.phase is JobPhase.RUNNING


# --- return to spot: only to a free matching GPU, with hysteresis -----------------------------


def test_a_shard_that_fell_back_because_spot_is_full_does_not_flap() -> None:
    """Replays the flapping case: spot nodes exist and are Ready but every GPU is taken."""
    spot = {"fallbackAfterSeconds": 300, "returnAfterSeconds": 120}
    w = World(spec=make_job(shards=1, spot=spot))
    w.other_gpus = {"spot-1": 1, "spot-2": 1}
    w.step()
    w.run_all()
    w.set_pod("qa-lora-shard-0-0", phase="Pending", node_name="", unschedulable_since=w.clock.now)
    w.step(300)
    w.run_all()
    w.step(1)
    assert w.status.shards[0].capacity_type is CapacityType.ON_DEMAND
    returns = 0
    for round_ in range(10):  # ten round boundaries, an hour apart
        w.progress[0] = make_progress(0, phase=Phase.WAITING, round=round_)
        w.step(3600)
        returns += len(w.events("ReturnedToSpot"))
        w.progress[0] = make_progress(0, phase=Phase.TRAINING, round=round_ + 1)
        w.step(1)
    assert returns == 0
    assert w.status.shards[0].capacity_type is CapacityType.ON_DEMAND
    # A GPU frees up: not at once (hysteresis), then at the next round boundary.
    w.other_gpus = {"spot-1": 1}
    w.progress[0] = make_progress(0, phase=Phase.WAITING, round=11)
    w.step(1)
    assert w.creates() == []
    w.step(60)
    assert w.creates() == []
    w.step(60)
    (create,) = w.creates()
    assert (create.index, create.capacity) == (0, CapacityType.SPOT)


def test_only_as_many_shards_return_as_there_are_free_spot_gpus() -> None:
    spot = {"fallbackAfterSeconds": 10, "returnAfterSeconds": 0}
    w = World(spec=make_job(shards=2, spot=spot))
    w.step()
    for i in range(2):
        w.set_pod(
            f"qa-lora-shard-{i}-0", unschedulable_since=w.clock.now, node_name="", phase="Pending"
        )
    w.run_all({"qa-lora-anchor-0": "on-demand-1"})
    for i in range(2):
        w.set_pod(f"qa-lora-shard-{i}-0", phase="Pending", node_name="")
    w.step(10)
    w.run_all({"qa-lora-shard-0-1": "on-demand-1", "qa-lora-shard-1-1": "on-demand-1"})
    w.step(1)
    assert [s.capacity_type for s in w.status.shards] == [CapacityType.ON_DEMAND] * 2
    w.other_gpus = {"spot-1": 1}  # one free GPU, on spot-2
    for i in range(2):
        w.progress[i] = make_progress(i, phase=Phase.WAITING)
    w.step(1)
    assert [(c.index, c.capacity) for c in w.creates()] == [(0, CapacityType.SPOT)]

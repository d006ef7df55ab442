"""One CheapTrainJob slot against its pods: what its current pod's state calls for. Pure.

A slot's current pod is the one with the slot's attempt; older pods are cleaned up. Each
reconciliation classifies the current pod (:func:`cheapspot_operator.planning.preemption.classify`):

* healthy: nothing to do, unless it should move (fallback / return to spot, see below);
* done (exit 0): the slot is finished; the anchor finishing ends the job Succeeded;
* preempted (interruption taint on its node, node NotReady or gone, ``DisruptionTarget``,
  eviction, SIGTERM exit, pod gone): the replacement is created at once, never on a node
  being reclaimed, and the restart budget is not touched;
  Past ``spot.maxPreemptions`` in all, the job fails or its shards finish on on-demand, as
  ``spot.onMaxPreemptions`` says;
* permanent (worker exit :attr:`ExitCode.PERMANENT`): the job fails with the worker's message;
* transient (exit :attr:`ExitCode.TRANSIENT`, the object store unreachable): the slot waits
  ``failurePolicy.transientBackoffSeconds`` (doubling per failure in a row) and starts a new
  pod, without spending ``maxRestarts``, for ``failurePolicy.transientRetrySeconds`` from the
  first failure in a row; the Progressing condition says it is backing off and until when;
* failed (anything else): counts against ``maxRestarts`` of that slot; past it the job fails.

A pod that cannot start (image pull failing, a missing secret or config map, its creation
refused by a quota or an admission webhook) is reported on the Progressing condition and in
an event naming the cause; after ``failurePolicy.startTimeoutSeconds`` the job fails with it.

Fallback: a spot shard pending Unschedulable for ``spot.fallbackAfterSeconds`` (measured
from the condition's ``lastTransitionTime``), or any shard while the job is preempted more
than ``spot.maxPreemptionsPerHour``, moves to on-demand. It returns to spot at its next round
boundary (progress phase ``waiting``; a generation shard between chunks, see
:func:`~cheapspot_operator.trainjob.shards.generator_can_move`) once a matching spot node
(ready, schedulable, no notice) has had a free GPU for ``spot.returnAfterSeconds``
(``status.spotFreeSince``), and only as many shards return in one pass as there are free GPUs
for them. ``spec.deadline`` may hold a shard on on-demand (reason ``Deadline``) while it
needs that to be met.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from cheapspot.contract import Phase, Progress
from cheapspot_operator.api.common import CapacityType
from cheapspot_operator.api.trainjob import ShardStatus
from cheapspot_operator.api.trainjob_policies import OnMaxPreemptions
from cheapspot_operator.cluster.views import PodView
from cheapspot_operator.planning import slots
from cheapspot_operator.planning.actions import DeletePod
from cheapspot_operator.planning.preemption import (
    START_FAILURES,
    Outcome,
    Verdict,
    classify,
    node_signal,
)
from cheapspot_operator.trainjob import deadline as train_deadline
from cheapspot_operator.trainjob.actions import Pass
from cheapspot_operator.trainjob.observed import ANCHOR_INDEX, is_generator, slot_name
from cheapspot_operator.trainjob.shards import (
    at_round_boundary,
    desired_capacity,
    generator_can_move,
    over_preemption_cap,
    pod_name,
    rate_exceeded,
    store_slot,
)

WORKING = (Phase.GENERATING, Phase.TRAINING, Phase.CHECKPOINTING, Phase.WAITING, Phase.DONE)
"""Progress phases of a worker past its start (loading and restoring are not among them)."""


def run_slot(work: Pass, known: ShardStatus, pods: list[PodView]) -> None:
    """Reconcile one slot with its pods and store the result in the status."""
    st, obs = work.status, work.obs
    slot, current = slots.adopt_newest(known, pods)
    # Older attempts: stop what still runs; force pods whose node is gone.
    for old in pods:
        if old.attempt < slot.attempt and not old.terminated:
            gone = node_signal(old.node_name, obs) in ("NodeGone", "NodeNotReady")
            if not old.deleting:
                work.actions.append(DeletePod(old.name, 0 if gone else None, reason="Replaced"))
            elif gone:
                work.actions.append(DeletePod(old.name, 0, reason="NodeGone"))
    if slot.done:
        store_slot(st, slot)
        return
    store_slot(st, _reconcile_slot(work, slot, current))


def _reconcile_slot(work: Pass, slot: ShardStatus, current: PodView | None) -> ShardStatus:
    st, spec, obs, now = work.status, work.spec, work.obs, work.now
    name = pod_name(obs.job.name, slot.index, slot.attempt)
    what = slot_name(slot.index)
    progress = obs.progress.get(slot.index)
    slot = _forget_transient_streak(slot, progress)

    if current is None:
        if not slot.pod_phase:
            if slot.retry_after is not None and now < slot.retry_after:
                return slot  # backing off after a transient failure
            # Never seen: (re)create under the deterministic name; 409 means it exists.
            slot = slot.model_copy(update={"pod": name})
            capacity, reason = desired_capacity(slot, st, spec)
            if _deadline_wants_on_demand(work, slot):
                capacity, reason = CapacityType.ON_DEMAND, train_deadline.REASON
            if capacity is not slot.capacity_type:
                slot = slot.model_copy(
                    update={"capacity_type": capacity, "fallback_reason": reason}
                )
            refused = obs.create_refused.get(slot.index, "")
            slot = _track_start(work, slot, "CreateRefused" if refused else "", refused)
            if not work.failure:
                slot = work.create(slot)
            return slot
        verdict = Verdict(Outcome.PREEMPTED, "PodGone", f"pod {name} disappeared")
    else:
        verdict = classify(current, obs, progress)
        slot = slot.model_copy(
            update={"pod": current.name, "node": current.node_name, "pod_phase": current.phase}
        )

    if verdict.outcome is Outcome.HEALTHY:
        assert current is not None
        stuck = current.phase == "Pending" and current.waiting_reason in START_FAILURES
        slot = _track_start(
            work,
            slot,
            current.waiting_reason if stuck else "",
            f"pod {current.name}: {current.waiting_message}" if stuck else "",
        )
        if work.failure:
            return slot
        return _maybe_move(work, slot, current, progress)
    slot = _track_start(work, slot, "", "")
    if verdict.outcome is Outcome.DONE:
        return slot.model_copy(update={"done": True})
    if verdict.outcome is Outcome.PERMANENT:
        work.failure = ("PermanentError", f"{what}: {verdict.message}")
        return slot
    if (
        verdict.outcome is Outcome.PREEMPTED
        and progress is not None
        and progress.phase is Phase.DONE
    ):
        # Reclaimed after its last result was published (its exit not yet reported): nothing
        # is left to redo, so a replacement would only start and stop.
        return slot.model_copy(update={"done": True})
    if verdict.outcome is Outcome.PREEMPTED:
        return _preempted(work, slot, current, verdict)
    if verdict.outcome is Outcome.TRANSIENT:
        window = timedelta(seconds=spec.failure_policy.transient_retry_seconds)
        since = slot.transient_since or now
        if now - since < window:
            return _back_off(work, slot, verdict, since)
        verdict = Verdict(
            Outcome.FAILED,
            verdict.reason,
            f"{verdict.message} (transient failures for more than "
            f"failurePolicy.transientRetrySeconds={spec.failure_policy.transient_retry_seconds})",
        )
    return _failed(work, slot, verdict)


def _failed(work: Pass, slot: ShardStatus, verdict: Verdict) -> ShardStatus:
    """Spend the slot's restart budget on a new pod; past ``maxRestarts`` the job fails."""
    st, spec = work.status, work.spec
    what = slot_name(slot.index)
    st.restarts += 1
    slot = slot.model_copy(
        update={
            "restarts": slot.restarts + 1,
            "transient_failures": 0,
            "transient_since": None,
            "retry_after": None,
            "transient_message": "",
        }
    )
    if slot.restarts > spec.max_restarts:
        work.failure = (
            "BackoffLimitExceeded",
            f"{what}: {verdict.message} (restart {slot.restarts} > maxRestarts "
            f"{spec.max_restarts})",
        )
        return slot
    work.event("Warning", "ShardFailed", f"{what}: {verdict.message}; restarting")
    return work.create(slots.next_attempt(slot, slot.capacity_type, slot.fallback_reason))


def _preempted(
    work: Pass, slot: ShardStatus, current: PodView | None, verdict: Verdict
) -> ShardStatus:
    st, spec, now = work.status, work.spec, work.now
    what = slot_name(slot.index)
    st.preemptions += 1
    st.recent_preemptions = [*st.recent_preemptions, now]
    slot, announced = slots.preempted(slot, what, verdict)
    work.actions.append(announced)
    if current is not None and not current.terminated and not current.deleting:
        gone = verdict.reason in ("NodeGone", "NodeNotReady")
        work.actions.append(DeletePod(current.name, 0 if gone else None, verdict.reason))
    cap = spec.spot.max_preemptions
    if over_preemption_cap(st, spec) and spec.spot.on_max_preemptions is OnMaxPreemptions.FAIL:
        work.failure = (
            "PreemptionLimitExceeded",
            f"{what}: preempted ({verdict.reason}); the job was preempted {st.preemptions} "
            f"times, more than spot.maxPreemptions={cap} (spot.onMaxPreemptions=Fail)",
        )
        return slot
    capacity, reason = desired_capacity(slot, st, spec)
    if _deadline_wants_on_demand(work, slot) and capacity is CapacityType.SPOT:
        capacity, reason = CapacityType.ON_DEMAND, train_deadline.REASON
        work.event(
            "Warning",
            "FellBackToOnDemand",
            f"{what}: spot is gone and the deadline leaves no time to wait for it",
            reason,
        )
    elif capacity is not slot.capacity_type and capacity is CapacityType.ON_DEMAND:
        work.event(
            "Warning",
            "FellBackToOnDemand",
            f"{what}: more than {spec.spot.max_preemptions_per_hour} preemptions in the last hour"
            if reason == "PreemptionRate"
            else f"{what}: more than spot.maxPreemptions={cap} preemptions; finishing on on-demand",
            reason,
        )
    else:
        reason = slot.fallback_reason
    return work.create(slots.next_attempt(slot, capacity, reason))


def _back_off(work: Pass, slot: ShardStatus, verdict: Verdict, since: datetime) -> ShardStatus:
    """A transient failure within the retry window: wait, then a new pod; no budget spent."""
    spec, now = work.spec, work.now
    what = slot_name(slot.index)
    failures = slot.transient_failures + 1
    base = spec.failure_policy.transient_backoff_seconds
    delay = min(base * 2 ** min(failures - 1, 10), base * 10)
    retry_at = now + timedelta(seconds=delay)
    work.event(
        "Warning",
        "TransientFailure",
        f"{what}: {verdict.message}; retrying in {delay}s (transient failure {failures} in a "
        f"row; maxRestarts is not spent for failurePolicy.transientRetrySeconds="
        f"{spec.failure_policy.transient_retry_seconds})",
        verdict.reason,
    )
    slot = slots.next_attempt(slot, slot.capacity_type, slot.fallback_reason)
    return slot.model_copy(
        update={
            "transient_failures": failures,
            "transient_since": since,
            "retry_after": retry_at,
            "transient_message": verdict.message,
        }
    )


def _forget_transient_streak(slot: ShardStatus, progress: Progress | None) -> ShardStatus:
    """A pod that got back to work after the last retry began has got past the outage (a pod
    that fails again while still loading has not: the streak and its time limit go on)."""
    if slot.transient_since is None or slot.retry_after is None or progress is None:
        return slot
    if progress.updated_at > slot.retry_after and progress.phase in WORKING:
        return slot.model_copy(
            update={
                "transient_failures": 0,
                "transient_since": None,
                "retry_after": None,
                "transient_message": "",
            }
        )
    return slot


def _track_start(work: Pass, slot: ShardStatus, reason: str, message: str) -> ShardStatus:
    """Record (or clear) why the slot's pod cannot start; fail past the start timeout."""
    if not reason:
        if slot.blocked_since is None and not slot.blocked_reason:
            return slot
        return slot.model_copy(
            update={"blocked_reason": "", "blocked_since": None, "blocked_message": ""}
        )
    now, spec = work.now, work.spec
    what = slot_name(slot.index)
    reason = START_FAILURES.get(reason, reason)
    since = slot.blocked_since or now
    if reason != slot.blocked_reason:
        work.event("Warning", "PodNotStarting", f"{what}: {reason}: {message}", reason)
    slot = slot.model_copy(
        update={"blocked_reason": reason, "blocked_message": message, "blocked_since": since}
    )
    timeout = spec.failure_policy.start_timeout_seconds
    if now - since >= timedelta(seconds=timeout):
        work.failure = (
            reason,
            f"{what}: its pod could not start for {timeout}s "
            f"(failurePolicy.startTimeoutSeconds): {reason}: {message}",
        )
    return slot


def _deadline_wants_on_demand(work: Pass, slot: ShardStatus) -> bool:
    view = work.deadline
    return view is not None and view.capacity.get(slot.index) is CapacityType.ON_DEMAND


def _deadline_wants_spot(work: Pass, slot: ShardStatus) -> bool:
    view = work.deadline
    return view is not None and view.capacity.get(slot.index) is CapacityType.SPOT


def _maybe_move(
    work: Pass, slot: ShardStatus, pod: PodView, progress: Progress | None
) -> ShardStatus:
    """Fallback to on-demand and return to spot for a healthy shard or generation pod."""
    if slot.index == ANCHOR_INDEX:
        return slot
    st, spec, now = work.status, work.spec, work.now
    limit = spec.spot.max_preemptions_per_hour
    what = slot_name(slot.index)
    # Where a running pod may move without losing work: a training shard between rounds, a
    # generation shard between chunks.
    if is_generator(slot.index):
        assert spec.distillation is not None
        chunk = spec.distillation.sampling.records_per_chunk
        movable = generator_can_move(progress, chunk)
    else:
        movable = at_round_boundary(progress)
    desired = slot.capacity_type
    reason = slot.fallback_reason
    if desired is CapacityType.SPOT and _deadline_wants_on_demand(work, slot):
        desired, reason = CapacityType.ON_DEMAND, train_deadline.REASON
        work.event(
            "Warning",
            "FellBackToOnDemand",
            f"{what}: the deadline needs on-demand now to be met",
            reason,
        )
    elif desired is CapacityType.SPOT:
        fell_back = slots.spot_wait_over(what, pod, spec.spot.fallback_after_seconds, now)
        if fell_back is not None:
            desired, reason = CapacityType.ON_DEMAND, slots.SPOT_UNAVAILABLE
            work.actions.append(fell_back)
        elif rate_exceeded(st, limit):
            desired, reason = CapacityType.ON_DEMAND, "PreemptionRate"
            work.event(
                "Warning",
                "FellBackToOnDemand",
                f"{what}: more than {limit} preemptions in the last hour",
                reason,
            )
    elif (
        slot.fallback_reason
        # Back from a deadline fallback only when the deadline says spot; from any other,
        # never while the deadline needs on-demand (it would only fall back again).
        and (
            _deadline_wants_spot(work, slot)
            if slot.fallback_reason == train_deadline.REASON
            else not _deadline_wants_on_demand(work, slot)
        )
        and movable
        and not rate_exceeded(st, limit)
        and not over_preemption_cap(st, spec)
        and work.spot_room > 0
    ):
        desired, reason = CapacityType.SPOT, ""
        work.spot_room -= 1
    slot = slot.model_copy(update={"capacity_type": desired, "fallback_reason": reason})
    if pod.capacity == desired.value:
        return slot
    # Move now if the pod has not started work, else at a boundary (no work lost).
    if pod.phase == "Pending" or movable:
        if desired is CapacityType.SPOT:
            work.event("Normal", "ReturnedToSpot", f"{what}: a spot GPU is free")
        slot = slots.next_attempt(slot, desired, reason)
        work.actions.append(DeletePod(pod.name, reason="Moved"))
        slot = work.create(slot)
    return slot

"""One replica slot against its pods: what its current pod's state calls for. Pure.

A slot's current pod is the one with the slot's attempt (older ones are retired by
:mod:`cheapspot_operator.inferencepool.draining`). Each pass classifies it
(:func:`cheapspot_operator.planning.preemption.classify`): a preempted pod is replaced at once;
a permanent error holds the slot; a transient one backs off and retries without counting as a
failure; other failures are retried :data:`MAX_FAILURES` times in a row, then held. A pod that
cannot start is reported and, past ``failurePolicy.startTimeoutSeconds``, its slot held. A spot
replica waiting too long falls back to on-demand, and one fallback slot at a time returns to
spot once a spot node has a free GPU (:func:`return_to_spot`); a return whose spot pod fails
goes back to on-demand.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from cheapspot_operator.api.common import CapacityType
from cheapspot_operator.api.inferencepool import ReplicaSlot
from cheapspot_operator.inferencepool.actions import Pass
from cheapspot_operator.inferencepool.observed import ReplicaPod
from cheapspot_operator.planning import slots
from cheapspot_operator.planning.actions import DeletePod
from cheapspot_operator.planning.preemption import (
    START_FAILURES,
    Outcome,
    Verdict,
    classify,
    spot_room,
)

MAX_FAILURES = 3
"""Failed replica pods in a row (not reclaims) before the slot is held."""


def next_attempt(slot: ReplicaSlot, capacity: CapacityType, reason: str) -> ReplicaSlot:
    """The slot's next attempt on ``capacity``: a new pod, not Ready yet."""
    return slots.next_attempt(slot, capacity, reason, ready=False)


def reconcile_slot(work: Pass, slot: ReplicaSlot, pods: list[ReplicaPod]) -> ReplicaSlot:
    st, obs, now = work.status, work.obs, work.now
    slot, current = slots.adopt_newest(slot, pods, pod_phase="")
    what = f"replica {slot.index}" + (" (anchor)" if slot.anchor else "")
    if slot.held:
        return slot
    if current is None:
        if not slot.pod_phase:
            if slot.retry_after is not None and now < slot.retry_after:
                return slot  # backing off after a transient failure
            refused = obs.create_refused.get(slot.index, "")
            slot = _track_start(work, slot, "CreateRefused" if refused else "", refused)
            if slot.held:
                return slot
            return work.create(slot)
        verdict = Verdict(Outcome.PREEMPTED, "PodGone", f"pod {slot.pod} disappeared")
    elif current.draining_until is not None:
        # Marked by someone (an operator that died before writing the next attempt): its
        # replacement is due.
        verdict = Verdict(Outcome.PREEMPTED, "Draining", f"pod {current.name} is draining")
    else:
        verdict = classify(current.pod, obs)
        slot = slot.model_copy(
            update={
                "pod": current.name,
                "node": current.pod.node_name,
                "pod_phase": current.pod.phase,
                "ready": current.ready,
            }
        )

    if verdict.outcome is Outcome.HEALTHY:
        assert current is not None
        if current.ready:
            slot = slot.model_copy(update=_STREAKS_CLEARED)
        stuck = current.pod.phase == "Pending" and current.pod.waiting_reason in START_FAILURES
        slot = _track_start(
            work,
            slot,
            current.pod.waiting_reason if stuck else "",
            f"pod {current.name}: {current.pod.waiting_message}" if stuck else "",
        )
        if slot.held:
            # Deleted, so a pod that will never start holds no node (and costs nothing).
            work.actions.append(DeletePod(current.name, reason=slot.blocked_reason))
            return slot
        return _maybe_fall_back(work, slot, current)
    slot = _track_start(work, slot, "", "")
    if verdict.outcome is not Outcome.PREEMPTED:
        back = _spot_return_failed(work, slot, verdict)
        if back is not None:
            return back
    if verdict.outcome is Outcome.PERMANENT:
        message = f"{what}: {verdict.message}"
        work.event("Warning", "ReplicaFailed", message, "PermanentError")
        return slot.model_copy(
            update={"held": message, "held_generation": obs.pool.generation, "ready": False}
        )
    if verdict.outcome is Outcome.PREEMPTED:
        st.preemptions += 1
        slot, announced = slots.preempted(slot, what, verdict)
        work.actions.append(announced)
        return work.create(next_attempt(slot, slot.capacity_type, slot.fallback_reason))
    if verdict.outcome is Outcome.TRANSIENT:
        policy = work.spec.failure_policy
        since = slot.transient_since or now
        if now - since < timedelta(seconds=policy.transient_retry_seconds):
            return _back_off(work, slot, what, verdict, since)
        verdict = Verdict(
            Outcome.FAILED,
            verdict.reason,
            f"{verdict.message} (transient failures for more than "
            f"failurePolicy.transientRetrySeconds={policy.transient_retry_seconds})",
        )
    # Failed (or exited): retried a few times in a row, then held.
    failures = slot.failures + 1
    slot = slot.model_copy(update={"failures": failures, "ready": False})
    if failures >= MAX_FAILURES:
        message = f"{what}: {verdict.message or verdict.reason} ({failures} failures in a row)"
        work.event("Warning", "ReplicaCrashLoop", message, "CrashLoop")
        return slot.model_copy(update={"held": message, "held_generation": obs.pool.generation})
    detail = verdict.message or verdict.reason
    work.event("Warning", "ReplicaFailed", f"{what}: {detail}; restarting", "Failed")
    return work.create(next_attempt(slot, slot.capacity_type, slot.fallback_reason))


_STREAKS_CLEARED: dict[str, object] = {
    "failures": 0,
    "transient_failures": 0,
    "transient_since": None,
    "retry_after": None,
}
"""What a slot forgets once its pod is Ready: it got past whatever failed before."""


def _back_off(
    work: Pass, slot: ReplicaSlot, what: str, verdict: Verdict, since: datetime
) -> ReplicaSlot:
    """A transient failure within the retry window: a new attempt after a backoff (doubling
    per failure in a row, at most 10 times the base), not counted as a failure."""
    policy = work.spec.failure_policy
    count = slot.transient_failures + 1
    base = policy.transient_backoff_seconds
    delay = min(base * 2 ** min(count - 1, 10), base * 10)
    work.event(
        "Warning",
        "TransientFailure",
        f"{what}: {verdict.message}; retrying in {delay}s (transient failure {count} in a row; "
        f"not counted as a failure for failurePolicy.transientRetrySeconds="
        f"{policy.transient_retry_seconds})",
        verdict.reason,
    )
    slot = next_attempt(slot, slot.capacity_type, slot.fallback_reason)
    return slot.model_copy(
        update={
            "ready": False,
            "transient_failures": count,
            "transient_since": since,
            "retry_after": work.now + timedelta(seconds=delay),
        }
    )


def _spot_return_failed(work: Pass, slot: ReplicaSlot, verdict: Verdict) -> ReplicaSlot | None:
    """A spot pod of a return to spot that failed while the slot's on-demand pod still serves:
    back to on-demand (a new pod there, the serving one kept until it is Ready), and no return
    for ``spot.fallbackAfterSeconds``. None when the slot is no such return."""
    if slot.anchor or slot.capacity_type is not CapacityType.SPOT:
        return None
    serving = [
        rp
        for rp in work.obs.replicas
        if rp.index == slot.index
        and rp.attempt < slot.attempt
        and rp.live
        and rp.ready
        and rp.draining_until is None
        and rp.pod.capacity == CapacityType.ON_DEMAND.value
    ]
    if not serving:
        return None
    wait = work.spec.spot.fallback_after_seconds
    work.event(
        "Warning",
        "SpotReturnFailed",
        f"replica {slot.index}: its spot pod {slot.pod} failed "
        f"({verdict.message or verdict.reason}); staying on on-demand ({serving[-1].name} "
        f"serves until its successor is Ready), next return in {wait}s or later",
        verdict.reason,
    )
    moved = next_attempt(slot, CapacityType.ON_DEMAND, slots.SPOT_UNAVAILABLE)
    moved = moved.model_copy(
        update={"ready": False, "spot_return_after": work.now + timedelta(seconds=wait)}
    )
    return work.create(moved)


def _track_start(work: Pass, slot: ReplicaSlot, reason: str, message: str) -> ReplicaSlot:
    """Record (or clear) why the slot's pod cannot start; hold the slot past the start
    timeout (as a job fails past it), with an event when the cause first shows."""
    if not reason:
        if slot.blocked_since is None and not slot.blocked_reason:
            return slot
        return slot.model_copy(update={"blocked_reason": "", "blocked_since": None})
    now, policy = work.now, work.spec.failure_policy
    what = f"replica {slot.index}" + (" (anchor)" if slot.anchor else "")
    reason = START_FAILURES.get(reason, reason)
    since = slot.blocked_since or now
    # A refused create is announced by the act layer, in the API server's words, as it
    # happens (controller.report_refusals); the rest here, once per cause.
    if reason not in (slot.blocked_reason, "CreateRefused"):
        work.event("Warning", "PodNotStarting", f"{what}: {reason}: {message}", reason)
    slot = slot.model_copy(update={"blocked_reason": reason, "blocked_since": since})
    timeout = policy.start_timeout_seconds
    if now - since < timedelta(seconds=timeout):
        return slot
    held = (
        f"{what}: its pod could not start for {timeout}s (failurePolicy.startTimeoutSeconds): "
        f"{reason}: {message}"
    )
    work.event("Warning", "ReplicaFailed", held, reason)
    return slot.model_copy(
        update={"held": held, "held_generation": work.obs.pool.generation, "ready": False}
    )


def _maybe_fall_back(work: Pass, slot: ReplicaSlot, current: ReplicaPod) -> ReplicaSlot:
    if slot.anchor or slot.capacity_type is not CapacityType.SPOT:
        return slot
    what = f"replica {slot.index}"
    fell_back = slots.spot_wait_over(
        what, current.pod, work.spec.spot.fallback_after_seconds, work.now
    )
    if fell_back is None:
        return slot
    work.actions.append(fell_back)
    return work.create(next_attempt(slot, CapacityType.ON_DEMAND, slots.SPOT_UNAVAILABLE))


def return_to_spot(work: Pass) -> None:
    """One fallback slot at a time goes back to spot once a spot node has a free GPU."""
    st = work.status
    moving = [
        s
        for s in st.slots
        if not s.anchor
        and s.capacity_type is CapacityType.SPOT
        and not s.ready
        and any(
            rp.index == s.index and rp.attempt < s.attempt and rp.live for rp in work.obs.replicas
        )
    ]
    fallback = [
        s
        for s in st.slots
        if not s.anchor
        and not s.held
        and s.capacity_type is CapacityType.ON_DEMAND
        and (s.spot_return_after is None or work.now >= s.spot_return_after)
    ]
    r = work.spec.resources
    if moving or not fallback or spot_room(work.obs, r.gpu_resource, r.gpu, work.avoid) < 1:
        return
    slot = fallback[0]
    work.event("Normal", "ReturnedToSpot", f"replica {slot.index}: spot capacity is back")
    moved = work.create(next_attempt(slot, CapacityType.SPOT, ""))
    st.slots = [moved if s.index == slot.index else s for s in st.slots]
    work.current[slot.index] = None

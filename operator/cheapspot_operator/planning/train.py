"""The CheapTrainJob planner: observed state and a clock in, actions out. No I/O.

``plan(spec, observed, now)`` looks at one CheapTrainJob (its status, its pods, their nodes,
the workers' progress records) and returns what to do: a new status first, then pods to
create or delete and events to post. The handlers apply the actions in order and stop at the
first failure, so the status (attempt numbers, counters) is always written before the pods it
describes; a crash between the two is repaired by the next reconciliation, which finds the
status ahead of the pods and creates what is missing under the same deterministic name.

Every pod slot (the anchor, shard 0..N-1) has an ``attempt``; its pod is
``<job>-<role>-<attempt>``. A slot's current pod is the one with the slot's attempt; older
pods are cleaned up. Each reconciliation classifies the current pod
(:func:`cheapspot_operator.planning.preemption.classify`):

* healthy: nothing to do, unless it should move (fallback / return to spot, see below);
* done (exit 0): the slot is finished; the anchor finishing ends the job Succeeded;
* preempted (interruption taint on its node, node NotReady or gone, ``DisruptionTarget``,
  eviction, SIGTERM exit, pod gone): the replacement is created at once, never on a node
  being reclaimed, and the restart budget is not touched;
* permanent (worker exit :attr:`ExitCode.PERMANENT`): the job fails with the worker's message;
* failed (anything else): counts against ``maxRestarts``; past it the job fails.

Fallback: a spot shard pending Unschedulable for ``spot.fallbackAfterSeconds`` (measured
from the condition's ``lastTransitionTime``), or any shard while the job is preempted more
than ``spot.maxPreemptionsPerHour``, moves to on-demand. It returns to spot at its next round
boundary (progress phase ``waiting``) once a schedulable spot node without a notice exists.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta

from cheapspot.contract import Layout, Phase, Progress, Role
from cheapspot_operator.observed import ANCHOR_INDEX, Observed, PodView
from cheapspot_operator.phases import JobPhase, transition
from cheapspot_operator.planning.actions import DeletePod, EmitEvent
from cheapspot_operator.planning.conditions import set_condition
from cheapspot_operator.planning.fallback import waited_too_long
from cheapspot_operator.planning.preemption import (
    Outcome,
    Verdict,
    classify,
    doomed_nodes,
    node_signal,
    spot_available,
)
from cheapspot_operator.spec import (
    CapacityType,
    CheckpointStatus,
    Condition,
    CostStatus,
    ProgressStatus,
    ShardStatus,
    TrainJobSpec,
    TrainJobStatus,
)

PREEMPTION_WINDOW = timedelta(hours=1)
COST_ACCRUAL_INTERVAL = timedelta(seconds=15)
"""Cost alone changes the status at most this often (status writes are not free)."""


# --- actions ------------------------------------------------------------------------------


@dataclass(frozen=True)
class UpdateStatus:
    status: TrainJobStatus


@dataclass(frozen=True)
class CreatePod:
    index: int
    """Shard index, or :data:`ANCHOR_INDEX`."""
    attempt: int
    capacity: CapacityType
    avoid_nodes: tuple[str, ...] = ()
    """Nodes being reclaimed or lost: the pod must not land there."""


Action = UpdateStatus | CreatePod | DeletePod | EmitEvent


# --- helpers --------------------------------------------------------------------------------


def pod_name(job_name: str, index: int, attempt: int) -> str:
    role = "anchor" if index == ANCHOR_INDEX else f"shard-{index}"
    return f"{job_name}-{role}-{attempt}"


def at_round_boundary(progress: Progress | None) -> bool:
    return progress is not None and progress.phase in (Phase.WAITING, Phase.DONE)


def _fresh_slot(slot: ShardStatus, capacity: CapacityType, reason: str) -> ShardStatus:
    return slot.model_copy(
        update={
            "attempt": slot.attempt + 1,
            "pod": "",
            "node": "",
            "pod_phase": "",
            "capacity_type": capacity,
            "fallback_reason": reason,
        }
    )


# --- the planner ----------------------------------------------------------------------------


@dataclass
class _Plan:
    """Inputs and mutable scratch space of one planning pass."""

    spec: TrainJobSpec
    obs: Observed
    now: datetime
    status: TrainJobStatus
    actions: list[Action]
    avoid: tuple[str, ...] = ()
    """Nodes being reclaimed or lost."""
    failure: tuple[str, str] | None = None

    def event(self, type_: str, reason: str, message: str, cause: str = "") -> None:
        self.actions.append(EmitEvent(type_, reason, message, cause))


def plan(spec: TrainJobSpec, obs: Observed, now: datetime) -> list[Action]:
    """What to do for one job now. The first action, if any, is always :class:`UpdateStatus`."""
    prev = obs.job.status
    work = _Plan(
        spec=spec,
        obs=obs,
        now=now,
        status=prev.model_copy(deep=True),
        actions=[],
        avoid=doomed_nodes(obs),
    )
    st = work.status
    st.observed_generation = obs.job.generation
    if st.start_time is None:
        st.start_time = now
    st.recent_preemptions = [t for t in st.recent_preemptions if now - t < PREEMPTION_WINDOW]
    _ensure_slots(st, spec)

    phase = JobPhase(st.phase)
    live = [p for p in obs.pods if not p.terminated and not p.deleting]
    if phase.is_terminal():
        # Nothing restarts a finished job; stray pods (an old operator's) are removed.
        work.actions += [DeletePod(p.name, reason="JobFinished") for p in live]
    elif spec.suspend:
        _suspend(work, obs, now)
    else:
        if phase is JobPhase.SUSPENDED:
            st.phase = transition(phase, JobPhase.PENDING)
            work.event("Normal", "Resumed", "spec.suspend cleared: pods are recreated")
        _run(work)

    _summarise(st, spec, obs, now)
    _accrue_cost(st, prev, obs, now)
    changed = st != prev
    pod_actions = [a for a in work.actions if not isinstance(a, UpdateStatus)]
    if not changed and not pod_actions:
        return []
    return [UpdateStatus(st), *pod_actions]


def _without_cost(st: TrainJobStatus) -> TrainJobStatus:
    return st.model_copy(update={"cost": CostStatus()})


def _ensure_slots(st: TrainJobStatus, spec: TrainJobSpec) -> None:
    if st.anchor is None:
        st.anchor = ShardStatus(index=ANCHOR_INDEX, capacity_type=CapacityType.ON_DEMAND)
    have = {s.index: s for s in st.shards}
    st.shards = [have.get(i) or ShardStatus(index=i) for i in range(spec.shards)]


def _slots(st: TrainJobStatus) -> list[ShardStatus]:
    assert st.anchor is not None
    return [st.anchor, *st.shards]


def _store_slot(st: TrainJobStatus, slot: ShardStatus) -> None:
    if slot.index == ANCHOR_INDEX:
        st.anchor = slot
    else:
        st.shards[slot.index] = slot


def _suspend(work: _Plan, obs: Observed, now: datetime) -> None:
    st = work.status
    phase = JobPhase(st.phase)
    if phase is not JobPhase.SUSPENDED:
        st.phase = transition(phase, JobPhase.SUSPENDED)
        work.event("Normal", "Suspended", "spec.suspend set: pods deleted, checkpoints kept")
    for slot in _slots(st):
        if slot.pod:
            # A new attempt on resume: the old pod may still be terminating under its name.
            _store_slot(st, _fresh_slot(slot, slot.capacity_type, slot.fallback_reason))
    for pod in obs.pods:
        if not pod.terminated and not pod.deleting:
            work.actions.append(DeletePod(pod.name, reason="Suspended"))


def _run(work: _Plan) -> None:
    st, spec, obs, now = work.status, work.spec, work.obs, work.now
    by_slot: dict[int, list[PodView]] = {}
    for pod in obs.pods:
        by_slot.setdefault(pod.index, []).append(pod)

    for known in _slots(st):
        pods = by_slot.get(known.index, [])
        newest = max((p.attempt for p in pods), default=-1)
        # A pod newer than the status knows is adopted (a status write was lost).
        slot = known.model_copy(update={"attempt": newest}) if newest > known.attempt else known
        current = next((p for p in pods if p.attempt == slot.attempt), None)
        # Older attempts: stop what still runs; force pods whose node is gone.
        for old in pods:
            if old.attempt < slot.attempt and not old.terminated:
                gone = node_signal(old.node_name, obs) in ("NodeGone", "NodeNotReady")
                if not old.deleting:
                    work.actions.append(DeletePod(old.name, 0 if gone else None, reason="Replaced"))
                elif gone:
                    work.actions.append(DeletePod(old.name, 0, reason="NodeGone"))
        if slot.done:
            _store_slot(st, slot)
            continue
        _store_slot(st, _reconcile_slot(work, slot, current))
        if work.failure:
            break

    if work.failure:
        reason, message = work.failure
        st.phase = transition(JobPhase(st.phase), JobPhase.FAILED)
        st.reason = reason
        st.message = message
        st.completion_time = now
        work.event("Warning", reason, message)
        kept: list[Action] = [a for a in work.actions if not isinstance(a, CreatePod)]
        kept += [
            DeletePod(p.name, reason="JobFailed")
            for p in obs.pods
            if not p.terminated and not p.deleting
        ]
        work.actions = kept
        return
    assert st.anchor is not None
    if st.anchor.done:
        st.phase = transition(JobPhase(st.phase), JobPhase.SUCCEEDED)
        st.reason = "Completed"
        st.message = "final adapter published"
        st.completion_time = now
        work.event("Normal", "Completed", f"final adapter in {Layout(spec.output.uri).final}")
        work.actions += [
            DeletePod(p.name, reason="JobSucceeded")
            for p in obs.pods
            if not p.terminated and not p.deleting
        ]
        return
    running = [s for s in _slots(st) if s.pod_phase == "Running" or s.done]
    if st.anchor in running and len(running) >= 2:
        st.phase = transition(JobPhase(st.phase), JobPhase.RUNNING)
    st.message = ""


def _reconcile_slot(work: _Plan, slot: ShardStatus, current: PodView | None) -> ShardStatus:
    st, spec, obs, now, avoid = work.status, work.spec, work.obs, work.now, work.avoid
    limit = spec.spot.max_preemptions_per_hour
    name = pod_name(obs.job.name, slot.index, slot.attempt)
    what = "anchor" if slot.index == ANCHOR_INDEX else f"shard {slot.index}"
    progress = obs.progress.get(slot.index)

    if current is None:
        if not slot.pod_phase:
            # Never seen: (re)create under the deterministic name; 409 means it exists.
            slot = slot.model_copy(update={"pod": name})
            capacity = _desired_capacity(slot, st, limit)
            if capacity is not slot.capacity_type:
                slot = slot.model_copy(
                    update={"capacity_type": capacity, "fallback_reason": "PreemptionRate"}
                )
            work.actions.append(CreatePod(slot.index, slot.attempt, slot.capacity_type, avoid))
            return slot
        verdict = Verdict(Outcome.PREEMPTED, "PodGone", f"pod {name} disappeared")
    else:
        verdict = classify(current, obs, progress)
        slot = slot.model_copy(
            update={"pod": current.name, "node": current.node_name, "pod_phase": current.phase}
        )

    if verdict.outcome is Outcome.HEALTHY:
        assert current is not None
        return _maybe_move(work, slot, current, progress)
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
        st.preemptions += 1
        st.recent_preemptions = [*st.recent_preemptions, now]
        slot = slot.model_copy(update={"preemptions": slot.preemptions + 1})
        work.event(
            "Warning",
            "Preempted",
            f"{what} ({slot.pod} on {slot.node or 'no node'}): "
            + " ".join(x for x in (verdict.reason, verdict.message) if x)
            + "; replacement started",
            verdict.reason,
        )
        if current is not None and not current.terminated and not current.deleting:
            gone = verdict.reason in ("NodeGone", "NodeNotReady")
            work.actions.append(DeletePod(current.name, 0 if gone else None, verdict.reason))
        capacity = _desired_capacity(slot, st, limit)
        reason = slot.fallback_reason
        if capacity is not slot.capacity_type and capacity is CapacityType.ON_DEMAND:
            reason = "PreemptionRate"
            work.event(
                "Warning",
                "FellBackToOnDemand",
                f"{what}: more than {limit} preemptions in the last hour",
                reason,
            )
        slot = _fresh_slot(slot, capacity, reason)
        slot = slot.model_copy(update={"pod": pod_name(obs.job.name, slot.index, slot.attempt)})
        work.actions.append(CreatePod(slot.index, slot.attempt, capacity, avoid))
        return slot
    # Outcome.FAILED: spend the restart budget.
    st.restarts += 1
    slot = slot.model_copy(update={"restarts": slot.restarts + 1})
    if st.restarts > spec.max_restarts:
        work.failure = (
            "BackoffLimitExceeded",
            f"{what}: {verdict.message} (restart {st.restarts} > maxRestarts {spec.max_restarts})",
        )
        return slot
    work.event("Warning", "ShardFailed", f"{what}: {verdict.message}; restarting")
    slot = _fresh_slot(slot, slot.capacity_type, slot.fallback_reason)
    slot = slot.model_copy(update={"pod": pod_name(obs.job.name, slot.index, slot.attempt)})
    work.actions.append(CreatePod(slot.index, slot.attempt, slot.capacity_type, avoid))
    return slot


def _rate_exceeded(st: TrainJobStatus, limit: int) -> bool:
    return limit > 0 and len(st.recent_preemptions) > limit


def _desired_capacity(slot: ShardStatus, st: TrainJobStatus, limit: int) -> CapacityType:
    if slot.index == ANCHOR_INDEX:
        return CapacityType.ON_DEMAND
    if _rate_exceeded(st, limit):
        return CapacityType.ON_DEMAND
    return slot.capacity_type


def _maybe_move(
    work: _Plan, slot: ShardStatus, pod: PodView, progress: Progress | None
) -> ShardStatus:
    """Fallback to on-demand and return to spot for a healthy shard pod."""
    if slot.index == ANCHOR_INDEX:
        return slot
    st, spec, obs, now, avoid = work.status, work.spec, work.obs, work.now, work.avoid
    limit = spec.spot.max_preemptions_per_hour
    what = f"shard {slot.index}"
    desired = slot.capacity_type
    reason = slot.fallback_reason
    if desired is CapacityType.SPOT:
        waited = waited_too_long(pod, spec.spot.fallback_after_seconds, now)
        if waited is not None:
            desired, reason = CapacityType.ON_DEMAND, "SpotUnavailable"
            work.event(
                "Warning",
                "FellBackToOnDemand",
                f"{what}: no spot capacity for {int(waited.total_seconds())}s",
                reason,
            )
        elif _rate_exceeded(st, limit):
            desired, reason = CapacityType.ON_DEMAND, "PreemptionRate"
            work.event(
                "Warning",
                "FellBackToOnDemand",
                f"{what}: more than {limit} preemptions in the last hour",
                reason,
            )
    elif (
        slot.fallback_reason
        and at_round_boundary(progress)
        and not _rate_exceeded(st, limit)
        and spot_available(obs)
    ):
        desired, reason = CapacityType.SPOT, ""
    slot = slot.model_copy(update={"capacity_type": desired, "fallback_reason": reason})
    if pod.capacity == desired.value:
        return slot
    # Move now if the pod has not started work, else at the round boundary (no work lost).
    if pod.phase == "Pending" or at_round_boundary(progress):
        if desired is CapacityType.SPOT:
            work.event("Normal", "ReturnedToSpot", f"{what}: spot capacity is back")
        slot = _fresh_slot(slot, desired, reason)
        slot = slot.model_copy(update={"pod": pod_name(obs.job.name, slot.index, slot.attempt)})
        work.actions.append(DeletePod(pod.name, reason="Moved"))
        work.actions.append(CreatePod(slot.index, slot.attempt, desired, avoid))
    return slot


# --- status summary -------------------------------------------------------------------------


def _summarise(st: TrainJobStatus, spec: TrainJobSpec, obs: Observed, now: datetime) -> None:
    gen = obs.job.generation
    shards = []
    for slot in st.shards:
        p = obs.progress.get(slot.index)
        update = {"round": p.round, "step": p.step, "loss": p.loss} if p else {}
        shards.append(slot.model_copy(update=update))
    st.shards = shards
    st.spot_shards = sum(1 for s in shards if s.capacity_type is CapacityType.SPOT and not s.done)
    st.on_demand_shards = sum(
        1 for s in shards if s.capacity_type is CapacityType.ON_DEMAND and not s.done
    )
    st.shards_display = f"{st.spot_shards}/{st.on_demand_shards}"
    st.progress = _progress(spec, obs)
    if JobPhase(st.phase) is JobPhase.SUCCEEDED:
        st.progress = st.progress.model_copy(update={"percent": 100})
    pr = st.progress
    st.progress_display = f"{pr.percent}% r{min(pr.round + 1, pr.rounds)}/{pr.rounds}"
    best = max(
        (
            (p.last_checkpoint_step, i)
            for i, p in obs.progress.items()
            if i != ANCHOR_INDEX and p.last_checkpoint_step is not None
        ),
        default=None,
    )
    if best is not None:
        step, index = best
        st.last_checkpoint = CheckpointStatus(
            shard=index, step=step, uri=Layout(spec.output.uri).shard_checkpoint(index, step)
        )
    _conditions(st, obs, now, gen)


def _progress(spec: TrainJobSpec, obs: Observed) -> ProgressStatus:
    rounds = -(-spec.training.steps // spec.rounds.local_steps)
    shard_progress = [
        p for i, p in obs.progress.items() if i != ANCHOR_INDEX and p.role is Role.TRAIN
    ]
    steps = [p.step for p in shard_progress] + [0] * (spec.shards - len(shard_progress))
    step = min(steps) if steps else 0
    losses = [p.loss for p in shard_progress if p.loss is not None]
    anchor = obs.progress.get(ANCHOR_INDEX)
    round_ = min((p.round for p in shard_progress), default=0)
    if anchor is not None:
        round_ = max(round_, anchor.round)
    percent = min(100, int(100 * step / spec.training.steps))
    if anchor is not None and anchor.phase is Phase.DONE:
        percent = 100
    return ProgressStatus(
        round=round_,
        rounds=rounds,
        step=step,
        total_steps=spec.training.steps,
        loss=round(sum(losses) / len(losses), 4) if losses else None,
        percent=percent,
    )


def _conditions(st: TrainJobStatus, obs: Observed, now: datetime, gen: int) -> None:
    phase = JobPhase(st.phase)
    c = st.conditions

    def put(type_: str, status: str, reason: str, message: str = "") -> None:
        nonlocal c
        new = Condition(
            type=type_,
            status=status,
            reason=reason,
            message=message,
            last_transition_time=now,
            observed_generation=gen,
        )
        c = set_condition(c, new)

    if phase is JobPhase.SUCCEEDED:
        put("Succeeded", "True", "Completed", st.message)
        put("Progressing", "False", "Completed")
    elif phase is JobPhase.FAILED:
        put("Succeeded", "False", st.reason or "Failed", st.message)
        put("Progressing", "False", "Failed")
    elif phase is JobPhase.SUSPENDED:
        put("Succeeded", "Unknown", "Suspended")
        put("Progressing", "False", "Suspended", "spec.suspend is true")
    else:
        put("Succeeded", "Unknown", "InProgress")
        waiting = [s for s in _slots(st) if s.pod_phase != "Running" and not s.done]
        if waiting:
            names = ", ".join(
                "anchor" if s.index == ANCHOR_INDEX else str(s.index) for s in waiting
            )
            put("Progressing", "True", "WaitingForPods", f"not running yet: {names}")
        else:
            put("Progressing", "True", "AllPodsRunning")
    if phase is JobPhase.SUSPENDED:
        put("Suspended", "True", "SuspendRequested")
    else:
        put("Suspended", "False", "NotSuspended")
    on_demand = [s for s in st.shards if s.capacity_type is CapacityType.ON_DEMAND and not s.done]
    if on_demand:
        reasons = sorted({s.fallback_reason or "FellBackToOnDemand" for s in on_demand})
        put(
            "OnSpot",
            "False",
            reasons[0],
            "on on-demand: " + ", ".join(str(s.index) for s in on_demand),
        )
    else:
        put("OnSpot", "True", "AllShardsOnSpot")
    st.conditions = c


def _accrue_cost(st: TrainJobStatus, prev: TrainJobStatus, obs: Observed, now: datetime) -> None:
    cost = st.cost
    if cost.accrued_at is None:
        st.cost = cost.model_copy(update={"accrued_at": now})
        return
    elapsed = now - cost.accrued_at
    if elapsed <= timedelta(0):
        return
    if elapsed < COST_ACCRUAL_INTERVAL and _without_cost(st) == _without_cost(prev):
        return
    hours = elapsed.total_seconds() / 3600
    paid, on_demand = 0.0, 0.0
    for pod in _running(obs.pods):
        node = obs.nodes.get(pod.node_name)
        if node is None:
            continue
        capacity = obs.profile.capacity_of(node.labels) or CapacityType(
            pod.capacity or CapacityType.ON_DEMAND.value
        )
        paid += obs.prices.hourly(node.instance_type, capacity) * hours
        on_demand += obs.prices.on_demand_hourly(node.instance_type) * hours
    dollars = cost.dollars + paid
    st.cost = CostStatus(
        dollars=round(dollars, 6),
        on_demand_dollars=round(cost.on_demand_dollars + on_demand, 6),
        display=f"${dollars:.2f}",
        accrued_at=now,
    )


def _running(pods: Iterable[PodView]) -> list[PodView]:
    return [p for p in pods if p.phase == "Running" and not p.deleting]

"""The CheapTrainJob planner: observed state and a clock in, actions out. No I/O.

``plan(spec, observed, now)`` looks at one CheapTrainJob (its status, its pods, their nodes,
the workers' progress records) and returns what to do: a new status first, then pods to
create or delete and events to post. The handlers apply the actions in order and stop at the
first failure, so the status (attempt numbers, counters) is always written before the pods it
describes; a crash between the two is repaired by the next reconciliation, which finds the
status ahead of the pods and creates what is missing under the same deterministic name.

Every pod slot (the anchor, shard 0..N-1) has an ``attempt``; its pod is
``<job>-<role>-<attempt>``. A sequences-mode distillation job has N generation slots more
(``status.generators``, slot index ``GENERATOR_BASE + i``, pods ``<job>-gen-<i>-<attempt>``):
they alone run until every one is done, then the anchor and the shards start, in the same
pass; each is reconciled like a shard (preemption, transient and failure handling, fallback). A slot's current pod is the one with the slot's attempt; older
pods are cleaned up. Each reconciliation classifies the current pod
(:func:`cheapspot_operator.planning.preemption.classify`):

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
:func:`generator_can_move`) once a matching spot node (ready, schedulable, no notice) has had
a free GPU for ``spot.returnAfterSeconds`` (``status.spotFreeSince``), and only as many
shards return in one pass as there are free GPUs for them.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta

from cheapspot.contract import Layout, Phase, Progress, Role
from cheapspot_operator.api.common import BudgetAction, CapacityType, Condition, CostStatus
from cheapspot_operator.api.phases import JobPhase, transition
from cheapspot_operator.api.trainjob import (
    CheckpointStatus,
    ProgressStatus,
    ShardStatus,
    TrainJobSpec,
    TrainJobStatus,
)
from cheapspot_operator.api.trainjob_policies import OnMaxPreemptions
from cheapspot_operator.cluster.views import (
    ANCHOR_INDEX,
    GENERATOR_BASE,
    Observed,
    PodView,
    is_generator,
    slot_name,
)
from cheapspot_operator.planning import budget, costing
from cheapspot_operator.planning.actions import DeletePod, EmitEvent
from cheapspot_operator.planning.conditions import set_condition
from cheapspot_operator.planning.fallback import waited_too_long
from cheapspot_operator.planning.preemption import (
    START_FAILURES,
    Outcome,
    Verdict,
    classify,
    doomed_nodes,
    node_signal,
    spot_room,
)
from cheapspot_operator.trainjob import deadline as train_deadline
from cheapspot_operator.trainjob.distillation import distillation_status

PREEMPTION_WINDOW = timedelta(hours=1)


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
    if index == ANCHOR_INDEX:
        role = "anchor"
    elif is_generator(index):
        role = f"gen-{index - GENERATOR_BASE}"
    else:
        role = f"shard-{index}"
    return f"{job_name}-{role}-{attempt}"


def at_round_boundary(progress: Progress | None) -> bool:
    return progress is not None and progress.phase in (Phase.WAITING, Phase.DONE)


def generator_can_move(progress: Progress | None, records_per_chunk: int) -> bool:
    """A generation shard's pod may move (back to spot) without losing work: it is
    generating, and more than the chunk in progress is left, which the leaving pod finishes
    and publishes on its SIGTERM; its replacement regenerates only the chunks not published.
    With no more than that chunk left a move would gain nothing and cost a teacher load."""
    return (
        progress is not None
        and progress.phase is Phase.GENERATING
        and progress.total_steps - progress.step > records_per_chunk
    )


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
    spot_room: int = 0
    """Shard pods that may return to spot in this pass (free GPUs on matching spot nodes,
    once they have been free for ``spot.returnAfterSeconds``)."""
    deadline: train_deadline.DeadlineView | None = None
    """What ``spec.deadline`` wants for each shard (None: the job has no deadline)."""

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
    _watch_spot_room(work)
    work.deadline = train_deadline.evaluate(spec, st, obs, now)

    phase = JobPhase(st.phase)
    live = [p for p in obs.pods if not p.terminated and not p.deleting]
    over_budget = None if phase.is_terminal() else _budget(work)
    if phase.is_terminal():
        # Nothing restarts a finished job; stray pods (an old operator's) are removed.
        work.actions += [DeletePod(p.name, reason="JobFinished") for p in live]
    elif spec.suspend:
        _suspend(work, obs, now)
    elif over_budget is not None and spec.budget is not None:
        if spec.budget.on_exceed is BudgetAction.FAIL:
            _fail(work, "BudgetExceeded", over_budget)
        else:
            _suspend(work, obs, now, "BudgetExceeded", f"budget exceeded: {over_budget}")
    else:
        if phase is JobPhase.SUSPENDED:
            st.phase = transition(phase, JobPhase.PENDING)
            st.reason = ""
            work.event("Normal", "Resumed", "resumed: pods are recreated from checkpoints")
        _run(work)

    _summarise(st, spec, obs, now)
    train_deadline.accrue(
        st, prev, work.deadline, now, timedelta(seconds=obs.status_refresh_seconds)
    )
    _accrue_cost(st, prev, obs, now)
    changed = st != prev
    pod_actions = [a for a in work.actions if not isinstance(a, UpdateStatus)]
    if not changed and not pod_actions:
        return []
    return [UpdateStatus(st), *pod_actions]


def _watch_spot_room(work: _Plan) -> None:
    """Hysteresis for the return to spot: free spot GPUs must stay free for a while."""
    st, spec, now = work.status, work.spec, work.now
    if not any(s.fallback_reason for s in [*st.shards, *st.generators]):
        st.spot_free_since = None
        return
    r = spec.resources
    room = spot_room(work.obs, r.gpu_resource, r.gpu, work.avoid)
    if room <= 0:
        st.spot_free_since = None
        return
    if st.spot_free_since is None:
        st.spot_free_since = now
    if now - st.spot_free_since >= timedelta(seconds=spec.spot.return_after_seconds):
        work.spot_room = room


def _without_cost(st: TrainJobStatus) -> TrainJobStatus:
    return st.model_copy(update={"cost": CostStatus()})


def generates(spec: TrainJobSpec) -> bool:
    """Sequences-mode distillation: generation shards run before training."""
    return spec.distillation is not None and spec.distillation.sequences


def _ensure_slots(st: TrainJobStatus, spec: TrainJobSpec) -> None:
    if st.anchor is None:
        st.anchor = ShardStatus(index=ANCHOR_INDEX, capacity_type=CapacityType.ON_DEMAND)
    have = {s.index: s for s in st.shards}
    st.shards = [have.get(i) or ShardStatus(index=i) for i in range(spec.shards)]
    if generates(spec):
        gens = {s.index: s for s in st.generators}
        st.generators = [
            gens.get(i) or ShardStatus(index=i)
            for i in range(GENERATOR_BASE, GENERATOR_BASE + spec.shards)
        ]


def generating(st: TrainJobStatus) -> bool:
    """True while a generation shard has not finished: training waits for all of them."""
    return any(not g.done for g in st.generators)


def _slots(st: TrainJobStatus) -> list[ShardStatus]:
    """The slots whose pods should run now: the generation shards until they are all done,
    then the anchor and the training shards."""
    assert st.anchor is not None
    if generating(st):
        return list(st.generators)
    return [st.anchor, *st.shards]


def _all_slots(st: TrainJobStatus) -> list[ShardStatus]:
    assert st.anchor is not None
    return [*st.generators, st.anchor, *st.shards]


def _store_slot(st: TrainJobStatus, slot: ShardStatus) -> None:
    if slot.index == ANCHOR_INDEX:
        st.anchor = slot
    elif is_generator(slot.index):
        st.generators[slot.index - GENERATOR_BASE] = slot
    else:
        st.shards[slot.index] = slot


def _budget(work: _Plan) -> str | None:
    """Budget status, condition and events; the reason to stop the job, if any. The horizon
    is the checkpoint interval: stopped then, the job loses no more than usual."""
    spec, st, obs = work.spec, work.status, work.obs
    if spec.budget is None:
        st.budget, st.conditions = None, budget.without_budget(st.conditions)
        return None
    rate = sum(
        costing.usage(pod, node, obs.profile, obs.prices, obs.quotes).usd_per_hour
        for pod in _running(obs.pods)
        if (node := obs.nodes.get(pod.node_name)) is not None
    )
    ahead = budget.horizon(train_deadline.checkpoint_interval(spec, st, obs, work.now))
    got = budget.assess(
        spec.budget,
        costing.spent_by(st.cost, rate, work.now),
        rate,
        prev=st.budget,
        conditions=st.conditions,
        now=work.now,
        generation=obs.job.generation,
        ahead=ahead,
    )
    st.budget, st.conditions = got.status, got.conditions
    if got.announce:
        work.event("Warning", got.verdict.level.value, got.verdict.message)
    return got.verdict.message if got.exceeded else None


def _fail(work: _Plan, reason: str, message: str) -> None:
    st = work.status
    st.phase = transition(JobPhase(st.phase), JobPhase.FAILED)
    st.reason, st.message, st.completion_time = reason, message, work.now
    if not any(isinstance(a, EmitEvent) and a.reason == reason for a in work.actions):
        work.event("Warning", reason, message)  # once: the budget may have said it already
    work.actions += [
        DeletePod(p.name, reason=reason)
        for p in work.obs.pods
        if not p.terminated and not p.deleting
    ]


def _suspend(
    work: _Plan,
    obs: Observed,
    now: datetime,
    reason: str = "SuspendRequested",
    message: str = "spec.suspend set: pods deleted, checkpoints kept",
) -> None:
    st = work.status
    phase = JobPhase(st.phase)
    st.reason = "" if reason == "SuspendRequested" else reason
    st.message = message if st.reason else ""
    if phase is not JobPhase.SUSPENDED:
        st.phase = transition(phase, JobPhase.SUSPENDED)
        work.event("Normal" if not st.reason else "Warning", "Suspended", message, reason)
    for slot in _all_slots(st):
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

    handled: set[int] = set()
    while not work.failure:
        # Generation shards first (done ones only have their old pods cleaned up); the
        # anchor and training shards once every generation shard is done, in the same pass.
        todo = {s.index: s for s in [*st.generators, *_slots(st)] if s.index not in handled}
        if not todo:
            break
        for known in todo.values():
            handled.add(known.index)
            if known.done and not by_slot.get(known.index):
                continue
            _run_slot(work, known, by_slot.get(known.index, []))
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
    if generating(st):
        if any(g.pod_phase == "Running" for g in st.generators):
            st.phase = transition(JobPhase(st.phase), JobPhase.RUNNING)
        st.message = ""
        return
    running = [s for s in _slots(st) if s.pod_phase == "Running" or s.done]
    if st.anchor in running and len(running) >= 2:
        st.phase = transition(JobPhase(st.phase), JobPhase.RUNNING)
    st.message = ""


def _run_slot(work: _Plan, known: ShardStatus, pods: list[PodView]) -> None:
    st, obs = work.status, work.obs
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
        return
    _store_slot(st, _reconcile_slot(work, slot, current))


def _reconcile_slot(work: _Plan, slot: ShardStatus, current: PodView | None) -> ShardStatus:
    st, spec, obs, now, avoid = work.status, work.spec, work.obs, work.now, work.avoid
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
            capacity, reason = _desired_capacity(slot, st, spec)
            if _deadline_wants_on_demand(work, slot):
                capacity, reason = CapacityType.ON_DEMAND, train_deadline.REASON
            if capacity is not slot.capacity_type:
                slot = slot.model_copy(
                    update={"capacity_type": capacity, "fallback_reason": reason}
                )
            refused = obs.create_refused.get(slot.index, "")
            slot = _track_start(work, slot, "CreateRefused" if refused else "", refused)
            if not work.failure:
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
    # Outcome.FAILED: spend this slot's restart budget.
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
    slot = _fresh_slot(slot, slot.capacity_type, slot.fallback_reason)
    slot = slot.model_copy(update={"pod": pod_name(obs.job.name, slot.index, slot.attempt)})
    work.actions.append(CreatePod(slot.index, slot.attempt, slot.capacity_type, avoid))
    return slot


def _preempted(
    work: _Plan, slot: ShardStatus, current: PodView | None, verdict: Verdict
) -> ShardStatus:
    st, spec, obs, now, avoid = work.status, work.spec, work.obs, work.now, work.avoid
    what = slot_name(slot.index)
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
    cap = spec.spot.max_preemptions
    if _over_preemption_cap(st, spec) and spec.spot.on_max_preemptions is OnMaxPreemptions.FAIL:
        work.failure = (
            "PreemptionLimitExceeded",
            f"{what}: preempted ({verdict.reason}); the job was preempted {st.preemptions} "
            f"times, more than spot.maxPreemptions={cap} (spot.onMaxPreemptions=Fail)",
        )
        return slot
    capacity, reason = _desired_capacity(slot, st, spec)
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
    slot = _fresh_slot(slot, capacity, reason)
    slot = slot.model_copy(update={"pod": pod_name(obs.job.name, slot.index, slot.attempt)})
    work.actions.append(CreatePod(slot.index, slot.attempt, capacity, avoid))
    return slot


def _back_off(work: _Plan, slot: ShardStatus, verdict: Verdict, since: datetime) -> ShardStatus:
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
    slot = _fresh_slot(slot, slot.capacity_type, slot.fallback_reason)
    return slot.model_copy(
        update={
            "transient_failures": failures,
            "transient_since": since,
            "retry_after": retry_at,
            "transient_message": verdict.message,
        }
    )


WORKING = (Phase.GENERATING, Phase.TRAINING, Phase.CHECKPOINTING, Phase.WAITING, Phase.DONE)


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


def _track_start(work: _Plan, slot: ShardStatus, reason: str, message: str) -> ShardStatus:
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


def _deadline_wants_on_demand(work: _Plan, slot: ShardStatus) -> bool:
    view = work.deadline
    return view is not None and view.capacity.get(slot.index) is CapacityType.ON_DEMAND


def _deadline_wants_spot(work: _Plan, slot: ShardStatus) -> bool:
    view = work.deadline
    return view is not None and view.capacity.get(slot.index) is CapacityType.SPOT


def _over_preemption_cap(st: TrainJobStatus, spec: TrainJobSpec) -> bool:
    cap = spec.spot.max_preemptions
    return cap > 0 and st.preemptions > cap


def _rate_exceeded(st: TrainJobStatus, limit: int) -> bool:
    return limit > 0 and len(st.recent_preemptions) > limit


def _desired_capacity(
    slot: ShardStatus, st: TrainJobStatus, spec: TrainJobSpec
) -> tuple[CapacityType, str]:
    """Where the slot's next pod goes and why (the fallback reason; "" for plain spot)."""
    if slot.index == ANCHOR_INDEX:
        return CapacityType.ON_DEMAND, ""
    if _over_preemption_cap(st, spec):
        return CapacityType.ON_DEMAND, "PreemptionLimit"
    if _rate_exceeded(st, spec.spot.max_preemptions_per_hour):
        return CapacityType.ON_DEMAND, "PreemptionRate"
    return slot.capacity_type, slot.fallback_reason


def _maybe_move(
    work: _Plan, slot: ShardStatus, pod: PodView, progress: Progress | None
) -> ShardStatus:
    """Fallback to on-demand and return to spot for a healthy shard or generation pod."""
    if slot.index == ANCHOR_INDEX:
        return slot
    st, spec, obs, now, avoid = work.status, work.spec, work.obs, work.now, work.avoid
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
        # Back from a deadline fallback only when the deadline says spot; from any other,
        # never while the deadline needs on-demand (it would only fall back again).
        and (
            _deadline_wants_spot(work, slot)
            if slot.fallback_reason == train_deadline.REASON
            else not _deadline_wants_on_demand(work, slot)
        )
        and movable
        and not _rate_exceeded(st, limit)
        and not _over_preemption_cap(st, spec)
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
    gens = []
    for slot in st.generators:
        p = obs.progress.get(slot.index)
        gens.append(slot.model_copy(update={"step": p.step}) if p else slot)
    st.generators = gens
    st.spot_shards = sum(1 for s in shards if s.capacity_type is CapacityType.SPOT and not s.done)
    st.on_demand_shards = sum(
        1 for s in shards if s.capacity_type is CapacityType.ON_DEMAND and not s.done
    )
    st.shards_display = f"{st.spot_shards}/{st.on_demand_shards}"
    _summarise_progress(st, spec, obs)
    _conditions(st, obs, now, gen)


def _summarise_progress(st: TrainJobStatus, spec: TrainJobSpec, obs: Observed) -> None:
    # Records not read yet (a slow store): keep what the status shows rather than drop to 0.
    if obs.progress_known or not st.progress.rounds:
        st.progress = _progress(spec, obs)
    if JobPhase(st.phase) is JobPhase.SUCCEEDED:
        st.progress = st.progress.model_copy(update={"percent": 100})
    pr = st.progress
    st.progress_display = f"{pr.percent}% r{min(pr.round + 1, pr.rounds)}/{pr.rounds}"
    generated = [obs.progress.get(g.index) for g in st.generators]
    st.distillation = distillation_status(
        spec,
        JobPhase(st.phase),
        generating=generating(st),
        generated=sum(p.step for p in generated if p is not None),
        # The total is known once every generation shard has reported its slice.
        records=sum(p.total_steps for p in generated if p is not None)
        if all(p is not None for p in generated)
        else 0,
        previous=st.distillation,
    )
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
        put("Progressing", "False", "Suspended", st.message or "spec.suspend is true")
    else:
        put("Succeeded", "Unknown", "InProgress")
        waiting = [s for s in _slots(st) if s.pod_phase != "Running" and not s.done]
        blocked = [s for s in _slots(st) if s.blocked_reason and not s.done]
        backing_off = [s for s in _slots(st) if s.retry_after is not None and now < s.retry_after]
        if blocked:
            put(
                "Progressing",
                "False",
                blocked[0].blocked_reason,
                "; ".join(
                    f"{_what(s.index)} cannot start since "
                    f"{_stamp(s.blocked_since)}: {s.blocked_reason}: {s.blocked_message}"
                    for s in blocked
                ),
            )
        elif backing_off:
            put(
                "Progressing",
                "True",
                "BackingOff",
                "; ".join(
                    f"{_what(s.index)}: transient failure {s.transient_failures} in a row "
                    f"({s.transient_message}); next pod after {_stamp(s.retry_after)}"
                    for s in backing_off
                ),
            )
        elif waiting:
            names = ", ".join(
                "anchor"
                if s.index == ANCHOR_INDEX
                else (slot_name(s.index) if is_generator(s.index) else str(s.index))
                for s in waiting
            )
            put("Progressing", "True", "WaitingForPods", f"not running yet: {names}")
        else:
            put("Progressing", "True", "AllPodsRunning")
    if phase is JobPhase.SUSPENDED:
        put("Suspended", "True", st.reason or "SuspendRequested")
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


def _what(index: int) -> str:
    return slot_name(index)


def _stamp(t: datetime | None) -> str:
    return t.strftime("%Y-%m-%dT%H:%M:%SZ") if t is not None else "?"


def _accrue_cost(st: TrainJobStatus, prev: TrainJobStatus, obs: Observed, now: datetime) -> None:
    if JobPhase(prev.phase).is_terminal():
        return  # a finished job's cost is final
    cost = st.cost
    if cost.accrued_at is None:
        st.cost = cost.model_copy(update={"accrued_at": now})
        return
    elapsed = now - cost.accrued_at
    if elapsed <= timedelta(0):
        return
    every = timedelta(seconds=obs.status_refresh_seconds)
    if elapsed < every and _without_cost(st) == _without_cost(prev):
        return
    usages = [
        costing.usage(pod, node, obs.profile, obs.prices, obs.quotes)
        for pod in _running(obs.pods)
        if (node := obs.nodes.get(pod.node_name)) is not None
    ]
    lost = round(train_deadline.lost_work_seconds(st, obs, now), 1)
    st.cost = costing.add(cost, usages, elapsed.total_seconds()).model_copy(
        update={"accrued_at": now, "lost_work_seconds": lost}
    )


def _running(pods: Iterable[PodView]) -> list[PodView]:
    return [p for p in pods if p.phase == "Running" and not p.deleting]

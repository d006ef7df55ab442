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
pass; each is reconciled like a shard (preemption, transient and failure handling, fallback:
:mod:`cheapspot_operator.trainjob.reconcile`).

This module is the job's phase machine: Pending until its pods run, Running, Succeeded once
the anchor is done, Failed when a slot says so; Suspended for ``spec.suspend`` and for an
exceeded ``spec.budget`` with ``onExceed: Suspend`` (pods deleted, checkpoints kept, a new
attempt for every slot on resume). The status it writes is assembled by
:mod:`cheapspot_operator.trainjob.summary`.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from cheapspot.contract import Layout
from cheapspot_operator.api.common import BudgetAction
from cheapspot_operator.api.phases import JobPhase, transition
from cheapspot_operator.api.trainjob import TrainJobSpec, TrainJobStatus
from cheapspot_operator.cluster.views import PodView
from cheapspot_operator.planning import budget, costing, slots
from cheapspot_operator.planning.actions import CreatePod, DeletePod, EmitEvent, UpdateStatus
from cheapspot_operator.planning.preemption import doomed_nodes, spot_room
from cheapspot_operator.trainjob import deadline as train_deadline
from cheapspot_operator.trainjob.actions import Action, Pass
from cheapspot_operator.trainjob.observed import Observed
from cheapspot_operator.trainjob.reconcile import run_slot
from cheapspot_operator.trainjob.shards import (
    PREEMPTION_WINDOW,
    active_slots,
    all_slots,
    ensure_slots,
    generating,
    store_slot,
)
from cheapspot_operator.trainjob.summary import summarise


def plan(spec: TrainJobSpec, obs: Observed, now: datetime) -> list[Action]:
    """What to do for one job now. The first action, if any, is always :class:`UpdateStatus`."""
    prev = obs.job.status
    work = Pass(
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
    ensure_slots(st, spec)
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

    summarise(st, spec, obs, now)
    train_deadline.accrue(
        st, prev, work.deadline, now, timedelta(seconds=obs.status_refresh_seconds)
    )
    _accrue_cost(st, prev, obs, now)
    changed = st != prev
    pod_actions = [a for a in work.actions if not isinstance(a, UpdateStatus)]
    if not changed and not pod_actions:
        return []
    return [UpdateStatus(st), *pod_actions]


def _watch_spot_room(work: Pass) -> None:
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


def _budget(work: Pass) -> str | None:
    """Budget status, condition and events; the reason to stop the job, if any. The horizon
    is the checkpoint interval: stopped then, the job loses no more than usual."""
    spec, st, obs = work.spec, work.status, work.obs
    interval = train_deadline.checkpoint_interval(spec, st, obs, work.now)
    got = budget.review(
        st,
        spec.budget,
        costing.running_usage(obs.pods, obs),
        now=work.now,
        generation=obs.job.generation,
        ahead=budget.horizon(interval),
    )
    if got is None:
        return None
    if got.event is not None:
        work.actions.append(got.event)
    return got.verdict.message if got.exceeded else None


def _fail(work: Pass, reason: str, message: str) -> None:
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
    work: Pass,
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
    for slot in all_slots(st):
        if slot.pod:
            # A new attempt on resume: the old pod may still be terminating under its name.
            store_slot(st, slots.next_attempt(slot, slot.capacity_type, slot.fallback_reason))
    for pod in obs.pods:
        if not pod.terminated and not pod.deleting:
            work.actions.append(DeletePod(pod.name, reason="Suspended"))


def _run(work: Pass) -> None:
    st, spec, obs, now = work.status, work.spec, work.obs, work.now
    by_slot: dict[int, list[PodView]] = {}
    for pod in obs.pods:
        by_slot.setdefault(pod.index, []).append(pod)

    handled: set[int] = set()
    while not work.failure:
        # Generation shards first (done ones only have their old pods cleaned up); the
        # anchor and training shards once every generation shard is done, in the same pass.
        todo = {s.index: s for s in [*st.generators, *active_slots(st)] if s.index not in handled}
        if not todo:
            break
        for known in todo.values():
            handled.add(known.index)
            if known.done and not by_slot.get(known.index):
                continue
            run_slot(work, known, by_slot.get(known.index, []))
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
    running = [s for s in active_slots(st) if s.pod_phase == "Running" or s.done]
    if st.anchor in running and len(running) >= 2:
        st.phase = transition(JobPhase(st.phase), JobPhase.RUNNING)
    st.message = ""


def _accrue_cost(st: TrainJobStatus, prev: TrainJobStatus, obs: Observed, now: datetime) -> None:
    if JobPhase(prev.phase).is_terminal():
        return  # a finished job's cost is final
    every = timedelta(seconds=obs.status_refresh_seconds)
    if costing.accrue(st, prev, costing.running_usage(obs.pods, obs), now, every):
        lost = round(train_deadline.lost_work_seconds(st, obs, now), 1)
        st.cost = st.cost.model_copy(update={"lost_work_seconds": lost})

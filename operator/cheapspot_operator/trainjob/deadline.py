"""``spec.deadline`` for CheapTrainJobs: per shard, spot or on-demand now. Pure.

Each unfinished shard is one worker of :mod:`cheapspot_operator.planning.deadline`: its work
is the job's steps times the shard's measured seconds per step (time its pods were Running
over the steps it has made, redone steps included, so load and restore time count), its
progress is its step, and the policy (``spec.deadline.policy``) chooses spot, on-demand or
waiting for spot. The train planner keeps a shard on on-demand while its choice is on-demand;
a shard without a measured step rate yet is left to the planner's usual rules.

In sequences-mode distillation the generation shards come first, and while any of them works
they are the workers: a generation shard's work is its records (its progress record's
``total_steps``) times its measured seconds per published record, measured the same way.
Training has yet to start after them, and how long it takes is not known before a training
shard has made a step, so the generation phase is held to the deadline less one changeover
(the training pods' start): an estimate that counts the training's start but not its steps.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta

from cheapspot_operator.api.common import CapacityType
from cheapspot_operator.api.phases import JobPhase
from cheapspot_operator.api.trainjob import (
    DeadlineStatus,
    ShardStatus,
    TrainJobSpec,
    TrainJobStatus,
)
from cheapspot_operator.api.trainjob_policies import DeadlinePolicy
from cheapspot_operator.planning.deadline import Mode, Policy, Situation, decide
from cheapspot_operator.planning.preemption import spot_available
from cheapspot_operator.trainjob.observed import Observed, is_generator

DECISION_STEP_SECONDS = 60.0
"""How long a decision holds: the operator re-plans every job at least this often."""
ACCRUAL_INTERVAL = timedelta(seconds=15)
"""Running time alone changes the status at most this often."""
REASON = "Deadline"
"""``fallbackReason`` of a shard the deadline keeps on on-demand."""

_POLICY = {
    DeadlinePolicy.CHEAPSPOT: Policy.CHEAPSPOT,
    DeadlinePolicy.UNIFORM_PROGRESS: Policy.UNIFORM_PROGRESS,
    DeadlinePolicy.GREEDY: Policy.GREEDY,
}


@dataclass(frozen=True)
class DeadlineView:
    complete_by: datetime
    capacity: dict[int, CapacityType] = field(default_factory=dict)
    """Shard index to the capacity the deadline wants; absent: no opinion yet."""
    remaining_work: float | None = None
    """Seconds, for the slowest shard with a step rate."""
    slack: float | None = None


def _running(slot: ShardStatus, status: TrainJobStatus, now: datetime) -> float:
    """The shard's Running seconds, including those since the last accrual."""
    extra = 0.0
    accrued = status.running_accrued_at
    if slot.pod_phase == "Running" and accrued is not None and now > accrued:
        extra = (now - accrued).total_seconds()
    return slot.running_seconds + extra


def seconds_per_step(
    slot: ShardStatus, status: TrainJobStatus, obs: Observed, now: datetime
) -> float | None:
    """The shard's measured seconds per optimizer step: its pods' Running time over the steps
    it has made, redone steps included (so loading and restoring count); None before its
    first step."""
    progress = obs.progress.get(slot.index)
    made = progress.step + progress.steps_lost if progress else 0
    running = _running(slot, status, now)
    if made <= 0 or running <= 0:
        return None
    return running / made


def lost_work_seconds(status: TrainJobStatus, obs: Observed, now: datetime) -> float:
    """Training time redone after reclaims and restarts: each shard's steps lost (from its
    progress record) times its seconds per step."""
    total = 0.0
    for slot in status.shards:
        progress = obs.progress.get(slot.index)
        rate = seconds_per_step(slot, status, obs, now)
        if progress is not None and rate is not None:
            total += progress.steps_lost * rate
    return total


def checkpoint_interval(
    spec: TrainJobSpec, status: TrainJobStatus, obs: Observed, now: datetime
) -> float | None:
    """Seconds between a shard's checkpoints: ``everySeconds``, or ``everySteps`` at the
    slowest measured step rate if sooner; None when neither is known."""
    policy = spec.checkpoint
    candidates = [policy.every_seconds] if policy.every_seconds > 0 else []
    rates = [r for s in status.shards if (r := seconds_per_step(s, status, obs, now))]
    if policy.every_steps > 0 and rates:
        candidates.append(policy.every_steps * max(rates))
    return min(candidates) if candidates else None


def spot_price_ratio(spec: TrainJobSpec, obs: Observed) -> float:
    kinds = spec.resources.instance_types
    instance_type = kinds[0] if kinds else "default"
    on_demand = obs.prices.on_demand_hourly(instance_type)
    spot = obs.prices.hourly(instance_type, CapacityType.SPOT)
    return spot / on_demand if on_demand > 0 else 0.35


def evaluate(
    spec: TrainJobSpec, status: TrainJobStatus, obs: Observed, now: datetime
) -> DeadlineView | None:
    """What the deadline wants for each shard now; None when the job has no deadline."""
    if spec.deadline is None or status.start_time is None:
        return None
    complete_by = spec.deadline.resolve(status.start_time)
    policy = _POLICY[spec.deadline.policy]
    changeover = float(spec.deadline.changeover_seconds)
    spot = spot_available(obs)
    ratio = spot_price_ratio(spec, obs)
    elapsed = (now - status.start_time).total_seconds()
    deadline = (complete_by - status.start_time).total_seconds()
    capacity: dict[int, CapacityType] = {}
    remaining: list[float] = []
    slacks: list[float] = []
    generating = any(not g.done for g in status.generators)
    # While generating, the generation shards are the workers, and the training phase
    # still has to start after them.
    workers = status.generators if generating else status.shards
    until = deadline - changeover if generating else deadline
    for slot in workers:
        if slot.done:
            continue
        progress = obs.progress.get(slot.index)
        steps = progress.step if progress else 0
        total = progress.total_steps if generating and progress else spec.training.steps
        rate = seconds_per_step(slot, status, obs, now)
        if rate is None or total <= 0:
            continue
        if slot.pod_phase == "Running":
            mode = Mode(slot.capacity_type.value)
            left = 0.0
        elif slot.capacity_type is CapacityType.ON_DEMAND and slot.pod:
            mode, left = Mode.ON_DEMAND, changeover
        else:
            mode, left = Mode.NONE, 0.0
        s = Situation(
            now=elapsed,
            deadline=until,
            work=total * rate,
            done=min(steps, total) * rate,
            mode=mode,
            spot_available=spot,
            changeover=changeover,
            changeover_left=left,
            step=DECISION_STEP_SECONDS,
            spot_price_ratio=ratio,
        )
        want = decide(policy, s)
        capacity[slot.index] = (
            CapacityType.ON_DEMAND if want is Mode.ON_DEMAND else CapacityType.SPOT
        )
        remaining.append(s.remaining_work)
        slacks.append(s.slack)
    return DeadlineView(
        complete_by=complete_by,
        capacity=capacity,
        remaining_work=max(remaining) if remaining else None,
        slack=min(slacks) if slacks else None,
    )


def _quiet(st: TrainJobStatus) -> TrainJobStatus:
    """The status without what accrues with time alone."""
    shards = [s.model_copy(update={"running_seconds": 0.0}) for s in st.shards]
    generators = [s.model_copy(update={"running_seconds": 0.0}) for s in st.generators]
    return st.model_copy(
        update={
            "cost": None,
            "deadline": None,
            "shards": shards,
            "generators": generators,
            "running_accrued_at": None,
        }
    )


def accrue(
    st: TrainJobStatus,
    prev: TrainJobStatus,
    view: DeadlineView | None,
    now: datetime,
    every: timedelta = ACCRUAL_INTERVAL,
) -> None:
    """Add Running time to each shard and generation shard (every job: the step rate also
    prices lost work and the budget's horizon) and record the deadline's figures in
    ``st.deadline``.

    At most ``every`` (the operator's ``statusRefreshSeconds``) unless something else in the
    status changed; never once the job is finished.
    """
    if JobPhase(prev.phase).is_terminal():
        return
    last = st.running_accrued_at
    if last is not None:
        elapsed = now - last
        if elapsed <= timedelta(0):
            return
        if elapsed < every and _quiet(st) == _quiet(prev):
            return
        seconds = elapsed.total_seconds()
        prev_running = {s.index: s.pod_phase == "Running" for s in [*prev.shards, *prev.generators]}

        def add(slots: list[ShardStatus]) -> list[ShardStatus]:
            return [
                s.model_copy(update={"running_seconds": round(s.running_seconds + seconds, 3)})
                if prev_running.get(s.index) and not s.done
                else s
                for s in slots
            ]

        st.shards = add(st.shards)
        st.generators = add(st.generators)
    st.running_accrued_at = now
    if view is None:
        st.deadline = None
        return
    st.deadline = DeadlineStatus(
        complete_by=view.complete_by,
        evaluated_at=now,
        remaining_work_seconds=None if view.remaining_work is None else round(view.remaining_work),
        slack_seconds=None if view.slack is None else round(view.slack),
        # Training shards only: a generation shard the deadline keeps on on-demand says so in
        # its own status (status.generators[].fallbackReason).
        on_demand_shards=sorted(
            i
            for i, c in view.capacity.items()
            if c is CapacityType.ON_DEMAND and not is_generator(i)
        ),
    )

"""Deadline-aware choice between spot and on-demand capacity. Pure.

A job has ``work`` seconds of computation to do before ``deadline`` (seconds after its start).
Spot capacity is cheap but comes and goes; on-demand is always there and costs more. Every
start of a new run (a new pod on another capacity type, or after a preemption) costs a
changeover of ``changeover`` seconds without progress (scheduling, image pull, model load,
checkpoint restore).

:func:`decide` answers one question for one worker at one moment: run on spot, on on-demand,
or wait. The same function drives the CheapTrainJob planner (per shard, see
:func:`cheapspot_operator.trainjob.plan`) and the trace-replay benchmark
(``benchmarks/trace_replay.py``), so what the benchmark measures is what the operator does.

Policies (:class:`Policy`):

* ``on-demand``: always on-demand (the cost baseline);
* ``spot``: spot when there is some, else wait; ignores the deadline (the cheapest, but late);
* ``greedy``: spot when there is some, else wait, until the safety net moves the job to
  on-demand for good;
* ``uniform-progress``: "Can't Be Late" (Wu et al., NSDI'24): keep up with the uniform
  progress line ``work * t / deadline``: wait for spot while ahead of it, run on-demand while
  behind it; once on on-demand stay until ``2 * changeover`` ahead of the line (hysteresis);
  take spot whenever it is there; the same safety net;
* ``cheapspot``: ours, see :func:`_cheapspot`.

The safety net is the guarantee: every policy but ``spot`` keeps, at each decision, enough
time to finish on on-demand even if the decision turns out badly (spot taken away at the
worst moment). ``step`` is how long a decision holds until the next one (the planner's
reconciliation interval, the benchmark's trace tick); the net includes it.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Mode(enum.StrEnum):
    NONE = "none"
    """Wait: no capacity, no cost, no progress."""
    SPOT = "spot"
    ON_DEMAND = "on-demand"


class Policy(enum.StrEnum):
    ON_DEMAND = "on-demand"
    SPOT = "spot"
    GREEDY = "greedy"
    UNIFORM_PROGRESS = "uniform-progress"
    CHEAPSPOT = "cheapspot"


@dataclass(frozen=True, slots=True)
class Situation:
    """What a policy knows at one decision. Times in seconds since the job started."""

    now: float
    deadline: float
    work: float
    """Total computation the job needs."""
    done: float
    """Computation finished (kept across preemptions: checkpoints)."""
    mode: Mode
    """Capacity the worker runs on now; NONE when waiting or just preempted."""
    spot_available: bool
    changeover: float
    """Seconds without progress at the start of every run."""
    changeover_left: float = 0.0
    """Of the current run's changeover, what is still to come."""
    step: float = 0.0
    """How long this decision holds before the next one."""
    spot_price_ratio: float = 0.35
    """Spot price over on-demand price (what cheapspot weighs a changeover against)."""

    @property
    def remaining_work(self) -> float:
        return max(0.0, self.work - self.done)

    @property
    def remaining_time(self) -> float:
        return self.deadline - self.now

    @property
    def slack(self) -> float:
        """Time that may still pass without progress (before any changeover)."""
        return self.remaining_time - self.remaining_work


# --- the safety net -------------------------------------------------------------------------


def can_wait(s: Situation) -> bool:
    """Waiting one step still leaves time to finish on on-demand (one changeover)."""
    return s.slack >= s.changeover + s.step


def can_start_spot(s: Situation) -> bool:
    """A new spot run (its changeover) followed by a preemption still leaves on-demand time."""
    return s.slack >= 2 * s.changeover + s.step


def can_stay_on_spot(s: Situation) -> bool:
    """The current spot run may continue: a preemption after this step still leaves time."""
    return s.slack - s.changeover_left >= s.changeover + s.step


def spot_allowed(s: Situation) -> bool:
    if not s.spot_available:
        return False
    return can_stay_on_spot(s) if s.mode is Mode.SPOT else can_start_spot(s)


def feasible(s: Situation) -> bool:
    """The deadline can still be met by on-demand from here on."""
    if s.mode is Mode.ON_DEMAND:
        return s.slack >= s.changeover_left
    return s.slack >= s.changeover


# --- policies -------------------------------------------------------------------------------


def decide(policy: Policy, s: Situation) -> Mode:
    """Where the worker should run for the next step."""
    if s.remaining_work <= 0:
        return Mode.NONE
    if policy is Policy.ON_DEMAND:
        return Mode.ON_DEMAND
    if policy is Policy.SPOT:
        return Mode.SPOT if s.spot_available else Mode.NONE
    if policy is Policy.GREEDY:
        return _greedy(s)
    if policy is Policy.UNIFORM_PROGRESS:
        return _uniform_progress(s)
    return _cheapspot(s)


def _safe(s: Situation, wanted: Mode) -> Mode:
    """The safety net: what ``wanted`` becomes when it could miss the deadline."""
    if wanted is Mode.SPOT and not spot_allowed(s):
        # Slack only shrinks: spot that is unsafe now stays unsafe, so waiting buys nothing.
        wanted = Mode.ON_DEMAND
    if wanted is Mode.NONE and not can_wait(s):
        wanted = Mode.ON_DEMAND
    return wanted


def _greedy(s: Situation) -> Mode:
    if s.mode is Mode.ON_DEMAND and not can_start_spot(s):
        return Mode.ON_DEMAND
    return _safe(s, Mode.SPOT if s.spot_available else Mode.NONE)


def expected_progress(s: Situation, at: float) -> float:
    """The uniform progress line: the work a job spread evenly over its deadline has done."""
    if s.deadline <= 0:
        return s.work
    return s.work * min(1.0, max(0.0, at) / s.deadline)


def _uniform_progress(s: Situation) -> Mode:
    if s.mode is Mode.ON_DEMAND:
        # Hysteresis: stay until ahead of the line by two changeovers.
        if s.done < expected_progress(s, s.now + 2 * s.changeover):
            return Mode.ON_DEMAND
        return _safe(s, Mode.SPOT if s.spot_available else Mode.NONE)
    if s.spot_available:
        return _safe(s, Mode.SPOT)
    if s.done < expected_progress(s, s.now):
        return Mode.ON_DEMAND
    return _safe(s, Mode.NONE)


def _cheapspot(s: Situation) -> Mode:
    """Uniform Progress, with three changes that each remove a cost it pays for nothing.

    1. Reserve by remaining work, not by elapsed time: the slack kept in reserve is the
       initial slack times the share of work still to do (``slack0 * remaining / work``).
       Progress made on spot early therefore frees slack to wait later, and a job that is
       ahead spends less on on-demand than the uniform line, which only moves with time.
    2. No hysteresis towards spot: on on-demand, spot is taken back as soon as the job is
       back above its reserve by one changeover, so a short on-demand catch-up does not turn
       into hours of on-demand while cheap capacity sits there.
    3. No move back to spot whose changeover costs more than it can save: near the end
       (remaining work under the break-even of two changeovers), an on-demand worker stays.
    """
    slack0 = s.deadline - s.work
    reserve = slack0 * (s.remaining_work / s.work) if s.work > 0 else 0.0
    # Break-even: switching on-demand -> spot costs a changeover at spot price and risks
    # another back; it saves (1 - ratio) per second of work moved.
    saving_per_second = max(1e-9, 1.0 - s.spot_price_ratio)
    worth_a_run = s.remaining_work * saving_per_second > 2 * s.changeover
    if s.mode is Mode.ON_DEMAND:
        if s.spot_available and worth_a_run and s.slack >= reserve + s.changeover:
            return _safe(s, Mode.SPOT)
        return Mode.ON_DEMAND
    if s.spot_available:
        return _safe(s, Mode.SPOT)
    if s.slack < reserve:
        return Mode.ON_DEMAND
    return _safe(s, Mode.NONE)

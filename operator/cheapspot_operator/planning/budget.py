"""Budgets: how a workload's spending compares with its limit. Pure.

The spending is the cost accounted so far plus what the running pods will cost over a
horizon: a job's checkpoint interval (stopped then, it loses no more than the work since its
last checkpoint, and does not overshoot its limit waiting for the next), :data:`PROJECTION`
for a pool or when the interval is not known. Below ``warnAtPercent``: fine. From it: a
warning. At the limit: exceeded, and the workload is suspended (jobs keep their checkpoints;
pools keep only their anchors) or failed, as ``onExceed`` says. Raising the limit ends the
suspension on the next pass.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Protocol

from cheapspot_operator.api.common import BudgetSpec, BudgetStatus, Condition, CostStatus
from cheapspot_operator.planning.actions import EmitEvent
from cheapspot_operator.planning.conditions import set_condition
from cheapspot_operator.planning.costing import Usage, spent_by

PROJECTION = timedelta(minutes=5)
"""The horizon when no checkpoint interval says otherwise."""
MIN_HORIZON = timedelta(minutes=1)
"""Never shorter: a reconciliation and a stop take about this long."""
MAX_HORIZON = timedelta(hours=1)
CONDITION = "WithinBudget"


class Level(enum.StrEnum):
    WITHIN = "WithinBudget"
    WARNING = "NearBudgetLimit"
    EXCEEDED = "BudgetExceeded"


@dataclass(frozen=True)
class Verdict:
    level: Level
    spent: float
    projected: float
    limit: float
    horizon: timedelta = PROJECTION

    @property
    def percent(self) -> int:
        return int(100 * self.spent / self.limit) if self.limit > 0 else 0

    @property
    def remaining(self) -> float:
        return max(0.0, self.limit - self.spent)

    @property
    def message(self) -> str:
        return (
            f"spent ${self.spent:.2f} of ${self.limit:.2f} ({self.percent}%); "
            f"${self.projected:.2f} projected over the next {int(self.horizon.total_seconds())}s"
        )


def horizon(seconds: float | None) -> timedelta:
    """The projection horizon for a checkpoint interval of ``seconds`` (None: unknown)."""
    if seconds is None or seconds <= 0:
        return PROJECTION
    return min(MAX_HORIZON, max(MIN_HORIZON, timedelta(seconds=seconds)))


def judge(
    budget: BudgetSpec, spent: float, usd_per_hour: float, ahead: timedelta = PROJECTION
) -> Verdict:
    """``spent`` so far and the running pods' ``usd_per_hour`` over ``ahead``, against the
    budget."""
    projected = spent + usd_per_hour * ahead.total_seconds() / 3600
    if projected >= budget.limit_usd:
        level = Level.EXCEEDED
    elif spent >= budget.limit_usd * budget.warn_at_percent / 100:
        level = Level.WARNING
    else:
        level = Level.WITHIN
    return Verdict(level, spent, projected, budget.limit_usd, ahead)


def evaluate(
    budget: BudgetSpec,
    spent: float,
    usd_per_hour: float,
    prev: BudgetStatus | None,
    ahead: timedelta = PROJECTION,
) -> tuple[Verdict, BudgetStatus]:
    """The verdict and the new status. Once exceeded, a workload stays stopped (its rate is
    lower then, so the projection alone would let it start and stop again) until the limit
    is raised above the one it reached."""
    verdict = judge(budget, spent, usd_per_hour, ahead)
    reached = prev.exceeded_at_limit_usd if prev else None
    if reached is not None and budget.limit_usd <= reached:
        verdict = Verdict(Level.EXCEEDED, verdict.spent, verdict.projected, verdict.limit, ahead)
    elif verdict.level is Level.EXCEEDED:
        reached = budget.limit_usd
    else:
        reached = None
    status = BudgetStatus(
        limit_usd=budget.limit_usd,
        spent_usd=round(spent, 4),
        remaining_usd=round(verdict.remaining, 4),
        percent=verdict.percent,
        exceeded_at_limit_usd=reached,
    )
    return verdict, status


def without_budget(conditions: list[Condition]) -> list[Condition]:
    """The conditions of a workload whose budget was removed: no ``WithinBudget`` left."""
    return [c for c in conditions if c.type != CONDITION]


@dataclass(frozen=True)
class Assessment:
    """A workload's budget this pass: the verdict, its status and conditions, and whether
    the level just changed to one worth a Warning event."""

    verdict: Verdict
    status: BudgetStatus
    conditions: list[Condition]
    announce: bool

    @property
    def exceeded(self) -> bool:
        return self.verdict.level is Level.EXCEEDED

    @property
    def event(self) -> EmitEvent | None:
        """The Warning event for a level just reached, else None."""
        if not self.announce:
            return None
        return EmitEvent("Warning", self.verdict.level.value, self.verdict.message)


def assess(
    budget: BudgetSpec,
    spent: float,
    usd_per_hour: float,
    *,
    prev: BudgetStatus | None,
    conditions: list[Condition],
    now: datetime,
    generation: int,
    ahead: timedelta = PROJECTION,
) -> Assessment:
    """:func:`evaluate`, and the ``WithinBudget`` condition it sets, for jobs and pools."""
    before = next((c.reason for c in conditions if c.type == CONDITION), "")
    verdict, status = evaluate(budget, spent, usd_per_hour, prev, ahead)
    level = verdict.level
    new = set_condition(
        conditions,
        Condition(
            type=CONDITION,
            status="False" if level is Level.EXCEEDED else "True",
            reason=level.value,
            message=verdict.message,
            last_transition_time=now,
            observed_generation=generation,
        ),
    )
    return Assessment(verdict, status, new, level.value != before and level is not Level.WITHIN)


class Budgeted(Protocol):
    """The part of a workload's status a budget reads and writes (jobs' and pools')."""

    budget: BudgetStatus | None
    conditions: list[Condition]
    cost: CostStatus


def review(
    status: Budgeted,
    limit: BudgetSpec | None,
    running: Iterable[Usage],
    *,
    now: datetime,
    generation: int,
    ahead: timedelta = PROJECTION,
) -> Assessment | None:
    """:func:`assess` the workload's spending (its cost so far and its ``running`` pods) and
    write the outcome into ``status``: ``budget`` and the ``WithinBudget`` condition, both
    removed when the spec has no budget (then None)."""
    if limit is None:
        status.budget, status.conditions = None, without_budget(status.conditions)
        return None
    rate = sum(u.usd_per_hour for u in running)
    got = assess(
        limit,
        spent_by(status.cost, rate, now),
        rate,
        prev=status.budget,
        conditions=status.conditions,
        now=now,
        generation=generation,
        ahead=ahead,
    )
    status.budget, status.conditions = got.status, got.conditions
    return got

"""Budgets: how a workload's spending compares with its limit. Pure.

The spending is the cost accounted so far plus what the running pods will cost over the
next :data:`PROJECTION` (so the limit is not overshot by a reconciliation interval or a
checkpoint). Below ``warnAtPercent``: fine. From it: a warning. At the limit: exceeded, and
the workload is suspended (jobs keep their checkpoints; pools keep only their anchor) or
failed, as ``onExceed`` says. Raising the limit ends the suspension on the next pass.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from datetime import timedelta

from cheapspot_operator.spec import BudgetSpec, BudgetStatus

PROJECTION = timedelta(minutes=5)


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
            f"${self.projected:.2f} projected over the next {int(PROJECTION.total_seconds())}s"
        )


def judge(budget: BudgetSpec, spent: float, usd_per_hour: float) -> Verdict:
    """``spent`` so far and the running pods' ``usd_per_hour`` against the budget."""
    projected = spent + usd_per_hour * PROJECTION.total_seconds() / 3600
    if projected >= budget.limit_usd:
        level = Level.EXCEEDED
    elif spent >= budget.limit_usd * budget.warn_at_percent / 100:
        level = Level.WARNING
    else:
        level = Level.WITHIN
    return Verdict(level, spent, projected, budget.limit_usd)


def evaluate(
    budget: BudgetSpec, spent: float, usd_per_hour: float, prev: BudgetStatus | None
) -> tuple[Verdict, BudgetStatus]:
    """The verdict and the new status. Once exceeded, a workload stays stopped (its rate is 0
    then, so the projection alone would let it start and stop again) until the limit is
    raised above the one it reached."""
    verdict = judge(budget, spent, usd_per_hour)
    reached = prev.exceeded_at_limit_usd if prev else None
    if reached is not None and budget.limit_usd <= reached:
        verdict = Verdict(Level.EXCEEDED, verdict.spent, verdict.projected, verdict.limit)
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

"""spec.budget in the CheapTrainJob planner: warn, suspend at the limit, resume when raised.

Table prices: 2 spot shards on g5.xlarge ($0.40/h) and the anchor on on-demand ($1.006/h):
$1.806 an hour.
"""

from __future__ import annotations

import pytest

from cheapspot_operator.api.common import BudgetSpec
from cheapspot_operator.api.phases import JobPhase
from cheapspot_operator.api.trainjob import TrainJobSpec
from cheapspot_operator.planning.budget import Level, judge
from cheapspot_operator.testing.train import World, make_job


def _spec(limit: float, on_exceed: str = "Suspend") -> TrainJobSpec:
    return make_job(budget={"limitUSD": limit, "warnAtPercent": 50, "onExceed": on_exceed})


@pytest.mark.parametrize(
    ("spent", "rate", "level"),
    [
        (1.0, 1.806, Level.WITHIN),
        (5.0, 1.806, Level.WARNING),
        (9.9, 1.806, Level.EXCEEDED),  # $10.05 projected over the next 5 minutes
        (9.8, 0.0, Level.WARNING),
        (10.0, 0.0, Level.EXCEEDED),
    ],
)
def test_the_verdict_projects_the_running_pods_over_the_next_minutes(
    spent: float, rate: float, level: Level
) -> None:
    budget = BudgetSpec.model_validate({"limitUSD": 10, "warnAtPercent": 50})
    assert judge(budget, spent, rate).level is level


def test_a_job_warns_then_suspends_at_its_limit_and_resumes_when_it_is_raised() -> None:
    w = World(spec=_spec(3.0)).started()
    assert w.condition("WithinBudget") == ("True", "WithinBudget")
    w.step(3600)  # $1.81 spent: past 50 %, seen by this very pass (not at the next write)
    assert w.condition("WithinBudget") == ("True", "NearBudgetLimit")
    (warning,) = w.events("NearBudgetLimit")
    assert warning.type == "Warning" and "of $3.00" in warning.message
    w.step(1)
    assert w.events("NearBudgetLimit") == []  # once, not every pass
    w.step(2400)  # $3.01: at the limit
    assert JobPhase(w.status.phase) is JobPhase.SUSPENDED
    assert w.condition("WithinBudget") == ("False", "BudgetExceeded")
    assert w.condition("Suspended") == ("True", "BudgetExceeded")
    assert w.status.budget is not None and w.status.budget.exceeded_at_limit_usd == 3.0
    assert not [p for p in w.pods.values() if not p.deleting]
    spent = w.status.cost.dollars
    w.step(3600)
    assert JobPhase(w.status.phase) is JobPhase.SUSPENDED  # stays stopped: no restart loop
    assert w.status.cost.dollars == pytest.approx(spent)
    assert w.creates() == []
    w.spec = _spec(6.0)
    w.step(1)
    assert JobPhase(w.status.phase) is JobPhase.PENDING
    assert w.events("Resumed")
    assert len(w.creates()) == 3  # anchor and both shards, from their checkpoints
    assert w.condition("WithinBudget") == ("True", "NearBudgetLimit")


def test_on_exceed_fail_fails_the_job() -> None:
    w = World(spec=_spec(1.0, "Fail")).started()
    w.step(3600)
    assert JobPhase(w.status.phase) is JobPhase.FAILED
    assert w.status.reason == "BudgetExceeded"
    assert len(w.events("BudgetExceeded")) == 1  # one event, not the budget's and the failure's
    assert all(p.deleting for p in w.pods.values() if not p.terminated)


def test_spending_since_the_last_cost_write_counts_against_the_budget() -> None:
    # Cost alone is written every statusRefreshSeconds; the budget must not wait for that.
    w = World(spec=_spec(1.0, "Fail")).started()
    w.status_refresh_seconds = 7200.0
    w.step(1950)  # $0.98 spent, none of it written yet; with the next minute, past $1.00
    assert JobPhase(w.status.phase) is JobPhase.FAILED
    assert w.status.reason == "BudgetExceeded"


def test_a_job_without_a_budget_has_no_budget_condition() -> None:
    w = World(spec=make_job()).started()
    w.step(3600)
    assert w.status.budget is None
    with pytest.raises(KeyError):
        w.condition("WithinBudget")

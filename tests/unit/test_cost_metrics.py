"""Cost and budget metrics carry the job's figures with OpenCost/Karpenter-style labels."""

from __future__ import annotations

from prometheus_client import REGISTRY

from cheapspot_operator.config import OperatorConfig
from cheapspot_operator.handlers import Reconciler
from cheapspot_operator.spec import BudgetStatus, CostStatus, TrainJobStatus
from cheapspot_operator.testing import EPOCH, FakeClock


def test_a_status_update_sets_the_job_cost_and_budget_gauges() -> None:
    r = Reconciler(
        object(),  # type: ignore[arg-type]
        OperatorConfig(),
        progress_reader=lambda uri, shards, anchor: {},
        clock=FakeClock(EPOCH),
    )
    new = TrainJobStatus(
        cost=CostStatus(
            dollars=1.5,
            spot_dollars=1.0,
            on_demand_spent_dollars=0.5,
            on_demand_dollars=3.0,
            estimated=True,
        ),
        budget=BudgetStatus(limit_usd=10, spent_usd=1.5, remaining_usd=8.5),
    )
    r._count_status("ml", "metrics-job", TrainJobStatus(), new)

    def sample(name: str, **labels: str) -> float | None:
        value: float | None = REGISTRY.get_sample_value(name, labels)
        return value

    job = {"namespace": "ml", "job": "metrics-job"}
    assert sample("cheapspot_job_cost_dollars", **job, capacity_type="spot") == 1.0
    assert sample("cheapspot_job_cost_dollars", **job, capacity_type="on-demand") == 0.5
    assert sample("cheapspot_job_cost_dollars", **job, capacity_type="on-demand-equivalent") == 3.0
    assert sample("cheapspot_job_cost_estimated", **job) == 1
    assert sample("cheapspot_budget_remaining_dollars", **job) == 8.5

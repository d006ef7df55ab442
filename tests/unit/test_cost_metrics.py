"""Cost and budget metrics carry the job's figures with OpenCost/Karpenter-style labels."""

from __future__ import annotations

from prometheus_client import REGISTRY

from cheapspot_operator.api.common import BudgetStatus, CostStatus
from cheapspot_operator.api.trainjob import TrainJobStatus
from cheapspot_operator.runtime.config import OperatorConfig
from cheapspot_operator.testing.world import EPOCH, FakeClock
from cheapspot_operator.trainjob.controller import Reconciler


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
    r.count_status("ml", "metrics-job", TrainJobStatus(), new)

    def sample(name: str, **labels: str) -> float | None:
        value: float | None = REGISTRY.get_sample_value(name, labels)
        return value

    job = {"namespace": "ml", "job": "metrics-job"}
    assert sample("cheapspot_job_cost_dollars", **job, capacity_type="spot") == 1.0
    assert sample("cheapspot_job_cost_dollars", **job, capacity_type="on-demand") == 0.5
    assert sample("cheapspot_job_cost_dollars", **job, capacity_type="on-demand-equivalent") == 3.0
    assert sample("cheapspot_job_cost_estimated", **job) == 1
    assert sample("cheapspot_budget_remaining_dollars", **job) == 8.5


def test_a_pool_status_update_sets_the_pool_cost_and_budget_gauges() -> None:
    from cheapspot_operator.api.inferencepool import InferencePoolStatus
    from cheapspot_operator.inferencepool.controller import PoolReconciler

    r = PoolReconciler(object(), OperatorConfig(), clock=FakeClock(EPOCH))  # type: ignore[arg-type]
    status = InferencePoolStatus(
        cost=CostStatus(
            dollars=2.0, spot_dollars=0.75, on_demand_spent_dollars=1.25, on_demand_dollars=4.0
        ),
        budget=BudgetStatus(limit_usd=5, spent_usd=2.0, remaining_usd=3.0),
    )
    r.count_status("web", "qa-serve", status)
    pool = {"namespace": "web", "pool": "qa-serve"}
    get = REGISTRY.get_sample_value
    assert get("cheapspot_pool_cost_dollars", {**pool, "capacity_type": "spot"}) == 0.75
    assert get("cheapspot_pool_cost_dollars", {**pool, "capacity_type": "on-demand"}) == 1.25
    assert (
        get("cheapspot_pool_cost_dollars", {**pool, "capacity_type": "on-demand-equivalent"}) == 4.0
    )
    assert get("cheapspot_pool_budget_remaining_dollars", pool) == 3.0

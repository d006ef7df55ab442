"""Budgets and cost beyond the basics: a job's projection horizon is its checkpoint interval,
a job's status counts the work its reclaims cost, and pools are priced per replica share
(live prices first) and held to their budget by scaling to their anchors.

Table prices: g5.xlarge $0.40/h on spot, $1.006/h on-demand.
"""

from __future__ import annotations

from dataclasses import replace

import pytest

from cheapspot_operator.api.common import CapacityType
from cheapspot_operator.planning.budget import MAX_HORIZON, MIN_HORIZON, PROJECTION, horizon
from cheapspot_operator.pricing.quotes import PriceKey, Quote
from cheapspot_operator.testing.pool import PoolWorld, make_pool
from cheapspot_operator.testing.train import World, make_job, make_progress
from cheapspot_operator.testing.world import EPOCH, make_node


def test_the_horizon_is_the_checkpoint_interval_within_bounds() -> None:
    assert horizon(None) == PROJECTION
    assert horizon(0) == PROJECTION
    assert horizon(200).total_seconds() == 200
    assert horizon(5) == MIN_HORIZON
    assert horizon(10**6) == MAX_HORIZON


def _measured_job(**spec: object) -> World:
    """One shard that has made 100 steps (10 of them redone) in 1000 s Running: 10 s/step."""
    w = World(spec=make_job(shards=1, **spec)).started()  # type: ignore[arg-type]
    w.progress[0] = make_progress(0, step=90, steps_lost=10)
    w.step(1000)
    return w


def test_a_job_counts_the_work_lost_to_reclaims_in_seconds() -> None:
    w = _measured_job()
    assert w.status.shards[0].running_seconds == 1000
    assert w.status.cost.lost_work_seconds == pytest.approx(100.0)


def test_a_job_without_lost_steps_lost_no_work() -> None:
    w = World(spec=make_job(shards=1)).started()
    w.progress[0] = make_progress(0, step=100)
    w.step(1000)
    assert w.status.cost.lost_work_seconds == 0.0


def test_a_jobs_budget_projects_over_its_checkpoint_interval() -> None:
    # everySteps 20 at 10 s/step: a checkpoint every 200 s, sooner than everySeconds (300).
    w = _measured_job(checkpoint={"everySteps": 20, "everySeconds": 300}, budget={"limitUSD": 100})
    w.step(1)
    message = next(c.message for c in w.status.conditions if c.type == "WithinBudget")
    assert "projected over the next 200s" in message, message
    w = _measured_job(checkpoint={"everySteps": 0, "everySeconds": 900}, budget={"limitUSD": 100})
    w.step(1)
    message = next(c.message for c in w.status.conditions if c.type == "WithinBudget")
    assert "projected over the next 900s" in message, message


def _four_gpu_spot_nodes() -> dict[str, object]:
    return {
        "spot-1": replace(make_node("spot-1", gpus=4), gpus=4.0),
        "spot-2": replace(make_node("spot-2", gpus=4), gpus=4.0),
        "on-demand-1": make_node("on-demand-1", "on-demand"),
    }


def test_a_pool_pays_each_replicas_share_of_its_node_at_live_prices_first() -> None:
    live = Quote(1.20, "aws-ec2-spot", observed_at=EPOCH)
    w = PoolWorld(
        nodes=_four_gpu_spot_nodes(),  # type: ignore[arg-type]
        quotes={PriceKey("g5.xlarge", CapacityType.SPOT): live},
    ).started()
    w.step(3600)
    c = w.status.cost
    # Two spot replicas, each 1 of its node's 4 GPUs at the live $1.20; the anchor has its
    # whole on-demand node at the table's $1.006.
    assert c.spot_dollars == pytest.approx(2 * 1.20 / 4)
    assert c.on_demand_spent_dollars == pytest.approx(1.006)
    assert c.on_demand_dollars == pytest.approx(2 * 1.006 / 4 + 1.006)
    assert c.spot_seconds == 7200 and c.on_demand_seconds == 3600
    assert c.sources == ["aws-ec2-spot", "table"]
    assert c.estimated  # the table price is an estimate
    assert c.savings_ratio == pytest.approx(1 - c.dollars / c.on_demand_dollars, abs=1e-4)


def _budget_pool(limit: float, on_exceed: str = "Suspend") -> PoolWorld:
    # $1.806/h running: 2 spot replicas ($0.40) and the anchor ($1.006), each a whole node.
    spec = make_pool(budget={"limitUSD": limit, "warnAtPercent": 50, "onExceed": on_exceed})
    return PoolWorld(spec=spec).started()


def _live_slots(w: PoolWorld) -> list[int]:
    return sorted(s.index for s in w.status.slots)


def test_a_pool_warns_then_keeps_only_its_anchors_at_the_limit_and_returns_when_raised() -> None:
    w = _budget_pool(2.0)
    w.step(3600)  # $1.81 spent, $1.96 projected: a warning, from this very pass
    assert w.condition("WithinBudget") == ("True", "NearBudgetLimit")
    assert w.events("NearBudgetLimit")
    w.step(300)  # $1.96 spent: the next 5 minutes cross $2
    assert w.condition("WithinBudget") == ("False", "BudgetExceeded")
    assert w.events("BudgetExceeded")
    assert _live_slots(w) == [0]
    assert w.status.replicas_display.endswith("/1")
    assert w.status.budget is not None and w.status.budget.exceeded_at_limit_usd == 2.0
    for _ in range(3):  # the spot replicas drain and go; the anchor keeps serving
        w.step(30)
    assert {rp.index for rp in w.live().values() if rp.draining_until is None} == {0}
    assert w.condition("Ready") == ("True", "Serving")
    w.step(3600)
    assert w.creates() == [] and _live_slots(w) == [0]  # no restart loop at the limit
    w.spec = make_pool(budget={"limitUSD": 20.0, "warnAtPercent": 50})
    w.generation += 1
    w.step(1)
    assert _live_slots(w) == [0, 1, 2]
    assert {c.capacity for c in w.creates()} == {CapacityType.SPOT}
    assert w.condition("WithinBudget") == ("True", "WithinBudget")


def test_a_pool_with_on_exceed_fail_stops_every_replica() -> None:
    w = _budget_pool(0.5, "Fail")
    w.step(1)  # projected: $0.15 of the next 5 minutes on top of nothing yet
    w.step(3600)
    w.step(1)
    assert w.condition("WithinBudget") == ("False", "BudgetExceeded")
    assert w.status.slots == []
    assert w.condition("Ready") == ("False", "BudgetExceeded")


def test_a_pool_without_a_budget_has_none_in_its_status() -> None:
    w = PoolWorld().started()
    w.step(3600)
    assert w.status.budget is None
    assert all(c.type != "WithinBudget" for c in w.status.conditions)
    assert w.status.cost.dollars == pytest.approx(1.806)


def test_an_unknown_node_share_is_flagged_estimated() -> None:
    w = PoolWorld().started()
    for name in list(w.pods):
        w.set_pod(name, gpus=0.0, cpus=0.0)
    w.nodes = {n: replace(v, allocatable={}) for n, v in w.nodes.items()}
    w.step(3600)
    assert w.status.cost.estimated
    assert w.status.cost.dollars == pytest.approx(1.806)


def test_removing_a_budget_removes_its_condition_from_jobs_and_pools() -> None:
    job = World(spec=make_job(budget={"limitUSD": 0.01})).started()
    job.step(3600)
    job.step(1)
    assert any(c.type == "WithinBudget" for c in job.status.conditions)
    job.spec = make_job()
    job.step(1)
    assert job.status.budget is None
    assert all(c.type != "WithinBudget" for c in job.status.conditions)

    pool = _budget_pool(0.01)
    pool.step(3600)
    pool.step(1)
    assert pool.condition("WithinBudget") == ("False", "BudgetExceeded")
    pool.spec = make_pool()
    pool.generation += 1
    pool.step(1)
    assert pool.status.budget is None
    assert all(c.type != "WithinBudget" for c in pool.status.conditions)
    assert sorted(s.index for s in pool.status.slots) == [0, 1, 2]

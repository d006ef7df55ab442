"""Per-pod cost accounting: node price x the pod's share x its seconds, with sources."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime

import pytest
from rich.console import Console

from cheapspot_localcluster.demo import summary_table
from cheapspot_operator.api.common import CapacityType, CostStatus
from cheapspot_operator.api.phases import JobPhase
from cheapspot_operator.app.costview import cost_rows, cost_table
from cheapspot_operator.cluster.placement import PROFILES
from cheapspot_operator.cluster.views import node_view
from cheapspot_operator.planning import costing
from cheapspot_operator.pricing.quotes import PriceKey, Quote
from cheapspot_operator.pricing.table import PriceTable
from cheapspot_operator.testing.pool import PoolWorld, make_pool
from cheapspot_operator.testing.train import World, make_job, make_pod, make_progress
from cheapspot_operator.testing.world import make_node
from cheapspot_operator.trainjob.observed import pod_view

TABLE = PriceTable({"g5.12xlarge": {"spot": 2.0, "on-demand": 5.0}})
LOCAL = PROFILES["local"]
SPOT = CapacityType.SPOT


def _node(capacity: str = "spot", gpus: float = 4, cpus: float = 48) -> object:
    n = make_node("n1", capacity, instance_type="g5.12xlarge")
    return replace(
        n, gpus=gpus, cpus=cpus, labels={**n.labels, "topology.kubernetes.io/zone": "z1"}
    )


@pytest.mark.parametrize(
    ("pod_gpus", "pod_cpus", "share", "estimated"),
    [(1, 8, 0.25, False), (4, 8, 1.0, False), (0, 12, 0.25, False), (0, 0, 1.0, True)],
)
def test_a_pod_pays_its_share_of_the_node(
    pod_gpus: float, pod_cpus: float, share: float, estimated: bool
) -> None:
    pod = replace(make_pod(0), gpus=pod_gpus, cpus=pod_cpus)
    u = costing.usage(pod, _node(), LOCAL, TABLE, {})  # type: ignore[arg-type]
    assert u.usd_per_hour == pytest.approx(2.0 * share)
    assert u.on_demand_usd_per_hour == pytest.approx(5.0 * share)
    assert u.estimated  # the table is always an estimate
    live = {
        PriceKey("g5.12xlarge", SPOT, "z1"): Quote(1.6, "aws-ec2-spot", datetime.now(UTC)),
        PriceKey("g5.12xlarge", CapacityType.ON_DEMAND): Quote(5.672, "aws-pricing", None),
    }
    u = costing.usage(pod, _node(), LOCAL, TABLE, live)  # type: ignore[arg-type]
    assert (u.usd_per_hour, u.source) == (pytest.approx(1.6 * share), "aws-ec2-spot")
    assert u.estimated is estimated


def test_spot_and_on_demand_are_counted_apart_with_savings_and_sources() -> None:
    spot = costing.Usage(SPOT, 2.0, 5.0, "aws-ec2-spot", False)
    anchor = costing.Usage(CapacityType.ON_DEMAND, 1.0, 1.0, "table", True)
    c = costing.add(CostStatus(), [spot, anchor], 1800)
    assert (c.spot_dollars, c.on_demand_spent_dollars, c.dollars) == (1.0, 0.5, 1.5)
    assert c.on_demand_dollars == 3.0 and c.savings_ratio == 0.5
    assert (c.spot_seconds, c.on_demand_seconds) == (1800, 1800)
    assert c.estimated and c.sources == ["aws-ec2-spot", "table"]
    assert c.display == "$1.50"


def test_the_planner_accrues_cost_while_running_and_never_after_the_job_finished() -> None:
    w = World(spec=make_job(shards=1)).started()
    w.step(3600)
    spent = w.status.cost.dollars
    assert spent > 0 and w.status.cost.spot_seconds == 3600
    assert w.status.cost.sources == ["table"] and w.status.cost.estimated
    w.status = w.status.model_copy(update={"phase": JobPhase.SUCCEEDED})
    w.step(3600)
    assert w.status.cost.dollars == spent


def test_requests_and_allocatable_are_read_from_the_api_objects() -> None:
    pod = pod_view(
        {
            "metadata": {
                "name": "p",
                "labels": {"cheapspot.dev/role": "shard", "cheapspot.dev/shard": "0"},
                "annotations": {"cheapspot.dev/attempt": "0"},
            },
            "spec": {
                "containers": [{"resources": {"requests": {"cpu": "500m", "nvidia.com/gpu": "1"}}}]
            },
        }
    )
    assert pod is not None and (pod.gpus, pod.cpus) == (1.0, 0.5)
    node = node_view(
        {
            "metadata": {"name": "n", "labels": {"topology.kubernetes.io/zone": "us-east-1a"}},
            "status": {"allocatable": {"cpu": "47500m", "nvidia.com/gpu": "4"}},
        }
    )
    assert (node.gpus, node.cpus, node.zone) == (4.0, 47.5, "us-east-1a")


def test_the_cost_table_shows_spent_savings_budget_and_sources() -> None:
    w = World(spec=make_job(budget={"limitUSD": 10})).started()
    w.step(3600)
    w.step(1)
    job = {
        "metadata": {"namespace": "ml", "name": "qa-lora"},
        "status": w.status.to_patch(),
    }
    (row,) = cost_rows([job])
    assert row.spent == pytest.approx(1.806, abs=1e-3)
    assert row.on_demand_equivalent == pytest.approx(3 * 1.006, abs=1e-3)
    assert row.budget_left == pytest.approx(10 - row.spent, abs=1e-3)
    console = Console(width=200, record=True)
    console.print(cost_table([row]))
    text = console.export_text()
    assert "qa-lora" in text and "1.81*" in text and "40%" in text and "table" in text


def test_the_cost_table_lists_pools_next_to_jobs() -> None:
    job = World(spec=make_job()).started()
    job.progress[0] = make_progress(0, step=90, steps_lost=10)
    job.step(1000)
    pool = PoolWorld(spec=make_pool(budget={"limitUSD": 50})).started()
    pool.step(3600)
    pool.step(1)
    rows = cost_rows(
        [
            {"metadata": {"namespace": "ml", "name": "qa-lora"}, "status": job.status.to_patch()},
            {
                "kind": "CheapInferencePool",
                "metadata": {"namespace": "ml", "name": "qa-serve"},
                "status": pool.status.to_patch(),
            },
        ]
    )
    assert [(r.kind, r.name) for r in rows] == [
        ("CheapInferencePool", "qa-serve"),
        ("CheapTrainJob", "qa-lora"),
    ]
    served, trained = rows
    assert served.spent == pytest.approx(1.806, abs=1e-3)
    assert served.budget_left == pytest.approx(50 - 1.806, abs=1e-3)
    assert served.phase == "Serving" and served.lost_seconds is None
    assert trained.lost_seconds == pytest.approx(100.0)
    console = Console(width=220, record=True)
    console.print(cost_table(rows))
    text = console.export_text()
    assert "pool" in text and "qa-serve" in text and "48.19" in text and "100s" in text


def test_the_demo_summary_names_where_its_prices_came_from() -> None:
    summary = {
        "succeeded": True,
        "wall_seconds": 60,
        "reclaims": 2,
        "steps_lost": 0,
        "cost_spot_usd": 0.01,
        "cost_on_demand_usd": 0.03,
        "adapter_uri": "",
        "adapter_loads": True,
        "price_sources": ["table"],
        "cost_estimated": True,
    }
    console = Console(width=200, record=True)
    console.print(summary_table(summary, []))
    text = console.export_text()
    assert "prices from" in text and "table (estimated: no live price)" in text

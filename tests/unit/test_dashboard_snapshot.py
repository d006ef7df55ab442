"""The README's dashboard picture: the operator's own metrics, parsed and drawn."""

from __future__ import annotations

from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest

from cheapspot_localcluster.dashboard import load, parse, render, save, savings, series_lines


def _exposition(spot: float, equivalent: float, preemptions: int) -> str:
    reg = CollectorRegistry()
    cost = Gauge(
        "cheapspot_job_cost_dollars", "", ["namespace", "job", "capacity_type"], registry=reg
    )
    cost.labels("demo", "qa", "spot").set(spot)
    cost.labels("demo", "qa", "on-demand").set(0.5)
    cost.labels("demo", "qa", "on-demand-equivalent").set(equivalent)
    Counter("cheapspot_preemptions", "", ["signal"], registry=reg).labels("Taint").inc(preemptions)
    Gauge("cheapspot_unrelated", "", registry=reg).set(7)
    return generate_latest(reg).decode()


def test_the_wanted_series_are_read_from_a_real_exposition() -> None:
    series = parse(_exposition(1.25, 4.0, 2))
    key = (
        "cheapspot_job_cost_dollars",
        (("capacity_type", "spot"), ("job", "qa"), ("namespace", "demo")),
    )
    assert series[key] == 1.25
    assert series[("cheapspot_preemptions_total", (("signal", "Taint"),))] == 2
    assert not [name for name, _ in series if name == "cheapspot_unrelated"]


def test_savings_is_one_minus_spent_over_the_on_demand_equivalent() -> None:
    samples = [(0.0, parse(_exposition(0.0, 0.0, 0))), (10.0, parse(_exposition(1.5, 4.0, 1)))]
    xs, ys = savings(samples, "cheapspot_job_cost_dollars")
    assert xs == [10.0]  # nothing to compare with before anything was spent
    assert ys == [pytest.approx(100 * (1 - 2.0 / 4.0))]


def test_the_panels_are_drawn_to_a_png(tmp_path: Path) -> None:
    samples = [(float(t), parse(_exposition(0.1 * t, 0.4 * t, t // 5))) for t in range(0, 30, 2)]
    out = render(samples, tmp_path / "img" / "dashboard.png", "test")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert out.stat().st_size > 10_000


def test_samples_saved_and_loaded_draw_the_same_lines(tmp_path: Path) -> None:
    samples = [(float(t), parse(_exposition(0.1 * t, 0.4 * t, t // 5))) for t in range(0, 10, 2)]
    again = load(save(samples, tmp_path / "samples.json"))
    assert again == samples


def test_a_price_shared_by_several_nodes_is_averaged_not_added() -> None:
    reg = CollectorRegistry()
    price = Gauge(
        "cheapspot_node_price_dollars_per_hour",
        "",
        ["node", "instance_type", "capacity_type", "zone"],
        registry=reg,
    )
    price.labels("spot-1", "g5.xlarge", "spot", "a").set(0.40)
    price.labels("spot-2", "g5.xlarge", "spot", "b").set(0.50)
    samples = [(0.0, parse(generate_latest(reg).decode()))]
    lines = series_lines(
        samples,
        "cheapspot_node_price_dollars_per_hour",
        lambda lb: lb["instance_type"],
        mean=True,
    )
    assert lines == {"g5.xlarge": ([0.0], [pytest.approx(0.45)])}

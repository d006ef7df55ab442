"""The deadline policies and the trace replay that measures them.

The simulator is the benchmark's own (``benchmarks/trace_replay.py``), so these tests also
pin what the benchmark reports: costs, deadline misses, the optimum as a lower bound.
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cheapspot_operator.planning.deadline import (
    Mode,
    Policy,
    Situation,
    can_wait,
    decide,
    expected_progress,
)

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))

import trace_replay as tr  # noqa: E402

SAMPLE = REPO / "tests" / "data" / "spot-traces"
HOUR = 3600.0
SAFE = (Policy.ON_DEMAND, Policy.GREEDY, Policy.UNIFORM_PROGRESS, Policy.CHEAPSPOT)


def _trace(bits: str | list[bool], gap: float = 600.0) -> tr.Trace:
    avail = tuple(b == "1" for b in bits) if isinstance(bits, str) else tuple(bits)
    return tr.Trace("t", gap, avail)


def _job(work_h: float, deadline_h: float, d_h: float = 0.2, ratio: float = 0.3) -> tr.Job:
    return tr.Job(work_h * HOUR, deadline_h * HOUR, d_h * HOUR, ratio)


def _situation(**kw: object) -> Situation:
    base: dict[str, object] = {
        "now": 0.0,
        "deadline": 10 * HOUR,
        "work": 5 * HOUR,
        "done": 0.0,
        "mode": Mode.NONE,
        "spot_available": False,
        "changeover": 0.2 * HOUR,
        "step": 60.0,
    }
    base.update(kw)
    return Situation(**base)  # type: ignore[arg-type]


# --- single decisions -----------------------------------------------------------------------


@pytest.mark.parametrize("policy", list(Policy))
def test_a_finished_job_runs_nowhere(policy: Policy) -> None:
    assert decide(policy, _situation(done=5 * HOUR)) is Mode.NONE


@pytest.mark.parametrize("policy", [Policy.GREEDY, Policy.UNIFORM_PROGRESS, Policy.CHEAPSPOT])
def test_no_policy_waits_when_waiting_could_miss_the_deadline(policy: Policy) -> None:
    # 5 h of work, 5.2 h left: one changeover and nothing more.
    s = _situation(now=4.8 * HOUR)
    assert not can_wait(s)
    assert decide(policy, s) is Mode.ON_DEMAND
    # Spot is there but a preemption after its changeover would make the job late.
    assert decide(policy, _situation(now=4.8 * HOUR, spot_available=True)) is Mode.ON_DEMAND


@pytest.mark.parametrize("policy", [Policy.GREEDY, Policy.UNIFORM_PROGRESS, Policy.CHEAPSPOT])
def test_every_policy_takes_spot_early_when_it_is_there(policy: Policy) -> None:
    assert decide(policy, _situation(spot_available=True)) is Mode.SPOT


def test_greedy_waits_for_spot_while_it_has_slack() -> None:
    assert decide(Policy.GREEDY, _situation(now=3 * HOUR)) is Mode.NONE


def test_uniform_progress_runs_on_demand_when_behind_the_line_and_waits_when_ahead() -> None:
    behind = _situation(now=2 * HOUR, done=0.5 * HOUR)  # line: 1 h
    ahead = _situation(now=2 * HOUR, done=1.5 * HOUR)
    assert expected_progress(behind, behind.now) == pytest.approx(1 * HOUR)
    assert decide(Policy.UNIFORM_PROGRESS, behind) is Mode.ON_DEMAND
    assert decide(Policy.UNIFORM_PROGRESS, ahead) is Mode.NONE


def test_uniform_progress_stays_on_demand_until_two_changeovers_ahead() -> None:
    # Line at 2 h: 1 h; at 2 h + 0.4 h: 1.2 h.
    just_ahead = _situation(now=2 * HOUR, done=1.1 * HOUR, mode=Mode.ON_DEMAND, spot_available=True)
    far_ahead = _situation(now=2 * HOUR, done=1.3 * HOUR, mode=Mode.ON_DEMAND, spot_available=True)
    assert decide(Policy.UNIFORM_PROGRESS, just_ahead) is Mode.ON_DEMAND
    assert decide(Policy.UNIFORM_PROGRESS, far_ahead) is Mode.SPOT


def test_cheapspot_returns_to_spot_without_waiting_for_the_hysteresis() -> None:
    s = _situation(now=2 * HOUR, done=1.1 * HOUR, mode=Mode.ON_DEMAND, spot_available=True)
    assert decide(Policy.CHEAPSPOT, s) is Mode.SPOT


def test_cheapspot_does_not_leave_on_demand_for_the_last_minutes_of_work() -> None:
    # 0.3 h of work left: two changeovers (0.4 h) cost more than spot saves on it.
    s = _situation(now=8 * HOUR, done=4.7 * HOUR, mode=Mode.ON_DEMAND, spot_available=True)
    assert decide(Policy.CHEAPSPOT, s) is Mode.ON_DEMAND


def test_cheapspot_keeps_a_reserve_proportional_to_the_work_left() -> None:
    # Initial slack 5 h; half the work left -> 2.5 h reserve.
    waiting = _situation(now=4 * HOUR, done=2.5 * HOUR)  # slack 3.5 h
    short = _situation(now=5.2 * HOUR, done=2.5 * HOUR)  # slack 2.3 h
    assert decide(Policy.CHEAPSPOT, waiting) is Mode.NONE
    assert decide(Policy.CHEAPSPOT, short) is Mode.ON_DEMAND


# --- whole runs -----------------------------------------------------------------------------


def test_on_demand_only_costs_the_work_and_one_changeover() -> None:
    run = tr.simulate(Policy.ON_DEMAND, _trace("0" * 100), 0, _job(5, 8))
    assert run.cost == pytest.approx(5.2)
    assert run.finished == pytest.approx(5.2 * HOUR)
    assert run.changeovers == 1


@pytest.mark.parametrize("policy", [Policy.GREEDY, Policy.UNIFORM_PROGRESS, Policy.CHEAPSPOT])
def test_with_spot_always_there_the_job_runs_on_spot_once(policy: Policy) -> None:
    run = tr.simulate(policy, _trace("1" * 100), 0, _job(5, 8))
    assert run.cost == pytest.approx(5.2 * 0.3)
    assert run.spot_work == pytest.approx(5 * HOUR)
    assert (run.changeovers, run.preemptions) == (1, 0)


def test_spot_only_is_late_without_spot_and_the_safety_net_is_not() -> None:
    trace, job = _trace("0" * 60 + "1" * 100), _job(5, 8)
    assert tr.simulate(Policy.SPOT, trace, 0, job).missed(job)
    for policy in SAFE:
        run = tr.simulate(policy, trace, 0, job)
        assert not run.missed(job), policy
        assert run.on_demand_work > 0


def test_a_preemption_costs_a_changeover_and_is_counted() -> None:
    # Spot for 2 h, gone 1 h, back: 5 h of work, loose deadline.
    trace, job = _trace("1" * 12 + "0" * 6 + "1" * 100), _job(5, 20)
    run = tr.simulate(Policy.GREEDY, trace, 0, job)
    assert run.preemptions == 1
    assert run.changeovers == 2
    assert run.finished == pytest.approx((5 + 0.4 + 1) * HOUR)  # work, 2 changeovers, gap
    assert run.cost == pytest.approx((5 + 0.4) * 0.3)


@settings(max_examples=60, deadline=None)
@given(
    bits=st.lists(st.booleans(), min_size=8, max_size=8).flatmap(
        lambda pattern: st.integers(1, 6).map(lambda k: [b for b in pattern for _ in range(k)])
    ),
    work_ticks=st.integers(2, 12),
    slack_ticks=st.integers(2, 20),
    changeover_ticks=st.sampled_from([0.0, 0.5, 1.0, 2.5]),
)
def test_the_safety_net_never_misses_and_the_optimum_is_a_lower_bound(
    bits: list[bool], work_ticks: int, slack_ticks: int, changeover_ticks: float
) -> None:
    g = 600.0
    work = work_ticks * g
    changeover = changeover_ticks * g
    deadline = work + 2 * changeover + g + slack_ticks * g
    length = int(deadline // g) + 2
    trace = _trace((bits * (length // len(bits) + 1))[:length], g)
    job = tr.Job(work, deadline, changeover, 0.3)
    best = tr.optimum(trace, 0, job)
    for policy in SAFE:
        run = tr.simulate(policy, trace, 0, job)
        assert not run.missed(job), (policy, run)
        assert best <= run.cost + 1e-9, (policy, best, run.cost)


@settings(max_examples=40, deadline=None)
@given(
    bits=st.lists(st.booleans(), min_size=40, max_size=120),
    work_ticks=st.floats(3, 30),
    slack_ticks=st.floats(0, 30),
    policy=st.sampled_from(sorted(tr.KEEPS_SPOT)),
)
def test_fast_forward_is_exact(
    bits: list[bool], work_ticks: float, slack_ticks: float, policy: Policy
) -> None:
    g = 600.0
    trace = _trace(bits * 3, g)
    job = tr.Job(work_ticks * g, work_ticks * g + 2.5 * g + slack_ticks * g, 0.7 * g, 0.3)
    slow = tr.simulate(policy, trace, 0, job)
    fast = tr.simulate(policy, trace, 0, job, tr.spot_run_ends(trace.available))
    assert fast.finished == pytest.approx(slow.finished)
    assert fast.cost == pytest.approx(slow.cost)
    assert (fast.changeovers, fast.preemptions) == (slow.changeovers, slow.preemptions)
    assert fast.spot_offered == pytest.approx(slow.spot_offered)


@pytest.mark.parametrize("policy", sorted(tr.KEEPS_SPOT))
def test_fast_forward_finishes_a_job_whose_work_ends_on_a_tick_boundary(policy: Policy) -> None:
    # 3 h of work on 600 s ticks, no changeover: the last spot run ends exactly at the end.
    trace, job = _trace("1" * 40), tr.Job(3 * HOUR, 5 * HOUR, 0.0, 0.3)
    run = tr.simulate(policy, trace, 0, job, tr.spot_run_ends(trace.available))
    assert run.finished == pytest.approx(3 * HOUR)
    assert not run.missed(job)


# --- traces and the benchmark ----------------------------------------------------------------


def test_traces_of_several_nodes_count_spot_as_there_when_enough_nodes_are(tmp_path: Path) -> None:
    (tmp_path / "two.json").write_text(
        json.dumps({"metadata": {"gap_seconds": 60}, "data": [2, 1, 0, 2]})
    )
    assert tr.load_traces(tmp_path, nodes=1)[0].available == (True, True, False, True)
    assert tr.load_traces(tmp_path, nodes=2)[0].available == (True, False, False, True)


def test_a_file_that_is_not_a_trace_is_named(tmp_path: Path) -> None:
    (tmp_path / "bad.json").write_text(json.dumps({"data": [1]}))
    with pytest.raises(SystemExit, match=r"bad\.json"):
        tr.load_traces(tmp_path)


def test_coarsening_keeps_spot_only_where_every_merged_tick_had_it() -> None:
    merged = tr.coarsen(_trace("1101111100", gap=30), tick=60)
    assert merged.gap == 60
    assert merged.available == (True, False, True, True, False)


def test_the_benchmark_replays_a_real_trace_and_cheapspot_beats_uniform_progress(
    tmp_path: Path,
) -> None:
    out = tmp_path / "replay"
    rc = tr.main(
        [
            str(SAMPLE),
            "--work-hours",
            "24",
            "--deadline-hours",
            "30,40",
            "--starts",
            "12",
            "--no-plot",
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    rows = list(csv.DictReader((tmp_path / "replay.csv").open()))
    by = {(r["deadline_hours"], r["policy"]): r for r in rows}
    for deadline in ("30.0", "40.0"):
        for policy in ("on-demand", "greedy", "uniform-progress", "cheapspot"):
            assert by[deadline, policy]["deadline_misses"] == "0"
        best = float(by[deadline, "optimum"]["cost_od_hours"])
        up = float(by[deadline, "uniform-progress"]["cost_od_hours"])
        ours = float(by[deadline, "cheapspot"]["cost_od_hours"])
        on_demand = float(by[deadline, "on-demand"]["cost_od_hours"])
        assert best <= ours <= up < on_demand
    assert (tmp_path / "replay_groups.csv").exists()


def test_replaying_in_several_processes_gives_the_same_figures() -> None:
    traces = tr.load_traces(SAMPLE)
    job = _job(24, 30)
    one = tr.replay(traces, [job], 4, with_optimum=False, workers=1)
    two = tr.replay(traces, [job], 4, with_optimum=False, workers=2)
    key = lambda r: (r.policy, sorted(r.costs), r.misses)  # noqa: E731
    assert sorted(map(key, one)) == sorted(map(key, two))
    assert all(r.runs == 4 for r in two)

"""Replay real spot availability / preemption traces against the deadline policies.

    python benchmarks/trace_replay.py TRACE_DIR [--work-hours 48] [--changeover-hours 0.2]
        [--deadline-hours 52,70] [--starts 300] [--spot-price-ratio 0.3] [--nodes 1]
        [--out benchmarks/results/trace_replay]

``TRACE_DIR`` holds JSON traces, searched recursively: ``{"metadata": {"gap_seconds": g},
"data": [n0, n1, ...]}`` where ``data[i]`` is how many spot nodes are alive or obtainable at
``i * g`` seconds. A job needs ``--nodes`` of them (spot is usable in a tick when
``data[i] >= nodes``), so traces of several nodes per file work the same way.

For every trace, deadline and start point (``--starts`` evenly spaced over the trace) a
job of ``--work-hours`` of computation is run under each policy of
:mod:`cheapspot_operator.planning.deadline` on a simulated clock: the policy decides at every
tick (spot / on-demand / wait), a spot run ends when the trace says spot is gone, and every
new run pays the changeover without progress. Costs are in on-demand hours (dollars divided
by the on-demand hourly price; spot costs ``--spot-price-ratio`` of it). The omniscient
optimum (dynamic programming over the whole future of the trace) is the lower bound.

Writes ``<out>.csv`` (one row per trace x deadline x policy, means over start points),
``<out>_groups.csv`` (by availability high/low x deadline tight/loose) and ``<out>.png``.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import statistics
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cheapspot_operator.planning.deadline import Mode, Policy, Situation, decide

HOUR = 3600.0
ONLINE_POLICIES = (
    Policy.ON_DEMAND,
    Policy.SPOT,
    Policy.GREEDY,
    Policy.UNIFORM_PROGRESS,
    Policy.CHEAPSPOT,
)
OPTIMUM = "optimum"
HIGH_AVAILABILITY = 0.5
"""A trace whose spot capacity is there at least this share of the time is "high"."""


@dataclass(frozen=True)
class Trace:
    name: str
    gap: float
    available: tuple[bool, ...]

    @property
    def availability(self) -> float:
        return sum(self.available) / len(self.available) if self.available else 0.0

    @property
    def hours(self) -> float:
        return len(self.available) * self.gap / HOUR


@dataclass(frozen=True)
class Job:
    work: float
    deadline: float
    changeover: float
    spot_price_ratio: float


@dataclass
class Run:
    cost: float = 0.0
    """On-demand hours."""
    finished: float = math.inf
    """Seconds after the start; inf when the trace ended first."""
    spot_work: float = 0.0
    on_demand_work: float = 0.0
    changeovers: int = 0
    preemptions: int = 0
    spot_seconds: float = 0.0
    """Time on spot capacity (changeovers included)."""
    spot_offered: float = 0.0
    """Time spot capacity was there while the job ran (start to finish)."""

    def missed(self, job: Job) -> bool:
        return self.finished > job.deadline + 1e-6


def coarsen(trace: Trace, tick: float) -> Trace:
    """Merge ticks shorter than ``tick``: a merged tick has spot only if all its parts had."""
    k = int(tick // trace.gap) if tick > trace.gap else 1
    if k <= 1:
        return trace
    a = trace.available
    merged = tuple(all(a[i : i + k]) for i in range(0, len(a) - k + 1, k))
    return Trace(trace.name, trace.gap * k, merged)


def load_traces(root: Path, nodes: int = 1) -> list[Trace]:
    """Every ``*.json`` trace under ``root``; a clear error for anything else."""
    paths = sorted(root.rglob("*.json"))
    if not paths:
        raise SystemExit(f"no *.json traces under {root}")
    traces = []
    for path in paths:
        try:
            raw = json.loads(path.read_text())
            gap = float(raw["metadata"]["gap_seconds"])
            data = [int(x) for x in raw["data"]]
        except (ValueError, KeyError, TypeError) as e:
            raise SystemExit(
                f"{path}: not a trace ({{'metadata': {{'gap_seconds'}}, 'data'}}): {e}"
            ) from e
        if gap <= 0 or not data:
            raise SystemExit(f"{path}: gap_seconds must be > 0 and data non-empty")
        name = str(path.relative_to(root).with_suffix(""))
        traces.append(Trace(name, gap, tuple(x >= nodes for x in data)))
    return traces


KEEPS_SPOT = frozenset({Policy.SPOT, Policy.GREEDY, Policy.UNIFORM_PROGRESS, Policy.CHEAPSPOT})
"""Policies that keep a productive spot run while spot lasts: their slack does not change on
it, so every decision along the run is spot again (``test_fast_forward_is_exact``)."""


def spot_run_ends(available: Sequence[bool]) -> list[int]:
    """For each tick, the first tick at or after it without spot."""
    ends = [len(available)] * (len(available) + 1)
    for i in range(len(available) - 1, -1, -1):
        ends[i] = ends[i + 1] if available[i] else i
    return ends


def simulate(
    policy: Policy, trace: Trace, start: int, job: Job, ends: Sequence[int] | None = None
) -> Run:
    """One job from tick ``start`` of ``trace`` under ``policy``.

    ``ends`` (:func:`spot_run_ends`) lets a productive spot run skip to its end in one go
    for the policies of :data:`KEEPS_SPOT` instead of asking the policy every tick.
    """
    run = Run()
    g = trace.gap
    mode = Mode.NONE
    changeover_left = 0.0
    done = 0.0
    now = 0.0
    i = start
    avail = trace.available
    while i < len(avail):
        spot = avail[i]
        if (
            ends is not None
            and spot
            and mode is Mode.SPOT
            and changeover_left <= 0
            and policy in KEEPS_SPOT
        ):
            full = min(ends[i] - i, int((job.work - done) // g))
            if full > 0:
                span = full * g
                done += span
                now += span
                run.cost += job.spot_price_ratio * span / HOUR
                run.spot_work += span
                run.spot_seconds += span
                run.spot_offered += span
                i += full
                if done >= job.work - 1e-9:
                    run.finished = now
                    return run
                continue
        if spot:
            run.spot_offered += g
        if mode is Mode.SPOT and not spot:
            mode, changeover_left = Mode.NONE, 0.0
            run.preemptions += 1
        s = Situation(
            now=now,
            deadline=job.deadline,
            work=job.work,
            done=done,
            mode=mode,
            spot_available=spot,
            changeover=job.changeover,
            changeover_left=changeover_left,
            step=g,
            spot_price_ratio=job.spot_price_ratio,
        )
        want = decide(policy, s)
        if want is Mode.SPOT and not spot:
            raise AssertionError(f"{policy} chose spot while none is available")
        if want is not mode and want is not Mode.NONE:
            changeover_left = job.changeover
            run.changeovers += 1
        mode = want
        if mode is Mode.NONE:
            changeover_left = 0.0
            now += g
            i += 1
            continue
        # One tick on capacity: the changeover first, then work, stopping when done.
        over = min(changeover_left, g)
        progress = min(g - over, job.work - done)
        used = over + progress
        changeover_left -= over
        done += progress
        price = job.spot_price_ratio if mode is Mode.SPOT else 1.0
        run.cost += price * used / HOUR
        if mode is Mode.SPOT:
            run.spot_work += progress
            run.spot_seconds += used
        else:
            run.on_demand_work += progress
        now += used
        if done >= job.work - 1e-9:
            run.finished = now
            if spot:
                run.spot_offered -= g - used
            return run
        i += 1
    return run


def optimum(trace: Trace, start: int, job: Job) -> float:
    """The least cost (on-demand hours) with full knowledge of the trace: a lower bound.

    Dynamic programming over ticks with states (capacity, changeover ticks left) and work done
    in whole ticks. Work and changeover are rounded down to whole ticks and the deadline up,
    so the figure never exceeds the true optimum.
    """
    g = trace.gap
    need = int(job.work // g)
    over = int(job.changeover // g)
    ticks = min(len(trace.available) - start, math.ceil(job.deadline / g))
    inf = math.inf
    # Rows: 0 = waiting, 1..over+1 = spot with (row-1) changeover ticks left, then on-demand.
    width = over + 1
    n_rows = 1 + 2 * width
    cost = np.full((n_rows, need + 1), inf)
    cost[0, 0] = 0.0
    spot_rows = slice(1, 1 + width)
    od_rows = slice(1 + width, 1 + 2 * width)
    best = inf

    def advance(block: np.ndarray, launch: np.ndarray, price: float) -> np.ndarray:
        """One tick on one capacity: continue (block) or start a new run (launch)."""
        out = np.full_like(block, inf)
        # Row r = r changeover ticks left before this tick.
        if over > 0:
            out[: over - 1 + 1] = np.minimum(out[:over], block[1:] + price)
        # Productive tick: row 0 moves work by one.
        prod = np.full(need + 1, inf)
        prod[1:] = block[0, :-1] + price
        prod[need] = min(prod[need], block[0, need] + price)
        out[0] = np.minimum(out[0], prod)
        # A new run: its first tick is changeover (or work if there is none).
        if over > 0:
            out[over - 1] = np.minimum(out[over - 1], launch + price)
        else:
            shifted = np.full(need + 1, inf)
            shifted[1:] = launch[:-1] + price
            shifted[need] = min(shifted[need], launch[need] + price)
            out[0] = np.minimum(out[0], shifted)
        return out

    for t in range(ticks):
        best = min(best, float(cost[:, need].min()))
        wait = cost.min(axis=0)
        spot_block = cost[spot_rows]
        od_block = cost[od_rows]
        new = np.full_like(cost, inf)
        new[0] = wait
        from_od_or_wait = np.minimum(cost[0], od_block.min(axis=0))
        from_spot_or_wait = np.minimum(cost[0], spot_block.min(axis=0))
        if trace.available[start + t]:
            new[spot_rows] = advance(spot_block, from_od_or_wait, job.spot_price_ratio)
        new[od_rows] = advance(od_block, from_spot_or_wait, 1.0)
        cost = new
    best = min(best, float(cost[:, need].min()))
    return best * g / HOUR


# --- the experiment -------------------------------------------------------------------------


@dataclass
class Row:
    trace: str
    availability: float
    deadline_hours: float
    policy: str
    runs: int = 0
    costs: list[float] = field(default_factory=list)
    finishes: list[float] = field(default_factory=list)
    spot_share: list[float] = field(default_factory=list)
    spot_taken: list[float] = field(default_factory=list)
    changeovers: list[int] = field(default_factory=list)
    misses: int = 0


def start_points(trace: Trace, job: Job, starts: int) -> list[int]:
    span = math.ceil(job.deadline / trace.gap) + 1
    last = len(trace.available) - span
    if last < 0:
        return []
    if starts <= 1 or last == 0:
        return [0]
    return sorted({round(k * last / (starts - 1)) for k in range(starts)})


def replay_one(
    trace: Trace, job: Job, points: Sequence[int], with_optimum: bool = True
) -> list[Row]:
    """All policies from the given start points of one trace for one job."""
    policies: list[str] = [p.value for p in ONLINE_POLICIES]
    if with_optimum:
        policies.append(OPTIMUM)
    by = {p: Row(trace.name, trace.availability, job.deadline / HOUR, p) for p in policies}
    ends = spot_run_ends(trace.available)
    for start in points:
        for policy in ONLINE_POLICIES:
            run = simulate(policy, trace, start, job, ends)
            row = by[policy.value]
            row.runs += 1
            row.costs.append(run.cost)
            row.finishes.append(run.finished / HOUR)
            row.spot_share.append(run.spot_work / job.work)
            if run.spot_offered > 0:
                row.spot_taken.append(min(1.0, run.spot_seconds / run.spot_offered))
            row.changeovers.append(run.changeovers)
            row.misses += run.missed(job)
        if with_optimum:
            row = by[OPTIMUM]
            row.runs += 1
            row.costs.append(optimum(trace, start, job))
    return list(by.values())


def replay(
    traces: Sequence[Trace],
    jobs: Iterable[Job],
    starts: int,
    *,
    with_optimum: bool = True,
    workers: int = 1,
) -> list[Row]:
    tasks: list[tuple[Trace, Job, list[int]]] = []
    for job in jobs:
        for trace in traces:
            points = start_points(trace, job, starts)
            if not points:
                print(f"  skip {trace.name}: {trace.hours:.0f} h is shorter than the deadline")
                continue
            # Chunks, so that one long trace keeps every worker busy.
            n = max(1, min(len(points), workers))
            tasks += [(trace, job, points[k::n]) for k in range(n)]
    if workers <= 1:
        parts = [replay_one(t, j, p, with_optimum) for t, j, p in tasks]
    else:
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(workers) as pool:
            futures = [pool.submit(replay_one, t, j, p, with_optimum) for t, j, p in tasks]
            parts = [f.result() for f in futures]
    merged: dict[tuple[str, float, str], Row] = {}
    for part in parts:
        for r in part:
            key = (r.trace, r.deadline_hours, r.policy)
            if key not in merged:
                merged[key] = r
                continue
            m = merged[key]
            m.runs += r.runs
            m.costs += r.costs
            m.finishes += r.finishes
            m.spot_share += r.spot_share
            m.spot_taken += r.spot_taken
            m.changeovers += r.changeovers
            m.misses += r.misses
    return list(merged.values())


def _mean(xs: Sequence[float]) -> float:
    finite = [x for x in xs if math.isfinite(x)]
    return statistics.fmean(finite) if finite else math.nan


def summarise(rows: Sequence[Row], job_work_hours: float) -> list[dict[str, object]]:
    """One dict per row: the figures the CSV and the docs report."""
    out = []
    opt = {(r.trace, r.deadline_hours): r for r in rows if r.policy == OPTIMUM}
    ond = {(r.trace, r.deadline_hours): r for r in rows if r.policy == Policy.ON_DEMAND.value}
    for r in rows:
        key = (r.trace, r.deadline_hours)
        cost = _mean(r.costs)
        base = _mean(ond[key].costs) if key in ond else math.nan
        best = _mean(opt[key].costs) if key in opt else math.nan
        out.append(
            {
                "trace": r.trace,
                "availability": round(r.availability, 3),
                "deadline_hours": r.deadline_hours,
                "policy": r.policy,
                "runs": r.runs,
                "cost_od_hours": round(cost, 3),
                "cost_vs_on_demand": round(cost / base, 4) if base else math.nan,
                "gap_to_optimum": round(cost / best - 1, 4) if best else math.nan,
                "deadline_misses": r.misses,
                "completion_hours": round(_mean(r.finishes), 2) if r.finishes else math.nan,
                "spot_utilisation": round(_mean(r.spot_share), 4) if r.spot_share else math.nan,
                "spot_taken": round(_mean(r.spot_taken), 4) if r.spot_taken else math.nan,
                "changeovers": round(_mean(r.changeovers), 2) if r.changeovers else math.nan,
            }
        )
    return out


def group_key(row: dict[str, object], tight_hours: float) -> tuple[str, str]:
    availability = "high" if float(str(row["availability"])) >= HIGH_AVAILABILITY else "low"
    deadline = "tight" if float(str(row["deadline_hours"])) <= tight_hours else "loose"
    return availability, deadline


def groups(summary: Sequence[dict[str, object]], tight_hours: float) -> list[dict[str, object]]:
    """Means over traces, by availability x deadline x policy."""
    acc: dict[tuple[str, str, str], list[dict[str, object]]] = {}
    for row in summary:
        a, d = group_key(row, tight_hours)
        acc.setdefault((a, d, str(row["policy"])), []).append(row)
    out = []
    for (a, d, policy), members in sorted(acc.items()):

        def m(col: str, members: list[dict[str, object]] = members) -> float:
            return _mean([float(str(x[col])) for x in members])

        out.append(
            {
                "availability": a,
                "deadline": d,
                "policy": policy,
                "traces": len(members),
                "runs": sum(int(str(x["runs"])) for x in members),
                "cost_od_hours": round(m("cost_od_hours"), 3),
                "cost_vs_on_demand": round(m("cost_vs_on_demand"), 4),
                "gap_to_optimum": round(m("gap_to_optimum"), 4),
                "deadline_misses": sum(int(str(x["deadline_misses"])) for x in members),
                "completion_hours": round(m("completion_hours"), 2),
                "spot_utilisation": round(m("spot_utilisation"), 4),
                "spot_taken": round(m("spot_taken"), 4),
                "changeovers": round(m("changeovers"), 2),
            }
        )
    return out


def write_csv(path: Path, rows: Sequence[dict[str, object]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def plot(path: Path, grouped: Sequence[dict[str, object]]) -> None:
    """Cost relative to on-demand per policy, one panel per availability x deadline."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted({(str(r["availability"]), str(r["deadline"])) for r in grouped})
    order = [*(p.value for p in ONLINE_POLICIES), OPTIMUM]
    colours = {
        "on-demand": "#888888",
        "spot": "#bbbbbb",
        "greedy": "#e08214",
        "uniform-progress": "#2166ac",
        "cheapspot": "#1a9850",
        "optimum": "#000000",
    }
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4.2), squeeze=False)
    for ax, (a, d) in zip(axes[0], panels, strict=True):
        rows = {
            str(r["policy"]): r for r in grouped if (r["availability"], r["deadline"]) == (a, d)
        }
        names = [p for p in order if p in rows]
        values = [float(str(rows[p]["cost_vs_on_demand"])) for p in names]
        bars = ax.bar(range(len(names)), values, color=[colours[p] for p in names])
        for bar, p in zip(bars, names, strict=True):
            misses = int(str(rows[p]["deadline_misses"]))
            label = f"{bar.get_height():.2f}" + (f"\n{misses} late" if misses else "")
            ax.annotate(
                label,
                (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                ha="center",
                va="bottom",
                fontsize=8,
            )
        ax.set_xticks(range(len(names)), names, rotation=35, ha="right", fontsize=8)
        ax.set_ylim(0, 1.15)
        ax.set_title(f"{a} availability, {d} deadline", fontsize=10)
        ax.axhline(1.0, color="#888888", linewidth=0.5)
    axes[0][0].set_ylabel("cost relative to on-demand only (lower is better)")
    fig.suptitle("Trace replay: mean cost per policy (label: relative cost, deadline misses)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _print_table(rows: Sequence[dict[str, object]], cols: Sequence[str]) -> None:
    widths = [max(len(c), *(len(str(r[c])) for r in rows)) for c in cols]
    print("  ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True)))
    for r in rows:
        print("  ".join(str(r[c]).ljust(w) for c, w in zip(cols, widths, strict=True)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("traces", type=Path, help="directory of JSON traces (searched recursively)")
    parser.add_argument("--work-hours", type=float, default=48.0)
    parser.add_argument("--changeover-hours", type=float, default=0.2)
    parser.add_argument(
        "--deadline-hours",
        default="52,70",
        help="comma-separated; the smallest is 'tight', the others 'loose'",
    )
    parser.add_argument("--starts", type=int, default=300, help="start points per trace")
    parser.add_argument("--spot-price-ratio", type=float, default=0.3)
    parser.add_argument("--nodes", type=int, default=1, help="spot nodes the job needs")
    parser.add_argument(
        "--tick-seconds",
        type=float,
        default=0.0,
        help="merge shorter trace ticks up to about this long (faster; spot only if always there)",
    )
    parser.add_argument("--workers", type=int, default=1, help="processes to replay with")
    parser.add_argument("--no-optimum", action="store_true", help="skip the (slower) optimum")
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/trace_replay"))
    args = parser.parse_args(argv)

    if not args.traces.is_dir():
        parser.error(f"{args.traces} is not a directory")
    deadlines = sorted(float(x) for x in str(args.deadline_hours).split(",") if x.strip())
    if not deadlines or deadlines[0] <= args.work_hours + 2 * args.changeover_hours:
        parser.error("every deadline must exceed work + 2 changeovers")
    if not 0 < args.spot_price_ratio < 1:
        parser.error("--spot-price-ratio must be between 0 and 1")
    traces = [coarsen(t, args.tick_seconds) for t in load_traces(args.traces, args.nodes)]
    jobs = [
        Job(
            work=args.work_hours * HOUR,
            deadline=d * HOUR,
            changeover=args.changeover_hours * HOUR,
            spot_price_ratio=args.spot_price_ratio,
        )
        for d in deadlines
    ]
    print(f"{len(traces)} traces, deadlines {deadlines} h, {args.starts} start points each")
    began = time.monotonic()
    rows = replay(traces, jobs, args.starts, with_optimum=not args.no_optimum, workers=args.workers)
    summary = summarise(rows, args.work_hours)
    grouped = groups(summary, deadlines[0])
    out: Path = args.out
    write_csv(out.with_suffix(".csv"), summary)
    write_csv(out.parent / f"{out.name}_groups.csv", grouped)
    cols = [
        "availability",
        "deadline",
        "policy",
        "runs",
        "cost_od_hours",
        "cost_vs_on_demand",
        "gap_to_optimum",
        "deadline_misses",
        "completion_hours",
        "spot_utilisation",
        "spot_taken",
        "changeovers",
    ]
    _print_table(grouped, cols)
    if not args.no_plot:
        plot(out.with_suffix(".png"), grouped)
    print(f"wrote {out}.csv, {out}_groups.csv" + ("" if args.no_plot else f", {out}.png"))
    print(f"took {time.monotonic() - began:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

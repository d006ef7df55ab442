"""``kubectl cheapspot cost``: what each job and pool has cost, by namespace, in a table.

:func:`cost_rows` is pure (CheapTrainJob and CheapInferencePool objects in, rows out) and
:func:`cost_table` renders them with rich; :func:`main` lists both kinds through the
kubeconfig's cluster.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from rich.console import Console
from rich.table import Table

from cheapspot_operator.api import inferencepool as poolspec
from cheapspot_operator.api.common import GROUP, VERSION, BudgetStatus, CostStatus
from cheapspot_operator.api.trainjob import PLURAL, parse_status
from cheapspot_operator.runtime.kubeapi import KubeApi


@dataclass(frozen=True)
class CostRow:
    namespace: str
    name: str
    kind: str
    phase: str
    spent: float
    spot: float
    on_demand: float
    on_demand_equivalent: float
    savings: float
    budget_left: float | None
    estimated: bool
    sources: tuple[str, ...]
    lost_seconds: float | None = None
    """Training time redone after reclaims (jobs); None for pools."""


def _pool_state(st: poolspec.InferencePoolStatus) -> str:
    """The pool's Ready reason (Serving, NoReplicaReady...), or BudgetExceeded while its
    budget holds it at its anchors."""
    conditions = {c.type: c for c in st.conditions}
    over = conditions.get("WithinBudget")
    if over is not None and over.status == "False":
        return over.reason
    ready = conditions.get("Ready")
    return ready.reason if ready is not None else "Pending"


def cost_rows(objects: Iterable[Mapping[str, Any]]) -> list[CostRow]:
    """One row per CheapTrainJob or CheapInferencePool (told apart by ``kind``; a job when
    absent)."""
    rows = []
    for obj in objects:
        meta = obj.get("metadata") or {}
        c: CostStatus
        budget: BudgetStatus | None
        lost: float | None
        if obj.get("kind") == poolspec.KIND:
            pool = poolspec.parse_status(obj.get("status"))
            c, budget, kind = pool.cost, pool.budget, poolspec.KIND
            state, lost = _pool_state(pool), None
        else:
            job = parse_status(obj.get("status"))
            c, budget, kind = job.cost, job.budget, "CheapTrainJob"
            state, lost = job.phase.value, c.lost_work_seconds
        rows.append(
            CostRow(
                namespace=str(meta.get("namespace", "")),
                name=str(meta.get("name", "")),
                kind=kind,
                phase=state,
                spent=c.dollars,
                spot=c.spot_dollars,
                on_demand=c.on_demand_spent_dollars,
                on_demand_equivalent=c.on_demand_dollars,
                savings=c.savings_ratio,
                budget_left=budget.remaining_usd if budget else None,
                estimated=c.estimated,
                sources=tuple(c.sources),
                lost_seconds=lost,
            )
        )
    return sorted(rows, key=lambda r: (r.namespace, r.kind, r.name))


def cost_table(rows: Sequence[CostRow]) -> Table:
    t = Table(title="cheapspot cost (USD)", caption="* estimated: a price from the table or stale")
    for col, justify in (
        ("NAMESPACE", "left"),
        ("KIND", "left"),
        ("NAME", "left"),
        ("STATE", "left"),
        ("SPENT", "right"),
        ("SPOT", "right"),
        ("ON-DEMAND", "right"),
        ("ON-DEMAND EQUIV.", "right"),
        ("SAVED", "right"),
        ("BUDGET LEFT", "right"),
        ("WORK LOST", "right"),
        ("PRICES FROM", "left"),
    ):
        t.add_column(col, justify=justify)  # type: ignore[arg-type]
    for r in rows:
        star = "*" if r.estimated else ""
        t.add_row(
            r.namespace,
            "pool" if r.kind == poolspec.KIND else "job",
            r.name,
            r.phase,
            f"{r.spent:.2f}{star}",
            f"{r.spot:.2f}",
            f"{r.on_demand:.2f}",
            f"{r.on_demand_equivalent:.2f}",
            f"{100 * r.savings:.0f}%",
            "-" if r.budget_left is None else f"{r.budget_left:.2f}",
            "-" if r.lost_seconds is None else f"{r.lost_seconds:.0f}s",
            ", ".join(r.sources) or "-",
        )
    return t


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="kubectl cheapspot cost",
        description="What each job and inference pool has cost, by namespace.",
    )
    parser.add_argument("-n", "--namespace", default="", help="one namespace (default: all)")
    parser.add_argument("--kubeconfig", default=None)
    args = parser.parse_args(argv)
    api = KubeApi.from_config(args.kubeconfig)
    scope = f"/namespaces/{args.namespace}" if args.namespace else ""
    objects: list[Mapping[str, Any]] = []
    for plural, kind in ((PLURAL, "CheapTrainJob"), (poolspec.PLURAL, poolspec.KIND)):
        try:
            listed = api.list(f"/apis/{GROUP}/{VERSION}{scope}/{plural}")
        except Exception as e:  # the API server is down or the CRD missing: say so plainly
            print(f"kubectl cheapspot cost: cannot list {plural}: {e}")
            return 1
        objects += [{**o, "kind": kind} for o in listed]
    Console().print(cost_table(cost_rows(objects)))
    return 0

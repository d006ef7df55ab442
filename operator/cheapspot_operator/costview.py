"""``kubectl cheapspot cost``: what each job has cost, by namespace, in a table.

:func:`cost_rows` is pure (CheapTrainJob objects in, rows out) and :func:`cost_table` renders
them with rich; :func:`main` lists the jobs through the kubeconfig's cluster.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from rich.console import Console
from rich.table import Table

from cheapspot_operator.spec import GROUP, PLURAL, VERSION, parse_status


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


def cost_rows(jobs: Iterable[Mapping[str, Any]]) -> list[CostRow]:
    rows = []
    for job in jobs:
        meta = job.get("metadata") or {}
        st = parse_status(job.get("status"))
        c = st.cost
        rows.append(
            CostRow(
                namespace=str(meta.get("namespace", "")),
                name=str(meta.get("name", "")),
                kind="CheapTrainJob",
                phase=st.phase.value,
                spent=c.dollars,
                spot=c.spot_dollars,
                on_demand=c.on_demand_spent_dollars,
                on_demand_equivalent=c.on_demand_dollars,
                savings=c.savings_ratio,
                budget_left=st.budget.remaining_usd if st.budget else None,
                estimated=c.estimated,
                sources=tuple(c.sources),
            )
        )
    return sorted(rows, key=lambda r: (r.namespace, r.kind, r.name))


def cost_table(rows: Sequence[CostRow]) -> Table:
    t = Table(title="cheapspot cost (USD)", caption="* estimated: a price from the table or stale")
    for col, justify in (
        ("NAMESPACE", "left"),
        ("NAME", "left"),
        ("PHASE", "left"),
        ("SPENT", "right"),
        ("SPOT", "right"),
        ("ON-DEMAND", "right"),
        ("ON-DEMAND EQUIV.", "right"),
        ("SAVED", "right"),
        ("BUDGET LEFT", "right"),
        ("PRICES FROM", "left"),
    ):
        t.add_column(col, justify=justify)  # type: ignore[arg-type]
    for r in rows:
        star = "*" if r.estimated else ""
        t.add_row(
            r.namespace,
            r.name,
            r.phase,
            f"{r.spent:.2f}{star}",
            f"{r.spot:.2f}",
            f"{r.on_demand:.2f}",
            f"{r.on_demand_equivalent:.2f}",
            f"{100 * r.savings:.0f}%",
            "-" if r.budget_left is None else f"{r.budget_left:.2f}",
            ", ".join(r.sources) or "-",
        )
    return t


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="kubectl cheapspot cost", description="What each job has cost, by namespace."
    )
    parser.add_argument("-n", "--namespace", default="", help="one namespace (default: all)")
    parser.add_argument("--kubeconfig", default=None)
    args = parser.parse_args(argv)
    from cheapspot_operator.kubeapi import KubeApi

    api = KubeApi.from_config(args.kubeconfig)
    scope = f"/namespaces/{args.namespace}" if args.namespace else ""
    try:
        jobs = api.list(f"/apis/{GROUP}/{VERSION}{scope}/{PLURAL}")
    except Exception as e:  # the API server is down or the CRD missing: say so plainly
        print(f"kubectl cheapspot cost: cannot list {PLURAL}: {e}")
        return 1
    Console().print(cost_table(cost_rows(jobs)))
    return 0

"""The nodes table of ``cheapspot nodes`` and the demo: rows decided from Node objects (pure),
rendered with rich."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from rich.table import Table

from cheapspot_localcluster.nodepool import GPU_RESOURCE
from cheapspot_localcluster.profiles import Profile, capacity_type_of
from cheapspot_localcluster.reclaim import is_ready


@dataclass(frozen=True)
class NodeRow:
    name: str
    capacity_type: str
    zone: str
    instance_type: str
    gpus: str
    ready: bool
    taints: tuple[str, ...]


def node_rows(nodes: list[dict[str, Any]], profile: Profile) -> list[NodeRow]:
    """One row per Node object (as the API returns it), sorted by name."""
    rows = []
    for node in nodes:
        meta = node.get("metadata", {})
        labels = meta.get("labels") or {}
        status = node.get("status", {})
        allocatable = status.get("allocatable") or status.get("capacity") or {}
        rows.append(
            NodeRow(
                name=meta.get("name", "?"),
                capacity_type=capacity_type_of(labels, profile).value,
                zone=labels.get("topology.kubernetes.io/zone", "-"),
                instance_type=labels.get("node.kubernetes.io/instance-type", "-"),
                gpus=str(allocatable.get(GPU_RESOURCE, "0")),
                ready=is_ready(node),
                taints=tuple(
                    f"{t['key']}:{t['effect']}" for t in (node.get("spec", {}).get("taints") or [])
                ),
            )
        )
    return sorted(rows, key=lambda r: r.name)


def nodes_table(rows: list[NodeRow], title: str = "nodes") -> Table:
    table = Table(title=title)
    table.add_column("node", no_wrap=True)  # names are what a user copies into `preempt`
    for column in ("capacity", "zone", "instance type", "GPUs", "status", "taints"):
        table.add_column(column)
    for row in rows:
        capacity = (
            f"[yellow]{row.capacity_type}[/]" if row.capacity_type == "spot" else row.capacity_type
        )
        status = "[green]Ready[/]" if row.ready else "[red]NotReady[/]"
        table.add_row(
            row.name,
            capacity,
            row.zone,
            row.instance_type,
            row.gpus,
            status,
            ", ".join(row.taints) or "-",
        )
    return table

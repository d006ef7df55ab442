"""Per-pod cost accounting, for every kind of workload. Pure.

A pod on a node for some seconds costs the node's hourly price times the pod's share of the
node: its GPUs over the node's allocatable GPUs, its CPUs over the node's CPUs for a pod
without GPUs, the whole node when neither is known (flagged estimated). The price is the
node's quote (:func:`cheapspot_operator.pricing.quotes.resolve`: live, last known good, the
table); the same seconds are also priced at on-demand, for the savings.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Protocol, Self

from cheapspot_operator.api.common import CapacityType, CostStatus
from cheapspot_operator.cluster.placement import PlacementProfile
from cheapspot_operator.cluster.views import NodeView, PodView
from cheapspot_operator.pricing.quotes import PriceKey, Quote, resolve
from cheapspot_operator.pricing.table import PriceTable


@dataclass(frozen=True)
class Usage:
    """What one pod costs per hour where it runs now."""

    capacity: CapacityType
    usd_per_hour: float
    on_demand_usd_per_hour: float
    source: str
    estimated: bool


def share(pod: PodView, node: NodeView) -> float | None:
    """The pod's share of its node; None when it cannot be known."""
    if pod.gpus > 0 and node.gpus > 0:
        return min(1.0, pod.gpus / node.gpus)
    if pod.gpus <= 0 and pod.cpus > 0 and node.cpus > 0:
        return min(1.0, pod.cpus / node.cpus)
    return None


def usage(
    pod: PodView,
    node: NodeView,
    profile: PlacementProfile,
    table: PriceTable,
    quotes: Mapping[PriceKey, Quote],
) -> Usage:
    capacity = profile.capacity_of(node.labels) or CapacityType(
        pod.capacity or CapacityType.ON_DEMAND.value
    )
    quote = resolve(PriceKey(node.instance_type, capacity, node.zone), quotes, {}, table)
    on_demand = (
        quote
        if capacity is CapacityType.ON_DEMAND
        else resolve(PriceKey(node.instance_type, CapacityType.ON_DEMAND), quotes, {}, table)
    )
    part = share(pod, node)
    fraction = 1.0 if part is None else part
    return Usage(
        capacity=capacity,
        usd_per_hour=quote.usd_per_hour * fraction,
        on_demand_usd_per_hour=on_demand.usd_per_hour * fraction,
        source=quote.source,
        estimated=quote.estimated or on_demand.estimated or part is None,
    )


class PricedCluster(Protocol):
    """What pricing a pod reads from an observation (every kind's has it)."""

    @property
    def nodes(self) -> Mapping[str, NodeView]: ...

    @property
    def profile(self) -> PlacementProfile: ...

    @property
    def prices(self) -> PriceTable: ...

    @property
    def quotes(self) -> Mapping[PriceKey, Quote]: ...


def running_usage(pods: Iterable[PodView], cluster: PricedCluster) -> Iterator[Usage]:
    """What each pod holding a node (running, or Pending but bound: pulling its image, or
    stuck on a missing secret, while its node's GPUs are reserved for it and billed) costs per
    hour, while not being deleted and on a node still there; lazy, so a caller that turns out
    not to need it prices nothing."""
    for pod in pods:
        held = pod.phase == "Running" or (pod.phase == "Pending" and bool(pod.node_name))
        if not held or pod.deleting:
            continue
        node = cluster.nodes.get(pod.node_name)
        if node is not None:
            yield usage(pod, node, cluster.profile, cluster.prices, cluster.quotes)


def add(cost: CostStatus, usages: Iterable[Usage], seconds: float) -> CostStatus:
    """``cost`` plus ``seconds`` of every usage (``accruedAt`` is the caller's)."""
    c = cost.model_copy(deep=True)
    hours = seconds / 3600
    sources = set(c.sources)
    for u in usages:
        dollars = u.usd_per_hour * hours
        if u.capacity is CapacityType.SPOT:
            c.spot_dollars += dollars
            c.spot_seconds += seconds
        else:
            c.on_demand_spent_dollars += dollars
            c.on_demand_seconds += seconds
        c.dollars += dollars
        c.on_demand_dollars += u.on_demand_usd_per_hour * hours
        c.estimated = c.estimated or u.estimated
        sources.add(u.source)
    c.dollars = round(c.dollars, 6)
    c.on_demand_dollars = round(c.on_demand_dollars, 6)
    c.spot_dollars = round(c.spot_dollars, 6)
    c.on_demand_spent_dollars = round(c.on_demand_spent_dollars, 6)
    c.spot_seconds = round(c.spot_seconds, 3)
    c.on_demand_seconds = round(c.on_demand_seconds, 3)
    c.savings_ratio = round(1 - c.dollars / c.on_demand_dollars, 4) if c.on_demand_dollars else 0.0
    c.sources = sorted(sources)
    c.display = f"${c.dollars:.2f}"
    return c


def spent_by(cost: CostStatus, usd_per_hour: float, now: datetime) -> float:
    """Dollars spent up to ``now``: what the status records, plus ``usd_per_hour`` since it
    was recorded (cost alone is written only every ``statusRefreshSeconds``; a budget must
    not wait for that write)."""
    if cost.accrued_at is None:
        return cost.dollars
    unwritten = max(0.0, (now - cost.accrued_at).total_seconds())
    return cost.dollars + usd_per_hour * unwritten / 3600


class Costed(Protocol):
    """A workload's status, as far as its cost goes."""

    cost: CostStatus

    def model_copy(
        self, *, update: Mapping[str, Any] | None = None, deep: bool = False
    ) -> Self: ...


def accrue(
    status: Costed, prev: Costed, running: Iterable[Usage], now: datetime, every: timedelta
) -> bool:
    """Add the ``running`` pods' cost since ``cost.accruedAt`` to ``status.cost``; True when
    it did. The first pass only stamps ``accruedAt``. Cost alone rewrites the status at most
    ``every`` (the operator's ``statusRefreshSeconds``): sooner only when something else in
    the status changed since ``prev`` and it is written anyway."""
    cost = status.cost
    if cost.accrued_at is None:
        status.cost = cost.model_copy(update={"accrued_at": now})
        return False
    elapsed = now - cost.accrued_at
    if elapsed <= timedelta(0):
        return False
    if elapsed < every and _without_cost(status) == _without_cost(prev):
        return False
    status.cost = add(cost, running, elapsed.total_seconds()).model_copy(update={"accrued_at": now})
    return True


def _without_cost(status: Costed) -> Costed:
    return status.model_copy(update={"cost": CostStatus()})

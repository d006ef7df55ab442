"""Builders for pool tests: pools, replica pods, replica reports and a world that steps forward.

``PoolWorld.step()`` plans and applies what the act layer would (status stored, replicas
created Pending, draining marks set, deletions begun, adapter lists taken up), so a test says
only what changes in the world (``w.taint("spot-1")``, ``w.run_all()``).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any

from cheapspot_operator.api.inferencepool import InferencePoolSpec, InferencePoolStatus
from cheapspot_operator.cluster.placement import PROFILES, PlacementProfile
from cheapspot_operator.cluster.views import NodeView, PodView
from cheapspot_operator.inferencepool.actions import (
    CreateReplica,
    EnsureRouter,
    MarkDraining,
    PoolAction,
    SyncAdapters,
    UpdatePoolStatus,
)
from cheapspot_operator.inferencepool.observed import (
    PoolObserved,
    PoolView,
    ReplicaPod,
    ReplicaReport,
    RouterView,
)
from cheapspot_operator.inferencepool.plan import plan, replica_pod_name
from cheapspot_operator.planning.actions import DeletePod, EmitEvent
from cheapspot_operator.pricing.quotes import PriceKey, Quote
from cheapspot_operator.pricing.table import PriceTable, default_prices
from cheapspot_operator.testing.train import FakeClock, make_node

POOL_NAME = "qa-serve"
INTERRUPTION = "cheapspot.dev/interruption"


def pool_dict(**overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "model": {"uri": "s3://models/tiny/"},
        "adapters": [{"name": "qa", "uri": "s3://ckpt/qa/final/"}],
        "replicas": 3,
        "anchor": {"replicas": 1},
        "engine": {"shutdownTimeoutSeconds": 30},
        "resources": {"gpu": 1, "cpu": "4", "memory": "16Gi"},
        "spot": {"fallbackAfterSeconds": 120},
    }
    base.update(overrides)
    return base


def make_pool(**overrides: Any) -> InferencePoolSpec:
    return InferencePoolSpec.model_validate(pool_dict(**overrides))


def make_replica(index: int, attempt: int = 0, **overrides: Any) -> ReplicaPod:
    capacity = overrides.pop("capacity", "spot")
    ready = overrides.pop("ready", True)
    draining_until = overrides.pop("draining_until", None)
    fields: dict[str, Any] = {
        "name": replica_pod_name(POOL_NAME, index, attempt),
        "index": index,
        "attempt": attempt,
        "capacity": capacity,
        "node_name": f"{capacity}-1",
        "phase": "Running",
        "gpus": 1.0,
    }
    fields.update(overrides)
    return ReplicaPod(
        pod=PodView(**fields),
        ready=ready and fields["phase"] == "Running",
        draining_until=draining_until,
        ip=f"127.0.1.{index + 1}",
    )


def default_pool_nodes() -> dict[str, NodeView]:
    nodes = [
        make_node("spot-1"),
        make_node("spot-2"),
        make_node("on-demand-1", "on-demand"),
    ]
    return {n.name: n for n in nodes}


@dataclass
class PoolWorld:
    spec: InferencePoolSpec = field(default_factory=make_pool)
    status: InferencePoolStatus = field(default_factory=InferencePoolStatus)
    pods: dict[str, ReplicaPod] = field(default_factory=dict)
    nodes: dict[str, NodeView] = field(default_factory=default_pool_nodes)
    reports: dict[str, ReplicaReport] = field(default_factory=dict)
    router: RouterView | None = None
    other_gpus: dict[str, int] = field(default_factory=dict)
    """GPUs requested on a node by pods of other workloads."""
    clock: FakeClock = field(default_factory=FakeClock)
    profile: PlacementProfile = PROFILES["local"]
    prices: PriceTable = field(default_factory=default_prices)
    quotes: dict[PriceKey, Quote] = field(default_factory=dict)
    """Live prices (the price book's snapshot); the table fills the gaps."""
    generation: int = 1
    last: list[PoolAction] = field(default_factory=list)

    def observed(self) -> PoolObserved:
        # What the act layer does: each node's GPUs requested by the live pods bound to it.
        used: dict[str, float] = {k: float(v) for k, v in self.other_gpus.items()}
        for rp in self.pods.values():
            if rp.pod.node_name and not rp.pod.terminated:
                used[rp.pod.node_name] = used.get(rp.pod.node_name, 0.0) + self.spec.resources.gpu
        resource = self.spec.resources.gpu_resource
        return PoolObserved(
            pool=PoolView("default", POOL_NAME, "uid-1", self.generation, self.status),
            replicas=tuple(self.pods.values()),
            nodes={
                name: replace(n, requested={resource: used.get(name, 0.0)})
                for name, n in self.nodes.items()
            },
            profile=self.profile,
            prices=self.prices,
            reports=dict(self.reports),
            router=self.router,
            quotes=dict(self.quotes),
        )

    def step(self, seconds: float = 0.0) -> list[PoolAction]:
        self.clock.advance(seconds)
        actions = plan(self.spec, self.observed(), self.clock.now)
        for action in actions:
            if isinstance(action, UpdatePoolStatus):
                self.status = action.status
            elif isinstance(action, CreateReplica):
                name = replica_pod_name(POOL_NAME, action.index, action.attempt)
                self.pods.setdefault(
                    name,
                    make_replica(
                        action.index,
                        action.attempt,
                        capacity=action.capacity.value,
                        node_name="",
                        phase="Pending",
                        ready=False,
                    ),
                )
            elif isinstance(action, MarkDraining) and action.pod in self.pods:
                self.pods[action.pod] = replace(
                    self.pods[action.pod], draining_until=action.deadline
                )
            elif isinstance(action, DeletePod) and action.name in self.pods:
                rp = self.pods[action.name]
                if action.grace_seconds == 0 or rp.pod.phase != "Running":
                    del self.pods[action.name]
                else:
                    self.pods[action.name] = replace(rp, pod=replace(rp.pod, deleting=True))
            elif isinstance(action, SyncAdapters) and action.pod in self.reports:
                names = frozenset(a.name for a in action.adapters)
                self.reports[action.pod] = replace(self.reports[action.pod], adapters=names)
            elif isinstance(action, EnsureRouter):
                self.router = RouterView(action.replicas, action.replicas)
        self.last = actions
        return actions

    def run_all(self, node: dict[str, str] | None = None) -> None:
        """Schedule pending replicas on a node of their capacity, Running and Ready, each
        reporting the spec's adapters and nothing in flight."""
        for name, rp in list(self.pods.items()):
            if rp.pod.phase == "Pending" and not rp.pod.deleting:
                where = (node or {}).get(name) or f"{rp.pod.capacity}-1"
                self.pods[name] = replace(
                    rp, pod=replace(rp.pod, phase="Running", node_name=where), ready=True
                )
                self.reports[name] = ReplicaReport(
                    ready=True, adapters=frozenset(a.name for a in self.spec.adapters)
                )

    def started(self) -> PoolWorld:
        self.step()
        spot = sorted(n for n, p in self.pods.items() if p.pod.capacity == "spot")
        self.run_all({n: f"spot-{1 + i % 2}" for i, n in enumerate(spot)})
        self.step()
        return self

    def taint(self, node: str, key: str = INTERRUPTION) -> None:
        n = self.nodes[node]
        self.nodes[node] = replace(n, taint_keys=n.taint_keys | {key})

    def set_pod(self, name: str, **changes: Any) -> None:
        rp = self.pods[name]
        top = {k: changes.pop(k) for k in ("ready", "draining_until", "ip") if k in changes}
        self.pods[name] = replace(rp, pod=replace(rp.pod, **changes), **top)

    def live(self) -> dict[str, ReplicaPod]:
        return {n: p for n, p in self.pods.items() if p.live}

    def of_slot(self, index: int) -> list[ReplicaPod]:
        return sorted((p for p in self.pods.values() if p.index == index), key=lambda p: p.attempt)

    def events(self, reason: str | None = None) -> list[EmitEvent]:
        return [
            a
            for a in self.last
            if isinstance(a, EmitEvent) and (reason is None or a.reason == reason)
        ]

    def creates(self) -> list[CreateReplica]:
        return [a for a in self.last if isinstance(a, CreateReplica)]

    def deletes(self) -> list[DeletePod]:
        return [a for a in self.last if isinstance(a, DeletePod)]

    def marks(self) -> list[MarkDraining]:
        return [a for a in self.last if isinstance(a, MarkDraining)]

    def syncs(self) -> list[SyncAdapters]:
        return [a for a in self.last if isinstance(a, SyncAdapters)]

    def condition(self, type_: str) -> tuple[str, str]:
        for c in self.status.conditions:
            if c.type == type_:
                return c.status, c.reason
        raise KeyError(type_)

    def condition_message(self, type_: str) -> str:
        return next(c.message for c in self.status.conditions if c.type == type_)

    def deadline_of(self, name: str) -> datetime | None:
        return self.pods[name].draining_until


def nodes(*names: str, capacity: str = "spot", taints: Iterable[str] = ()) -> dict[str, NodeView]:
    return {n: make_node(n, capacity, taints=taints) for n in names}

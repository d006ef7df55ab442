"""The inference pool's test world and its builders: pools and replica pods.

``PoolWorld.step()`` plans and applies what the act layer would (status stored, replicas
created Pending, draining marks set, deletions begun, adapter lists taken up), so a test says
only what changes in the world (``w.taint("spot-1")``, ``w.run_all()``).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any

from cheapspot_operator.api.inferencepool import InferencePoolSpec, InferencePoolStatus
from cheapspot_operator.cluster.views import ObjectView, PodView
from cheapspot_operator.inferencepool.actions import (
    EnsureRouter,
    MarkDraining,
    PoolAction,
    SyncAdapters,
)
from cheapspot_operator.inferencepool.observed import (
    PoolObserved,
    ReplicaPod,
    ReplicaReport,
    RouterView,
)
from cheapspot_operator.inferencepool.plan import plan
from cheapspot_operator.inferencepool.replicas import replica_pod_name
from cheapspot_operator.planning.actions import CreatePod
from cheapspot_operator.pricing.quotes import PriceKey, Quote
from cheapspot_operator.testing.world import WorkloadWorld

POOL_NAME = "qa-serve"


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


@dataclass
class PoolWorld(WorkloadWorld[ReplicaPod, PoolAction, InferencePoolStatus]):
    spec: InferencePoolSpec = field(default_factory=make_pool)
    status: InferencePoolStatus = field(default_factory=InferencePoolStatus)
    reports: dict[str, ReplicaReport] = field(default_factory=dict)
    router: RouterView | None = None
    quotes: dict[PriceKey, Quote] = field(default_factory=dict)
    """Live prices (the price book's snapshot); the table fills the gaps."""
    router_template_hash: str = ""
    """The router template hash the operator builds now (empty: not compared)."""
    refused: dict[int, str] = field(default_factory=dict)
    """Slots whose pod the API server refused, with its message (the runtime's memory)."""

    @property
    def current_status(self) -> InferencePoolStatus:
        return self.status

    def view_of(self, pod: ReplicaPod) -> PodView:
        return pod.pod

    def with_view(self, pod: ReplicaPod, view: PodView) -> ReplicaPod:
        return replace(pod, pod=view)

    def gpus_of(self, pod: ReplicaPod) -> float:
        return self.spec.resources.gpu

    @property
    def gpu_resource(self) -> str:
        return self.spec.resources.gpu_resource

    def observed(self) -> PoolObserved:
        return PoolObserved(
            pool=ObjectView("default", POOL_NAME, "uid-1", self.generation, self.status),
            replicas=tuple(self.pods.values()),
            nodes=self.observed_nodes(),
            profile=self.profile,
            prices=self.prices,
            reports=dict(self.reports),
            router=self.router,
            quotes=dict(self.quotes),
            create_refused=dict(self.refused),
            router_template_hash=self.router_template_hash,
        )

    def plan(self) -> list[PoolAction]:
        return plan(self.spec, self.observed(), self.clock.now)

    def store_status(self, status: InferencePoolStatus) -> None:
        self.status = status

    def pending_pod(self, action: CreatePod) -> tuple[str, ReplicaPod]:
        pod = make_replica(
            action.index,
            action.attempt,
            capacity=action.capacity.value,
            node_name="",
            phase="Pending",
            ready=False,
        )
        return replica_pod_name(POOL_NAME, action.index, action.attempt), pod

    def apply(self, action: PoolAction) -> None:
        if isinstance(action, MarkDraining) and action.pod in self.pods:
            self.pods[action.pod] = replace(self.pods[action.pod], draining_until=action.deadline)
        elif isinstance(action, SyncAdapters) and action.pod in self.reports:
            loaded = {a.name: a.uri for a in action.adapters}
            self.reports[action.pod] = replace(
                self.reports[action.pod], adapters=loaded, generation=action.generation
            )
        elif isinstance(action, EnsureRouter):
            self.router = RouterView(action.replicas, action.replicas, self.router_template_hash)

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
                    ready=True, adapters={a.name: a.uri for a in self.spec.adapters}
                )

    def started(self) -> PoolWorld:
        self.step()
        spot = sorted(n for n, p in self.pods.items() if p.pod.capacity == "spot")
        self.run_all({n: f"spot-{1 + i % 2}" for i, n in enumerate(spot)})
        self.step()
        return self

    def set_pod(self, name: str, **changes: Any) -> None:
        rp = self.pods[name]
        top = {k: changes.pop(k) for k in ("ready", "draining_until", "ip") if k in changes}
        self.pods[name] = replace(rp, pod=replace(rp.pod, **changes), **top)

    def live(self) -> dict[str, ReplicaPod]:
        return {n: p for n, p in self.pods.items() if p.live}

    def of_slot(self, index: int) -> list[ReplicaPod]:
        return sorted((p for p in self.pods.values() if p.index == index), key=lambda p: p.attempt)

    def creates(self) -> list[CreatePod]:
        return [a for a in self.last if isinstance(a, CreatePod)]

    def marks(self) -> list[MarkDraining]:
        return [a for a in self.last if isinstance(a, MarkDraining)]

    def syncs(self) -> list[SyncAdapters]:
        return [a for a in self.last if isinstance(a, SyncAdapters)]

    def deadline_of(self, name: str) -> datetime | None:
        return self.pods[name].draining_until

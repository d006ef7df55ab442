"""Builders for tests: jobs, pods, nodes, progress records and a clock that tests step forward.

Every builder takes overrides, so a test states only what matters to it
(``make_job(shards=4)``, ``make_pod(2, node="spot-1", phase="Running")``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any

from cheapspot.contract import Phase, Progress, Role
from cheapspot_operator.api.trainjob import TrainJobSpec, TrainJobStatus
from cheapspot_operator.cluster.placement import PROFILES, PlacementProfile
from cheapspot_operator.cluster.views import NodeView, PodView
from cheapspot_operator.planning.actions import DeletePod, EmitEvent
from cheapspot_operator.pricing.table import PriceTable, default_prices
from cheapspot_operator.trainjob.actions import Action, CreatePod, UpdateStatus
from cheapspot_operator.trainjob.observed import (
    ANCHOR_INDEX,
    GENERATOR_BASE,
    JobView,
    Observed,
    is_generator,
)
from cheapspot_operator.trainjob.plan import plan
from cheapspot_operator.trainjob.shards import pod_name

EPOCH = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)
JOB_NAME = "qa-lora"


@dataclass
class FakeClock:
    now: datetime = EPOCH

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> datetime:
        self.now += timedelta(seconds=seconds)
        return self.now


def spec_dict(**overrides: Any) -> dict[str, Any]:
    """A valid spec in its YAML (camelCase) shape; top-level keys overridden."""
    base: dict[str, Any] = {
        "model": {"uri": "s3://models/tiny/", "quantization": "none"},
        "dataset": {"uri": "s3://data/qa.jsonl", "format": "auto"},
        "output": {"uri": "s3://ckpt/qa-lora/"},
        "training": {"steps": 1000, "batchSize": 8},
        "shards": 2,
        "rounds": {"localSteps": 100},
        "resources": {"gpu": 1, "cpu": "4", "memory": "16Gi", "instanceTypes": ["g5.xlarge"]},
        "spot": {"fallbackAfterSeconds": 300, "maxPreemptionsPerHour": 6},
        "maxRestarts": 3,
    }
    base.update(overrides)
    return base


def make_job(**overrides: Any) -> TrainJobSpec:
    """A spec: ``make_job(shards=4, maxRestarts=0)``."""
    return TrainJobSpec.model_validate(spec_dict(**overrides))


def make_node(
    name: str,
    capacity: str = "spot",
    *,
    ready: bool = True,
    taints: Iterable[str] = (),
    instance_type: str = "g5.xlarge",
    unschedulable: bool = False,
    gpus: int = 1,
) -> NodeView:
    return NodeView(
        name=name,
        labels={
            "cheapspot.dev/capacity-type": capacity,
            "node.kubernetes.io/instance-type": instance_type,
        },
        ready=ready,
        unschedulable=unschedulable,
        taint_keys=frozenset(taints),
        allocatable={"nvidia.com/gpu": float(gpus)} if gpus else {},
    )


def make_pod(index: int, attempt: int = 0, **overrides: Any) -> PodView:
    """A pod of slot ``index`` (-1: the anchor); Running on a node named after its capacity."""
    capacity = overrides.pop("capacity", "on-demand" if index == ANCHOR_INDEX else "spot")
    defaults: dict[str, Any] = {
        "name": pod_name(JOB_NAME, index, attempt),
        "index": index,
        "attempt": attempt,
        "capacity": capacity,
        "node_name": f"{capacity}-1",
        "phase": "Running",
    }
    defaults.update(overrides)
    return PodView(**defaults)


def make_progress(index: int, **overrides: Any) -> Progress:
    """Slot ``index``'s record (-1: the anchor; ``GENERATOR_BASE + i``: generation shard i)."""
    role, shard, phase = Role.TRAIN, max(index, 0), Phase.TRAINING
    if index == ANCHOR_INDEX:
        role = Role.ANCHOR
    elif is_generator(index):
        role, shard, phase = Role.GENERATE, index - GENERATOR_BASE, Phase.GENERATING
    fields: dict[str, Any] = {
        "role": role,
        "shard_index": shard,
        "phase": phase,
        "updated_at": EPOCH,
    }
    fields.update(overrides)
    return Progress(**fields)


def default_nodes() -> dict[str, NodeView]:
    nodes = [make_node("spot-1"), make_node("spot-2"), make_node("on-demand-1", "on-demand")]
    return {n.name: n for n in nodes}


@dataclass
class World:
    """A job and what is around it; ``step()`` plans and applies the status like the handler."""

    spec: TrainJobSpec = field(default_factory=make_job)
    status: TrainJobStatus = field(default_factory=TrainJobStatus)
    pods: dict[str, PodView] = field(default_factory=dict)
    nodes: dict[str, NodeView] = field(default_factory=default_nodes)
    progress: dict[int, Progress] = field(default_factory=dict)
    clock: FakeClock = field(default_factory=FakeClock)
    profile: PlacementProfile = PROFILES["local"]
    prices: PriceTable = field(default_factory=default_prices)
    generation: int = 1
    last: list[Action] = field(default_factory=list)

    other_gpus: dict[str, int] = field(default_factory=dict)
    """GPUs requested on a node by pods of other workloads."""
    create_refused: dict[int, str] = field(default_factory=dict)
    status_refresh_seconds: float = 15.0

    def observed(self) -> Observed:
        # What the act layer does: each node's GPUs requested by the live pods bound to it.
        used: dict[str, float] = {k: float(v) for k, v in self.other_gpus.items()}
        for pod in self.pods.values():
            if pod.node_name and not pod.terminated:
                gpus = (
                    self.spec.anchor.gpu if pod.index == ANCHOR_INDEX else self.spec.resources.gpu
                )
                used[pod.node_name] = used.get(pod.node_name, 0.0) + gpus
        resource = self.spec.resources.gpu_resource
        nodes = {
            name: replace(n, requested={resource: used.get(name, 0.0)})
            for name, n in self.nodes.items()
        }
        return Observed(
            job=JobView("default", JOB_NAME, "uid-1", self.generation, self.status),
            pods=tuple(self.pods.values()),
            nodes=nodes,
            progress=dict(self.progress),
            profile=self.profile,
            prices=self.prices,
            create_refused=dict(self.create_refused),
            status_refresh_seconds=self.status_refresh_seconds,
        )

    def step(self, seconds: float = 0.0, *, apply_pods: bool = True) -> list[Action]:
        """Advance the clock, plan, store the new status; created pods appear Pending
        unless ``apply_pods`` is false (the create failed)."""
        self.clock.advance(seconds)
        actions = plan(self.spec, self.observed(), self.clock.now)
        for action in actions:
            if isinstance(action, UpdateStatus):
                self.status = action.status
            elif isinstance(action, CreatePod) and apply_pods:
                name = pod_name(JOB_NAME, action.index, action.attempt)
                self.pods.setdefault(
                    name,
                    make_pod(
                        action.index,
                        action.attempt,
                        capacity=action.capacity.value,
                        node_name="",
                        phase="Pending",
                    ),
                )
            elif isinstance(action, DeletePod) and apply_pods and action.name in self.pods:
                pod = self.pods[action.name]
                if action.grace_seconds == 0 or pod.phase == "Pending":
                    del self.pods[action.name]
                else:
                    self.pods[action.name] = replace(pod, deleting=True)
        self.last = actions
        return actions

    def run_all(self, nodes: Mapping[str, str] | None = None) -> None:
        """Schedule every pending pod on a node of its capacity and mark it Running."""
        for name, pod in list(self.pods.items()):
            if pod.phase == "Pending" and not pod.deleting:
                node = (nodes or {}).get(name) or f"{pod.capacity}-1"
                self.pods[name] = replace(pod, phase="Running", node_name=node)

    def set_pod(self, name: str, **changes: Any) -> None:
        self.pods[name] = replace(self.pods[name], **changes)

    def events(self, reason: str | None = None) -> list[EmitEvent]:
        return [
            a
            for a in self.last
            if isinstance(a, EmitEvent) and (reason is None or a.reason == reason)
        ]

    def creates(self) -> list[CreatePod]:
        return [a for a in self.last if isinstance(a, CreatePod)]

    def deletes(self) -> list[DeletePod]:
        return [a for a in self.last if isinstance(a, DeletePod)]

    def condition(self, type_: str) -> tuple[str, str]:
        for c in self.status.conditions:
            if c.type == type_:
                return c.status, c.reason
        raise KeyError(type_)

    def started(self) -> World:
        """Create every pod and run them all."""
        self.step()
        self.run_all()
        self.step()
        return self

"""The training job's test world and its builders: jobs, pods and progress records.

Every builder takes overrides, so a test states only what matters to it
(``make_job(shards=4)``, ``make_pod(2, node="spot-1", phase="Running")``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from cheapspot.contract import Phase, Progress, Role
from cheapspot_operator.api.trainjob import TrainJobSpec, TrainJobStatus
from cheapspot_operator.cluster.views import ObjectView, PodView
from cheapspot_operator.planning.actions import CreatePod
from cheapspot_operator.testing.world import EPOCH, WorkloadWorld
from cheapspot_operator.trainjob.actions import Action
from cheapspot_operator.trainjob.observed import (
    ANCHOR_INDEX,
    GENERATOR_BASE,
    Observed,
    is_generator,
)
from cheapspot_operator.trainjob.plan import plan
from cheapspot_operator.trainjob.shards import pod_name

JOB_NAME = "qa-lora"


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


@dataclass
class World(WorkloadWorld[PodView, Action, TrainJobStatus]):
    """A training job and what is around it; ``step()`` plans and applies like the handler:
    the status stored, created pods Pending (unless ``apply_pods`` is false: the create
    failed)."""

    spec: TrainJobSpec = field(default_factory=make_job)
    status: TrainJobStatus = field(default_factory=TrainJobStatus)
    progress: dict[int, Progress] = field(default_factory=dict)
    create_refused: dict[int, str] = field(default_factory=dict)
    status_refresh_seconds: float = 15.0

    @property
    def current_status(self) -> TrainJobStatus:
        return self.status

    def view_of(self, pod: PodView) -> PodView:
        return pod

    def with_view(self, pod: PodView, view: PodView) -> PodView:
        return view

    def gpus_of(self, pod: PodView) -> float:
        return self.spec.anchor.gpu if pod.index == ANCHOR_INDEX else self.spec.resources.gpu

    @property
    def gpu_resource(self) -> str:
        return self.spec.resources.gpu_resource

    def observed(self) -> Observed:
        return Observed(
            job=ObjectView("default", JOB_NAME, "uid-1", self.generation, self.status),
            pods=tuple(self.pods.values()),
            nodes=self.observed_nodes(),
            progress=dict(self.progress),
            profile=self.profile,
            prices=self.prices,
            create_refused=dict(self.create_refused),
            status_refresh_seconds=self.status_refresh_seconds,
        )

    def plan(self) -> list[Action]:
        return plan(self.spec, self.observed(), self.clock.now)

    def store_status(self, status: TrainJobStatus) -> None:
        self.status = status

    def pending_pod(self, action: CreatePod) -> tuple[str, PodView]:
        pod = make_pod(
            action.index,
            action.attempt,
            capacity=action.capacity.value,
            node_name="",
            phase="Pending",
        )
        return pod_name(JOB_NAME, action.index, action.attempt), pod

    def run_all(self, nodes: Mapping[str, str] | None = None) -> None:
        """Schedule every pending pod on a node of its capacity and mark it Running."""
        for name, pod in list(self.pods.items()):
            if pod.phase == "Pending" and not pod.deleting:
                node = (nodes or {}).get(name) or f"{pod.capacity}-1"
                self.pods[name] = replace(pod, phase="Running", node_name=node)

    def set_pod(self, name: str, **changes: Any) -> None:
        self.pods[name] = replace(self.pods[name], **changes)

    def creates(self) -> list[CreatePod]:
        return [a for a in self.last if isinstance(a, CreatePod)]

    def started(self) -> World:
        """Create every pod and run them all."""
        self.step()
        self.run_all()
        self.step()
        return self

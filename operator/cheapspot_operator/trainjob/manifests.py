"""Pure builders for the pods of a CheapTrainJob. Dicts in the shape the API server takes.

The handlers create what these return if it is absent (409 means it exists) and never patch
a pod: a change of placement is a new attempt under a new name.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from cheapspot.contract import JobRef, Role, Task
from cheapspot_operator.api import trainjob as s
from cheapspot_operator.cluster.pods import (
    NO_VOLUNTARY_DISRUPTION,
    Owner,
    Placement,
    resource_requirements,
    workload_container,
    workload_pod,
)
from cheapspot_operator.cluster.views import LABEL_ROLE
from cheapspot_operator.runtime.config import ServingSettings, WorkerSettings
from cheapspot_operator.trainjob.observed import (
    ANCHOR_INDEX,
    GENERATOR_BASE,
    LABEL_JOB,
    LABEL_SHARD,
    is_generator,
)
from cheapspot_operator.trainjob.shards import pod_name

SIGTERM_MARGIN_SECONDS = 5
"""Kept back from the notice when telling the worker how long its SIGTERM checkpoint may take."""


@dataclass(frozen=True)
class JobInfo:
    """The job a pod belongs to."""

    namespace: str
    name: str
    uid: str
    spec: s.TrainJobSpec

    @property
    def owner(self) -> Owner:
        return Owner(s.KIND, self.namespace, self.name, self.uid)


def build_task(job: JobInfo, index: int, attempt: int, grace_seconds: int) -> Task:
    spec = job.spec
    # The worker must publish its SIGTERM checkpoint before the node goes: within the notice.
    fits = max(grace_seconds / 2, grace_seconds - SIGTERM_MARGIN_SECONDS)
    budget = min(spec.checkpoint.sigterm_budget_seconds, float(fits))
    if index == ANCHOR_INDEX:
        role, shard = Role.ANCHOR, 0
    elif is_generator(index):
        role, shard = Role.GENERATE, index - GENERATOR_BASE
    else:
        role, shard = Role.TRAIN, index
    return Task(
        role=role,
        job=JobRef(namespace=job.namespace, name=job.name, uid=job.uid),
        shard_index=shard,
        shard_count=spec.shards,
        model=spec.model,
        dataset=spec.dataset,
        output_uri=spec.output.uri,
        lora=spec.lora,
        training=spec.training,
        rounds=spec.rounds,
        checkpoint=spec.checkpoint.model_copy(update={"sigterm_budget_seconds": budget}),
        distillation=spec.distillation,
        attempt=attempt,
    )


def build_shard_pod(
    job: JobInfo, shard: int, attempt: int, placement: Placement, worker: WorkerSettings
) -> dict[str, Any]:
    """Shard ``shard``'s pod, attempt ``attempt``: GPUs from ``spec.resources``."""
    r = job.spec.resources
    wants = _Wants(r.cpu, r.memory, r.gpu, r.instance_types)
    return _pod(job, shard, attempt, placement, worker, wants=wants)


def build_generator_pod(
    job: JobInfo,
    shard: int,
    attempt: int,
    placement: Placement,
    worker: WorkerSettings,
    *,
    serving: ServingSettings,
) -> dict[str, Any]:
    """Generation shard ``shard``'s pod (sequences-mode distillation): the teacher generates
    with vLLM, so it runs the serving image and command, with the resources of a training
    shard and the workers' environment, secret, service account and user."""
    r = job.spec.resources
    wants = _Wants(r.cpu, r.memory, r.gpu, r.instance_types)
    return _pod(
        job,
        GENERATOR_BASE + shard,
        attempt,
        placement,
        worker,
        wants=wants,
        image=serving.image,
        command=serving.command,
    )


def build_anchor_pod(
    job: JobInfo, attempt: int, placement: Placement, worker: WorkerSettings
) -> dict[str, Any]:
    """The anchor's pod: on-demand, CPU only unless ``spec.anchor.gpu`` asks for GPUs."""
    a = job.spec.anchor
    wants = _Wants(a.cpu, a.memory, a.gpu, [])
    return _pod(job, ANCHOR_INDEX, attempt, placement, worker, wants=wants)


@dataclass(frozen=True)
class _Wants:
    cpu: str
    memory: str
    gpu: int
    instance_types: list[str]


def _pod(
    job: JobInfo,
    index: int,
    attempt: int,
    placement: Placement,
    worker: WorkerSettings,
    *,
    wants: _Wants,
    image: str | None = None,
    command: list[str] | None = None,
) -> dict[str, Any]:
    grace = placement.profile.notice_seconds
    task = build_task(job, index, attempt, grace)
    labels = {
        LABEL_JOB: job.name,
        LABEL_ROLE: task.role.value,
        "app.kubernetes.io/name": "cheapspot-worker",
    }
    if index != ANCHOR_INDEX:
        labels[LABEL_SHARD] = str(task.shard_index)
    r = job.spec.resources
    container = workload_container(
        "worker",
        worker.image if image is None else image,
        worker.command if command is None else command,
        task=task.to_env(),
        resources=resource_requirements(wants.cpu, wants.memory, wants.gpu, r.gpu_resource),
        settings=worker,
    )
    return workload_pod(
        job.owner,
        pod_name(job.name, index, attempt),
        attempt,
        labels=labels,
        annotations=NO_VOLUNTARY_DISRUPTION,
        container=container,
        placement=placement,
        instance_types=wants.instance_types,
        grace_seconds=grace,
        scratch_size=r.scratch_size,
        settings=worker,
        priority_class=job.spec.priority_class_name or worker.priority_class,
    )

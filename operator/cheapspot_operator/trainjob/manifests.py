"""Pure builders for the pods of a CheapTrainJob. Dicts in the shape the API server takes.

The handlers create what these return if it is absent (409 means it exists) and never patch
a pod: a change of placement is a new attempt under a new name.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from cheapspot.contract import TASK_ENV, JobRef, Role, Task
from cheapspot_operator.api import common
from cheapspot_operator.api import trainjob as s
from cheapspot_operator.cluster.placement import PlacementProfile
from cheapspot_operator.cluster.views import ANNOTATION_ATTEMPT, LABEL_CAPACITY, LABEL_ROLE
from cheapspot_operator.runtime.config import ServingSettings, WorkerSettings
from cheapspot_operator.trainjob.observed import (
    ANCHOR_INDEX,
    GENERATOR_BASE,
    LABEL_JOB,
    LABEL_SHARD,
    is_generator,
)
from cheapspot_operator.trainjob.shards import pod_name

NO_VOLUNTARY_DISRUPTION = {
    "karpenter.sh/do-not-disrupt": "true",
    "cluster-autoscaler.kubernetes.io/safe-to-evict": "false",
}
"""Consolidation (Karpenter, the cluster autoscaler) must not take a node a training pod runs
on: the cloud's reclaims are handled, but a voluntary scale-down only costs work for nothing."""

SIGTERM_MARGIN_SECONDS = 5
"""Kept back from the notice when telling the worker how long its SIGTERM checkpoint may take."""


@dataclass(frozen=True)
class JobInfo:
    """The job a pod belongs to."""

    namespace: str
    name: str
    uid: str
    spec: s.TrainJobSpec


@dataclass(frozen=True)
class Placement:
    """Where a pod goes."""

    profile: PlacementProfile
    capacity: common.CapacityType
    avoid_nodes: tuple[str, ...] = ()
    """Nodes being reclaimed or lost: excluded by name, whatever their taints say."""
    not_ready_toleration_seconds: int = 5


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
    runner = worker.model_copy(update={"image": serving.image, "command": list(serving.command)})
    return _pod(job, GENERATOR_BASE + shard, attempt, placement, runner, wants=wants)


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
) -> dict[str, Any]:
    cpu, memory, gpu = wants.cpu, wants.memory, wants.gpu
    profile = placement.profile
    grace = profile.notice_seconds
    task = build_task(job, index, attempt, grace)
    role = task.role.value
    labels = {
        LABEL_JOB: job.name,
        LABEL_ROLE: role,
        LABEL_CAPACITY: placement.capacity.value,
        "app.kubernetes.io/name": "cheapspot-worker",
        "app.kubernetes.io/managed-by": "cheapspot",
    }
    if index != ANCHOR_INDEX:
        labels[LABEL_SHARD] = str(task.shard_index)
    requests: dict[str, str] = {"cpu": cpu, "memory": memory}
    limits: dict[str, str] = {"memory": memory}
    if gpu:
        # Extended resources: request and limit must be equal.
        requests[job.spec.resources.gpu_resource] = str(gpu)
        limits[job.spec.resources.gpu_resource] = str(gpu)
    env: list[dict[str, Any]] = [{"name": TASK_ENV, "value": task.to_env()}]
    env += [{"name": k, "value": v} for k, v in sorted(worker.env.items())]
    env += [
        {"name": "HOME", "value": "/tmp"},
        {"name": "HF_HOME", "value": "/tmp/hf"},
        {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": "NODE_NAME", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}},
    ]
    container: dict[str, Any] = {
        "name": "worker",
        "image": worker.image,
        "imagePullPolicy": worker.image_pull_policy,
        "command": list(worker.command),
        "env": env,
        "resources": {"requests": requests, "limits": limits},
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "runAsNonRoot": True,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}],
    }
    if worker.env_from_secret:
        container["envFrom"] = [{"secretRef": {"name": worker.env_from_secret}}]
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "terminationGracePeriodSeconds": grace,
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": worker.run_as_user,
            "runAsGroup": worker.run_as_user,
            "fsGroup": worker.run_as_user,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "affinity": {"nodeAffinity": _node_affinity(placement, wants.instance_types)},
        "tolerations": _tolerations(placement),
        "containers": [container],
        # Bounded: a pod that fills its scratch is evicted for it (a failure with the kubelet's
        # message), instead of filling the node's disk and getting every pod there evicted.
        "volumes": [{"name": "tmp", "emptyDir": {"sizeLimit": job.spec.resources.scratch_size}}],
    }
    if worker.service_account:
        pod_spec["serviceAccountName"] = worker.service_account
    priority_class = job.spec.priority_class_name or worker.priority_class
    if priority_class:
        pod_spec["priorityClassName"] = priority_class
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": pod_name(job.name, index, attempt),
            "namespace": job.namespace,
            "labels": labels,
            "annotations": {ANNOTATION_ATTEMPT: str(attempt), **NO_VOLUNTARY_DISRUPTION},
            "ownerReferences": [
                {
                    "apiVersion": f"{common.GROUP}/{common.VERSION}",
                    "kind": s.KIND,
                    "name": job.name,
                    "uid": job.uid,
                    "controller": True,
                    "blockOwnerDeletion": True,
                }
            ],
        },
        "spec": pod_spec,
    }


def _node_affinity(placement: Placement, instance_types: list[str]) -> dict[str, Any]:
    terms = []
    for term in placement.profile.terms_for(placement.capacity):
        out: dict[str, Any] = {
            "matchExpressions": [
                {"key": k, "operator": op, **({"values": list(v)} if v else {})}
                for k, op, v in term
            ]
        }
        if placement.avoid_nodes:
            # The API takes one value per node-field requirement; requirements in a term
            # are ANDed, so one NotIn per node excludes them all.
            out["matchFields"] = [
                {"key": "metadata.name", "operator": "NotIn", "values": [node]}
                for node in placement.avoid_nodes
            ]
        terms.append(out)
    affinity: dict[str, Any] = {
        "requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": terms}
    }
    if instance_types:
        n = len(instance_types)
        affinity["preferredDuringSchedulingIgnoredDuringExecution"] = [
            {
                # Best first: weights n*k down to k, within the API's 1..100.
                "weight": max(1, 100 * (n - i) // n),
                "preference": {
                    "matchExpressions": [
                        {
                            "key": "node.kubernetes.io/instance-type",
                            "operator": "In",
                            "values": [t],
                        }
                    ]
                },
            }
            for i, t in enumerate(instance_types)
        ]
    return affinity


def _tolerations(placement: Placement) -> list[dict[str, Any]]:
    short = placement.not_ready_toleration_seconds
    out: list[dict[str, Any]] = [
        {
            "key": f"node.kubernetes.io/{key}",
            "operator": "Exists",
            "effect": "NoExecute",
            "tolerationSeconds": short,
        }
        for key in ("not-ready", "unreachable")
    ]
    if placement.capacity is common.CapacityType.SPOT:
        out += [dict(t) for t in placement.profile.spot_tolerations]
    out += [dict(t) for t in placement.profile.extra_tolerations]
    return out

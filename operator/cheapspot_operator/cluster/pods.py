"""The pod skeleton every kind's workload pods share. Pure: dicts in the shape the API server
takes.

A training shard and a serving replica differ in their container (image, command, task,
ports, probes) and in their labels; everything else is one policy and lives here: Pod
Security "restricted" contexts, the owner reference (deleting the resource deletes its pods),
placement through node affinity and tolerations, a bounded scratch volume for /tmp (the root
filesystem is read-only), no restarts in place (a new attempt is a new pod), the cloud's
notice as the grace period.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from cheapspot.contract import TASK_ENV
from cheapspot_operator.api import common
from cheapspot_operator.cluster.placement import PlacementProfile
from cheapspot_operator.cluster.views import ANNOTATION_ATTEMPT, LABEL_CAPACITY

NO_VOLUNTARY_DISRUPTION = {
    "karpenter.sh/do-not-disrupt": "true",
    "cluster-autoscaler.kubernetes.io/safe-to-evict": "false",
}
"""Consolidation (Karpenter, the cluster autoscaler) must not take a node a workload pod runs
on (training pods, serving replicas, routers): the cloud's reclaims are handled, but a
voluntary scale-down only costs work (or cuts streams) for nothing."""

SCRATCH_VOLUME = "tmp"
SCRATCH_PATH = "/tmp"


@dataclass(frozen=True)
class Placement:
    """Where a pod goes."""

    profile: PlacementProfile
    capacity: common.CapacityType
    avoid_nodes: tuple[str, ...] = ()
    """Nodes being reclaimed or lost: excluded by name, whatever their taints say."""
    not_ready_toleration_seconds: int = 5


@dataclass(frozen=True)
class Owner:
    """The custom resource that owns a pod (or a router object)."""

    kind: str
    namespace: str
    name: str
    uid: str

    def references(self) -> list[dict[str, Any]]:
        """``ownerReferences`` that make the garbage collector delete what the resource
        owns together with it."""
        return [
            {
                "apiVersion": f"{common.GROUP}/{common.VERSION}",
                "kind": self.kind,
                "name": self.name,
                "uid": self.uid,
                "controller": True,
                "blockOwnerDeletion": True,
            }
        ]


class PodSettings(Protocol):
    """How this site runs workload pods, whatever the kind (the operator's worker settings)."""

    @property
    def image_pull_policy(self) -> str: ...

    @property
    def env(self) -> Mapping[str, str]: ...

    @property
    def env_from_secret(self) -> str | None: ...

    @property
    def service_account(self) -> str | None: ...

    @property
    def run_as_user(self) -> int: ...


def restricted_container_security() -> dict[str, Any]:
    """A container context that passes Pod Security "restricted"."""
    return {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def restricted_pod_security(user: int) -> dict[str, Any]:
    """A pod context that passes Pod Security "restricted", files owned by ``user``."""
    return {
        "runAsNonRoot": True,
        "runAsUser": user,
        "runAsGroup": user,
        "fsGroup": user,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def scratch_volume(size_limit: str | None) -> dict[str, Any]:
    """The emptyDir mounted at /tmp, bounded by ``size_limit`` where one is given."""
    return {"name": SCRATCH_VOLUME, "emptyDir": {"sizeLimit": size_limit} if size_limit else {}}


def resource_requirements(cpu: str, memory: str, gpu: int, gpu_resource: str) -> dict[str, Any]:
    """Requests, and a memory limit so a pod that outgrows it fails alone."""
    requests: dict[str, str] = {"cpu": cpu, "memory": memory}
    limits: dict[str, str] = {"memory": memory}
    if gpu:
        # Extended resources: request and limit must be equal.
        requests[gpu_resource] = str(gpu)
        limits[gpu_resource] = str(gpu)
    return {"requests": requests, "limits": limits}


def node_affinity(placement: Placement, instance_types: Sequence[str]) -> dict[str, Any]:
    """The capacity's node selector terms, the avoided nodes excluded from each, and the
    instance types as a preference, best first."""
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


def tolerations(placement: Placement) -> list[dict[str, Any]]:
    """A short stay on a node that stops answering (its pods are replaced elsewhere soon),
    the profile's spot taints on spot, and the site's own."""
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


def workload_container(
    name: str,
    image: str,
    command: Sequence[str],
    *,
    task: str,
    resources: dict[str, Any],
    settings: PodSettings,
    extra_env: Sequence[dict[str, Any]] = (),
) -> dict[str, Any]:
    """The container that runs ``task`` (a contract task as JSON, in ``CHEAPSPOT_TASK``) with
    the site's environment; /tmp is its only writable path."""
    env: list[dict[str, Any]] = [{"name": TASK_ENV, "value": task}]
    env += [{"name": k, "value": v} for k, v in sorted(settings.env.items())]
    env += [
        {"name": "HOME", "value": SCRATCH_PATH},
        {"name": "HF_HOME", "value": f"{SCRATCH_PATH}/hf"},
        {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": "NODE_NAME", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}},
        *extra_env,
    ]
    container: dict[str, Any] = {
        "name": name,
        "image": image,
        "imagePullPolicy": settings.image_pull_policy,
        "command": list(command),
        "env": env,
        "resources": resources,
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "securityContext": restricted_container_security(),
        "volumeMounts": [{"name": SCRATCH_VOLUME, "mountPath": SCRATCH_PATH}],
    }
    if settings.env_from_secret:
        container["envFrom"] = [{"secretRef": {"name": settings.env_from_secret}}]
    return container


def workload_pod(
    owner: Owner,
    name: str,
    attempt: int,
    *,
    labels: Mapping[str, str],
    container: dict[str, Any],
    placement: Placement,
    instance_types: Sequence[str],
    grace_seconds: int,
    scratch_size: str | None,
    settings: PodSettings,
    priority_class: str | None,
    annotations: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Attempt ``attempt`` of one workload pod of ``owner``, running ``container`` where
    ``placement`` says. It never restarts in place: a failed or moved pod is replaced by the
    next attempt, under a new name."""
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "terminationGracePeriodSeconds": grace_seconds,
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "securityContext": restricted_pod_security(settings.run_as_user),
        "affinity": {"nodeAffinity": node_affinity(placement, instance_types)},
        "tolerations": tolerations(placement),
        "containers": [container],
        # Bounded: a pod that fills its scratch is evicted for it (a failure with the kubelet's
        # message), instead of filling the node's disk and getting every pod there evicted.
        "volumes": [scratch_volume(scratch_size)],
    }
    if settings.service_account:
        pod_spec["serviceAccountName"] = settings.service_account
    if priority_class:
        pod_spec["priorityClassName"] = priority_class
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "namespace": owner.namespace,
            "labels": {
                **labels,
                LABEL_CAPACITY: placement.capacity.value,
                "app.kubernetes.io/managed-by": "cheapspot",
            },
            "annotations": {ANNOTATION_ATTEMPT: str(attempt), **(annotations or {})},
            "ownerReferences": owner.references(),
        },
        "spec": pod_spec,
    }

"""Pure builders for what a CheapInferencePool creates. Dicts in the shape the API server takes.

* replica pods (``<pool>-replica-<i>-<attempt>``): the serving image running the worker's
  ``serve`` role, the pool's :class:`ServeTask` in ``CHEAPSPOT_TASK``, a readiness probe on
  the admin port (``/cheapspot/ready``), a grace period that covers vLLM's drain, PSS restricted;
* the router: a Deployment on on-demand capacity running ``cheapspot router --pool NAME``, a
  Service in front of it (the pool's endpoint), and the least RBAC it needs (read the pods of
  its own namespace);

everything owned by the pool, so deleting the pool deletes them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from cheapspot.contract import (
    ADMIN_PORT,
    LABEL_POOL,
    LABEL_POOL_ROLE,
    LABEL_REPLICA,
    ROUTER_PORT,
    ROUTER_READY_PATH,
    SERVE_PORT,
    TASK_ENV,
    JobRef,
    Role,
    ServeTask,
)
from cheapspot_operator.api import common
from cheapspot_operator.api import inferencepool as ps
from cheapspot_operator.cluster.views import ANNOTATION_ATTEMPT, LABEL_CAPACITY, LABEL_ROLE
from cheapspot_operator.inferencepool.observed import REPLICA_ROLE, ROUTER_ROLE
from cheapspot_operator.inferencepool.plan import ROUTER_SERVICE_PORT, replica_pod_name
from cheapspot_operator.runtime.config import ServingSettings, WorkerSettings
from cheapspot_operator.trainjob.manifests import Placement, _node_affinity, _tolerations

DRAIN_MARGIN_SECONDS = 5
"""Added to vLLM's shutdown timeout in the grace period, for the launcher to exit."""
READY_PATH = "/cheapspot/ready"
"""The launcher's readiness: 200 once vLLM answers and every adapter is loaded, else 503."""


@dataclass(frozen=True)
class PoolInfo:
    namespace: str
    name: str
    uid: str
    spec: ps.InferencePoolSpec


def _owner(pool: PoolInfo) -> list[dict[str, Any]]:
    return [
        {
            "apiVersion": f"{common.GROUP}/{common.VERSION}",
            "kind": ps.KIND,
            "name": pool.name,
            "uid": pool.uid,
            "controller": True,
            "blockOwnerDeletion": True,
        }
    ]


def _restricted_container() -> dict[str, Any]:
    return {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def _restricted_pod(user: int) -> dict[str, Any]:
    return {
        "runAsNonRoot": True,
        "runAsUser": user,
        "runAsGroup": user,
        "fsGroup": user,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def build_serve_task(pool: PoolInfo, index: int, attempt: int) -> ServeTask:
    spec = pool.spec
    return ServeTask(
        role=Role.SERVE,
        pool=JobRef(namespace=pool.namespace, name=pool.name, uid=pool.uid),
        replica_index=index,
        model=spec.model,
        adapters=list(spec.adapters),
        engine=spec.engine,
        attempt=attempt,
    )


def replica_grace_seconds(spec: ps.InferencePoolSpec, notice_seconds: int) -> int:
    """At least vLLM's drain (shutdown timeout plus a margin) and the cloud's notice."""
    return max(notice_seconds, spec.engine.shutdown_timeout_seconds + DRAIN_MARGIN_SECONDS)


def build_replica_pod(
    pool: PoolInfo,
    index: int,
    attempt: int,
    placement: Placement,
    worker: WorkerSettings,
    *,
    serving: ServingSettings,
) -> dict[str, Any]:
    """Replica slot ``index``'s pod, attempt ``attempt``."""
    r = pool.spec.resources
    task = build_serve_task(pool, index, attempt)
    labels = {
        LABEL_POOL: pool.name,
        LABEL_POOL_ROLE: REPLICA_ROLE,
        LABEL_REPLICA: str(index),
        LABEL_ROLE: Role.SERVE.value,
        LABEL_CAPACITY: placement.capacity.value,
        "app.kubernetes.io/name": "cheapspot-serve",
        "app.kubernetes.io/managed-by": "cheapspot",
    }
    requests: dict[str, str] = {"cpu": r.cpu, "memory": r.memory}
    limits: dict[str, str] = {"memory": r.memory}
    if r.gpu:
        requests[r.gpu_resource] = str(r.gpu)
        limits[r.gpu_resource] = str(r.gpu)
    env: list[dict[str, Any]] = [{"name": TASK_ENV, "value": task.to_env()}]
    env += [{"name": k, "value": v} for k, v in sorted(worker.env.items())]
    env += [
        {"name": "HOME", "value": "/tmp"},
        {"name": "HF_HOME", "value": "/tmp/hf"},
        {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": "NODE_NAME", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}},
        # The launcher binds vLLM and its admin API to the pod's IP.
        {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
    ]
    container: dict[str, Any] = {
        "name": "replica",
        "image": serving.image,
        "imagePullPolicy": worker.image_pull_policy,
        "command": list(serving.command),
        "env": env,
        "ports": [
            {"name": "http", "containerPort": SERVE_PORT, "protocol": "TCP"},
            {"name": "admin", "containerPort": ADMIN_PORT, "protocol": "TCP"},
        ],
        "readinessProbe": {
            "httpGet": {"path": READY_PATH, "port": ADMIN_PORT},
            "periodSeconds": 2,
            "timeoutSeconds": 2,
            "failureThreshold": 2,
        },
        "resources": {"requests": requests, "limits": limits},
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "securityContext": _restricted_container(),
        "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}],
    }
    if worker.env_from_secret:
        container["envFrom"] = [{"secretRef": {"name": worker.env_from_secret}}]
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "terminationGracePeriodSeconds": replica_grace_seconds(
            pool.spec, placement.profile.notice_seconds
        ),
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "securityContext": _restricted_pod(worker.run_as_user),
        "affinity": {"nodeAffinity": _node_affinity(placement, list(r.instance_types))},
        "tolerations": _tolerations(placement),
        "containers": [container],
        "volumes": [{"name": "tmp", "emptyDir": {}}],
    }
    if worker.service_account:
        pod_spec["serviceAccountName"] = worker.service_account
    if worker.priority_class:
        pod_spec["priorityClassName"] = worker.priority_class
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": replica_pod_name(pool.name, index, attempt),
            "namespace": pool.namespace,
            "labels": labels,
            "annotations": {ANNOTATION_ATTEMPT: str(attempt)},
            "ownerReferences": _owner(pool),
        },
        "spec": pod_spec,
    }


# --- the router ---------------------------------------------------------------------------


def router_grace_seconds(spec: ps.InferencePoolSpec) -> int:
    """A queued request may wait ``maxQueueSeconds`` for a replica: the router's drain covers
    that, a margin to exit, and its linger while the Service drops it."""
    return int(spec.router.max_queue_seconds) + 2 * DRAIN_MARGIN_SECONDS


def router_name(pool_name: str) -> str:
    return f"{pool_name}-router"


def _router_labels(pool: PoolInfo) -> dict[str, str]:
    return {LABEL_POOL: pool.name, LABEL_POOL_ROLE: ROUTER_ROLE}


def build_router_deployment(
    pool: PoolInfo,
    replicas: int,
    placement: Placement,
    worker: WorkerSettings,
    serving: ServingSettings,
) -> dict[str, Any]:
    """The router pods: on on-demand capacity, reading the pool's pods with their own
    service account (:func:`build_router_rbac`)."""
    router = pool.spec.router
    selector = _router_labels(pool)
    labels = {
        **selector,
        "app.kubernetes.io/name": "cheapspot-router",
        "app.kubernetes.io/managed-by": "cheapspot",
    }
    container: dict[str, Any] = {
        "name": "router",
        "image": serving.router_image,
        "imagePullPolicy": worker.image_pull_policy,
        "command": [
            *serving.router_command,
            "--pool",
            pool.name,
            "--namespace",
            pool.namespace,
            # The pod's own IP (kubelet expands $(POD_IP) from the env below).
            "--host",
            "$(POD_IP)",
            "--port",
            str(ROUTER_PORT),
            "--max-queue-seconds",
            f"{router.max_queue_seconds:g}",
            # On SIGTERM: not Ready at once, then the requests in flight finish, within the
            # grace period less the time to exit.
            "--drain-seconds",
            str(router_grace_seconds(pool.spec) - DRAIN_MARGIN_SECONDS),
        ],
        "env": [
            {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
            {"name": "HOME", "value": "/tmp"},
        ],
        "ports": [{"name": "http", "containerPort": ROUTER_PORT, "protocol": "TCP"}],
        # Ready once it knows the replica pods; not Ready from SIGTERM on (its drain). A new
        # router of a rolling update takes traffic only when it can route it.
        "readinessProbe": {
            "httpGet": {"path": ROUTER_READY_PATH, "port": ROUTER_PORT},
            "periodSeconds": 2,
            "timeoutSeconds": 2,
            "failureThreshold": 1,
        },
        "resources": {
            "requests": {"cpu": router.cpu, "memory": router.memory},
            "limits": {"memory": router.memory},
        },
        "securityContext": _restricted_container(),
        "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}],
    }
    pod_spec: dict[str, Any] = {
        "serviceAccountName": router_name(pool.name),
        "automountServiceAccountToken": True,
        "enableServiceLinks": False,
        # Requests in flight finish before the router exits (its drain on SIGTERM).
        "terminationGracePeriodSeconds": router_grace_seconds(pool.spec),
        "securityContext": _restricted_pod(worker.run_as_user),
        "affinity": {"nodeAffinity": _node_affinity(placement, [])},
        "tolerations": _tolerations(placement),
        "containers": [container],
        "volumes": [{"name": "tmp", "emptyDir": {}}],
    }
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {
            "name": router_name(pool.name),
            "namespace": pool.namespace,
            "labels": labels,
            "ownerReferences": _owner(pool),
        },
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": selector},
            "strategy": {
                "type": "RollingUpdate",
                "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1},
            },
            "template": {"metadata": {"labels": labels}, "spec": pod_spec},
        },
    }


def build_router_service(pool: PoolInfo) -> dict[str, Any]:
    """The pool's endpoint: ``http://<pool>.<namespace>.svc/v1``."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": pool.name,
            "namespace": pool.namespace,
            "labels": {**_router_labels(pool), "app.kubernetes.io/managed-by": "cheapspot"},
            "ownerReferences": _owner(pool),
        },
        "spec": {
            "type": "ClusterIP",
            "selector": _router_labels(pool),
            "ports": [
                {
                    "name": "http",
                    "port": ROUTER_SERVICE_PORT,
                    "targetPort": ROUTER_PORT,
                    "protocol": "TCP",
                }
            ],
        },
    }


def build_router_rbac(pool: PoolInfo) -> list[dict[str, Any]]:
    """ServiceAccount, Role (read pods in this namespace only) and RoleBinding."""
    name = router_name(pool.name)
    meta = {
        "name": name,
        "namespace": pool.namespace,
        "labels": {**_router_labels(pool), "app.kubernetes.io/managed-by": "cheapspot"},
        "ownerReferences": _owner(pool),
    }
    return [
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": dict(meta)},
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "Role",
            "metadata": dict(meta),
            "rules": [
                {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]}
            ],
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": dict(meta),
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
            "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": pool.namespace}],
        },
    ]

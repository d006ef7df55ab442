"""Pure builders for what a CheapInferencePool creates. Dicts in the shape the API server takes.

* replica pods (``<pool>-replica-<i>-<attempt>``): the serving image running the worker's
  ``serve`` role, the pool's :class:`ServeTask` in ``CHEAPSPOT_TASK``, a readiness probe on
  the admin port (``/cheapspot/ready``), a grace period that covers vLLM's drain, PSS restricted;
* the router: a Deployment on on-demand capacity running ``cheapspot router --pool NAME``, a
  Service in front of it (the pool's endpoint), and the least RBAC it needs (read the pods of
  its own namespace), with the pool's API keys Secret mounted when the pool has one;
* who may talk to the replicas: the pool's admin token Secret (``<pool>-admin``; the replicas
  ask it of every change on their admin port) and a NetworkPolicy that lets only the pool's
  routers and the operator reach the replicas' ports;

everything owned by the pool, so deleting the pool deletes them.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from cheapspot.contract import (
    ADMIN_PORT,
    ADMIN_TOKEN_ENV,
    LABEL_POOL,
    LABEL_POOL_ROLE,
    LABEL_REPLICA,
    ROUTER_PORT,
    ROUTER_READY_PATH,
    SERVE_PORT,
    JobRef,
    Role,
    ServeTask,
)
from cheapspot_operator.api import inferencepool as ps
from cheapspot_operator.cluster.pods import (
    NO_VOLUNTARY_DISRUPTION,
    SCRATCH_PATH,
    SCRATCH_VOLUME,
    Owner,
    Placement,
    node_affinity,
    resource_requirements,
    restricted_container_security,
    restricted_pod_security,
    scratch_volume,
    tolerations,
    workload_container,
    workload_pod,
)
from cheapspot_operator.cluster.views import LABEL_ROLE
from cheapspot_operator.inferencepool.observed import (
    ANNOTATION_TEMPLATE_HASH,
    REPLICA_ROLE,
    ROUTER_ROLE,
)
from cheapspot_operator.inferencepool.replicas import ROUTER_SERVICE_PORT, replica_pod_name
from cheapspot_operator.runtime.config import ServingSettings, WorkerSettings

DRAIN_MARGIN_SECONDS = 5
"""Added to vLLM's shutdown timeout in the grace period, for the launcher to exit."""
API_KEYS_PATH = "/etc/cheapspot/api-keys"
"""Where the router pods mount the pool's API keys Secret."""
API_KEYS_ENV = "CHEAPSPOT_API_KEYS_FILE"
"""The router's keys file (``--api-keys``'s default)."""
API_KEYS_VOLUME = "api-keys"
ADMIN_TOKEN_KEY = "token"
"""The key of the admin Secret that holds the token."""
READY_PATH = "/cheapspot/ready"
"""The launcher's readiness: 200 once vLLM answers and every adapter is loaded, else 503."""


@dataclass(frozen=True)
class PoolInfo:
    namespace: str
    name: str
    uid: str
    spec: ps.InferencePoolSpec

    @property
    def owner(self) -> Owner:
        return Owner(ps.KIND, self.namespace, self.name, self.uid)


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
    container = workload_container(
        "replica",
        serving.image,
        serving.command,
        task=build_serve_task(pool, index, attempt).to_env(),
        resources=resource_requirements(r.cpu, r.memory, r.gpu, r.gpu_resource),
        settings=worker,
        extra_env=[
            # The launcher binds vLLM and its admin API to the pod's IP.
            {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
            # Changes on the admin port need the pool's token (the operator's Secret).
            {
                "name": ADMIN_TOKEN_ENV,
                "valueFrom": {
                    "secretKeyRef": {"name": admin_secret_name(pool.name), "key": ADMIN_TOKEN_KEY}
                },
            },
        ],
    )
    container["ports"] = [
        {"name": "http", "containerPort": SERVE_PORT, "protocol": "TCP"},
        {"name": "admin", "containerPort": ADMIN_PORT, "protocol": "TCP"},
    ]
    container["readinessProbe"] = {
        "httpGet": {"path": READY_PATH, "port": ADMIN_PORT},
        "periodSeconds": 2,
        "timeoutSeconds": 2,
        "failureThreshold": 2,
    }
    return workload_pod(
        pool.owner,
        replica_pod_name(pool.name, index, attempt),
        attempt,
        labels={
            LABEL_POOL: pool.name,
            LABEL_POOL_ROLE: REPLICA_ROLE,
            LABEL_REPLICA: str(index),
            LABEL_ROLE: Role.SERVE.value,
            "app.kubernetes.io/name": "cheapspot-serve",
        },
        annotations=NO_VOLUNTARY_DISRUPTION,
        container=container,
        placement=placement,
        instance_types=r.instance_types,
        grace_seconds=replica_grace_seconds(pool.spec, placement.profile.notice_seconds),
        scratch_size=r.scratch_size,
        settings=worker,
        priority_class=worker.priority_class,
    )


# --- the router ---------------------------------------------------------------------------


def router_grace_seconds(spec: ps.InferencePoolSpec) -> int:
    """The router's drain covers the longest of a queued request's wait (``maxQueueSeconds``)
    and a stream's length (``drainSeconds``), plus a margin to exit and its linger while the
    Service drops it."""
    router = spec.router
    longest = max(int(router.max_queue_seconds), router.drain_seconds)
    return longest + 2 * DRAIN_MARGIN_SECONDS


def template_hash(template: Mapping[str, Any]) -> str:
    """A short stable hash of a pod template (its JSON, keys sorted)."""
    text = json.dumps(template, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def router_patch(existing: Mapping[str, Any], built: Mapping[str, Any]) -> dict[str, Any]:
    """The merge patch that brings an existing router Deployment to ``built``: its replica
    count, and its pod template when the built one's hash differs from the one recorded (a
    new router image or setting rolls out, the Deployment's rolling update making way)."""
    want = built["metadata"]["annotations"][ANNOTATION_TEMPLATE_HASH]
    have = ((existing.get("metadata") or {}).get("annotations") or {}).get(ANNOTATION_TEMPLATE_HASH)
    patch: dict[str, Any] = {"spec": {"replicas": built["spec"]["replicas"]}}
    if have != want:
        patch["metadata"] = {"annotations": {ANNOTATION_TEMPLATE_HASH: want}}
        patch["spec"]["template"] = built["spec"]["template"]
    return patch


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
            "--first-token-seconds",
            f"{router.first_token_seconds:g}",
            "--stall-seconds",
            f"{router.stall_seconds:g}",
            "--max-request-bytes",
            str(router.max_request_bytes),
            "--max-concurrent-requests",
            str(router.max_concurrent_requests),
            "--max-queued-requests",
            str(router.max_queued_requests),
            "--max-buffered-bytes",
            str(router.max_buffered_bytes),
            # On SIGTERM: not Ready at once, then the requests in flight finish, within the
            # grace period less the time to exit.
            "--drain-seconds",
            str(router_grace_seconds(pool.spec) - DRAIN_MARGIN_SECONDS),
        ],
        "env": [
            {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
            {"name": "HOME", "value": SCRATCH_PATH},
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
        "securityContext": restricted_container_security(),
        "volumeMounts": [{"name": SCRATCH_VOLUME, "mountPath": SCRATCH_PATH}],
    }
    volumes = [scratch_volume(None)]
    if router.api_keys is not None:
        keys = router.api_keys
        # A mounted Secret (not an env var) so that edits reach the router without a restart.
        volumes.append(
            {
                "name": API_KEYS_VOLUME,
                "secret": {
                    "secretName": keys.secret_name,
                    "items": [{"key": keys.key, "path": "keys.yaml"}],
                },
            }
        )
        container["volumeMounts"].append(
            {"name": API_KEYS_VOLUME, "mountPath": API_KEYS_PATH, "readOnly": True}
        )
        container["env"].append({"name": API_KEYS_ENV, "value": f"{API_KEYS_PATH}/keys.yaml"})
    pod_spec: dict[str, Any] = {
        "serviceAccountName": router_name(pool.name),
        "automountServiceAccountToken": True,
        "enableServiceLinks": False,
        # Requests in flight finish before the router exits (its drain on SIGTERM).
        "terminationGracePeriodSeconds": router_grace_seconds(pool.spec),
        "securityContext": restricted_pod_security(worker.run_as_user),
        "affinity": {"nodeAffinity": node_affinity(placement, [])},
        "tolerations": tolerations(placement),
        "containers": [container],
        "volumes": volumes,
    }
    template = {
        "metadata": {"labels": labels, "annotations": dict(NO_VOLUNTARY_DISRUPTION)},
        "spec": pod_spec,
    }
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {
            "name": router_name(pool.name),
            "namespace": pool.namespace,
            "labels": labels,
            "annotations": {ANNOTATION_TEMPLATE_HASH: template_hash(template)},
            "ownerReferences": pool.owner.references(),
        },
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": selector},
            "strategy": {
                "type": "RollingUpdate",
                "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1},
            },
            "template": template,
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
            "ownerReferences": pool.owner.references(),
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
        "ownerReferences": pool.owner.references(),
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


def anchor_pdb_name(pool_name: str) -> str:
    return f"{pool_name}-anchors"


def build_pdbs(pool: PoolInfo) -> list[dict[str, Any]]:
    """PodDisruptionBudgets: no anchor replica may be evicted voluntarily (a node drain or
    consolidation waits; reclaims are not evictions), and one router always stays (with one
    router, a drain waits for the user). A pod that is not Ready can always be evicted
    (``unhealthyPodEvictionPolicy``), so a broken pod never blocks a node drain. None for
    anchors when the pool has none."""
    meta_labels = {**_router_labels(pool), "app.kubernetes.io/managed-by": "cheapspot"}
    anchors = min(pool.spec.anchor.replicas, pool.spec.replicas)
    out: list[dict[str, Any]] = []

    def pdb(name: str, selector: dict[str, Any], budget: dict[str, int]) -> dict[str, Any]:
        return {
            "apiVersion": "policy/v1",
            "kind": "PodDisruptionBudget",
            "metadata": {
                "name": name,
                "namespace": pool.namespace,
                "labels": {
                    **meta_labels,
                    LABEL_POOL_ROLE: selector["matchLabels"][LABEL_POOL_ROLE],
                },
                "ownerReferences": pool.owner.references(),
            },
            "spec": {
                **budget,
                "selector": selector,
                "unhealthyPodEvictionPolicy": "AlwaysAllow",
            },
        }

    if anchors > 0:
        selector: dict[str, Any] = {
            "matchLabels": {LABEL_POOL: pool.name, LABEL_POOL_ROLE: REPLICA_ROLE},
            "matchExpressions": [
                {
                    "key": LABEL_REPLICA,
                    "operator": "In",
                    "values": [str(i) for i in range(anchors)],
                }
            ],
        }
        out.append(pdb(anchor_pdb_name(pool.name), selector, {"maxUnavailable": 0}))
    router = {"matchLabels": _router_labels(pool)}
    out.append(pdb(router_name(pool.name), router, {"minAvailable": 1}))
    return out


# --- who may reach the replicas ------------------------------------------------------------


def admin_secret_name(pool_name: str) -> str:
    return f"{pool_name}-admin"


def build_admin_secret(pool: PoolInfo, token: str) -> dict[str, Any]:
    """The pool's admin token, which its replicas ask of every change on their admin port
    (an adapter push). The token is derived from the operator's key (:mod:`.tokens`)."""
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "Opaque",
        "metadata": {
            "name": admin_secret_name(pool.name),
            "namespace": pool.namespace,
            "labels": {LABEL_POOL: pool.name, "app.kubernetes.io/managed-by": "cheapspot"},
            "ownerReferences": pool.owner.references(),
        },
        "stringData": {ADMIN_TOKEN_KEY: token},
    }


def network_policy_name(pool_name: str) -> str:
    return f"{pool_name}-replicas"


def build_network_policy(
    pool: PoolInfo, operator_namespace: str, operator_labels: Mapping[str, str]
) -> dict[str, Any]:
    """The replicas' ports (vLLM's and the admin port) take connections only from the pool's
    router pods and the operator's pods (in ``operator_namespace``; ``""``: any namespace).
    Every other ingress to the replica pods is refused, where the network plugin enforces
    NetworkPolicies; the kubelet's probes come from the node, which the common plugins
    always admit."""
    operator_ns: dict[str, Any] = (
        {"matchLabels": {"kubernetes.io/metadata.name": operator_namespace}}
        if operator_namespace
        else {}
    )
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {
            "name": network_policy_name(pool.name),
            "namespace": pool.namespace,
            "labels": {LABEL_POOL: pool.name, "app.kubernetes.io/managed-by": "cheapspot"},
            "ownerReferences": pool.owner.references(),
        },
        "spec": {
            "podSelector": {"matchLabels": {LABEL_POOL: pool.name, LABEL_POOL_ROLE: REPLICA_ROLE}},
            "policyTypes": ["Ingress"],
            "ingress": [
                {
                    "from": [
                        {"podSelector": {"matchLabels": _router_labels(pool)}},
                        {
                            "namespaceSelector": operator_ns,
                            "podSelector": {"matchLabels": dict(operator_labels)},
                        },
                    ],
                    "ports": [
                        {"protocol": "TCP", "port": SERVE_PORT},
                        {"protocol": "TCP", "port": ADMIN_PORT},
                    ],
                }
            ],
        },
    }

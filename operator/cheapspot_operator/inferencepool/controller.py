"""The CheapInferencePool's reconciler: the pool planner and manifests over the shared runtime
(:class:`runtime.reconciler.ObjectReconciler`), like the train job's
(:mod:`cheapspot_operator.trainjob.controller`).

What only serving needs, beyond the shared observe-plan-act pass:

* **Replica reports** and **adapter pushes** through the replicas' admin endpoints
  (:class:`inferencepool.admin.AdminClient`).
* **Draining**: the mark is a merge patch of the pod's ``cheapspot.dev/draining-until``
  annotation, which the router watches.
* **The router**: ServiceAccount, Role, RoleBinding, Service and Deployment created if
  absent; only the Deployment's replicas are ever changed.
* **Who may reach the replicas**: the pool's admin token Secret and its NetworkPolicy, before
  any replica is created (:class:`.tokens.PoolGuard`); every adapter push carries the token.
* **Allowed URIs**: a model or adapter URI outside the namespace's ``allowedUriPrefixes``
  refuses the pool (``Degraded``, reason ``URINotAllowed``, naming the field and the prefixes).
* **Free GPUs** for the return to spot are counted (node allocatable minus the requests of
  pods bound there) only while the pool has a replica on on-demand fallback.
* **A refused replica create** (a quota, an admission webhook) is reported on the ``Degraded``
  condition (reason ``CreateRefused``, the API server's words) and in a ``PodNotStarting``
  event, and retried every pass.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any, ClassVar

from pydantic import ValidationError

from cheapspot.contract import ANNOTATION_DRAINING, LABEL_POOL
from cheapspot_operator.api import common
from cheapspot_operator.api import inferencepool as ps
from cheapspot_operator.api.common import CapacityType
from cheapspot_operator.cluster.pods import Placement
from cheapspot_operator.cluster.views import ObjectView
from cheapspot_operator.inferencepool.actions import (
    EnsureRouter,
    MarkDraining,
    PoolAction,
    SyncAdapters,
)
from cheapspot_operator.inferencepool.admin import AdminClient
from cheapspot_operator.inferencepool.manifests import (
    PoolInfo,
    build_pdbs,
    build_replica_pod,
    build_router_deployment,
    build_router_rbac,
    build_router_service,
    router_name,
    router_patch,
)
from cheapspot_operator.inferencepool.observed import (
    ANNOTATION_TEMPLATE_HASH,
    PoolObserved,
    replica_pod_view,
    router_view,
)
from cheapspot_operator.inferencepool.plan import plan
from cheapspot_operator.inferencepool.tokens import PoolGuard
from cheapspot_operator.planning.actions import CreatePod, EmitEvent, UpdateStatus
from cheapspot_operator.planning.conditions import set_condition
from cheapspot_operator.planning.uris import refused_uris
from cheapspot_operator.pricing.quotes import PriceKey, Quote
from cheapspot_operator.runtime import metrics
from cheapspot_operator.runtime.config import OperatorConfig
from cheapspot_operator.runtime.kubeapi import ApiError, KubeApi
from cheapspot_operator.runtime.nodelist import SharedNodeList
from cheapspot_operator.runtime.reconciler import (
    ObjectReconciler,
    Stage,
    pods_path,
    validation_message,
)

log = logging.getLogger("cheapspot.operator.pools")


class PoolReconciler(ObjectReconciler[PoolAction]):
    """Observe, plan, act for one pool at a time. Synchronous: runs in a worker thread."""

    KIND = ps.KIND
    PLURAL = ps.PLURAL
    POD_LABEL = LABEL_POOL
    STAGES: ClassVar[Mapping[type, Stage]] = {MarkDraining: Stage.DRAIN}

    def __init__(
        self,
        api: KubeApi,
        config: OperatorConfig,
        *,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        admin: AdminClient | None = None,
        quotes: Callable[[], Mapping[PriceKey, Quote]] = dict,
        nodes: SharedNodeList | None = None,
    ) -> None:
        super().__init__(api, config, clock=clock, quotes=quotes, nodes=nodes)
        self.admin = admin or AdminClient()
        self.counts: dict[tuple[str, str], tuple[int, int]] = {}
        self.guard = PoolGuard(api, config.serving)

    def finished(self, namespace: str, name: str) -> bool:
        """Never: a pool serves until it is deleted, and deletion stops its loop."""
        return False

    def reconcile_once(self, namespace: str, name: str) -> list[PoolAction]:
        pool = self.get_object(namespace, name)
        if pool is None or pool["metadata"].get("deletionTimestamp"):
            self.counts.pop((namespace, name), None)
            return []
        meta = pool["metadata"]
        status = ps.parse_status(pool.get("status"))
        try:
            spec = ps.parse_spec(pool.get("spec") or {})
        except ValidationError as exc:
            return self._invalid(pool, status, validation_message(exc))
        outside = refused_uris(namespace, pool_uris(spec), self.config.allowed_uri_prefixes)
        if outside:
            return self._invalid(pool, status, outside, reason="URINotAllowed")
        token = self.guard.secure(self._info(pool, spec))
        pods = self.object_pods(namespace, name, meta["uid"])
        replicas = tuple(v for p in pods if (v := replica_pod_view(p)) is not None)
        # What is free on the nodes matters only to a replica that fell back to on-demand.
        usage: dict[str, dict[str, float]] = {}
        if any(
            not slot.anchor and slot.capacity_type is CapacityType.ON_DEMAND
            for slot in status.slots
        ):
            usage = self.nodes.usage()
        deployment = self.api.get(
            f"/apis/apps/v1/namespaces/{namespace}/deployments/{router_name(name)}"
        )
        observed = PoolObserved(
            pool=ObjectView.of(pool, status),
            replicas=replicas,
            nodes=self.nodes.views(usage),
            profile=self.profile,
            prices=self.prices,
            reports=self.admin.reports(replicas),
            router=router_view(deployment),
            quotes=self.quotes(),
            status_refresh_seconds=self.config.status_refresh_seconds,
            router_template_hash=self._router_deployment(
                self._info(pool, spec), spec.router.replicas
            )["metadata"]["annotations"][ANNOTATION_TEMPLATE_HASH],
            create_refused=self.refused_for(
                meta["uid"], ((s.index, s.attempt) for s in status.slots)
            ),
        )
        now = self.clock()
        actions = plan(spec, observed, now)
        retried = [(a.index, a.attempt) for a in actions if isinstance(a, CreatePod)]
        refused = self.refused_for(meta["uid"], retried)
        if refused:
            actions = report_refusals(actions, refused, status, now, observed.pool.generation)
        by_name = {rp.name: rp for rp in observed.replicas}

        def act(action: PoolAction) -> None:
            if isinstance(action, CreatePod):
                self._create_replica(pool, spec, action)
            elif isinstance(action, MarkDraining):
                self._mark_draining(namespace, action)
            elif isinstance(action, SyncAdapters) and action.pod in by_name:
                adapters = [a.model_dump(mode="json", by_alias=True) for a in action.adapters]
                self.admin.push_adapters(
                    by_name[action.pod], adapters, action.generation, token=token
                )
            elif isinstance(action, EnsureRouter):
                self._ensure_router(pool, spec, action.replicas)

        self.apply(pool, actions, act)
        return actions

    def _invalid(
        self,
        pool: dict[str, Any],
        status: ps.InferencePoolStatus,
        message: str,
        reason: str = "InvalidSpec",
    ) -> list[PoolAction]:
        actions = invalid_actions(
            status, message, int(pool["metadata"].get("generation", 1)), self.clock(), reason
        )
        self.apply(pool, actions, lambda action: None)
        return actions

    # -- acting -------------------------------------------------------------------------------

    def _placement(self, capacity: CapacityType, avoid: tuple[str, ...] = ()) -> Placement:
        return Placement(
            profile=self.profile,
            capacity=capacity,
            avoid_nodes=avoid,
            not_ready_toleration_seconds=self.config.not_ready_toleration_seconds,
        )

    def _info(self, pool: dict[str, Any], spec: ps.InferencePoolSpec) -> PoolInfo:
        meta = pool["metadata"]
        return PoolInfo(meta["namespace"], meta["name"], meta["uid"], spec)

    def _create_replica(
        self, pool: dict[str, Any], spec: ps.InferencePoolSpec, action: CreatePod
    ) -> None:
        pod = build_replica_pod(
            self._info(pool, spec),
            action.index,
            action.attempt,
            self._placement(action.capacity, action.avoid_nodes),
            self.config.worker,
            serving=self.config.serving,
        )
        self.create_pod(
            pool, action.index, action.attempt, pod, role="serve", capacity=action.capacity.value
        )

    def _mark_draining(self, namespace: str, action: MarkDraining) -> None:
        stamp = action.deadline.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        try:
            self.api.merge_patch(
                pods_path(namespace, action.pod),
                {"metadata": {"annotations": {ANNOTATION_DRAINING: stamp}}},
            )
        except ApiError as exc:
            if exc.status != 404:
                raise
        metrics.REPLICA_DRAINS.inc()
        log.info("draining %s until %s", action.pod, stamp)

    def _ensure_router(
        self, pool: dict[str, Any], spec: ps.InferencePoolSpec, replicas: int
    ) -> None:
        info = self._info(pool, spec)
        ns = info.namespace
        for obj in build_router_rbac(info):
            group = "/api/v1" if obj["apiVersion"] == "v1" else "/apis/rbac.authorization.k8s.io/v1"
            plural = {
                "ServiceAccount": "serviceaccounts",
                "Role": "roles",
                "RoleBinding": "rolebindings",
            }[obj["kind"]]
            self.api.create(f"{group}/namespaces/{ns}/{plural}", obj)
        self.api.create(f"/api/v1/namespaces/{ns}/services", build_router_service(info))
        for pdb in build_pdbs(info):
            self.api.create(f"/apis/policy/v1/namespaces/{ns}/poddisruptionbudgets", pdb)
        deployments = f"/apis/apps/v1/namespaces/{ns}/deployments"
        body = self._router_deployment(info, replicas)
        if not self.api.create(deployments, body):
            path = f"{deployments}/{router_name(info.name)}"
            existing = self.api.get(path) or {}
            self.api.merge_patch(path, router_patch(existing, body))

    def _router_deployment(self, info: PoolInfo, replicas: int) -> dict[str, Any]:
        return build_router_deployment(
            info,
            replicas,
            self._placement(CapacityType.ON_DEMAND),
            self.config.worker,
            self.config.serving,
        )

    # -- metrics ------------------------------------------------------------------------------

    def status_written(self, obj: Mapping[str, Any], status: Any) -> None:
        meta = obj["metadata"]
        self.count_status(meta["namespace"], meta["name"], status)

    def count_status(self, namespace: str, name: str, status: ps.InferencePoolStatus) -> None:
        metrics.set_cost(
            metrics.POOL_COST,
            metrics.POOL_BUDGET_REMAINING,
            (namespace, name),
            status.cost,
            status.budget,
        )
        self.counts[(namespace, name)] = (status.spot_replicas, status.on_demand_replicas)
        metrics.POOL_REPLICAS.labels(capacity="spot").set(sum(c[0] for c in self.counts.values()))
        metrics.POOL_REPLICAS.labels(capacity="on-demand").set(
            sum(c[1] for c in self.counts.values())
        )


def report_refusals(
    actions: list[PoolAction],
    refused: Mapping[int, str],
    before: ps.InferencePoolStatus,
    now: datetime,
    generation: int,
) -> list[PoolAction]:
    """``actions`` with the replica creates the API server refused last time (``refused``: its
    words by slot, for the creates tried again now) on the planned status: ``Degraded``
    (reason ``CreateRefused``), with an event when the refusal is new since ``before``."""
    if not actions or not isinstance(actions[0], UpdateStatus):
        return actions
    planned = actions[0].status
    message = "; ".join(f"replica {i}: {refused[i]}" for i in sorted(refused))
    degraded = next((c for c in planned.conditions if c.type == "Degraded"), None)
    if degraded is not None and degraded.status == "True":
        message = f"{message}; {degraded.message}"[:2000]
    old = next((c for c in before.conditions if c.type == "Degraded"), None)
    condition = common.Condition(
        type="Degraded",
        status="True",
        reason="CreateRefused",
        message=message,
        last_transition_time=(
            old.last_transition_time if old is not None and old.status == "True" else now
        ),
        observed_generation=generation,
    )
    status = planned.model_copy(
        update={"conditions": set_condition(list(planned.conditions), condition)}
    )
    out: list[PoolAction] = [UpdateStatus(status), *actions[1:]]
    if old is None or old.reason != "CreateRefused" or old.message != message:
        event = EmitEvent("Warning", "PodNotStarting", f"CreateRefused: {message}", "CreateRefused")
        out.append(event)
    return out


def pool_uris(spec: ps.InferencePoolSpec) -> dict[str, str]:
    """Every storage URI the pool names, by spec field."""
    uris = {"spec.model.uri": spec.model.uri}
    uris.update({f"spec.adapters[{a.name}].uri": a.uri for a in spec.adapters})
    return uris


def invalid_actions(
    status: ps.InferencePoolStatus,
    message: str,
    generation: int,
    now: datetime,
    reason: str = "InvalidSpec",
) -> list[PoolAction]:
    """An invalid spec (which the CRD's schema normally stops): Degraded and not Ready, said
    once per generation; retrying cannot fix it, the next edit may."""
    old = next((c for c in status.conditions if c.type == "Degraded"), None)
    if old is not None and old.reason == reason and old.observed_generation == generation:
        return []
    conditions = status.conditions
    for type_, value in (("Degraded", "True"), ("Ready", "False")):
        conditions = set_condition(
            conditions,
            common.Condition(
                type=type_,
                status=value,
                reason=reason,
                message=message,
                last_transition_time=now,
                observed_generation=generation,
            ),
        )
    update = {"conditions": conditions, "observed_generation": generation}
    return [
        UpdateStatus(status.model_copy(update=update)),
        EmitEvent("Warning", reason, message),
    ]

"""The act layer for CheapInferencePools: observe, ask :func:`planning.pool.plan`, apply.

Same shape as the train job's (:mod:`cheapspot_operator.trainjob.controller`): one asyncio loop per pool,
reconciling every ``reconcileIntervalSeconds`` and at once when one of its pods or any node
changes (a reclaim notice becomes a draining mark and a replacement within a second); the
status is written first with the pool's resourceVersion as a precondition; pods have
deterministic names and a 409 on create is success; no finalizer.

What only serving needs:

* **Replica reports**: every running replica's admin endpoint (``GET /cheapspot/status`` on
  :data:`ADMIN_PORT`, pod IP) is read in parallel with a short timeout; a replica that does
  not answer simply has no report (the planner then waits for its deadline).
* **Draining**: the mark is a merge patch of the pod's ``cheapspot.dev/draining-until``
  annotation, which the router watches.
* **Adapters**: ``PUT /cheapspot/adapters`` with ``{"adapters": [{"name", "uri"}, ...]}`` on
  the admin port, in the background (one at a time per replica; the replica answers once it
  fetched and loaded what is new); it loads and unloads through vLLM's runtime adapter API.
* **The router**: ServiceAccount, Role, RoleBinding, Service and Deployment created if
  absent; only the Deployment's replicas are ever changed.
* **Free GPUs** for the return to spot are counted (node allocatable minus the requests of
  pods bound there) only while the pool has a replica on on-demand fallback.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from datetime import UTC, datetime
from typing import Any

import kopf
import urllib3
from pydantic import ValidationError

from cheapspot.contract import ADMIN_PORT, ANNOTATION_DRAINING, LABEL_POOL
from cheapspot_operator.api import common
from cheapspot_operator.api import inferencepool as ps
from cheapspot_operator.api.common import CapacityType
from cheapspot_operator.cluster.pods import Placement
from cheapspot_operator.inferencepool.actions import (
    CreateReplica,
    EnsureRouter,
    MarkDraining,
    PoolAction,
    SyncAdapters,
    UpdatePoolStatus,
)
from cheapspot_operator.inferencepool.manifests import (
    PoolInfo,
    build_replica_pod,
    build_router_deployment,
    build_router_rbac,
    build_router_service,
    router_name,
)
from cheapspot_operator.inferencepool.observed import (
    PoolObserved,
    PoolView,
    ReplicaPod,
    ReplicaReport,
    replica_pod_view,
    router_view,
)
from cheapspot_operator.inferencepool.plan import plan
from cheapspot_operator.planning.actions import DeletePod, EmitEvent
from cheapspot_operator.planning.conditions import set_condition
from cheapspot_operator.pricing.quotes import PriceKey, Quote
from cheapspot_operator.runtime import metrics
from cheapspot_operator.runtime.config import OperatorConfig
from cheapspot_operator.runtime.kubeapi import ApiError, KubeApi
from cheapspot_operator.runtime.nodelist import SharedNodeList
from cheapspot_operator.trainjob.controller import _owned_by, loops_for, post_event

log = logging.getLogger("cheapspot.operator.pools")

ADMIN_TIMEOUT = urllib3.Timeout(connect=0.5, read=1.0)
"""A replica that cannot answer this fast is treated as silent for this pass."""
PUSH_TIMEOUT = urllib3.Timeout(connect=1.0, read=300.0)
REPORT_WAIT_S = 0.25
"""How long a reconcile waits for fresh reports; slower answers count for the next pass, so
a busy replica never delays the reaction to a reclaim notice."""
REPORT_MAX_AGE_S = 10.0
"""A report older than this is not used (the replica stopped answering)."""
"""An adapter push returns once the replica fetched and loaded what is new."""

ReportReader = Callable[[Sequence[ReplicaPod]], Mapping[str, ReplicaReport]]
AdapterPusher = Callable[[ReplicaPod, Sequence[Mapping[str, str]]], None]


def _pool_path(namespace: str, name: str = "") -> str:
    base = f"/apis/{common.GROUP}/{common.VERSION}/namespaces/{namespace}/{ps.PLURAL}"
    return f"{base}/{name}" if name else base


def _pods_path(namespace: str, name: str = "") -> str:
    base = f"/api/v1/namespaces/{namespace}/pods"
    return f"{base}/{name}" if name else base


class AdminClient:
    """The replicas' admin endpoints over HTTP (pod IP, :data:`ADMIN_PORT`)."""

    def __init__(self) -> None:
        self.http = urllib3.PoolManager(timeout=ADMIN_TIMEOUT, retries=False)
        self.pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="replica-status")
        self.pushers = ThreadPoolExecutor(max_workers=4, thread_name_prefix="adapter-push")
        self.pushing: set[str] = set()
        self.lock = threading.Lock()
        self.asking: dict[str, Future[None]] = {}
        self.latest: dict[str, tuple[float, ReplicaReport]] = {}

    def _url(self, rp: ReplicaPod, path: str) -> str:
        return f"http://{rp.ip}:{ADMIN_PORT}{path}"

    def report(self, rp: ReplicaPod) -> ReplicaReport | None:
        try:
            response = self.http.request("GET", self._url(rp, "/cheapspot/status"))
            data = json.loads(response.data or b"{}")
        except (urllib3.exceptions.HTTPError, ValueError, OSError):
            return None
        if not isinstance(data, dict):
            return None
        return ReplicaReport.from_json(data)

    def reports(
        self, replicas: Sequence[ReplicaPod], wait_s: float = REPORT_WAIT_S
    ) -> Mapping[str, ReplicaReport]:
        """The newest report of each running replica: asked now, waited for ``wait_s`` at
        most; an answer still on its way is used by the next pass."""
        asked = [rp for rp in replicas if rp.ip and rp.live and rp.pod.phase == "Running"]
        pending = []
        with self.lock:
            for rp in asked:
                future = self.asking.get(rp.name)
                if future is None or future.done():
                    future = self.pool.submit(self._refresh, rp)
                    self.asking[rp.name] = future
                pending.append(future)
        wait(pending, timeout=wait_s)
        now = time.monotonic()
        with self.lock:
            names = {rp.name for rp in asked}
            for gone in [n for n in self.latest if n not in names]:
                if now - self.latest[gone][0] > REPORT_MAX_AGE_S:
                    del self.latest[gone]
                    self.asking.pop(gone, None)
            return {
                rp.name: got[1]
                for rp in asked
                if (got := self.latest.get(rp.name)) and now - got[0] <= REPORT_MAX_AGE_S
            }

    def _refresh(self, rp: ReplicaPod) -> None:
        report = self.report(rp)
        with self.lock:
            if report is None:
                self.latest.pop(rp.name, None)  # not answering: no stale report stands in
            else:
                self.latest[rp.name] = (time.monotonic(), report)

    def push_adapters(self, rp: ReplicaPod, adapters: Sequence[Mapping[str, str]]) -> None:
        """Start pushing the adapter list to ``rp`` in the background (the replica fetches
        and loads new adapters before it answers, which can take a while); a push already
        under way for the same pod is not repeated. Reconciliation never waits for it: the
        replica's next report says whether it took."""
        with self.lock:
            if rp.name in self.pushing:
                return
            self.pushing.add(rp.name)
        self.pushers.submit(self._push, rp, list(adapters))

    def _push(self, rp: ReplicaPod, adapters: list[Mapping[str, str]]) -> None:
        body = json.dumps({"adapters": adapters}).encode()
        try:
            response = self.http.request(
                "PUT",
                self._url(rp, "/cheapspot/adapters"),
                body=body,
                headers={"Content-Type": "application/json"},
                timeout=PUSH_TIMEOUT,
            )
            ok = response.status < 300
            metrics.ADAPTER_SYNCS.labels(result="ok" if ok else "error").inc()
            if not ok:
                log.warning(
                    "PUT adapters on %s: HTTP %d: %s",
                    rp.name,
                    response.status,
                    response.data[:300].decode(errors="replace"),
                )
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            metrics.ADAPTER_SYNCS.labels(result="error").inc()
            log.warning("cannot push adapters to %s: %s", rp.name, exc)
        finally:
            with self.lock:
                self.pushing.discard(rp.name)


class PoolReconciler:
    """Observe, plan, act for one pool at a time. Synchronous: runs in a worker thread."""

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
        self.api = api
        self.config = config
        self.nodes = nodes or SharedNodeList(api, ttl=0)
        self.profile = config.placement_profile()
        self.prices = config.price_table()
        self.quotes = quotes
        self.clock = clock
        self.admin = admin or AdminClient()
        self.counts: dict[tuple[str, str], tuple[int, int]] = {}

    def finished(self, namespace: str, name: str) -> bool:
        """Never: a pool serves until it is deleted, and deletion stops its loop."""
        return False

    def reconcile(self, namespace: str, name: str) -> list[PoolAction]:
        started = time.monotonic()
        try:
            return self._reconcile(namespace, name)
        except Exception:
            metrics.RECONCILE_ERRORS.inc()
            raise
        finally:
            metrics.RECONCILE_SECONDS.observe(time.monotonic() - started)

    def _reconcile(self, namespace: str, name: str) -> list[PoolAction]:
        pool = self.api.get(_pool_path(namespace, name))
        if pool is None or pool["metadata"].get("deletionTimestamp"):
            self.counts.pop((namespace, name), None)
            return []
        meta = pool["metadata"]
        status = ps.parse_status(pool.get("status"))
        try:
            spec = ps.parse_spec(pool.get("spec") or {})
        except ValidationError as exc:
            return self._invalid(pool, status, exc)
        raw_pods = [
            p
            for p in self.api.list(_pods_path(namespace), f"{LABEL_POOL}={name}")
            if _owned_by(p, meta["uid"])
        ]
        replicas = tuple(v for p in raw_pods if (v := replica_pod_view(p)) is not None)
        # What is free on the nodes matters only to a replica that fell back to on-demand.
        usage: dict[str, dict[str, float]] = {}
        if any(
            not slot.anchor and slot.capacity_type is CapacityType.ON_DEMAND
            for slot in status.slots
        ):
            usage = self.nodes.usage()
        nodes = self.nodes.views(usage)
        deployment = self.api.get(
            f"/apis/apps/v1/namespaces/{namespace}/deployments/{router_name(name)}"
        )
        observed = PoolObserved(
            pool=PoolView(namespace, name, meta["uid"], int(meta.get("generation", 1)), status),
            replicas=replicas,
            nodes=nodes,
            profile=self.profile,
            prices=self.prices,
            reports=self.admin.reports(replicas),
            router=router_view(deployment),
            quotes=self.quotes(),
            status_refresh_seconds=self.config.status_refresh_seconds,
        )
        actions = plan(spec, observed, self.clock())
        self._apply(pool, spec, observed, actions)
        return actions

    def _invalid(
        self, pool: dict[str, Any], status: ps.InferencePoolStatus, exc: ValidationError
    ) -> list[PoolAction]:
        message = "; ".join(
            f"spec.{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()
        )
        gen = int(pool["metadata"].get("generation", 1))
        old = next((c for c in status.conditions if c.type == "Degraded"), None)
        if old is not None and old.reason == "InvalidSpec" and old.observed_generation == gen:
            return []
        now = self.clock()
        conditions = status.conditions
        for type_, value in (("Degraded", "True"), ("Ready", "False")):
            conditions = set_condition(
                conditions,
                common.Condition(
                    type=type_,
                    status=value,
                    reason="InvalidSpec",
                    message=message,
                    last_transition_time=now,
                    observed_generation=gen,
                ),
            )
        actions: list[PoolAction] = [
            UpdatePoolStatus(
                status.model_copy(update={"conditions": conditions, "observed_generation": gen})
            ),
            EmitEvent("Warning", "InvalidSpec", message),
        ]
        self._apply(pool, None, None, actions)
        return actions

    def _apply(
        self,
        pool: dict[str, Any],
        spec: ps.InferencePoolSpec | None,
        observed: PoolObserved | None,
        actions: list[PoolAction],
    ) -> None:
        meta = pool["metadata"]
        namespace, name = meta["namespace"], meta["name"]
        by_name = {rp.name: rp for rp in observed.replicas} if observed else {}
        for action in actions:
            if isinstance(action, UpdatePoolStatus):
                body = {
                    "metadata": {"resourceVersion": meta["resourceVersion"]},
                    "status": action.status.to_patch(),
                }
                try:
                    self.api.merge_patch(_pool_path(namespace, name) + "/status", body)
                except ApiError as exc:
                    if exc.status == 409:
                        log.info("%s/%s changed meanwhile; replanning", namespace, name)
                        return
                    raise
                self._gauge(namespace, name, action.status)
            elif isinstance(action, CreateReplica):
                assert spec is not None
                self._create_replica(pool, spec, action)
            elif isinstance(action, MarkDraining):
                stamp = action.deadline.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
                try:
                    self.api.merge_patch(
                        _pods_path(namespace, action.pod),
                        {"metadata": {"annotations": {ANNOTATION_DRAINING: stamp}}},
                    )
                except ApiError as exc:
                    if exc.status != 404:
                        raise
                metrics.REPLICA_DRAINS.inc()
                log.info("draining %s until %s", action.pod, stamp)
            elif isinstance(action, DeletePod):
                self.api.delete(_pods_path(namespace, action.name), action.grace_seconds)
            elif isinstance(action, SyncAdapters):
                rp = by_name.get(action.pod)
                if rp is None:
                    continue
                adapters = [a.model_dump(mode="json", by_alias=True) for a in action.adapters]
                self.admin.push_adapters(rp, adapters)
            elif isinstance(action, EnsureRouter):
                assert spec is not None
                self._ensure_router(pool, spec, action.replicas)
            elif isinstance(action, EmitEvent):
                self._count_event(action)
                post_event(self.api, ps.KIND, pool, action, self.clock())

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
        self, pool: dict[str, Any], spec: ps.InferencePoolSpec, action: CreateReplica
    ) -> None:
        info = self._info(pool, spec)
        pod = build_replica_pod(
            info,
            action.index,
            action.attempt,
            self._placement(action.capacity, action.avoid_nodes),
            self.config.worker,
            serving=self.config.serving,
        )
        if self.api.create(_pods_path(info.namespace), pod):
            metrics.PODS_CREATED.labels(role="serve").inc()
            log.info("created replica %s (%s)", pod["metadata"]["name"], action.capacity.value)

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
        deployments = f"/apis/apps/v1/namespaces/{ns}/deployments"
        body = build_router_deployment(
            info,
            replicas,
            self._placement(CapacityType.ON_DEMAND),
            self.config.worker,
            self.config.serving,
        )
        if not self.api.create(deployments, body):
            self.api.merge_patch(
                f"{deployments}/{router_name(info.name)}", {"spec": {"replicas": replicas}}
            )

    def _count_event(self, event: EmitEvent) -> None:
        if event.reason == "Preempted":
            metrics.PREEMPTIONS.labels(signal=event.cause or "Unknown").inc()
        elif event.reason == "FellBackToOnDemand":
            metrics.FALLBACKS.labels(reason=event.cause or "Unknown").inc()
        elif event.reason == "ReturnedToSpot":
            metrics.RETURNS_TO_SPOT.inc()

    def _gauge(self, namespace: str, name: str, status: ps.InferencePoolStatus) -> None:
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


def register_pool_handlers(
    registry: kopf.OperatorRegistry, reconciler: PoolReconciler, config: OperatorConfig
) -> None:
    """The pools' kopf handlers: one loop per pool, poked by its pods and by node changes."""
    loops = loops_for(reconciler, config, "reconcile-pool")

    @kopf.on.cleanup(registry=registry)
    async def pool_shutdown(**_: Any) -> None:
        await loops.stop_all()
        loops.shutdown()

    @kopf.on.event(common.GROUP, common.VERSION, ps.PLURAL, registry=registry)
    async def pool_event(
        event: Mapping[str, Any], namespace: str | None, name: str | None, **_: Any
    ) -> None:
        if not namespace or not name:
            return
        if event.get("type") == "DELETED":
            loops.stop((namespace, name))
        else:
            loops.ensure((namespace, name))

    @kopf.on.event("", "v1", "pods", labels={LABEL_POOL: kopf.PRESENT}, registry=registry)
    async def pool_pod_event(
        event: Mapping[str, Any], labels: Mapping[str, str], namespace: str | None, **_: Any
    ) -> None:
        if namespace:
            key = (namespace, labels[LABEL_POOL])
            loops.place(event.get("type"), event.get("object") or {}, key)
            loops.poke(key)

    @kopf.on.event("", "v1", "nodes", registry=registry)
    async def pool_node_event(event: Mapping[str, Any], name: str | None, **_: Any) -> None:
        # The node list itself is fed by the jobs' node handler, registered first.
        if name:
            loops.node_changed(event.get("type"), name, event.get("object") or {})

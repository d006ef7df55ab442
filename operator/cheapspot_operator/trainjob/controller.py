"""The act layer: kopf wiring and the reconciler that applies the planner's actions.

One reconciliation of a job (:meth:`Reconciler.reconcile`) reads everything afresh (the job,
its pods, the nodes, the workers' progress records), asks :func:`planning.train.plan` what to do and
applies the actions in order: the status first (with the job's resourceVersion as a
precondition, so two writers cannot both act on the same state), then pods and events. Pods
have deterministic names (``<job>-shard-<i>-<attempt>``) and are created if absent, a 409 being
success. Nothing lives only in memory: an operator killed at any point and restarted rebuilds
the same picture and creates no duplicates.

kopf choices, on purpose:

* **A per-job loop without a finalizer.** kopf's timers and daemons put a finalizer on every
  object so they can be stopped before deletion; our reconciliation needs no clean-up (pods
  go through ownerReferences, output stays in object storage), and a finalizer would make
  ``kubectl delete ctj`` hang whenever the operator is down. So a ``kopf.on.event`` handler
  on the CheapTrainJob starts one asyncio task per job that reconciles every
  ``reconcileIntervalSeconds`` (level-based, like a timer) and at once when poked; pod and
  node events poke the affected jobs, which is how a reclaim notice becomes a replacement pod
  within a second. The task ends when the job is deleted.
* **Watch timeouts**: ``settings.watching.server_timeout`` 300 s (the API server ends the
  watch, kopf re-lists: a silently dead connection cannot stall the operator for long),
  ``client_timeout`` a bit above it, ``connect_timeout`` 10 s, and
  ``settings.networking.request_timeout`` 30 s for kopf's own API calls.
* **Handler progress in status**: ``StatusProgressStorage`` under ``status.kopf`` (the CRD
  preserves that field) and the last-handled configuration in a ``cheapspot.dev`` annotation.
  The event handlers here keep no progress; the setting makes the place explicit for any
  change handler added later.
* **Peering**: standalone unless ``peeringPriority`` is configured. The chart runs one replica
  (Deployment strategy Recreate); several replicas need distinct peering priorities.
* **Events**: kopf's own per-handler events are posted at WARNING and above only; the Events a
  user should notice (Preempted, FellBackToOnDemand, ReturnedToSpot, Completed, failures)
  come from the planner and are posted by :meth:`Reconciler.post_event`.
* **Errors**: an invalid spec (which the CRD's schema normally stops) fails the job with
  reason ``InvalidSpec`` once: retrying cannot fix it. Any other error is logged, counted and
  retried at the next tick: the loop never dies.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

import kopf
from pydantic import ValidationError

from cheapspot.contract import Layout, Progress, Role
from cheapspot_operator.api import common
from cheapspot_operator.api import trainjob as s
from cheapspot_operator.api.phases import JobPhase
from cheapspot_operator.cluster.placement import PlacementProfile
from cheapspot_operator.cluster.pods import Placement
from cheapspot_operator.cluster.views import LABEL_ROLE, NodeView, node_view
from cheapspot_operator.planning.actions import DeletePod, EmitEvent
from cheapspot_operator.pricing.quotes import PriceKey, Quote
from cheapspot_operator.pricing.table import PriceTable
from cheapspot_operator.runtime import events, metrics
from cheapspot_operator.runtime.config import OperatorConfig
from cheapspot_operator.runtime.kubeapi import ApiError, KubeApi
from cheapspot_operator.runtime.nodelist import SharedNodeList
from cheapspot_operator.runtime.watchcache import Primed, WatchCache
from cheapspot_operator.trainjob.actions import Action, CreatePod, UpdateStatus
from cheapspot_operator.trainjob.manifests import (
    JobInfo,
    build_anchor_pod,
    build_generator_pod,
    build_shard_pod,
)
from cheapspot_operator.trainjob.observed import (
    ANCHOR_INDEX,
    GENERATOR_BASE,
    LABEL_JOB,
    JobView,
    Observed,
    is_generator,
    pod_view,
)
from cheapspot_operator.trainjob.plan import plan
from cheapspot_operator.trainjob.shards import generates, generating

log = logging.getLogger("cheapspot.operator")

TERMINAL_PHASES = frozenset(p.value for p in JobPhase if p.is_terminal())

ProgressReader = Callable[[str, int, int], Mapping[int, Progress]]
"""(output uri, shard count, generation shard count) -> progress records by slot index (the
anchor's at ``ANCHOR_INDEX``, generation shard i's at ``GENERATOR_BASE + i``)."""


def _job_path(namespace: str, name: str = "") -> str:
    base = f"/apis/{common.GROUP}/{common.VERSION}/namespaces/{namespace}/{s.PLURAL}"
    return f"{base}/{name}" if name else base


def _pods_path(namespace: str, name: str = "") -> str:
    base = f"/api/v1/namespaces/{namespace}/pods"
    return f"{base}/{name}" if name else base


class StoreProgressReader:
    """Progress records read through :mod:`cheapspot.store`, with few retries: a slow store
    must not hold up reacting to a reclaim (the next tick tries again). One store client per
    output prefix, kept: building a boto3 client costs more than the reads themselves."""

    MAX_STORES = 4096

    def __init__(self, timeout_attempts: int = 2) -> None:
        self.attempts = timeout_attempts
        self.stores: dict[str, Any] = {}
        self.lock = threading.Lock()

    def store(self, output_uri: str) -> Any:
        from cheapspot.store import RetryPolicy, Store

        with self.lock:
            store = self.stores.get(output_uri)
            if store is None:
                if len(self.stores) >= self.MAX_STORES:
                    self.stores.pop(next(iter(self.stores)))
                store = Store(output_uri, retry=RetryPolicy(attempts=self.attempts, base_delay=0.2))
                self.stores[output_uri] = store
            return store

    def forget(self, output_uri: str) -> None:
        with self.lock:
            self.stores.pop(output_uri, None)

    def __call__(self, output_uri: str, shards: int, generators: int = 0) -> Mapping[int, Progress]:
        store = self.store(output_uri)
        layout = Layout(output_uri)
        out: dict[int, Progress] = {}
        slots = [(ANCHOR_INDEX, Role.ANCHOR, 0)] + [(i, Role.TRAIN, i) for i in range(shards)]
        slots += [(GENERATOR_BASE + i, Role.GENERATE, i) for i in range(generators)]
        for index, role, shard in slots:
            raw = store.get_bytes_or_none(layout.progress(role, shard))
            if raw:
                try:
                    out[index] = Progress.from_json(raw)
                except (ValueError, ValidationError):
                    log.warning("unreadable progress record %s", layout.progress(role, shard))
        return out


OutputClaims = Callable[[str, str, str, str, bool], str]
"""(output uri, namespace, name, uid, resume) -> "" when the job owns the prefix, else why not."""


def store_output_claims(reader: StoreProgressReader) -> OutputClaims:
    """Claims an output prefix for a job by writing ``OWNER.json`` if absent (a conditional
    write where the store has one), so two jobs (or a job deleted and re-applied: a new UID)
    never mix their checkpoints and an old ``final/`` never passes for a new result."""

    def claim(output_uri: str, namespace: str, name: str, uid: str, resume: bool) -> str:
        import json

        store = reader.store(output_uri)
        layout = Layout(output_uri)
        record = json.dumps({"namespace": namespace, "name": name, "uid": uid}).encode()
        raw = store.get_bytes_or_none(layout.owner)
        if raw is None:
            if not resume and store.has_manifest(layout.final):
                return (
                    f"output prefix {output_uri} already holds a finished adapter "
                    "(final/); set spec.output.ifExists: Resume to take it as this job's "
                    "result, or use another prefix"
                )
            if store.put_bytes(layout.owner, record, if_absent=True):
                return ""
            raw = store.get_bytes_or_none(layout.owner) or b"{}"
        try:
            owner = json.loads(raw)
        except ValueError:
            owner = {}
        if owner.get("uid") == uid:
            return ""
        if resume:
            store.put_bytes(layout.owner, record)
            return ""
        who = f"{owner.get('namespace', '?')}/{owner.get('name', '?')} (uid {owner.get('uid')})"
        return (
            f"output prefix {output_uri} belongs to job {who}; set spec.output.ifExists: "
            "Resume to continue from what it holds, or use another prefix"
        )

    return claim


def store_progress_reader(timeout_attempts: int = 2) -> ProgressReader:
    return StoreProgressReader(timeout_attempts)


@dataclass
class _ProgressCache:
    """Progress records per job, read in the background: at most every ``ttl`` seconds, and
    a reconciliation waits for the first read of a job at most ``first_wait`` seconds. So a
    slow or dead object store never delays the reaction to a reclaim (progress only drives
    round-boundary moves and the status)."""

    reader: ProgressReader
    ttl: float
    first_wait: float = 1.0
    entries: dict[str, tuple[float, Mapping[int, Progress]]] = field(default_factory=dict)
    refreshing: dict[str, Future[None]] = field(default_factory=dict)
    pool: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(max_workers=2, thread_name_prefix="progress")
    )
    lock: threading.Lock = field(default_factory=threading.Lock)

    def get(
        self, uid: str, output_uri: str, shards: int, generators: int = 0
    ) -> Mapping[int, Progress] | None:
        """The job's records, or None while none has been read yet."""
        with self.lock:
            cached = self.entries.get(uid)
            stale = cached is None or time.monotonic() - cached[0] >= self.ttl
            running = self.refreshing.get(uid)
            if stale and running is None:
                running = self.pool.submit(self._refresh, uid, output_uri, shards, generators)
                self.refreshing[uid] = running
        if cached is None and running is not None:
            with contextlib.suppress(TimeoutError):
                running.result(timeout=self.first_wait)
            with self.lock:
                cached = self.entries.get(uid)
        return cached[1] if cached else None

    def forget(self, uid: str) -> None:
        with self.lock:
            self.entries.pop(uid, None)

    def _refresh(self, uid: str, output_uri: str, shards: int, generators: int) -> None:
        try:
            records = self.reader(output_uri, shards, generators)
        except Exception as exc:  # the store being down must not stop pod handling
            log.warning("cannot read progress from %s: %s", output_uri, exc)
            records = None
        with self.lock:
            self.refreshing.pop(uid, None)
            if records is not None:
                self.entries[uid] = (time.monotonic(), records)


class Reconciler:
    """Observe, plan, act for one job at a time. Synchronous: runs in a worker thread."""

    def __init__(
        self,
        api: KubeApi,
        config: OperatorConfig,
        progress_reader: ProgressReader | None = None,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        progress_ttl_seconds: float = 1.0,
        *,
        output_claims: OutputClaims | None = None,
        quotes: Callable[[], Mapping[PriceKey, Quote]] = dict,
        nodes: SharedNodeList | None = None,
    ) -> None:
        self.api = api
        self.config = config
        self.nodes = nodes or SharedNodeList(api, ttl=0)
        """Every node; shared with the pools' reconciler and invalidated by the node watch."""
        self.quotes = quotes
        """The price book's snapshot (:mod:`cheapspot_operator.runtime.pricebook`); none: the table."""
        self.profile: PlacementProfile = config.placement_profile()
        self.prices: PriceTable = config.price_table()
        stores = StoreProgressReader()
        self.progress = _ProgressCache(progress_reader or stores, progress_ttl_seconds)
        self.claims = output_claims or store_output_claims(stores)
        self.claimed: set[str] = set()
        """UIDs of jobs whose output prefix is theirs (checked once per operator process)."""
        self.clock = clock
        self.phases: dict[tuple[str, str], str] = {}
        self.refused: dict[tuple[str, int], tuple[int, str]] = {}
        """(job uid, slot) -> (attempt, the API server's message) of the last refused create."""
        self._finished: set[tuple[str, str]] = set()
        self.jobs: WatchCache | None = None
        """Jobs as the job watch reported them (:meth:`watch`); None: GET each time."""
        self.pods = WatchCache(group_label=LABEL_JOB)
        """The jobs' pods as the pod watch reported them, grouped by job (when watched)."""
        self.pods_primed = Primed(POD_RESYNC_SECONDS)

    def watch(self) -> None:
        """kopf's watches feed the jobs, their pods and the nodes from now on
        (:meth:`observe_job`, :meth:`observe_pod`, :meth:`SharedNodeList.observe`): a
        reconcile then reads them without a request, and the API server hears from this
        operator only when something is to be done."""
        self.jobs = WatchCache()
        self.nodes.watch()

    def observe_job(self, event_type: str | None, job: Mapping[str, Any]) -> None:
        if self.jobs is not None:
            self.jobs.observe(event_type, job)

    def observe_pod(self, event_type: str | None, pod: Mapping[str, Any]) -> None:
        if self.jobs is not None:
            self.pods.observe(event_type, pod)

    def _get_job(self, namespace: str, name: str) -> dict[str, Any] | None:
        if self.jobs is not None:
            cached = self.jobs.get(namespace, name)
            if cached is not None:
                return dict(cached)
        job = self.api.get(_job_path(namespace, name))
        if self.jobs is not None and job is not None:
            self.jobs.wrote(job)
        return job

    def _job_pods(self, namespace: str, name: str) -> list[Mapping[str, Any]]:
        """The job's pods (label-selected): from the pod watch when watched."""
        if self.jobs is None:
            return list(self.api.list(_pods_path(namespace), f"{LABEL_JOB}={name}"))

        def prime() -> None:
            items, at = self.api.list_versioned(_pods_path(namespace), LABEL_JOB)
            self.pods.merge_list(namespace, items, at)

        self.pods_primed.prime(namespace, prime)
        return self.pods.group(namespace, name)

    def reconcile(self, namespace: str, name: str) -> list[Action]:
        started = time.monotonic()
        try:
            return self._reconcile(namespace, name)
        except Exception:
            metrics.RECONCILE_ERRORS.inc()
            raise
        finally:
            metrics.RECONCILE_SECONDS.observe(time.monotonic() - started)

    def finished(self, namespace: str, name: str) -> bool:
        """The job is gone, or Succeeded / Failed with nothing left to do for it: its loop
        can stop (a terminal job is left alone; a new event about it reconciles it once)."""
        return (namespace, name) in self._finished

    def _reconcile(self, namespace: str, name: str) -> list[Action]:
        key = (namespace, name)
        self._finished.discard(key)
        job = self._get_job(namespace, name)
        if job is None or job["metadata"].get("deletionTimestamp"):
            self.phases.pop(key, None)
            self._finished.add(key)
            return []
        meta = job["metadata"]
        status = s.parse_status(job.get("status"))
        if status.phase.is_terminal():
            actions = self._reconcile_terminal(job, status)
            if not actions:
                self.progress.forget(meta["uid"])
                self._finished.add(key)
            return actions
        try:
            spec = s.parse_spec(job.get("spec") or {})
        except ValidationError as exc:
            return self._invalid(job, status, _validation_message(exc))
        unusable = self._unusable_uris(spec)
        if unusable:
            return self._invalid(job, status, unusable, reason="UnsupportedURI")
        if meta["uid"] not in self.claimed:
            resume = spec.output.if_exists is s.IfOutputExists.RESUME
            refused = self.claims(spec.output.uri, namespace, name, meta["uid"], resume)
            if refused:
                return self._invalid(job, status, refused, reason="OutputInUse")
            self.claimed.add(meta["uid"])
        pods = [
            v
            for p in self._job_pods(namespace, name)
            if _owned_by(p, meta["uid"]) and (v := pod_view(p)) is not None
        ]
        # What other pods request on each node only matters when a shard may return to spot.
        usage = self.nodes.usage() if any(x.fallback_reason for x in status.shards) else {}
        nodes = self.nodes.views(usage)
        # Generation shards' records only while they work (sequences-mode distillation).
        gens = (
            spec.shards if generates(spec) and (generating(status) or not status.generators) else 0
        )
        progress = self.progress.get(meta["uid"], spec.output.uri, spec.shards, gens)
        observed = Observed(
            job=JobView(namespace, name, meta["uid"], int(meta.get("generation", 1)), status),
            pods=tuple(pods),
            nodes=nodes,
            progress=progress or {},
            progress_known=progress is not None,
            profile=self.profile,
            prices=self.prices,
            quotes=self.quotes(),
            create_refused=self._refused_for(meta["uid"], status),
            status_refresh_seconds=self.config.status_refresh_seconds,
        )
        actions = plan(spec, observed, self.clock())
        self._apply(job, spec, observed, actions)
        return actions

    def _reconcile_terminal(self, job: dict[str, Any], status: s.TrainJobStatus) -> list[Action]:
        """A finished job: only stray pods (an earlier operator's) are removed; no node LIST,
        no progress read, no status write."""
        meta = job["metadata"]
        namespace, name = meta["namespace"], meta["name"]
        actions: list[Action] = [
            DeletePod(p.name, reason="JobFinished")
            for raw in self._job_pods(namespace, name)
            if _owned_by(raw, meta["uid"])
            and (p := pod_view(raw)) is not None
            and not p.terminated
            and not p.deleting
        ]
        self._apply(job, None, None, actions)
        return actions

    def _refused_for(self, uid: str, status: s.TrainJobStatus) -> dict[int, str]:
        out: dict[int, str] = {}
        for slot in [
            *([status.anchor] if status.anchor else []),
            *status.shards,
            *status.generators,
        ]:
            refused = self.refused.get((uid, slot.index))
            if refused is not None and refused[0] == slot.attempt:
                out[slot.index] = refused[1]
        return out

    def _unusable_uris(self, spec: s.TrainJobSpec) -> str:
        """Why the job's URIs cannot work in this cluster, or ""."""
        if self.config.file_uris:
            return ""
        uris = {
            "spec.model.uri": spec.model.uri,
            "spec.dataset.uri": spec.dataset.uri,
            "spec.output.uri": spec.output.uri,
        }
        if spec.distillation is not None:
            teacher = spec.distillation.teacher
            uris["spec.distillation.teacher.uri"] = teacher.uri
            uris["spec.distillation.teacher.adapterUri"] = teacher.adapter_uri or ""
        local = [f"{k} {v}" for k, v in uris.items() if v.startswith("file://")]
        if not local:
            return ""
        return (
            f"{', '.join(local)}: file:// needs one filesystem shared by every pod, which this "
            "cluster does not have (operator setting fileUris: false); use s3://bucket/prefix/"
        )

    def _invalid(
        self,
        job: dict[str, Any],
        status: s.TrainJobStatus,
        message: str,
        reason: str = "InvalidSpec",
    ) -> list[Action]:
        if status.phase is JobPhase.FAILED:
            return []
        failed = status.model_copy(
            update={
                "phase": JobPhase.FAILED,
                "reason": reason,
                "message": message,
                "observed_generation": int(job["metadata"].get("generation", 1)),
                "conditions": [
                    common.Condition(
                        type="Succeeded",
                        status="False",
                        reason=reason,
                        message=message,
                        last_transition_time=self.clock(),
                        observed_generation=int(job["metadata"].get("generation", 1)),
                    )
                ],
            }
        )
        actions: list[Action] = [
            UpdateStatus(failed),
            EmitEvent("Warning", reason, message),
        ]
        self._apply(job, None, None, actions)
        return actions

    def _apply(
        self,
        job: dict[str, Any],
        spec: s.TrainJobSpec | None,
        observed: Observed | None,
        actions: list[Action],
    ) -> None:
        meta = job["metadata"]
        namespace, name = meta["namespace"], meta["name"]
        previous = s.parse_status(job.get("status"))
        # The status first (the planner puts it first: a pod is only created once its
        # attempt is recorded), then pod creates, deletes, and the events last: a
        # replacement never waits for the events about it.
        for action in sorted(actions, key=_apply_order):
            if isinstance(action, UpdateStatus):
                body = {
                    "metadata": {"resourceVersion": meta["resourceVersion"]},
                    "status": action.status.to_patch(),
                }
                try:
                    written = self.api.merge_patch(_job_path(namespace, name) + "/status", body)
                except ApiError as exc:
                    if exc.status == 409:
                        log.info("%s/%s changed meanwhile; replanning", namespace, name)
                        return
                    raise
                if self.jobs is not None:
                    self.jobs.wrote(written)
                self._count_status(namespace, name, previous, action.status)
            elif isinstance(action, CreatePod):
                assert spec is not None
                self._create_pod(job, spec, action)
            elif isinstance(action, DeletePod):
                self.api.delete(_pods_path(namespace, action.name), action.grace_seconds)
            elif isinstance(action, EmitEvent):
                self._count_event(action)
                self.post_event(job, action)

    def _create_pod(self, job: dict[str, Any], spec: s.TrainJobSpec, action: CreatePod) -> None:
        meta = job["metadata"]
        info = JobInfo(meta["namespace"], meta["name"], meta["uid"], spec)
        placement = Placement(
            profile=self.profile,
            capacity=action.capacity,
            avoid_nodes=action.avoid_nodes,
            not_ready_toleration_seconds=self.config.not_ready_toleration_seconds,
        )
        worker = self.config.worker
        if action.index == ANCHOR_INDEX:
            pod = build_anchor_pod(info, action.attempt, placement, worker)
        elif is_generator(action.index):
            pod = build_generator_pod(
                info,
                action.index - GENERATOR_BASE,
                action.attempt,
                placement,
                worker,
                serving=self.config.serving,
            )
        else:
            pod = build_shard_pod(info, action.index, action.attempt, placement, worker)
        try:
            created = self.api.create(_pods_path(meta["namespace"]), pod)
        except ApiError as exc:
            if not 400 <= exc.status < 500 or exc.status == 429:
                raise
            # Refused (quota, admission, a missing service account): the planner reports it
            # and gives up after failurePolicy.startTimeoutSeconds; retried every tick.
            self.refused[(meta["uid"], action.index)] = (action.attempt, exc.message)
            log.warning("pod %s refused: %s", pod["metadata"]["name"], exc.message)
            return
        self.refused.pop((meta["uid"], action.index), None)
        if created and self.jobs is not None:
            self.pods.wrote(created)
        if created:
            role = pod["metadata"]["labels"][LABEL_ROLE]
            metrics.PODS_CREATED.labels(role=role).inc()
            log.info("created pod %s (%s)", pod["metadata"]["name"], action.capacity.value)

    def post_event(self, job: dict[str, Any], event: EmitEvent) -> None:
        post_event(self.api, s.KIND, job, event, self.clock())

    def _count_event(self, event: EmitEvent) -> None:
        if event.reason == "Preempted":
            metrics.PREEMPTIONS.labels(signal=event.cause or "Unknown").inc()
        elif event.reason == "FellBackToOnDemand":
            metrics.FALLBACKS.labels(reason=event.cause or "Unknown").inc()
        elif event.reason == "ReturnedToSpot":
            metrics.RETURNS_TO_SPOT.inc()
        elif event.reason in ("ShardFailed", "BackoffLimitExceeded"):
            metrics.RESTARTS.inc()

    def _count_status(
        self, namespace: str, name: str, old: s.TrainJobStatus, new: s.TrainJobStatus
    ) -> None:
        metrics.COST.labels(basis="actual").inc(max(0.0, new.cost.dollars - old.cost.dollars))
        metrics.COST.labels(basis="on-demand").inc(
            max(0.0, new.cost.on_demand_dollars - old.cost.on_demand_dollars)
        )
        metrics.set_cost(
            metrics.JOB_COST, metrics.BUDGET_REMAINING, (namespace, name), new.cost, new.budget
        )
        metrics.COST_ESTIMATED.labels(namespace, name).set(1 if new.cost.estimated else 0)
        if new.phase != old.phase and new.phase.is_terminal():
            metrics.JOBS_FINISHED.labels(phase=new.phase.value).inc()
        self.phases[(namespace, name)] = new.phase.value
        for phase in JobPhase:
            metrics.JOBS.labels(phase=phase.value).set(
                sum(1 for p in self.phases.values() if p == phase.value)
            )


def _apply_order(action: Action) -> int:
    order = (UpdateStatus, CreatePod, DeletePod)
    return next((i for i, kind in enumerate(order) if isinstance(action, kind)), len(order))


def post_event(
    api: KubeApi, kind: str, obj: Mapping[str, Any], event: EmitEvent, now: datetime
) -> None:
    """Post ``event`` about ``obj`` (a CheapTrainJob or CheapInferencePool)."""
    involved = events.reference(f"{common.GROUP}/{common.VERSION}", kind, obj)
    events.post(
        api, involved, type_=event.type, reason=event.reason, message=event.message, now=now
    )


def _connection_info(config: Any, settings: kopf.OperatorSettings) -> kopf.ConnectionInfo:
    header = config.get_api_key_with_prefix("BearerToken") or config.get_api_key_with_prefix(
        "authorization"
    )
    parts = header.split(" ", 1) if header else []
    scheme, token = (None, None) if not parts else (None, parts[0]) if len(parts) == 1 else parts
    return kopf.ConnectionInfo(
        server=config.host,
        ca_path=config.ssl_ca_cert,
        insecure=not config.verify_ssl,
        username=config.username or None,
        password=config.password or None,
        scheme=scheme,
        token=token,
        certificate_path=config.cert_file,
        private_key_path=config.key_file,
        trust_env=settings.networking.trust_env,
    )


def _validation_message(exc: ValidationError) -> str:
    return "; ".join(f"spec.{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())


POD_RESYNC_SECONDS = 300.0
"""How often the watched pods of a namespace are LISTed again (see :mod:`watchcache`)."""


def _owned_by(pod: Mapping[str, Any], uid: str) -> bool:
    refs = (pod.get("metadata") or {}).get("ownerReferences") or []
    return any(r.get("uid") == uid for r in refs)


# --- kopf wiring ------------------------------------------------------------------------------


class Reconciles(Protocol):
    def reconcile(self, namespace: str, name: str) -> Any: ...

    def finished(self, namespace: str, name: str) -> bool:
        """Nothing is left to do for the object: its loop may end."""
        ...


NodeState = tuple[bool, bool, frozenset[str]]
"""What of a node decides whether its change wakes anyone: ready, unschedulable, taint keys."""

Key = tuple[str, str]


def _node_state(node: Mapping[str, Any]) -> NodeState:
    view: NodeView = node_view(node)
    return (view.ready, view.unschedulable, view.taint_keys)


@dataclass
class _Loops:
    """One reconcile task per object, the event that wakes it early, and which objects have
    pods on which node (so a node's change wakes only those it concerns).

    A loop woken by an event (its pod, its node, an edit) runs on ``urgent``; a loop whose
    interval merely ran out runs on ``executor``. The timer ticks of many idle objects then
    never queue ahead of the reaction to a reclaim notice."""

    reconciler: Reconciles
    interval: float
    executor: ThreadPoolExecutor
    urgent: ThreadPoolExecutor
    tasks: dict[Key, asyncio.Task[None]] = field(default_factory=dict)
    pokes: dict[Key, asyncio.Event] = field(default_factory=dict)
    nodes: dict[str, NodeState] = field(default_factory=dict)
    settled: dict[Key, str] = field(default_factory=dict)
    """Finished jobs by the resourceVersion last seen: the same version needs no new look."""
    placed: dict[Key, str] = field(default_factory=dict)
    """Each watched pod's node."""
    on_node: dict[str, dict[Key, Key]] = field(default_factory=dict)
    """node -> {pod: the object (job or pool) it belongs to}."""

    def ensure(self, key: Key) -> None:
        task = self.tasks.get(key)
        if task is None or task.done():
            self.pokes[key] = asyncio.Event()
            self.tasks[key] = asyncio.create_task(self._loop(key), name=f"reconcile {key}")
        self.poke(key)

    def poke(self, key: Key) -> None:
        event = self.pokes.get(key)
        if event is not None:
            event.set()

    def place(self, event_type: str | None, pod: Mapping[str, Any], owner: Key) -> None:
        """A pod watch event: remember the node the pod is bound to (none once deleted)."""
        meta = pod.get("metadata") or {}
        key = (str(meta.get("namespace") or ""), str(meta.get("name") or ""))
        node = str((pod.get("spec") or {}).get("nodeName") or "")
        if event_type == "DELETED":
            node = ""
        before = self.placed.get(key)
        if before == node:
            return
        if before is not None:
            self.placed.pop(key, None)
            held = self.on_node.get(before)
            if held is not None:
                held.pop(key, None)
                if not held:
                    del self.on_node[before]
        if node:
            self.placed[key] = node
            self.on_node.setdefault(node, {})[key] = owner

    def node_changed(self, event_type: str | None, name: str, node: Mapping[str, Any]) -> None:
        """A node watch event. Heartbeats wake nobody; a change that matters (a notice,
        NotReady, cordoned, deleted) wakes the objects with pods on the node, and only them.
        Room that appears (a new node, one ready again) wakes nobody: the scheduler places
        pending pods, and every loop's next timer tick sees the node. Waking every loop on
        every such change made a thousand flapping nodes a storm of reconciles."""
        if event_type == "DELETED":
            self.nodes.pop(name, None)
            self._poke_owners(name)
            return
        state = _node_state(node)
        if self.nodes.get(name) == state:
            return
        self.nodes[name] = state
        self._poke_owners(name)

    def _poke_owners(self, node: str) -> None:
        for owner in set((self.on_node.get(node) or {}).values()):
            self.poke(owner)

    def stop(self, key: Key) -> None:
        self.settled.pop(key, None)
        task = self.tasks.pop(key, None)
        self.pokes.pop(key, None)
        if task is not None:
            task.cancel()

    async def stop_all(self) -> None:
        for key in list(self.tasks):
            self.stop(key)
        await asyncio.sleep(0)

    def shutdown(self) -> None:
        for executor in (self.executor, self.urgent):
            executor.shutdown(wait=False, cancel_futures=True)

    async def _loop(self, key: Key) -> None:
        loop = asyncio.get_running_loop()
        poke = self.pokes[key]
        woken = True
        while True:
            poke.clear()
            executor = self.urgent if woken else self.executor
            try:
                await loop.run_in_executor(executor, self.reconciler.reconcile, *key)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("reconciling %s/%s failed; retrying", *key)
            else:
                if self.reconciler.finished(*key):
                    # Succeeded, Failed or gone: nothing costs anything any more. A later
                    # event about the job (an edit, a stray pod) starts a new loop.
                    self.tasks.pop(key, None)
                    self.pokes.pop(key, None)
                    return
            try:
                await asyncio.wait_for(poke.wait(), timeout=self.interval)
                woken = True
            except TimeoutError:
                woken = False


def loops_for(reconciler: Reconciles, config: OperatorConfig, name: str) -> _Loops:
    """The loops of one kind of object: a few threads for the timer ticks (planning is CPU
    work under one interpreter lock: more would only contend), more for woken loops (their
    work is mostly waiting on the API server: creates, deletes, status writes)."""
    return _Loops(
        reconciler=reconciler,
        interval=config.reconcile_interval_seconds,
        executor=ThreadPoolExecutor(max_workers=2, thread_name_prefix=name),
        urgent=ThreadPoolExecutor(max_workers=4, thread_name_prefix=f"{name}-woken"),
    )


def make_registry(reconciler: Reconciler, config: OperatorConfig) -> kopf.OperatorRegistry:
    """A kopf registry with the operator's handlers, bound to ``reconciler``."""
    registry = kopf.OperatorRegistry()
    reconciler.watch()
    loops = loops_for(reconciler, config, "reconcile")

    @kopf.on.startup(registry=registry)
    def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
        settings.watching.server_timeout = 300
        settings.watching.client_timeout = 330
        settings.watching.connect_timeout = 10
        settings.networking.request_timeout = 30
        settings.networking.connect_timeout = 10
        settings.persistence.progress_storage = kopf.StatusProgressStorage(field="status.kopf")
        settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
            prefix="cheapspot.dev", key="last-handled-configuration"
        )
        settings.persistence.finalizer = "cheapspot.dev/finalizer"
        settings.posting.level = logging.WARNING
        settings.peering.standalone = config.peering_priority is None
        if config.peering_priority is not None:
            settings.peering.priority = config.peering_priority
            settings.peering.name = "cheapspot"

    @kopf.on.login(registry=registry)
    def login(settings: kopf.OperatorSettings, **_: Any) -> kopf.ConnectionInfo:
        # kopf talks with the very credentials the reconciler uses (in-cluster or the given
        # kubeconfig), so both always reach the same API server as the same identity.
        return _connection_info(reconciler.api.configuration, settings)

    @kopf.on.cleanup(registry=registry)
    async def shutdown(**_: Any) -> None:
        await loops.stop_all()
        loops.shutdown()

    @kopf.on.event(common.GROUP, common.VERSION, s.PLURAL, registry=registry)
    async def job_event(
        event: Mapping[str, Any], namespace: str | None, name: str | None, **_: Any
    ) -> None:
        if not namespace or not name:
            return
        job = event.get("object") or {}
        reconciler.observe_job(event.get("type"), job)
        if event.get("type") == "DELETED":
            loops.stop((namespace, name))
            return
        phase = str((job.get("status") or {}).get("phase") or "")
        version = str((job.get("metadata") or {}).get("resourceVersion") or "")
        if phase in TERMINAL_PHASES and loops.settled.get((namespace, name)) == version:
            return  # our own last status write of a finished job: nothing to do
        if phase in TERMINAL_PHASES:
            loops.settled[(namespace, name)] = version
        loops.ensure((namespace, name))

    @kopf.on.event("", "v1", "pods", labels={LABEL_JOB: kopf.PRESENT}, registry=registry)
    async def pod_event(
        event: Mapping[str, Any], labels: Mapping[str, str], namespace: str | None, **_: Any
    ) -> None:
        pod = event.get("object") or {}
        reconciler.observe_pod(event.get("type"), pod)
        if namespace:
            loops.place(event.get("type"), pod, (namespace, labels[LABEL_JOB]))
            loops.poke((namespace, labels[LABEL_JOB]))

    @kopf.on.event("", "v1", "nodes", registry=registry)
    async def node_event(event: Mapping[str, Any], name: str | None, **_: Any) -> None:
        if not name:
            return
        # Every event feeds the node list, heartbeats too (the pools' handler only wakes
        # the pools); only a change that matters wakes the jobs it concerns.
        reconciler.nodes.observe(event.get("type"), event.get("object") or {})
        loops.node_changed(event.get("type"), name, event.get("object") or {})

    # Inference pools: their own loops, pod and node handlers (see poolhandlers).
    from cheapspot_operator.inferencepool.controller import PoolReconciler, register_pool_handlers

    register_pool_handlers(
        registry,
        PoolReconciler(
            reconciler.api,
            config,
            clock=reconciler.clock,
            quotes=reconciler.quotes,
            nodes=reconciler.nodes,
        ),
        config,
    )
    return registry

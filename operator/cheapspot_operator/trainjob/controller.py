"""The CheapTrainJob's reconciler: the train planner and manifests over the shared runtime
(:class:`runtime.reconciler.ObjectReconciler`).

What only training needs, beyond the shared observe-plan-act pass:

* **Progress**: the workers' progress records, read from the object store in the background
  (:class:`trainjob.progress.ProgressCache`): a slow store never delays a reclaim. Read again
  when the job's pods change or its checkpoint interval passes (:mod:`trainjob.freshness`),
  not on every pass.
* **The output prefix** is claimed for the job once per operator process
  (:func:`trainjob.progress.store_output_claims`).
* **Errors**: an invalid spec (which the CRD's schema normally stops), a ``file://`` URI in a
  cluster without a shared filesystem or an output prefix held by another job fails the job
  once: retrying cannot fix it. Any other error is logged, counted and retried at the next
  tick: the loop never dies.
* **A finished job** (Succeeded, Failed) is left alone: only stray pods are removed, and its
  loop ends (:meth:`Reconciler.finished`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any

from pydantic import ValidationError

from cheapspot_operator.api import common
from cheapspot_operator.api import trainjob as s
from cheapspot_operator.api.phases import JobPhase
from cheapspot_operator.cluster.pods import Placement
from cheapspot_operator.cluster.views import LABEL_ROLE, ObjectView
from cheapspot_operator.planning.actions import CreatePod, DeletePod, EmitEvent, UpdateStatus
from cheapspot_operator.planning.uris import refused_uris
from cheapspot_operator.pricing.quotes import PriceKey, Quote
from cheapspot_operator.runtime import metrics
from cheapspot_operator.runtime.config import OperatorConfig
from cheapspot_operator.runtime.kubeapi import KubeApi
from cheapspot_operator.runtime.nodelist import SharedNodeList
from cheapspot_operator.runtime.reconciler import ObjectReconciler, validation_message
from cheapspot_operator.trainjob.actions import Action
from cheapspot_operator.trainjob.freshness import (
    MIN_GAP_SECONDS,
    pods_fingerprint,
    read_interval,
)
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
    Observed,
    is_generator,
    pod_view,
)
from cheapspot_operator.trainjob.plan import plan
from cheapspot_operator.trainjob.progress import (
    OutputClaims,
    ProgressCache,
    ProgressReader,
    StoreProgressReader,
    store_output_claims,
)
from cheapspot_operator.trainjob.shards import generates, generating


class Reconciler(ObjectReconciler[Action]):
    """Observe, plan, act for one job at a time. Synchronous: runs in a worker thread."""

    KIND = s.KIND
    PLURAL = s.PLURAL
    POD_LABEL = LABEL_JOB

    def __init__(
        self,
        api: KubeApi,
        config: OperatorConfig,
        progress_reader: ProgressReader | None = None,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        progress_min_gap_seconds: float = MIN_GAP_SECONDS,
        *,
        output_claims: OutputClaims | None = None,
        quotes: Callable[[], Mapping[PriceKey, Quote]] = dict,
        nodes: SharedNodeList | None = None,
    ) -> None:
        super().__init__(api, config, clock=clock, quotes=quotes, nodes=nodes)
        stores = StoreProgressReader()
        self.progress = ProgressCache(progress_reader or stores, progress_min_gap_seconds)
        self.claims = output_claims or store_output_claims(stores)
        self.claimed: set[str] = set()
        """UIDs of jobs whose output prefix is theirs (checked once per operator process)."""
        self.phases: dict[tuple[str, str], str] = {}
        self._finished: set[tuple[str, str]] = set()

    def finished(self, namespace: str, name: str) -> bool:
        """The job is gone, or Succeeded / Failed with nothing left to do for it: its loop
        can stop (a terminal job is left alone; a new event about it reconciles it once)."""
        return (namespace, name) in self._finished

    def reconcile_once(self, namespace: str, name: str) -> list[Action]:
        key = (namespace, name)
        self._finished.discard(key)
        job = self.get_object(namespace, name)
        if job is None or job["metadata"].get("deletionTimestamp"):
            self.phases.pop(key, None)
            self._finished.add(key)
            return []
        meta = job["metadata"]
        status = s.parse_status(job.get("status"))
        if status.phase.is_terminal():
            actions = self._reconcile_terminal(job)
            if not actions:
                self.progress.forget(meta["uid"])
                self._finished.add(key)
            return actions
        try:
            spec = s.parse_spec(job.get("spec") or {})
        except ValidationError as exc:
            return self._invalid(job, status, validation_message(exc))
        unusable = unusable_uris(spec, self.config.file_uris)
        if unusable:
            return self._invalid(job, status, unusable, reason="UnsupportedURI")
        outside = refused_uris(namespace, job_uris(spec), self.config.allowed_uri_prefixes)
        if outside:
            return self._invalid(job, status, outside, reason="URINotAllowed")
        if meta["uid"] not in self.claimed:
            resume = spec.output.if_exists is s.IfOutputExists.RESUME
            refused = self.claims(spec.output.uri, namespace, name, meta["uid"], resume)
            if refused:
                return self._invalid(job, status, refused, reason="OutputInUse")
            self.claimed.add(meta["uid"])
        pods = [
            v
            for p in self.object_pods(namespace, name, meta["uid"])
            if (v := pod_view(p)) is not None
        ]
        # What other pods request on each node only matters when a shard may return to spot.
        usage = self.nodes.usage() if any(x.fallback_reason for x in status.shards) else {}
        nodes = self.nodes.views(usage)
        # Generation shards' records only while they work (sequences-mode distillation).
        gens = (
            spec.shards if generates(spec) and (generating(status) or not status.generators) else 0
        )
        progress = self.progress.get(
            meta["uid"],
            spec.output.uri,
            spec.shards,
            gens,
            pods=pods_fingerprint(pods),
            interval=read_interval(spec, status),
        )
        slots = [*([status.anchor] if status.anchor else []), *status.shards, *status.generators]
        observed = Observed(
            job=ObjectView.of(job, status),
            pods=tuple(pods),
            nodes=nodes,
            progress=progress or {},
            progress_known=progress is not None,
            profile=self.profile,
            prices=self.prices,
            quotes=self.quotes(),
            create_refused=self.refused_for(meta["uid"], ((x.index, x.attempt) for x in slots)),
            status_refresh_seconds=self.config.status_refresh_seconds,
        )
        actions = plan(spec, observed, self.clock())
        self.apply(job, actions, lambda action: self._act(job, spec, action))
        return actions

    def _reconcile_terminal(self, job: dict[str, Any]) -> list[Action]:
        """A finished job: only stray pods (an earlier operator's) are removed; no node LIST,
        no progress read, no status write."""
        meta = job["metadata"]
        actions: list[Action] = [
            DeletePod(p.name, reason="JobFinished")
            for raw in self.object_pods(meta["namespace"], meta["name"], meta["uid"])
            if (p := pod_view(raw)) is not None and not p.terminated and not p.deleting
        ]
        self.apply(job, actions, lambda action: None)
        return actions

    def _invalid(
        self,
        job: dict[str, Any],
        status: s.TrainJobStatus,
        message: str,
        reason: str = "InvalidSpec",
    ) -> list[Action]:
        if status.phase is JobPhase.FAILED:
            return []
        generation = int(job["metadata"].get("generation", 1))
        failed = failed_status(status, reason, message, generation, self.clock())
        actions: list[Action] = [UpdateStatus(failed), EmitEvent("Warning", reason, message)]
        self.apply(job, actions, lambda action: None)
        return actions

    # -- acting -------------------------------------------------------------------------------

    def _act(self, job: dict[str, Any], spec: s.TrainJobSpec, action: Action) -> None:
        if isinstance(action, CreatePod):
            self._create_pod(job, spec, action)

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
        role = pod["metadata"]["labels"][LABEL_ROLE]
        self.create_pod(
            job, action.index, action.attempt, pod, role=role, capacity=action.capacity.value
        )

    # -- metrics ------------------------------------------------------------------------------

    def status_written(self, obj: Mapping[str, Any], status: Any) -> None:
        meta = obj["metadata"]
        self.count_status(
            meta["namespace"], meta["name"], s.parse_status(obj.get("status")), status
        )

    def count_status(
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


def job_uris(spec: s.TrainJobSpec) -> dict[str, str]:
    """Every storage URI the job names, by spec field ("" where it names none)."""
    uris = {
        "spec.model.uri": spec.model.uri,
        "spec.dataset.uri": spec.dataset.uri,
        "spec.output.uri": spec.output.uri,
    }
    if spec.distillation is not None:
        teacher = spec.distillation.teacher
        uris["spec.distillation.teacher.uri"] = teacher.uri
        uris["spec.distillation.teacher.adapterUri"] = teacher.adapter_uri or ""
    return uris


def unusable_uris(spec: s.TrainJobSpec, file_uris: bool) -> str:
    """Why the job's URIs cannot work in this cluster (``file_uris``: whether it has one
    filesystem shared by every pod), or ""."""
    if file_uris:
        return ""
    uris = job_uris(spec)
    local = [f"{k} {v}" for k, v in uris.items() if v.startswith("file://")]
    if not local:
        return ""
    return (
        f"{', '.join(local)}: file:// needs one filesystem shared by every pod, which this "
        "cluster does not have (operator setting fileUris: false); use s3://bucket/prefix/"
    )


def failed_status(
    status: s.TrainJobStatus, reason: str, message: str, generation: int, now: datetime
) -> s.TrainJobStatus:
    """``status`` failed for good: retrying cannot fix ``reason``."""
    return status.model_copy(
        update={
            "phase": JobPhase.FAILED,
            "reason": reason,
            "message": message,
            "observed_generation": generation,
            "conditions": [
                common.Condition(
                    type="Succeeded",
                    status="False",
                    reason=reason,
                    message=message,
                    last_transition_time=now,
                    observed_generation=generation,
                )
            ],
        }
    )

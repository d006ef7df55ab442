"""What the pool planner sees: typed views of a CheapInferencePool, its pods and replicas. Pure.

Replica pods are :class:`~cheapspot_operator.cluster.views.PodView` like every kind's (so the
shared :func:`~cheapspot_operator.planning.preemption.classify` sorts them), with the slot
index in ``index`` and what only serving needs beside it: readiness, the drain deadline and
the pod IP. A replica's own report (``GET /cheapspot/status`` on :data:`ADMIN_PORT`: ready,
adapters loaded, requests running and waiting) is read by the act layer and comes in as
:class:`ReplicaReport`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from cheapspot.contract import ANNOTATION_DRAINING, LABEL_POOL_ROLE, LABEL_REPLICA
from cheapspot_operator.api.inferencepool import InferencePoolStatus
from cheapspot_operator.cluster.placement import PlacementProfile
from cheapspot_operator.cluster.views import (
    NodeView,
    ObjectView,
    PodView,
    parse_time,
    slot_pod_view,
)
from cheapspot_operator.pricing.quotes import PriceKey, Quote
from cheapspot_operator.pricing.table import PriceTable

REPLICA_ROLE = "replica"
ANNOTATION_TEMPLATE_HASH = "cheapspot.dev/template-hash"
"""On the router Deployment: the hash of the pod template it was built with, so a changed
image or setting is patched in (a rollout) and an unchanged one is left alone."""
ROUTER_ROLE = "router"


@dataclass(frozen=True)
class ReplicaReport:
    """A replica launcher's answer to ``GET /cheapspot/status``."""

    ready: bool
    adapters: Mapping[str, str] = field(default_factory=dict)
    """Adapter name -> the URI of the version loaded (the replica also reports the
    manifest digest, which the routers compare; the operator pushes by URI)."""
    generation: int = 0
    """The pool generation of the desired list the replica applied last."""
    running: int | None = 0
    waiting: int | None = 0
    """Requests vLLM runs and queues; None when the replica cannot tell (vLLM not up)."""
    message: str = ""
    """An error the replica reports (an adapter that cannot be loaded), else empty."""

    @property
    def in_flight(self) -> int | None:
        if self.running is None or self.waiting is None:
            return None
        return self.running + self.waiting

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ReplicaReport:
        adapters = {
            str(a["name"]): str(a.get("uri") or "")
            for a in data.get("adapters") or []
            if isinstance(a, Mapping) and a.get("name")
        }
        desired = data.get("desired")
        generation = desired.get("generation") if isinstance(desired, Mapping) else 0
        errors = data.get("errors") or data.get("message") or ""
        if isinstance(errors, Mapping):
            errors = "; ".join(f"{k}: {v}" for k, v in sorted(errors.items()))
        elif isinstance(errors, list):
            errors = "; ".join(str(e) for e in errors)
        return cls(
            ready=bool(data.get("ready")),
            adapters=adapters,
            generation=generation if isinstance(generation, int) else 0,
            running=None if data.get("running") is None else int(data["running"]),
            waiting=None if data.get("waiting") is None else int(data["waiting"]),
            message=str(errors),
        )


@dataclass(frozen=True)
class ReplicaPod:
    pod: PodView
    """``pod.index`` is the replica slot."""
    ready: bool = False
    """The pod's Ready condition (its readiness probe on the admin port)."""
    draining_until: datetime | None = None
    ip: str = ""

    @property
    def name(self) -> str:
        return self.pod.name

    @property
    def index(self) -> int:
        return self.pod.index

    @property
    def attempt(self) -> int:
        return self.pod.attempt

    @property
    def live(self) -> bool:
        return not self.pod.terminated and not self.pod.deleting


@dataclass(frozen=True)
class RouterView:
    replicas: int
    ready_replicas: int = 0
    template_hash: str = ""
    """The pod template hash the Deployment was last built with (its annotation)."""


@dataclass(frozen=True)
class PoolObserved:
    """Everything one reconciliation of one pool looks at."""

    pool: ObjectView[InferencePoolStatus]
    replicas: tuple[ReplicaPod, ...]
    nodes: Mapping[str, NodeView]
    profile: PlacementProfile
    prices: PriceTable
    reports: Mapping[str, ReplicaReport] = field(default_factory=dict)
    """Replica reports by pod name; a pod without one did not answer (or was not asked)."""
    router: RouterView | None = None
    """The router Deployment; None when it does not exist."""
    quotes: Mapping[PriceKey, Quote] = field(default_factory=dict)
    """Live and last known good prices (the price book); the table fills the gaps."""
    status_refresh_seconds: float = 15.0
    router_template_hash: str = ""
    """The hash of the router pod template the operator builds now; a Deployment recording
    another one gets the new template (empty: not compared)."""
    create_refused: Mapping[int, str] = field(default_factory=dict)
    """Slots whose current pod the API server refused to create (quota, admission), with its
    message (the runtime remembers it per slot)."""
    """Cost alone rewrites the status at most this often (``statusRefreshSeconds``)."""


def replica_pod_view(pod: Mapping[str, Any]) -> ReplicaPod | None:
    """The planner's view of one replica pod; None for the router's pods and strangers."""
    meta = pod.get("metadata") or {}
    labels = meta.get("labels") or {}
    if labels.get(LABEL_POOL_ROLE) != REPLICA_ROLE or LABEL_REPLICA not in labels:
        return None
    base = slot_pod_view(pod, _replica_index)
    if base is None:
        return None
    status = pod.get("status") or {}
    ready = any(
        c.get("type") == "Ready" and c.get("status") == "True"
        for c in status.get("conditions") or []
    )
    until = None
    raw = (meta.get("annotations") or {}).get(ANNOTATION_DRAINING)
    if raw:
        try:
            until = parse_time(raw)
        except ValueError:
            until = None
    return ReplicaPod(
        pod=base,
        ready=ready and base.phase == "Running",
        draining_until=until,
        ip=str(status.get("podIP") or ""),
    )


def _replica_index(labels: Mapping[str, str]) -> int:
    return int(labels[LABEL_REPLICA])


def router_view(deployment: Mapping[str, Any] | None) -> RouterView | None:
    if deployment is None:
        return None
    annotations = (deployment.get("metadata") or {}).get("annotations") or {}
    return RouterView(
        replicas=int((deployment.get("spec") or {}).get("replicas") or 0),
        ready_replicas=int((deployment.get("status") or {}).get("readyReplicas") or 0),
        template_hash=str(annotations.get(ANNOTATION_TEMPLATE_HASH) or ""),
    )

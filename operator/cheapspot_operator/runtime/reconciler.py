"""What reconciling any kind of object takes, written once: each kind adds its planner, its
manifests and a few hooks (:class:`ObjectReconciler`).

One reconciliation (:meth:`ObjectReconciler.reconcile`) reads everything afresh (the object,
its pods, the nodes), asks the kind's planner what to do and applies the actions in the order
of :class:`Stage`: the status first, with the object's resourceVersion as a precondition, so
two writers cannot both act on the same state (a 409 ends the pass: the next one replans from
the newer object); then pods and events. Pods have deterministic names and are created if
absent, a 409 being success. Nothing lives only in memory: an operator killed at any point and
restarted rebuilds the same picture and creates no duplicates.

Under kopf (:meth:`ObjectReconciler.watch`) the object and its pods come from what the watches
reported (:mod:`watchcache`) and the reconciler's own writes, so a reconcile at rest costs the
API server nothing; without, each pass GETs and LISTs.

A pod create the API server refuses for good reasons of its own (a quota, an admission
webhook, a missing service account: a 4xx other than 429) is not an error of the operator: it
is remembered per slot (:meth:`ObjectReconciler.refused_for`) for the kind's status to report,
and tried again at the next pass.
"""

from __future__ import annotations

import enum
import logging
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, ClassVar, Generic, TypeVar

from pydantic import ValidationError

from cheapspot_operator.api import common
from cheapspot_operator.api.common import StatusModel
from cheapspot_operator.planning.actions import CreatePod, DeletePod, EmitEvent, UpdateStatus
from cheapspot_operator.pricing.quotes import PriceKey, Quote
from cheapspot_operator.runtime import events, metrics
from cheapspot_operator.runtime.config import OperatorConfig
from cheapspot_operator.runtime.kubeapi import ApiError, KubeApi
from cheapspot_operator.runtime.loops import POD_RESYNC_SECONDS
from cheapspot_operator.runtime.nodelist import SharedNodeList
from cheapspot_operator.runtime.watchcache import Primed, WatchCache

log = logging.getLogger("cheapspot.operator")

A = TypeVar("A")
"""The kind's actions (its planner's output)."""


class Stage(enum.IntEnum):
    """The order in which one pass's actions are applied (a stable sort: the planner's order
    holds within a stage)."""

    STATUS = 0
    """First: a pod is only created once its attempt is recorded."""
    DRAIN = 1
    """Drain marks: the router stops choosing a doomed replica before anything else (its
    replacement's creation included) takes time."""
    CREATE = 2
    DELETE = 3
    OTHER = 4
    """Adapter pushes, the router."""
    EVENT = 5
    """Last: a replacement never waits for the events about it."""


def pods_path(namespace: str, name: str = "") -> str:
    base = f"/api/v1/namespaces/{namespace}/pods"
    return f"{base}/{name}" if name else base


def owned_by(pod: Mapping[str, Any], uid: str) -> bool:
    refs = (pod.get("metadata") or {}).get("ownerReferences") or []
    return any(r.get("uid") == uid for r in refs)


def validation_message(exc: ValidationError) -> str:
    return "; ".join(f"spec.{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())


def refused(exc: ApiError) -> bool:
    """The API server refused a create for reasons of its own (quota, admission, a missing
    service account), as opposed to being overloaded (429) or failing (5xx)."""
    return 400 <= exc.status < 500 and exc.status != 429


SHARED_STAGES: Mapping[type, Stage] = {
    UpdateStatus: Stage.STATUS,
    CreatePod: Stage.CREATE,
    DeletePod: Stage.DELETE,
    EmitEvent: Stage.EVENT,
}


def apply_order(action: object, own: Mapping[type, Stage]) -> Stage:
    """When ``action`` is applied: the shared actions' stages, else the kind's (``own``),
    else :attr:`Stage.OTHER`."""
    shared = SHARED_STAGES.get(type(action))
    return shared if shared is not None else own.get(type(action), Stage.OTHER)


def count_event(event: EmitEvent) -> None:
    if event.reason == "Preempted":
        metrics.PREEMPTIONS.labels(signal=event.cause or "Unknown").inc()
    elif event.reason == "FellBackToOnDemand":
        metrics.FALLBACKS.labels(reason=event.cause or "Unknown").inc()
    elif event.reason == "ReturnedToSpot":
        metrics.RETURNS_TO_SPOT.inc()
    elif event.reason in ("ShardFailed", "BackoffLimitExceeded"):
        metrics.RESTARTS.inc()


class ObjectReconciler(ABC, Generic[A]):
    """Observe, plan, act for one object of a kind at a time. Synchronous: runs in a worker
    thread (:mod:`loops`). A kind names its resource and the stages of its own actions
    (:attr:`STAGES`), and implements :meth:`reconcile_once`, :meth:`finished` and
    :meth:`status_written`."""

    KIND: ClassVar[str]
    PLURAL: ClassVar[str]
    POD_LABEL: ClassVar[str]
    """The label that carries the object's name on each of its pods."""
    STAGES: ClassVar[Mapping[type, Stage]] = {}
    """When the kind's own actions are applied (the shared ones' stages are known here)."""

    def __init__(
        self,
        api: KubeApi,
        config: OperatorConfig,
        *,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        quotes: Callable[[], Mapping[PriceKey, Quote]] = dict,
        nodes: SharedNodeList | None = None,
    ) -> None:
        self.api = api
        self.config = config
        self.clock = clock
        self.nodes = nodes or SharedNodeList(api, ttl=0)
        """Every node; shared by every kind and invalidated by the node watch."""
        self.quotes = quotes
        """The price book's snapshot (:mod:`runtime.pricebook`); none: the table."""
        self.profile = config.placement_profile()
        self.prices = config.price_table()
        self.objects: WatchCache | None = None
        """Objects as their watch reported them (:meth:`watch`); None: GET each time."""
        self.pods = WatchCache(group_label=self.POD_LABEL)
        """The objects' pods as the pod watch reported them, grouped by object (when watched)."""
        self.pods_primed = Primed(POD_RESYNC_SECONDS)
        self.refused: dict[tuple[str, int], tuple[int, str]] = {}
        self._writing = threading.local()
        """Seconds the current thread's pass spent applying actions (its ``seconds``)."""
        """(object uid, slot) -> (attempt, the API server's message) of the last refused create."""

    # -- reading ------------------------------------------------------------------------------

    def object_path(self, namespace: str, name: str = "") -> str:
        base = f"/apis/{common.GROUP}/{common.VERSION}/namespaces/{namespace}/{self.PLURAL}"
        return f"{base}/{name}" if name else base

    def watch(self, nodes: bool = True) -> None:
        """kopf's watches feed the objects, their pods and (``nodes``: unless another
        reconciler's watch feeds the same node list) the nodes from now on: a reconcile reads
        them without a request; the API server hears from us only when there is work."""
        self.objects = WatchCache()
        if nodes:
            self.nodes.watch()

    def observe_object(self, event_type: str | None, obj: Mapping[str, Any]) -> bool:
        """A watch event of the kind; whether it is news (not our own write coming back)."""
        if self.objects is not None:
            return self.objects.observe(event_type, obj)
        return True

    def observe_pod(self, event_type: str | None, pod: Mapping[str, Any]) -> bool:
        """A watch event of one of the kind's pods; whether it is news."""
        if self.objects is not None:
            return self.pods.observe(event_type, pod)
        return True

    def get_object(self, namespace: str, name: str) -> dict[str, Any] | None:
        if self.objects is not None:
            cached = self.objects.get(namespace, name)
            if cached is not None:
                return dict(cached)
        obj = self.api.get(self.object_path(namespace, name))
        if self.objects is not None and obj is not None:
            self.objects.wrote(obj)
        return obj

    def object_pods(self, namespace: str, name: str, uid: str) -> list[Mapping[str, Any]]:
        """The object's pods (label-selected, owned by ``uid``): from the pod watch when
        watched, primed by one LIST per namespace."""
        found: Sequence[Mapping[str, Any]]
        if self.objects is None:
            found = self.api.list(pods_path(namespace), f"{self.POD_LABEL}={name}")
        else:

            def prime() -> None:
                items, at = self.api.list_versioned(pods_path(namespace), self.POD_LABEL)
                self.pods.merge_list(namespace, items, at)

            self.pods_primed.prime(namespace, prime)
            found = self.pods.group(namespace, name)
        return [p for p in found if owned_by(p, uid)]

    # -- one pass -----------------------------------------------------------------------------

    def reconcile(self, namespace: str, name: str) -> list[A]:
        started = time.monotonic()
        self._writing.seconds = 0.0
        try:
            return self.reconcile_once(namespace, name)
        except Exception:
            metrics.RECONCILE_ERRORS.inc()
            raise
        finally:
            total = time.monotonic() - started
            writing: float = self._writing.seconds
            metrics.RECONCILE_SECONDS.observe(total)
            metrics.RECONCILE_STAGE_SECONDS.labels(stage="planning").observe(total - writing)

    @abstractmethod
    def reconcile_once(self, namespace: str, name: str) -> list[A]:
        """Observe, plan and :meth:`apply`; the actions planned."""

    @abstractmethod
    def finished(self, namespace: str, name: str) -> bool:
        """Nothing is left to do for the object: its loop may end."""

    # -- acting -------------------------------------------------------------------------------

    @abstractmethod
    def status_written(self, obj: Mapping[str, Any], status: Any) -> None:
        """The kind's metrics for a status just written over ``obj``'s."""

    def apply(self, obj: dict[str, Any], actions: Sequence[A], act: Callable[[A], None]) -> None:
        """Apply ``actions`` in :class:`Stage` order: the status, deletes and events here,
        the kind's other actions through ``act``. A status write refused by its precondition
        ends the pass (nothing is done from an outdated picture)."""

        if not actions:
            return
        started = time.monotonic()
        try:
            self._apply(obj, actions, act)
        finally:
            seconds = time.monotonic() - started
            self._writing.seconds = getattr(self._writing, "seconds", 0.0) + seconds
            metrics.RECONCILE_STAGE_SECONDS.labels(stage="writing").observe(seconds)

    def _apply(self, obj: dict[str, Any], actions: Sequence[A], act: Callable[[A], None]) -> None:
        meta = obj["metadata"]
        for action in sorted(actions, key=lambda a: apply_order(a, self.STAGES)):
            if isinstance(action, DeletePod):
                self.api.delete(pods_path(meta["namespace"], action.name), action.grace_seconds)
            elif isinstance(action, EmitEvent):
                count_event(action)
                self.post_event(obj, action)
            elif isinstance(action, UpdateStatus):
                if not self.write_status(obj, action.status):
                    return
            else:
                act(action)

    def write_status(self, obj: Mapping[str, Any], status: StatusModel) -> bool:
        """Write ``status`` over ``obj``'s, on the condition that ``obj`` is the newest
        version; False when it is not (someone wrote it meanwhile)."""
        meta = obj["metadata"]
        namespace, name = meta["namespace"], meta["name"]
        body = {
            "metadata": {"resourceVersion": meta["resourceVersion"]},
            "status": status.to_patch(),
        }
        try:
            written = self.api.merge_patch(self.object_path(namespace, name) + "/status", body)
        except ApiError as exc:
            if exc.status == 409:
                log.info("%s/%s changed meanwhile; replanning", namespace, name)
                return False
            raise
        if self.objects is not None:
            self.objects.wrote(written)
        self.status_written(obj, status)
        return True

    def create_pod(
        self,
        obj: Mapping[str, Any],
        index: int,
        attempt: int,
        pod: Mapping[str, Any],
        *,
        role: str,
        capacity: str,
    ) -> None:
        """Create the pod of slot ``index``'s ``attempt``; a refusal is remembered
        (:meth:`refused_for`), not raised."""
        meta = obj["metadata"]
        pod_name = pod["metadata"]["name"]
        try:
            created = self.api.create(pods_path(meta["namespace"]), pod)
        except ApiError as exc:
            if not refused(exc):
                raise
            self.refused[(meta["uid"], index)] = (attempt, exc.message)
            log.warning("pod %s refused: %s", pod_name, exc.message)
            return
        self.refused.pop((meta["uid"], index), None)
        if created:
            if self.objects is not None:
                self.pods.wrote(created)
            metrics.PODS_CREATED.labels(role=role).inc()
            log.info("created pod %s (%s)", pod_name, capacity)

    def refused_for(self, uid: str, slots: Iterable[tuple[int, int]]) -> dict[int, str]:
        """The API server's words, by slot index, for those ``(index, attempt)`` slots whose
        pod was refused the last time it was created."""
        out: dict[int, str] = {}
        for index, attempt in slots:
            refusal = self.refused.get((uid, index))
            if refusal is not None and refusal[0] == attempt:
                out[index] = refusal[1]
        return out

    def post_event(self, obj: Mapping[str, Any], event: EmitEvent) -> None:
        post_event(self.api, self.KIND, obj, event, self.clock())


def post_event(
    api: KubeApi, kind: str, obj: Mapping[str, Any], event: EmitEvent, now: datetime
) -> None:
    """Post ``event`` about ``obj``, an object of ``kind`` in the operator's API group."""
    involved = events.reference(f"{common.GROUP}/{common.VERSION}", kind, obj)
    events.post(
        api, involved, type_=event.type, reason=event.reason, message=event.message, now=now
    )

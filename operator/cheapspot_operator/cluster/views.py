"""What the planners see: small, typed views of pods and nodes. Pure.

The handlers read raw Kubernetes objects (dicts); :func:`slot_pod_view` and :func:`node_view`
reduce them to the facts the planners decide on, so planner tests build views directly and
never need a Kubernetes object. Each kind adds its own views of its workload (its object,
its slots' numbering) next to its planner.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Generic, TypeVar

from cheapspot_operator.api.common import StatusModel

LABEL_ROLE = "cheapspot.dev/role"
LABEL_CAPACITY = "cheapspot.dev/capacity-type"
ANNOTATION_ATTEMPT = "cheapspot.dev/attempt"


INSTANCE_TYPE_LABELS = ("node.kubernetes.io/instance-type", "beta.kubernetes.io/instance-type")
ZONE_LABELS = ("topology.kubernetes.io/zone", "failure-domain.beta.kubernetes.io/zone")


def quantity(value: Any) -> float:
    """A Kubernetes CPU or count quantity (``4``, ``500m``, ``1.5``) as a number; 0 if unset."""
    text = str(value or "").strip()
    if not text:
        return 0.0
    try:
        return float(text[:-1]) / 1000 if text.endswith("m") else float(text)
    except ValueError:
        return 0.0


def _gpus(resources: Mapping[str, Any]) -> float:
    return sum(quantity(v) for k, v in resources.items() if "gpu" in str(k).lower())


@dataclass(frozen=True)
class PodView:
    name: str
    index: int
    """The slot the pod fills (each kind numbers its slots)."""
    attempt: int
    capacity: str
    node_name: str = ""
    phase: str = "Pending"
    deleting: bool = False
    exit_code: int | None = None
    """The worker container's exit code once it terminated."""
    exit_reason: str = ""
    """The container's termination reason (``OOMKilled``, ``Error``, ``Completed``)."""
    termination_message: str = ""
    reason: str = ""
    """``status.reason`` (``Evicted`` after an eviction)."""
    disruption_target: bool = False
    disruption_reason: str = ""
    unschedulable_since: datetime | None = None
    """``PodScheduled=False, reason=Unschedulable``: its lastTransitionTime."""
    waiting_reason: str = ""
    """Why the container has not started (``ImagePullBackOff``, ``CreateContainerConfigError``)."""
    waiting_message: str = ""
    gpus: float = 0.0
    """GPUs the pod requests (its share of a node's cost)."""
    cpus: float = 0.0

    @property
    def terminated(self) -> bool:
        return self.phase in ("Succeeded", "Failed")


@dataclass(frozen=True)
class NodeView:
    name: str
    labels: Mapping[str, str] = field(default_factory=dict)
    ready: bool = True
    unschedulable: bool = False
    taint_keys: frozenset[str] = frozenset()
    allocatable: Mapping[str, float] = field(default_factory=dict)
    """Extended resources the node offers (``nvidia.com/gpu``: 8), whole units."""
    requested: Mapping[str, float] = field(default_factory=dict)
    """The same resources requested by the live pods bound to the node (any job's or none);
    empty when the observation did not look (only needed to decide a return to spot)."""
    gpus: float = 0.0
    """Allocatable GPUs."""
    cpus: float = 0.0
    """Allocatable CPUs."""

    def free(self, resource: str) -> float:
        return self.allocatable.get(resource, 0.0) - self.requested.get(resource, 0.0)

    @property
    def instance_type(self) -> str:
        for key in INSTANCE_TYPE_LABELS:
            if key in self.labels:
                return self.labels[key]
        return ""

    @property
    def zone(self) -> str:
        for key in ZONE_LABELS:
            if key in self.labels:
                return self.labels[key]
        return ""


def parse_time(value: Any) -> datetime | None:
    """A Kubernetes timestamp (``2026-01-01T12:00:00Z``) as an aware datetime; None if unset.
    Raises ValueError for text that is not one."""
    if isinstance(value, datetime):
        return value
    if isinstance(value, str) and value:
        return datetime.fromisoformat(value.replace("Z", "+00:00"))
    return None


def slot_pod_view(
    pod: Mapping[str, Any], slot_index: Callable[[Mapping[str, str]], int]
) -> PodView | None:
    """The planner's view of a pod the operator created; ``slot_index`` reads its slot off its
    labels (each kind numbers its slots). None for a pod without the role label and attempt
    annotation every such pod carries: not the operator's."""
    meta = pod.get("metadata") or {}
    labels = meta.get("labels") or {}
    annotations = meta.get("annotations") or {}
    if LABEL_ROLE not in labels or ANNOTATION_ATTEMPT not in annotations:
        return None
    index = slot_index(labels)
    status = pod.get("status") or {}
    exit_code: int | None = None
    message, exit_reason, waiting_reason, waiting_message = "", "", "", ""
    for cs in status.get("containerStatuses") or []:
        state = cs.get("state") or {}
        terminated = state.get("terminated")
        if terminated:
            exit_code = int(terminated.get("exitCode", 0))
            exit_reason = str(terminated.get("reason") or "")
            message = str(terminated.get("message") or terminated.get("reason") or "")
        waiting = state.get("waiting")
        if waiting:
            waiting_reason = str(waiting.get("reason") or "")
            waiting_message = str(waiting.get("message") or "")
    disruption, disruption_reason, unschedulable_since = False, "", None
    for cond in status.get("conditions") or []:
        if cond.get("type") == "DisruptionTarget" and cond.get("status") == "True":
            disruption, disruption_reason = True, str(cond.get("reason") or "")
        if (
            cond.get("type") == "PodScheduled"
            and cond.get("status") == "False"
            and cond.get("reason") == "Unschedulable"
        ):
            unschedulable_since = parse_time(cond.get("lastTransitionTime"))
    requests = [
        ((c.get("resources") or {}).get("requests") or {})
        for c in (pod.get("spec") or {}).get("containers") or []
    ]
    return PodView(
        gpus=sum(_gpus(r) for r in requests),
        cpus=sum(quantity(r.get("cpu")) for r in requests),
        name=str(meta.get("name")),
        index=index,
        attempt=int(annotations[ANNOTATION_ATTEMPT]),
        capacity=str(labels.get(LABEL_CAPACITY, "")),
        node_name=str((pod.get("spec") or {}).get("nodeName") or ""),
        phase=str(status.get("phase") or "Pending"),
        deleting=bool(meta.get("deletionTimestamp")),
        exit_code=exit_code,
        exit_reason=exit_reason,
        termination_message=message or str(status.get("message") or ""),
        reason=str(status.get("reason") or ""),
        disruption_target=disruption,
        disruption_reason=disruption_reason,
        unschedulable_since=unschedulable_since,
        waiting_reason=waiting_reason,
        waiting_message=waiting_message,
    )


def whole_quantity(value: Any) -> float | None:
    """A resource quantity in whole units (extended resources are integers), or None when it
    is not a plain number (``16Gi``, ``500m``: not what GPU counts look like)."""
    try:
        return float(int(str(value)))
    except ValueError:
        return None


def pod_requests(pod: Mapping[str, Any]) -> dict[str, float]:
    """The extended (whole-unit) resources a pod's containers request, summed."""
    out: dict[str, float] = {}
    for c in (pod.get("spec") or {}).get("containers") or []:
        for key, value in ((c.get("resources") or {}).get("requests") or {}).items():
            amount = whole_quantity(value) if "/" in key else None
            if amount is not None:
                out[key] = out.get(key, 0.0) + amount
    return out


BOUND_LIVE_PODS = "spec.nodeName!=,status.phase!=Succeeded,status.phase!=Failed"
"""Field selector for the pods that hold resources on a node (see :func:`node_usage`)."""


def node_usage(bound_pods: Iterable[Mapping[str, Any]]) -> dict[str, dict[str, float]]:
    """Per node, the extended resources the given bound, live pods request, summed."""
    usage: dict[str, dict[str, float]] = {}
    for pod in bound_pods:
        node = usage.setdefault(str(pod["spec"]["nodeName"]), {})
        for key, amount in pod_requests(pod).items():
            node[key] = node.get(key, 0.0) + amount
    return usage


def node_view(node: Mapping[str, Any], requested: Mapping[str, float] | None = None) -> NodeView:
    """``requested``: what the live pods bound to the node request (see :func:`pod_requests`)."""
    meta = node.get("metadata") or {}
    spec = node.get("spec") or {}
    ready = True
    for cond in (node.get("status") or {}).get("conditions") or []:
        if cond.get("type") == "Ready":
            ready = cond.get("status") == "True"
    allocatable = (node.get("status") or {}).get("allocatable") or {}
    return NodeView(
        gpus=_gpus(allocatable),
        cpus=quantity(allocatable.get("cpu")),
        name=str(meta.get("name")),
        labels=dict(meta.get("labels") or {}),
        ready=ready,
        unschedulable=bool(spec.get("unschedulable")),
        taint_keys=frozenset(str(t.get("key")) for t in spec.get("taints") or []),
        allocatable={
            k: q
            for k, v in ((node.get("status") or {}).get("allocatable") or {}).items()
            if "/" in k and (q := whole_quantity(v)) is not None
        },
        requested=dict(requested or {}),
    )


S = TypeVar("S", bound=StatusModel)


@dataclass(frozen=True)
class ObjectView(Generic[S]):
    """The custom resource a reconcile is about (a job, a pool): who it is, and its status."""

    namespace: str
    name: str
    uid: str
    generation: int
    status: S

    @classmethod
    def of(cls, obj: Mapping[str, Any], status: S) -> ObjectView[S]:
        """The view of ``obj`` (as the API server returns it) with its parsed ``status``."""
        meta = obj["metadata"]
        return cls(
            meta["namespace"], meta["name"], meta["uid"], int(meta.get("generation", 1)), status
        )

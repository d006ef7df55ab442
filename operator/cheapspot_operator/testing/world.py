"""What every kind's test world shares: a clock tests step forward, nodes, and the world base.

A world holds one workload's pods, the nodes around them and the last plan; ``step()`` runs
the kind's planner and applies its actions the way the act layer and the API server would.
The kind-neutral actions are applied here, once, so the train and pool worlds cannot disagree
on them: an :class:`EmitEvent` is only recorded, and a :class:`DeletePod` does what the API
server does with a pod deletion (see :meth:`WorkloadWorld.delete`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Generic, Protocol, TypeVar

from cheapspot_operator.api.common import Condition
from cheapspot_operator.cluster.placement import PROFILES, PlacementProfile
from cheapspot_operator.cluster.views import NodeView, PodView
from cheapspot_operator.planning.actions import CreatePod, DeletePod, EmitEvent, UpdateStatus
from cheapspot_operator.pricing.table import PriceTable, default_prices

EPOCH = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)
INTERRUPTION = "cheapspot.dev/interruption"
"""The taint a reclaim notice puts on a spot node (the local profile's)."""


@dataclass
class FakeClock:
    now: datetime = EPOCH

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> datetime:
        self.now += timedelta(seconds=seconds)
        return self.now


def make_node(
    name: str,
    capacity: str = "spot",
    *,
    ready: bool = True,
    taints: Iterable[str] = (),
    instance_type: str = "g5.xlarge",
    unschedulable: bool = False,
    gpus: int = 1,
) -> NodeView:
    return NodeView(
        name=name,
        labels={
            "cheapspot.dev/capacity-type": capacity,
            "node.kubernetes.io/instance-type": instance_type,
        },
        ready=ready,
        unschedulable=unschedulable,
        taint_keys=frozenset(taints),
        allocatable={"nvidia.com/gpu": float(gpus)} if gpus else {},
    )


def default_nodes() -> dict[str, NodeView]:
    """Two spot nodes and one on-demand node, one GPU each."""
    nodes = [make_node("spot-1"), make_node("spot-2"), make_node("on-demand-1", "on-demand")]
    return {n.name: n for n in nodes}


def removed_at_once(pod: PodView, grace_seconds: int | None) -> bool:
    """Whether the API server removes a pod the moment it is deleted, as it does when the
    deletion has no grace period, or there is no kubelet to wait for (the pod is bound to no
    node) or nothing left to stop (the pod already ended). Any other pod stays, terminating
    (``deletionTimestamp`` set), until its kubelet reports it gone."""
    return grace_seconds == 0 or not pod.node_name or pod.terminated


class HasConditions(Protocol):
    @property
    def conditions(self) -> list[Condition]: ...


P = TypeVar("P")
"""The kind's record of one of its pods."""
A = TypeVar("A")
"""The kind's planner actions."""
S = TypeVar("S", bound=HasConditions)
"""The kind's status."""


@dataclass
class WorkloadWorld(ABC, Generic[P, A, S]):
    """One workload and what is around it. A kind's world adds its spec, its status and how
    its own actions land; tests change the world between steps (``set_pod``, ``taint``)."""

    pods: dict[str, P] = field(default_factory=dict)
    nodes: dict[str, NodeView] = field(default_factory=default_nodes)
    other_gpus: dict[str, int] = field(default_factory=dict)
    """GPUs requested on a node by pods of other workloads."""
    clock: FakeClock = field(default_factory=FakeClock)
    profile: PlacementProfile = PROFILES["local"]
    prices: PriceTable = field(default_factory=default_prices)
    generation: int = 1
    last: list[A] = field(default_factory=list)

    # -- what a kind says about itself ---------------------------------------------------

    @property
    @abstractmethod
    def current_status(self) -> S: ...

    @abstractmethod
    def view_of(self, pod: P) -> PodView:
        """The pod as the API server has it."""

    @abstractmethod
    def with_view(self, pod: P, view: PodView) -> P:
        """``pod`` with the API server's part replaced."""

    @abstractmethod
    def gpus_of(self, pod: P) -> float:
        """The GPUs the pod requests of its node."""

    @property
    @abstractmethod
    def gpu_resource(self) -> str: ...

    @abstractmethod
    def plan(self) -> Sequence[A]:
        """The kind's planner on the world as it is now."""

    @abstractmethod
    def store_status(self, status: S) -> None:
        """An :class:`UpdateStatus` as the API server stores it."""

    @abstractmethod
    def pending_pod(self, action: CreatePod) -> tuple[str, P]:
        """The pod a :class:`CreatePod` makes: its name, and the pod, Pending on no node."""

    def apply(self, action: A) -> None:
        """The effect of one of the kind's own actions (none but the shared ones: the status,
        creates, deletions, events)."""

    # -- stepping ------------------------------------------------------------------------

    def step(self, seconds: float = 0.0, *, apply_pods: bool = True) -> list[A]:
        """Advance the clock, plan, apply; pods are neither created nor deleted when
        ``apply_pods`` is false (the API server refused)."""
        self.clock.advance(seconds)
        actions = list(self.plan())
        for action in actions:
            if isinstance(action, DeletePod):
                if apply_pods:
                    self.delete(action)
            elif isinstance(action, UpdateStatus):
                self.store_status(action.status)
            elif isinstance(action, CreatePod):
                if apply_pods:
                    name, pod = self.pending_pod(action)
                    self.pods.setdefault(name, pod)
            elif not isinstance(action, EmitEvent):
                self.apply(action)
        self.last = actions
        return actions

    def delete(self, action: DeletePod) -> None:
        """A pod deletion as the API server carries it out (:func:`removed_at_once`)."""
        pod = self.pods.get(action.name)
        if pod is None:
            return
        view = self.view_of(pod)
        if removed_at_once(view, action.grace_seconds):
            del self.pods[action.name]
        else:
            self.pods[action.name] = self.with_view(pod, replace(view, deleting=True))

    def observed_nodes(self) -> dict[str, NodeView]:
        """Each node with the GPUs requested by the live pods bound to it, as the act layer
        reads them."""
        used: dict[str, float] = {k: float(v) for k, v in self.other_gpus.items()}
        for pod in self.pods.values():
            view = self.view_of(pod)
            if view.node_name and not view.terminated:
                used[view.node_name] = used.get(view.node_name, 0.0) + self.gpus_of(pod)
        return {
            name: replace(n, requested={self.gpu_resource: used.get(name, 0.0)})
            for name, n in self.nodes.items()
        }

    # -- changing the world --------------------------------------------------------------

    def taint(self, node: str, key: str = INTERRUPTION) -> None:
        n = self.nodes[node]
        self.nodes[node] = replace(n, taint_keys=n.taint_keys | {key})

    # -- reading the last plan -----------------------------------------------------------

    def events(self, reason: str | None = None) -> list[EmitEvent]:
        return [
            a
            for a in self.last
            if isinstance(a, EmitEvent) and (reason is None or a.reason == reason)
        ]

    def deletes(self) -> list[DeletePod]:
        return [a for a in self.last if isinstance(a, DeletePod)]

    def condition(self, type_: str) -> tuple[str, str]:
        for c in self.current_status.conditions:
            if c.type == type_:
                return c.status, c.reason
        raise KeyError(type_)

    def condition_message(self, type_: str) -> str:
        return next(c.message for c in self.current_status.conditions if c.type == type_)

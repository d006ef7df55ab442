"""What the pool planner returns, and the pass that collects it. Pure.

The status and create actions are every kind's (:mod:`cheapspot_operator.planning.actions`);
the runtime applies them all in one order.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from cheapspot.contract import AdapterSource
from cheapspot_operator.api.inferencepool import InferencePoolSpec, InferencePoolStatus, ReplicaSlot
from cheapspot_operator.inferencepool.observed import PoolObserved, ReplicaPod
from cheapspot_operator.inferencepool.replicas import replica_pod_name
from cheapspot_operator.planning.actions import CreatePod, DeletePod, EmitEvent, UpdateStatus


@dataclass(frozen=True)
class MarkDraining:
    """Set the draining annotation (deadline) on a replica pod: the router stops at once."""

    pod: str
    deadline: datetime


@dataclass(frozen=True)
class SyncAdapters:
    """Push the desired adapter list to a running replica (loaded/unloaded, no restart),
    with the pool generation it comes from (replicas refuse an older one; routers take the
    newest as the versions wanted)."""

    pod: str
    adapters: tuple[AdapterSource, ...]
    generation: int = 0


@dataclass(frozen=True)
class EnsureRouter:
    """Create the router (Deployment, Service, its RBAC) if absent; set its replicas."""

    replicas: int


PoolAction = (
    UpdateStatus[InferencePoolStatus]
    | CreatePod
    | MarkDraining
    | SyncAdapters
    | EnsureRouter
    | DeletePod
) | EmitEvent


@dataclass
class Pass:
    """Inputs and mutable scratch space of one planning pass."""

    spec: InferencePoolSpec
    obs: PoolObserved
    now: datetime
    status: InferencePoolStatus
    actions: list[PoolAction]
    avoid: tuple[str, ...]
    current: dict[int, ReplicaPod | None]
    since: dict[str, datetime]
    """Pod name -> when its drain began (kept in status.draining)."""
    replicas: int = 0
    """The replicas wanted now: ``spec.replicas``, fewer when the budget is exceeded."""
    over_budget: bool = False

    def event(self, type_: str, reason: str, message: str, cause: str = "") -> None:
        self.actions.append(EmitEvent(type_, reason, message, cause))

    def create(self, slot: ReplicaSlot) -> ReplicaSlot:
        """Create the slot's pod (its attempt, on its capacity, off the doomed nodes)."""
        name = replica_pod_name(self.obs.pool.name, slot.index, slot.attempt)
        self.actions.append(CreatePod(slot.index, slot.attempt, slot.capacity_type, self.avoid))
        return slot.model_copy(update={"pod": name})

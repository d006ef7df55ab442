"""What the pool planner returns. Pure.

The status and create actions are every kind's (:mod:`cheapspot_operator.planning.actions`);
the runtime applies them all in one order.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from cheapspot.contract import AdapterSource
from cheapspot_operator.api.inferencepool import InferencePoolStatus
from cheapspot_operator.planning.actions import CreatePod, DeletePod, EmitEvent, UpdateStatus


@dataclass(frozen=True)
class MarkDraining:
    """Set the draining annotation (deadline) on a replica pod: the router stops at once."""

    pod: str
    deadline: datetime


@dataclass(frozen=True)
class SyncAdapters:
    """Push the desired adapter list to a running replica (loaded/unloaded, no restart)."""

    pod: str
    adapters: tuple[AdapterSource, ...]


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

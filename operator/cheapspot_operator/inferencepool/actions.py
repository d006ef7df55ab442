"""What the pool planner returns. Pure.

The handlers apply the actions in order and stop at the first failure; :class:`UpdatePoolStatus`
comes first (a slot's new attempt is recorded before its pod is created), then the drain marks
(the router stops choosing a doomed replica before anything else takes time), then the rest.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from cheapspot.contract import AdapterSource
from cheapspot_operator.api.common import CapacityType
from cheapspot_operator.api.inferencepool import InferencePoolStatus
from cheapspot_operator.planning.actions import DeletePod, EmitEvent


@dataclass(frozen=True)
class UpdatePoolStatus:
    status: InferencePoolStatus


@dataclass(frozen=True)
class CreateReplica:
    index: int
    attempt: int
    capacity: CapacityType
    avoid_nodes: tuple[str, ...] = ()


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
    UpdatePoolStatus | CreateReplica | MarkDraining | SyncAdapters | EnsureRouter | DeletePod
) | EmitEvent

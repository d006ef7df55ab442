"""The actions every planner returns: a status to write, a pod to create or delete, an event.
Each kind adds its own (the pool's drain marks, adapter pushes, router).

The runtime applies one pass's actions in one order for every kind
(:class:`~cheapspot_operator.runtime.reconciler.Stage`): the status first, so a slot's new
attempt is recorded before its pod is created; events last.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Generic, TypeVar

from cheapspot_operator.api.common import CapacityType, StatusModel

S = TypeVar("S", bound=StatusModel)


@dataclass(frozen=True)
class UpdateStatus(Generic[S]):
    """Write the object's status (under the resourceVersion the pass read)."""

    status: S


@dataclass(frozen=True)
class CreatePod:
    """Create a slot's pod: its attempt, on its capacity, off the doomed nodes."""

    index: int
    """Slot index (a shard, the anchor, a generator, a replica: the kind's numbering)."""
    attempt: int
    capacity: CapacityType
    avoid_nodes: tuple[str, ...] = ()
    """Nodes being reclaimed or lost: the pod must not land there."""


@dataclass(frozen=True)
class DeletePod:
    name: str
    grace_seconds: int | None = None
    """None: the pod's own grace period (the worker checkpoints); 0: its node is gone."""
    reason: str = ""


@dataclass(frozen=True)
class EmitEvent:
    type: str
    """Normal or Warning."""
    reason: str
    message: str
    cause: str = ""
    """Machine-readable detail (the preemption signal, the fallback reason) for metrics."""

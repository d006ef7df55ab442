"""Slot life, the same for every kind. Pure.

A workload's pods fill numbered slots (a job's anchor and shards, a pool's replicas). Each slot
has an ``attempt``: its current pod is the one with that attempt, and a new pod is a new
attempt under a new deterministic name, so the status (written first) always says which pod
is meant. What every kind does with a slot the same way lives here: starting a fresh attempt,
adopting an attempt newer than the status knows, counting a preemption, and falling back to
on-demand once a spot pod has waited too long for capacity. What a kind does around them (the
pods it creates, its restart budgets, its drains) stays with its planner.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any, Protocol, Self, TypeVar

from cheapspot_operator.api.common import CapacityType
from cheapspot_operator.cluster.views import PodView
from cheapspot_operator.planning.actions import EmitEvent
from cheapspot_operator.planning.fallback import waited_too_long
from cheapspot_operator.planning.preemption import Verdict

SPOT_UNAVAILABLE = "SpotUnavailable"
"""``fallbackReason`` of a slot whose spot pod waited ``spot.fallbackAfterSeconds`` in vain."""


class Slot(Protocol):
    """What every kind's slot status has (``ShardStatus``, ``ReplicaSlot``)."""

    attempt: int
    pod: str
    node: str
    pod_phase: str
    capacity_type: CapacityType
    fallback_reason: str
    preemptions: int

    def model_copy(
        self, *, update: Mapping[str, Any] | None = None, deep: bool = False
    ) -> Self: ...


class AttemptPod(Protocol):
    """A pod of a slot, as far as attempts go (``PodView``, ``ReplicaPod``)."""

    @property
    def attempt(self) -> int: ...


S = TypeVar("S", bound=Slot)
P = TypeVar("P", bound=AttemptPod)


def next_attempt(slot: S, capacity: CapacityType, reason: str, **reset: object) -> S:
    """The slot with a new attempt on ``capacity`` (``reason``: its fallback reason, "" on
    plain spot) and nothing known yet about the pod that attempt gets; ``reset``: what else a
    kind's slot forgets with the old pod."""
    return slot.model_copy(
        update={
            "attempt": slot.attempt + 1,
            "pod": "",
            "node": "",
            "pod_phase": "",
            **reset,
            "capacity_type": capacity,
            "fallback_reason": reason,
        }
    )


def adopt_newest(slot: S, pods: Sequence[P], **reset: object) -> tuple[S, P | None]:
    """The slot and its current pod. A pod of an attempt newer than the status knows (the
    status write that named it was lost) becomes the slot's attempt rather than being
    replaced; ``reset``: what the slot forgets about the attempt it knew."""
    newest = max((p.attempt for p in pods), default=-1)
    if newest > slot.attempt:
        slot = slot.model_copy(update={"attempt": newest, **reset})
    current = next((p for p in pods if p.attempt == slot.attempt), None)
    return slot, current


def preempted(slot: S, what: str, verdict: Verdict) -> tuple[S, EmitEvent]:
    """The slot with one more preemption, and the event that says its replacement starts
    (the caller counts the preemption on the workload and creates the replacement)."""
    event = EmitEvent(
        "Warning",
        "Preempted",
        f"{what} ({slot.pod} on {slot.node or 'no node'}): "
        + " ".join(x for x in (verdict.reason, verdict.message) if x)
        + "; replacement started",
        verdict.reason,
    )
    return slot.model_copy(update={"preemptions": slot.preemptions + 1}), event


def spot_wait_over(
    what: str, pod: PodView, fallback_after_seconds: int, now: datetime
) -> EmitEvent | None:
    """The event that moves a spot slot to on-demand (reason :data:`SPOT_UNAVAILABLE`) once
    its pod has been unschedulable for ``fallback_after_seconds``; None before then."""
    waited = waited_too_long(pod, fallback_after_seconds, now)
    if waited is None:
        return None
    return EmitEvent(
        "Warning",
        "FellBackToOnDemand",
        f"{what}: no spot capacity for {int(waited.total_seconds())}s",
        SPOT_UNAVAILABLE,
    )

"""What the train planner returns, and the pass that collects it. Pure."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from cheapspot_operator.api.trainjob import ShardStatus, TrainJobSpec, TrainJobStatus
from cheapspot_operator.planning.actions import CreatePod, DeletePod, EmitEvent, UpdateStatus
from cheapspot_operator.trainjob.deadline import DeadlineView
from cheapspot_operator.trainjob.observed import Observed
from cheapspot_operator.trainjob.shards import pod_name

Action = UpdateStatus[TrainJobStatus] | CreatePod | DeletePod | EmitEvent


@dataclass
class Pass:
    """Inputs and mutable scratch space of one planning pass."""

    spec: TrainJobSpec
    obs: Observed
    now: datetime
    status: TrainJobStatus
    actions: list[Action]
    avoid: tuple[str, ...] = ()
    """Nodes being reclaimed or lost."""
    failure: tuple[str, str] | None = None
    """Why the job fails (reason, message), once a slot has said so."""
    spot_room: int = 0
    """Shard pods that may return to spot in this pass (free GPUs on matching spot nodes,
    once they have been free for ``spot.returnAfterSeconds``)."""
    deadline: DeadlineView | None = None
    """What ``spec.deadline`` wants for each shard (None: the job has no deadline)."""

    def event(self, type_: str, reason: str, message: str, cause: str = "") -> None:
        self.actions.append(EmitEvent(type_, reason, message, cause))

    def create(self, slot: ShardStatus) -> ShardStatus:
        """Create the slot's pod (its attempt, on its capacity, off the doomed nodes)."""
        name = pod_name(self.obs.job.name, slot.index, slot.attempt)
        self.actions.append(CreatePod(slot.index, slot.attempt, slot.capacity_type, self.avoid))
        return slot.model_copy(update={"pod": name})

"""What a distillation job's status says about the distillation. Pure, like every planner.

logits mode has one working phase, ``training``: the teacher runs inside each shard pod, next
to the student, from the first step to the last. Before and after it the phase follows the
job's: ``pending``, ``suspended``, ``done`` or ``failed``.
"""

from __future__ import annotations

from cheapspot_operator.phases import JobPhase
from cheapspot_operator.spec import DistillationStatus, TrainJobSpec


def distillation_status(spec: TrainJobSpec, phase: JobPhase) -> DistillationStatus | None:
    """The job's ``status.distillation``; None for a job that does not distil."""
    d = spec.distillation
    if d is None:
        return None
    where = {
        JobPhase.PENDING: "pending",
        JobPhase.RUNNING: "training",
        JobPhase.SUSPENDED: "suspended",
        JobPhase.SUCCEEDED: "done",
        JobPhase.FAILED: "failed",
    }[phase]
    return DistillationStatus(mode=d.mode.value, teacher=d.teacher.uri, phase=where)

"""What a distillation job's status says about the distillation. Pure, like every planner.

logits mode has one working phase, ``training``: the teacher runs inside each shard pod, next
to the student, from the first step to the last. sequences mode has two: ``generating`` while
the generation shards complete the dataset's prompts with the teacher (``generated`` of
``records`` published), then ``training`` on what they wrote. Before and after them the phase
follows the job's: ``pending``, ``suspended``, ``done`` or ``failed``.
"""

from __future__ import annotations

from cheapspot_operator.api.phases import JobPhase
from cheapspot_operator.api.trainjob import DistillationStatus, TrainJobSpec


def distillation_status(
    spec: TrainJobSpec,
    phase: JobPhase,
    *,
    generating: bool = False,
    generated: int = 0,
    records: int = 0,
    previous: DistillationStatus | None = None,
) -> DistillationStatus | None:
    """The job's ``status.distillation``; None for a job that does not distil.

    ``generating``: a generation shard has not finished; ``generated`` / ``records``: what
    the generation shards' progress records say (``records`` 0 while a shard has not said).
    Counts not read this pass (no records: a slow store) keep what ``previous`` showed.
    """
    d = spec.distillation
    if d is None:
        return None
    where = {
        JobPhase.PENDING: "pending",
        JobPhase.RUNNING: "generating" if generating else "training",
        JobPhase.SUSPENDED: "suspended",
        JobPhase.SUCCEEDED: "done",
        JobPhase.FAILED: "failed",
    }[phase]
    if not d.sequences:
        return DistillationStatus(mode=d.mode.value, teacher=d.teacher.uri, phase=where)
    if previous is not None:
        generated = max(generated, previous.generated or 0)
        records = records or previous.records or 0
    if not generating and records:
        generated = records
    return DistillationStatus(
        mode=d.mode.value,
        teacher=d.teacher.uri,
        phase=where,
        generated=generated,
        records=records,
    )

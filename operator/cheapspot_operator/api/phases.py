"""The CheapTrainJob phase: one enum, its legal transitions, and the one function that moves.

Legal transitions (anything else is a bug in the planner and raises)::

    Pending   -> Running | Suspended | Succeeded | Failed
    Running   -> Suspended | Succeeded | Failed
    Suspended -> Pending | Failed
    Succeeded, Failed: terminal, nothing leaves them

A Running job stays Running while shards are replaced (the ``Progressing`` condition says
which pods are not running); a resumed job goes through Pending again.
"""

from __future__ import annotations

import enum


class JobPhase(enum.StrEnum):
    PENDING = "Pending"
    """Accepted; pods are being created or wait for capacity. No pod of the job runs yet."""
    RUNNING = "Running"
    """At least the anchor and one shard run; replacements may be on their way."""
    SUSPENDED = "Suspended"
    """``spec.suspend`` is true: pods deleted, checkpoints kept. Clearing it resumes."""
    SUCCEEDED = "Succeeded"
    """The anchor published the final adapter and exited 0. Terminal."""
    FAILED = "Failed"
    """A permanent worker error, or more failures than ``maxRestarts``. Terminal."""

    def is_terminal(self) -> bool:
        return self in (JobPhase.SUCCEEDED, JobPhase.FAILED)


TRANSITIONS: dict[JobPhase, frozenset[JobPhase]] = {
    JobPhase.PENDING: frozenset(
        {JobPhase.RUNNING, JobPhase.SUSPENDED, JobPhase.SUCCEEDED, JobPhase.FAILED}
    ),
    JobPhase.RUNNING: frozenset({JobPhase.SUSPENDED, JobPhase.SUCCEEDED, JobPhase.FAILED}),
    JobPhase.SUSPENDED: frozenset({JobPhase.PENDING, JobPhase.FAILED}),
    JobPhase.SUCCEEDED: frozenset(),
    JobPhase.FAILED: frozenset(),
}


class IllegalTransitionError(ValueError):
    pass


def transition(current: JobPhase, target: JobPhase) -> JobPhase:
    """Move from ``current`` to ``target``; staying put is always allowed."""
    if target == current or target in TRANSITIONS[current]:
        return target
    raise IllegalTransitionError(f"job phase cannot go from {current} to {target}")

"""When the operator reads a job's progress records from the object store again (pure).

Progress drives the status (steps, loss, the last checkpoint), the deadline's step rates and
the moves that wait for a round boundary. A worker publishes its record when its phase
changes, when it checkpoints and at most every few seconds in between; the operator cannot
watch the store, so it reads:

* the first time it reconciles the job (after a start or a restart of the operator);
* when the job's pods changed (a pod created, scheduled, running, terminated, deleted or
  marked for disruption: :func:`pods_fingerprint`): a worker that starts, finishes or fails
  has just published, and its exit is when its last record matters;
* once per checkpoint interval (``spec.checkpoint.everySeconds``, else
  :data:`DEFAULT_REST_SECONDS`) otherwise: the cadence at which there is something new;
* every :data:`WATCHFUL_SECONDS` while a slot waits on its records to move (a shard or
  generation shard on on-demand after a fallback goes back to spot at a round boundary,
  which only its record shows);

and never more often than :data:`MIN_GAP_SECONDS` for one job. Before, every reconcile read
a job's records once they were older than 1 s: up to 1,000 GETs a second at 200 jobs of 4.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable
from dataclasses import dataclass

from cheapspot_operator.api.trainjob import TrainJobSpec, TrainJobStatus
from cheapspot_operator.cluster.views import PodView

DEFAULT_REST_SECONDS = 300.0
"""The read interval at rest when the job has no timed checkpoints (``everySeconds: 0``):
the default checkpoint interval."""
WATCHFUL_SECONDS = 5.0
"""The read interval while a move waits for a round boundary: a worker publishes its record
at most every 5 s (phase changes at once)."""
MIN_GAP_SECONDS = 1.0
"""No job's records are read more often than this, whatever its pods do."""

PodsFingerprint = Hashable


@dataclass(frozen=True)
class ProgressRead:
    """The last read of a job's records that was started: when (monotonic seconds) and what
    its pods looked like then."""

    at: float
    pods: PodsFingerprint


def pods_fingerprint(pods: Iterable[PodView]) -> PodsFingerprint:
    """What of a job's pods says its workers may have published something new."""
    return tuple(
        sorted((p.name, p.phase, p.node_name, p.deleting, p.disruption_target) for p in pods)
    )


def read_interval(spec: TrainJobSpec, status: TrainJobStatus) -> float:
    """Seconds between two reads of the job's records while its pods do not change."""
    slots = [*status.shards, *status.generators]
    if any(s.fallback_reason and not s.done for s in slots):
        return WATCHFUL_SECONDS
    every = spec.checkpoint.every_seconds
    return every if every > 0 else DEFAULT_REST_SECONDS


def read_due(
    last: ProgressRead | None,
    now: float,
    pods: PodsFingerprint,
    interval: float,
    min_gap: float = MIN_GAP_SECONDS,
) -> bool:
    """Whether to read the job's records now, given the last read started (None: never)."""
    if last is None:
        return True
    since = now - last.at
    if since < min_gap:
        return False
    return pods != last.pods or since >= interval

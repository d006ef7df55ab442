"""When the operator reads a job's progress records again: on pod changes and once per
checkpoint interval, not on every pass (issue 24: up to 1,000 GETs a second at 200 jobs)."""

from __future__ import annotations

from collections.abc import Mapping

import pytest

from cheapspot.contract import Progress
from cheapspot_operator.api.common import CapacityType
from cheapspot_operator.api.trainjob import ShardStatus, TrainJobStatus
from cheapspot_operator.testing.train import make_job, make_pod
from cheapspot_operator.trainjob.freshness import (
    DEFAULT_REST_SECONDS,
    WATCHFUL_SECONDS,
    ProgressRead,
    pods_fingerprint,
    read_due,
    read_interval,
)
from cheapspot_operator.trainjob.progress import ProgressCache

pytestmark = pytest.mark.unit

RUNNING = pods_fingerprint([make_pod(-1), make_pod(0)])


@pytest.mark.parametrize(
    ("last", "now", "pods", "due"),
    [
        (None, 0.0, RUNNING, True),  # never read: at once
        (ProgressRead(100.0, RUNNING), 101.0, RUNNING, False),  # nothing new
        (ProgressRead(100.0, RUNNING), 399.0, RUNNING, False),  # within the interval
        (ProgressRead(100.0, RUNNING), 400.0, RUNNING, True),  # the interval passed
        (ProgressRead(100.0, ()), 101.5, RUNNING, True),  # the pods changed
        (ProgressRead(100.0, ()), 100.5, RUNNING, False),  # ... but not twice a second
    ],
)
def test_a_read_is_due_on_a_pod_change_or_once_per_interval(
    last: ProgressRead | None, now: float, pods: tuple[object, ...], due: bool
) -> None:
    assert read_due(last, now, pods, interval=300.0, min_gap=1.0) is due


def test_the_pods_fingerprint_changes_with_what_a_worker_does() -> None:
    base = pods_fingerprint([make_pod(0)])
    assert pods_fingerprint([make_pod(0)]) == base
    for changed in (
        [make_pod(0, phase="Succeeded")],  # the worker finished: its last record is there
        [make_pod(0, deleting=True)],
        [make_pod(0, disruption_target=True)],
        [make_pod(0), make_pod(1)],
        [make_pod(0, attempt=1)],
    ):
        assert pods_fingerprint(changed) != base


def _status(**slot: object) -> TrainJobStatus:
    return TrainJobStatus(shards=[ShardStatus(index=0, **slot)])


def test_the_interval_is_the_checkpoint_interval_and_short_while_a_move_waits() -> None:
    assert read_interval(make_job(), _status()) == 300.0
    every60 = make_job(checkpoint={"everySteps": 20, "everySeconds": 60})
    assert read_interval(every60, _status()) == 60.0
    untimed = make_job(checkpoint={"everySteps": 20, "everySeconds": 0})
    assert read_interval(untimed, _status()) == DEFAULT_REST_SECONDS
    # On on-demand after a fallback: back to spot at a round boundary, which only the
    # record shows.
    fell_back = _status(capacity_type=CapacityType.ON_DEMAND, fallback_reason="SpotUnavailable")
    assert read_interval(make_job(), fell_back) == WATCHFUL_SECONDS
    done = _status(
        capacity_type=CapacityType.ON_DEMAND, fallback_reason="SpotUnavailable", done=True
    )
    assert read_interval(make_job(), done) == 300.0


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_job_at_rest_costs_one_read_per_checkpoint_interval() -> None:
    reads: list[str] = []

    def reader(uri: str, shards: int, generators: int) -> Mapping[int, Progress]:
        reads.append(uri)
        return {}

    clock = _Clock()
    cache = ProgressCache(reader, clock=clock)

    def reconcile(pods: object = RUNNING) -> None:
        cache.get("uid", "s3://b/j/", 2, pods=pods, interval=300.0)
        with cache.lock:
            running = cache.refreshing.get("uid")
        if running is not None:
            running.result(timeout=5)

    # A pass every 2 s for 10 minutes: the old cache read on every pass past 1 s (300 reads).
    for _ in range(300):
        reconcile()
        clock.now += 2.0
    assert len(reads) == 2  # the first pass, then 300 s later
    reconcile(pods_fingerprint([make_pod(-1), make_pod(0, phase="Succeeded")]))
    assert len(reads) == 3  # a pod changed: read at once

"""``spec.deadline`` in the CheapTrainJob planner, table-driven on a fake clock.

The job: 1 shard, 1000 steps. After 1000 s Running the shard has made 100 steps, so its
measured rate is 10 s/step: 10000 s of work, 9000 s of it left. Changeover 600 s.
"""

from __future__ import annotations

from dataclasses import replace
from datetime import timedelta

import pytest
from pydantic import ValidationError

from cheapspot.contract import Phase
from cheapspot_operator.api.common import CapacityType
from cheapspot_operator.api.phases import JobPhase
from cheapspot_operator.api.trainjob_policies import DeadlineSpec, parse_duration
from cheapspot_operator.testing.train import World, make_job, make_progress
from cheapspot_operator.testing.world import EPOCH

SHARD0 = "qa-lora-shard-0-0"


def _world(deadline: dict[str, object]) -> World:
    spec = make_job(
        shards=1,
        deadline={"changeoverSeconds": 600, **deadline},
        spot={"fallbackAfterSeconds": 3600, "maxPreemptionsPerHour": 0},
    )
    w = World(spec=spec).started()
    w.progress[0] = make_progress(0, step=100)
    w.step(1000)
    return w


def _take_spot_away(w: World) -> None:
    """The shard's node is reclaimed and no spot node is left to schedule on."""
    for name in ("spot-1", "spot-2"):
        w.nodes[name] = replace(w.nodes[name], taint_keys=frozenset({"cheapspot.dev/interruption"}))
    w.set_pod(SHARD0, node_name="spot-1")


def test_the_status_shows_the_deadline_and_the_measured_work() -> None:
    w = _world({"maxDuration": "10h"})
    d = w.status.deadline
    assert d is not None
    assert d.complete_by == EPOCH + timedelta(hours=10)
    assert d.remaining_work_seconds == 9000
    assert d.slack_seconds == 36000 - 1000 - 9000
    assert d.on_demand_shards == []
    assert w.status.shards[0].running_seconds == 1000


@pytest.mark.parametrize(
    ("policy", "max_duration", "after_preemption", "after_wait"),
    [
        # Loose: wait for spot to come back, however long.
        ("CheapSpot", "10h", CapacityType.SPOT, CapacityType.SPOT),
        ("UniformProgress", "10h", CapacityType.SPOT, CapacityType.SPOT),
        ("Greedy", "10h", CapacityType.SPOT, CapacityType.SPOT),
        # 1400 s of slack: ours waits down to its reserve (90 % of it), then on-demand.
        ("CheapSpot", "3h10m", CapacityType.SPOT, CapacityType.ON_DEMAND),
        # Uniform Progress waits while ahead of its line and falls behind it within 300 s.
        ("UniformProgress", "3h10m", CapacityType.SPOT, CapacityType.ON_DEMAND),
        # Greedy spends the slack down to the safety net: 1100 s left, it still waits.
        ("Greedy", "3h10m", CapacityType.SPOT, CapacityType.SPOT),
        # 700 s of slack: one more step of waiting is safe, then the net moves every policy.
        ("CheapSpot", "2h58m20s", CapacityType.SPOT, CapacityType.ON_DEMAND),
        ("UniformProgress", "2h58m20s", CapacityType.SPOT, CapacityType.ON_DEMAND),
        ("Greedy", "2h58m20s", CapacityType.SPOT, CapacityType.ON_DEMAND),
    ],
)
def test_when_spot_is_taken_away_the_deadline_decides_where_the_replacement_runs(
    policy: str, max_duration: str, after_preemption: CapacityType, after_wait: CapacityType
) -> None:
    w = _world({"maxDuration": max_duration, "policy": policy})
    _take_spot_away(w)
    w.step(1)
    (create,) = w.creates()
    assert create.capacity is after_preemption
    w.step(300)  # the replacement waits for spot, Pending
    slot = w.status.shards[0]
    assert slot.capacity_type is after_wait
    if after_wait is CapacityType.ON_DEMAND:
        assert slot.fallback_reason == "Deadline"
        assert w.condition("OnSpot") == ("False", "Deadline")
        assert w.status.deadline is not None and w.status.deadline.on_demand_shards == [0]
        assert w.pods[slot.pod].capacity == "on-demand"
    assert w.status.restarts == 0


def test_a_running_spot_shard_moves_to_on_demand_at_its_round_boundary_when_time_runs_short() -> (
    None
):
    w = _world({"maxDuration": "10h"})
    # The shard turns out slow: 100 steps in 3.3 h, 900 left -> 30 h of work, 6.4 h left.
    w.step(11000)
    assert w.status.shards[0].capacity_type is CapacityType.ON_DEMAND
    assert w.events("FellBackToOnDemand")
    assert w.creates() == []  # mid-round: no work thrown away
    w.progress[0] = make_progress(0, step=100, phase=Phase.WAITING)
    w.step(1)
    (create,) = w.creates()
    assert create.capacity is CapacityType.ON_DEMAND


def test_a_shard_without_a_step_rate_keeps_the_usual_rules() -> None:
    w = World(spec=make_job(shards=1, deadline={"maxDuration": "1h"})).started()
    w.step(600)
    assert w.status.shards[0].capacity_type is CapacityType.SPOT
    assert w.status.deadline is not None and w.status.deadline.remaining_work_seconds is None


def test_running_time_is_not_written_more_often_than_every_15_seconds_nor_after_the_end() -> None:
    w = _world({"maxDuration": "10h"})
    assert w.step(5) == []  # nothing else changed: no status write
    w.step(10)
    assert w.status.shards[0].running_seconds == 1015
    w.status = w.status.model_copy(update={"phase": JobPhase.SUCCEEDED})
    w.step(100)
    assert w.status.shards[0].running_seconds == 1015


def test_a_job_at_rest_writes_its_status_once_per_status_refresh_interval() -> None:
    # Cost and running time both grow every second; neither alone is worth a write more
    # often than statusRefreshSeconds (the operator's default: 120 s).
    w = _world({"maxDuration": "10h"})
    w.status_refresh_seconds = 120.0
    w.step(120)
    writes = [bool(w.step(10)) for _ in range(12)]
    assert writes == [False] * 11 + [True]
    assert w.status.shards[0].running_seconds == 1000 + 120 + 120


def test_a_deadline_needs_exactly_one_of_complete_by_and_max_duration() -> None:
    with pytest.raises(ValidationError, match="exactly one"):
        DeadlineSpec.model_validate({})
    with pytest.raises(ValidationError, match="exactly one"):
        DeadlineSpec.model_validate({"maxDuration": "1h", "completeBy": "2026-01-01T00:00:00Z"})
    with pytest.raises(ValidationError, match="maxDuration"):
        DeadlineSpec.model_validate({"maxDuration": "1 hour"})


@pytest.mark.parametrize(
    ("text", "seconds"), [("48h", 172800), ("1d12h", 129600), ("90m", 5400), ("2h30m15s", 9015)]
)
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


def test_a_shard_that_fell_back_for_spot_does_not_return_while_the_deadline_needs_on_demand() -> (
    None
):
    # 700 s of slack: the safety net wants on-demand. The shard is already there, for another
    # reason (no spot capacity); spot has room again and the round ends: it must stay.
    w = _world({"maxDuration": "2h58m20s"})
    slot = w.status.shards[0]
    w.status.shards[0] = slot.model_copy(
        update={"capacity_type": CapacityType.ON_DEMAND, "fallback_reason": "SpotUnavailable"}
    )
    w.set_pod(SHARD0, capacity="on-demand", node_name="on-demand-1")
    w.spec = w.spec.model_copy(
        update={"spot": w.spec.spot.model_copy(update={"return_after_seconds": 0})}
    )
    w.progress[0] = make_progress(0, step=100, phase=Phase.WAITING)
    for _ in range(3):
        w.step(1)
        assert w.events("ReturnedToSpot") == []
        assert w.creates() == []
    assert w.status.shards[0].capacity_type is CapacityType.ON_DEMAND

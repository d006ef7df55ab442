"""What a CheapTrainJob does when things go wrong or time runs short: its spot policy (when
to leave spot and when to return), its failure policy (transient failures, pods that cannot
start) and its deadline. Parts of the spec in :mod:`cheapspot_operator.api.trainjob`, and of
its CRD schema.
"""

from __future__ import annotations

import enum
import re
from datetime import datetime, timedelta
from typing import Annotated

from pydantic import ConfigDict, Field, model_validator

from cheapspot_operator.api.common import SpecModel, cel


class OnMaxPreemptions(enum.StrEnum):
    ON_DEMAND = "OnDemand"
    """Shards move to on-demand for the rest of the job."""
    FAIL = "Fail"
    """The job fails with reason PreemptionLimitExceeded."""


class SpotPolicy(SpecModel):
    fallback_after_seconds: Annotated[
        int,
        Field(
            alias="fallbackAfterSeconds",
            ge=0,
            le=86400,
            description="A shard that stays unschedulable on spot this long moves to on-demand; "
            "it returns to spot at the next round boundary once spot capacity is back.",
        ),
    ] = 300
    max_preemptions_per_hour: Annotated[
        int,
        Field(
            alias="maxPreemptionsPerHour",
            ge=0,
            le=1000,
            description="When the job is preempted more often than this within an hour its "
            "shards move to on-demand until the rate drops. 0 turns the rule off.",
        ),
    ] = 6
    max_preemptions: Annotated[
        int,
        Field(
            alias="maxPreemptions",
            ge=0,
            le=100000,
            description="Preemptions (reclaims, evictions under node pressure) the job takes in "
            "all; past it onMaxPreemptions applies, so a job cannot loop forever. 0: no cap.",
        ),
    ] = 100
    on_max_preemptions: Annotated[
        OnMaxPreemptions,
        Field(
            alias="onMaxPreemptions",
            description="OnDemand: each shard preempted from then on is replaced on on-demand "
            "and stays there (shards still on spot are left alone); Fail: the job fails.",
        ),
    ] = OnMaxPreemptions.ON_DEMAND
    return_after_seconds: Annotated[
        int,
        Field(
            alias="returnAfterSeconds",
            ge=0,
            le=86400,
            description="A shard that fell back returns to spot only after a matching spot node "
            "has had a free GPU this long (and only at a round boundary), so it does not flap.",
        ),
    ] = 120


class FailurePolicy(SpecModel):
    transient_retry_seconds: Annotated[
        int,
        Field(
            alias="transientRetrySeconds",
            ge=0,
            le=7 * 86400,
            description="Transient worker failures (exit 75: object store unreachable) are "
            "retried with backoff, without spending maxRestarts, for this long from the first "
            "one in a row; after it they count as failures.",
        ),
    ] = 1800
    transient_backoff_seconds: Annotated[
        int,
        Field(
            alias="transientBackoffSeconds",
            ge=1,
            le=3600,
            description="First wait before retrying after a transient failure; doubles per "
            "failure in a row, up to 10 times this.",
        ),
    ] = 10
    start_timeout_seconds: Annotated[
        int,
        Field(
            alias="startTimeoutSeconds",
            ge=10,
            le=86400,
            description="A pod that cannot start (image pull failing, a missing secret, pod "
            "creation refused by quota or admission) fails the job after this long.",
        ),
    ] = 600


DURATION_PATTERN = r"^([0-9]+d)?([0-9]+h)?([0-9]+m)?([0-9]+s)?$"


def parse_duration(text: str) -> float:
    """``1d2h30m10s`` (any part may be left out) in seconds; ValueError names bad input."""
    m = re.fullmatch(DURATION_PATTERN, text)
    if not text or m is None:
        raise ValueError(f"duration {text!r}: expected e.g. 48h, 90m, 1d12h")
    units = (86400, 3600, 60, 1)
    return float(sum(int(g[:-1]) * u for g, u in zip(m.groups(), units, strict=True) if g))


class DeadlinePolicy(enum.StrEnum):
    CHEAPSPOT = "CheapSpot"
    UNIFORM_PROGRESS = "UniformProgress"
    GREEDY = "Greedy"


class DeadlineSpec(SpecModel):
    """When the job must be finished; spot is used while that stays safe."""

    complete_by: Annotated[
        datetime | None,
        Field(
            alias="completeBy",
            description="Wall-clock time (RFC 3339) by which the final adapter must exist.",
        ),
    ] = None
    max_duration: Annotated[
        str | None,
        Field(
            alias="maxDuration",
            pattern=DURATION_PATTERN,
            min_length=2,
            max_length=32,
            description="Longest the job may take from its start, e.g. 48h or 1d12h.",
        ),
    ] = None
    changeover_seconds: Annotated[
        int,
        Field(
            alias="changeoverSeconds",
            ge=0,
            le=86400,
            description="Expected time a new pod needs before it trains (scheduling, image, "
            "model load, checkpoint restore): the price of every move between spot and "
            "on-demand, kept in reserve before the deadline.",
        ),
    ] = 600
    policy: Annotated[
        DeadlinePolicy,
        Field(
            description="CheapSpot (default), UniformProgress (Can't Be Late, NSDI'24) or "
            "Greedy; all keep the safety net that moves a shard to on-demand in time."
        ),
    ] = DeadlinePolicy.CHEAPSPOT

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                cel(
                    "has(self.completeBy) != has(self.maxDuration)",
                    "set exactly one of deadline.completeBy and deadline.maxDuration",
                )
            ]
        }
    )

    @model_validator(mode="after")
    def _one_of(self) -> DeadlineSpec:
        if (self.complete_by is None) == (self.max_duration is None):
            raise ValueError("set exactly one of deadline.completeBy and deadline.maxDuration")
        return self

    def resolve(self, start: datetime) -> datetime:
        """The deadline as a wall-clock time for a job that started at ``start``."""
        if self.complete_by is not None:
            return self.complete_by
        return start + timedelta(seconds=parse_duration(self.max_duration or ""))

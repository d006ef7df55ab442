"""Types both custom resources share: the CRD helpers (CEL rules), the base models, capacity,
pod resources, conditions, cost and budget.

Both kinds' API modules build on these; neither imports the other.
"""

from __future__ import annotations

import enum
from datetime import datetime
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field
from pydantic.config import JsonDict

GROUP = "cheapspot.dev"
VERSION = "v1alpha1"
QUANTITY_PATTERN = r"^[0-9]+(\.[0-9]+)?(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?$"


def cel(rule: str, message: str, *, field_path: str | None = None) -> JsonDict:
    out: JsonDict = {"rule": rule, "message": message}
    if field_path:
        out["fieldPath"] = field_path
    return out


def immutable(name: str) -> JsonDict:
    return cel("self == oldSelf", f"{name} is immutable after creation")


def scheme_rule(name: str, schemes: tuple[str, ...]) -> JsonDict:
    rule = " || ".join(f"self.uri.startsWith('{s}://')" for s in schemes)
    allowed = ", ".join(f"{s}://" for s in schemes)
    return cel(rule, f"{name}.uri must start with one of {allowed}", field_path=".uri")


def uri_shape_rules(name: str) -> list[JsonDict]:
    """What the contract's validator checks fully, cheaply enough for the API server's CEL
    cost budget: an s3:// URI names a bucket, a file:// URI is an absolute path."""
    return [
        cel(
            "!self.uri.startsWith('s3://') || "
            "(self.uri.size() > 5 && !self.uri.startsWith('s3:///'))",
            f"{name}.uri names no bucket: use s3://bucket/prefix/",
            field_path=".uri",
        ),
        cel(
            "!self.uri.startsWith('file://') || self.uri.startsWith('file:///')",
            f"{name}.uri is not an absolute path: use file:///dir/",
            field_path=".uri",
        ),
    ]


class SpecModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


# What each workload pod gets, a job's training shard or a pool's replica. No docstring: it
# would become the schema's description, and each kind's field describes it in its own words.
class Resources(SpecModel):
    gpu: Annotated[int, Field(ge=0, le=16, description="GPUs per pod.")] = 1
    cpu: Annotated[
        str,
        Field(pattern=QUANTITY_PATTERN, max_length=32, description="CPU request per pod."),
    ] = "4"
    memory: Annotated[
        str,
        Field(pattern=QUANTITY_PATTERN, max_length=32, description="Memory request per pod."),
    ] = "16Gi"
    instance_types: Annotated[
        list[Annotated[str, Field(max_length=64)]],
        Field(
            alias="instanceTypes",
            max_length=32,
            description="Preferred instance types, best first (a preference, not a requirement).",
        ),
    ] = []
    gpu_resource: Annotated[
        str,
        Field(
            alias="gpuResource",
            max_length=128,
            description="Extended resource name of the GPU (nvidia.com/gpu on EKS and GKE, "
            "aliyun.com/gpu-mem style names where the cluster uses them).",
        ),
    ] = "nvidia.com/gpu"
    scratch_size: Annotated[
        str,
        Field(
            alias="scratchSize",
            pattern=QUANTITY_PATTERN,
            max_length=32,
            description="Size limit of each pod's scratch volume (/tmp: the downloaded base "
            "model; a shard's dataset and the checkpoints it writes; a replica's adapters). A "
            "pod that outgrows it is evicted and the eviction counts as a failure, not a "
            "preemption: size it to the model.",
        ),
    ] = "100Gi"


class BudgetAction(enum.StrEnum):
    SUSPEND = "Suspend"
    FAIL = "Fail"


class BudgetSpec(SpecModel):
    """A spending limit; the anchor's cost counts."""

    limit_usd: Annotated[
        float,
        Field(
            alias="limitUSD",
            gt=0,
            description="Most the job may cost, in USD. Raising it resumes a job it suspended.",
        ),
    ]
    warn_at_percent: Annotated[
        int,
        Field(
            alias="warnAtPercent",
            ge=1,
            le=100,
            description="A warning event and condition when spending crosses this share.",
        ),
    ] = 80
    on_exceed: Annotated[
        BudgetAction,
        Field(
            alias="onExceed",
            description="Suspend (checkpoints kept, resumed when the limit is raised) or Fail.",
        ),
    ] = BudgetAction.SUSPEND


class CapacityType(enum.StrEnum):
    SPOT = "spot"
    ON_DEMAND = "on-demand"


class StatusModel(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    def to_patch(self) -> dict[str, Any]:
        """The status as a merge patch: the CRD's field names, unset fields left out."""
        data: dict[str, Any] = self.model_dump(mode="json", by_alias=True, exclude_none=True)
        return data


class Condition(StatusModel):
    """``metav1.Condition``."""

    type: Annotated[str, Field(description="Succeeded, Progressing, Suspended, OnSpot.")]
    status: Annotated[str, Field(description="True, False or Unknown.")]
    reason: Annotated[str, Field(description="CamelCase reason.")] = ""
    message: str = ""
    last_transition_time: Annotated[datetime | None, Field(alias="lastTransitionTime")] = None
    observed_generation: Annotated[int | None, Field(alias="observedGeneration")] = None


class CostStatus(StatusModel):
    dollars: Annotated[
        float,
        Field(description="What the job's pods cost so far, spot and on-demand at their prices."),
    ] = 0.0
    on_demand_dollars: Annotated[
        float,
        Field(alias="onDemandDollars", description="The same pod hours at on-demand prices."),
    ] = 0.0
    display: Annotated[str, Field(description="Cost for the printer column.")] = "$0.00"
    accrued_at: Annotated[datetime | None, Field(alias="accruedAt")] = None
    spot_dollars: Annotated[
        float, Field(alias="spotDollars", description="Spent on spot capacity.")
    ] = 0.0
    on_demand_spent_dollars: Annotated[
        float,
        Field(alias="onDemandSpentDollars", description="Spent on on-demand capacity."),
    ] = 0.0
    savings_ratio: Annotated[
        float,
        Field(
            alias="savingsRatio",
            description="1 - dollars / onDemandDollars: the share saved against on-demand.",
        ),
    ] = 0.0
    spot_seconds: Annotated[
        float, Field(alias="spotSeconds", description="Pod seconds on spot capacity.")
    ] = 0.0
    on_demand_seconds: Annotated[
        float, Field(alias="onDemandSeconds", description="Pod seconds on on-demand capacity.")
    ] = 0.0
    estimated: Annotated[
        bool,
        Field(
            description="Some figure used a price that was not a current observation (last "
            "known good or the static table) or a node share that was not known."
        ),
    ] = False
    sources: Annotated[
        list[str], Field(description="Where the prices came from (aws-ec2-spot, table, ...).")
    ] = []
    lost_work_seconds: Annotated[
        float,
        Field(
            alias="lostWorkSeconds",
            description="Training time redone after reclaims and restarts (each shard's steps "
            "lost times its seconds per step); 0 for pools, which lose no work.",
        ),
    ] = 0.0


class BudgetStatus(StatusModel):
    limit_usd: Annotated[float, Field(alias="limitUSD")] = 0.0
    spent_usd: Annotated[float, Field(alias="spentUSD")] = 0.0
    remaining_usd: Annotated[float, Field(alias="remainingUSD")] = 0.0
    percent: int = 0
    exceeded_at_limit_usd: Annotated[
        float | None,
        Field(
            alias="exceededAtLimitUSD",
            description="The limit that was reached; the job resumes once the limit is above it.",
        ),
    ] = None

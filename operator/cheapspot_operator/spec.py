"""The CheapTrainJob API as pydantic models: the single source of the CRD schema.

``crds/cheaptrainjobs.yaml`` is generated from these models (:mod:`cheapspot_operator.crd`),
and a unit test fails when the committed YAML drifts from them. Sub-objects that the worker
receives unchanged (model, dataset, lora, training, rounds, checkpoint) are the contract's own
models, so the spec a user writes, the CRD the API server enforces and the task a pod runs
cannot disagree.

Rules the API server enforces live next to the field they guard: bounds and enums through
pydantic constraints (they become OpenAPI ``minimum`` / ``enum``), cross-field rules and
immutability through ``x-kubernetes-validations`` (CEL) in ``json_schema_extra``.
"""

from __future__ import annotations

import enum
from datetime import datetime
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field
from pydantic.config import JsonDict

from cheapspot.contract import (
    CheckpointPolicy,
    DatasetSource,
    DistillationSettings,
    LoraSettings,
    ModelSource,
    RoundSettings,
    TrainingSettings,
)
from cheapspot_operator.phases import JobPhase

GROUP = "cheapspot.dev"
VERSION = "v1alpha1"
KIND = "CheapTrainJob"
PLURAL = "cheaptrainjobs"
SINGULAR = "cheaptrainjob"
SHORT_NAMES = ("ctj",)
MAX_SHARDS = 256
MAX_NAME_LENGTH = 40
"""Pod names (``<job>-shard-<i>-<attempt>``) and label values derive from it: kept short."""

QUANTITY_PATTERN = r"^[0-9]+(\.[0-9]+)?(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?$"


def _cel(rule: str, message: str, *, field_path: str | None = None) -> JsonDict:
    out: JsonDict = {"rule": rule, "message": message}
    if field_path:
        out["fieldPath"] = field_path
    return out


def _immutable(name: str) -> JsonDict:
    return _cel("self == oldSelf", f"{name} is immutable after creation")


def _scheme_rule(name: str, schemes: tuple[str, ...]) -> JsonDict:
    rule = " || ".join(f"self.uri.startsWith('{s}://')" for s in schemes)
    allowed = ", ".join(f"{s}://" for s in schemes)
    return _cel(rule, f"{name}.uri must start with one of {allowed}", field_path=".uri")


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class OutputTarget(_Spec):
    uri: Annotated[
        str,
        Field(
            min_length=6,
            max_length=1024,
            description="Job prefix in object storage (s3:// or file://): checkpoints, round "
            "results and the final PEFT adapter land under it. Kept when the job is deleted.",
        ),
    ]


class Resources(_Spec):
    gpu: Annotated[int, Field(ge=0, le=16, description="GPUs per shard pod.")] = 1
    cpu: Annotated[
        str,
        Field(pattern=QUANTITY_PATTERN, max_length=32, description="CPU request per shard pod."),
    ] = "4"
    memory: Annotated[
        str,
        Field(pattern=QUANTITY_PATTERN, max_length=32, description="Memory request per shard pod."),
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


class AnchorSpec(_Spec):
    gpu: Annotated[
        int,
        Field(
            ge=0, le=16, description="GPUs for the anchor pod; 0 (default) runs it on a CPU node."
        ),
    ] = 0
    cpu: Annotated[
        str, Field(pattern=QUANTITY_PATTERN, max_length=32, description="CPU request.")
    ] = "1"
    memory: Annotated[
        str, Field(pattern=QUANTITY_PATTERN, max_length=32, description="Memory request.")
    ] = "2Gi"


class SpotPolicy(_Spec):
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


class TrainJobSpec(_Spec):
    """What a user asks for: a LoRA fine-tuning job, split into shards that run on spot."""

    model: Annotated[
        ModelSource,
        Field(
            description="The base model (Hugging Face format).",
            json_schema_extra={
                "x-kubernetes-validations": [
                    _scheme_rule("model", ("s3", "file", "hf")),
                    _immutable("model"),
                ]
            },
        ),
    ]
    dataset: Annotated[
        DatasetSource,
        Field(
            description="The training data (JSONL).",
            json_schema_extra={
                "x-kubernetes-validations": [
                    _scheme_rule("dataset", ("s3", "file")),
                    _immutable("dataset"),
                ]
            },
        ),
    ]
    output: Annotated[
        OutputTarget,
        Field(
            description="Where the job writes everything.",
            json_schema_extra={
                "x-kubernetes-validations": [
                    _scheme_rule("output", ("s3", "file")),
                    _immutable("output"),
                ]
            },
        ),
    ]
    lora: Annotated[
        LoraSettings,
        Field(
            description="LoRA adapter settings.",
            json_schema_extra={"x-kubernetes-validations": [_immutable("lora")]},
        ),
    ] = LoraSettings()
    training: Annotated[
        TrainingSettings,
        Field(
            description="Optimizer settings.",
            json_schema_extra={"x-kubernetes-validations": [_immutable("training")]},
        ),
    ] = TrainingSettings()
    shards: Annotated[
        int,
        Field(
            ge=1,
            le=MAX_SHARDS,
            description="Deterministic dataset slices, one spot pod each.",
            json_schema_extra={"x-kubernetes-validations": [_immutable("shards")]},
        ),
    ] = 1
    rounds: Annotated[
        RoundSettings,
        Field(
            description="DiLoCo-style rounds: local steps per round and the outer optimizer.",
            json_schema_extra={"x-kubernetes-validations": [_immutable("rounds")]},
        ),
    ] = RoundSettings()
    checkpoint: Annotated[
        CheckpointPolicy, Field(description="When shards checkpoint within a round.")
    ] = CheckpointPolicy()
    distillation: Annotated[
        DistillationSettings | None,
        Field(
            description="Distil a teacher model into the student (model + LoRA). logits mode: "
            "the teacher, frozen, runs next to the student in every shard pod, so "
            "resources must fit both. Teacher and student must share a tokenizer.",
            json_schema_extra={
                "x-kubernetes-validations": [
                    _cel(
                        "self.teacher.uri.startsWith('s3://') || "
                        "self.teacher.uri.startsWith('file://') || "
                        "self.teacher.uri.startsWith('hf://')",
                        "distillation.teacher.uri must start with one of s3://, file://, hf://",
                        field_path=".teacher.uri",
                    ),
                    _cel(
                        "!has(self.teacher.adapterUri) || "
                        "self.teacher.adapterUri.startsWith('s3://') || "
                        "self.teacher.adapterUri.startsWith('file://')",
                        "distillation.teacher.adapterUri must start with one of s3://, file://",
                        field_path=".teacher.adapterUri",
                    ),
                    _immutable("distillation"),
                ]
            },
        ),
    ] = None
    resources: Annotated[Resources, Field(description="What each shard pod gets.")] = Resources()
    anchor: Annotated[
        AnchorSpec, Field(description="The coordinating pod, always on on-demand capacity.")
    ] = AnchorSpec()
    spot: Annotated[SpotPolicy, Field(description="When to leave spot and when to return.")] = (
        SpotPolicy()
    )
    max_restarts: Annotated[
        int,
        Field(
            alias="maxRestarts",
            ge=0,
            le=1000,
            description="Failures (not preemptions) tolerated before the job fails.",
        ),
    ] = 3
    suspend: Annotated[
        bool,
        Field(description="True deletes the job's pods and keeps its checkpoints; false resumes."),
    ] = False

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                _cel(
                    "!has(self.rounds) || !has(self.rounds.quorum) "
                    "|| self.rounds.quorum <= self.shards",
                    "rounds.quorum must not exceed shards",
                    field_path=".rounds.quorum",
                ),
                _cel(
                    "!has(self.training) || !has(self.rounds) || "
                    "self.rounds.localSteps <= self.training.steps",
                    "rounds.localSteps must not exceed training.steps",
                    field_path=".rounds.localSteps",
                ),
                _cel(
                    "has(self.distillation) == has(oldSelf.distillation)",
                    "distillation cannot be added or removed after creation",
                    field_path=".distillation",
                ),
            ]
        }
    )


# --- status -----------------------------------------------------------------------------


class CapacityType(enum.StrEnum):
    SPOT = "spot"
    ON_DEMAND = "on-demand"


class _Status(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)


class Condition(_Status):
    """``metav1.Condition``."""

    type: Annotated[str, Field(description="Succeeded, Progressing, Suspended, OnSpot.")]
    status: Annotated[str, Field(description="True, False or Unknown.")]
    reason: Annotated[str, Field(description="CamelCase reason.")] = ""
    message: str = ""
    last_transition_time: Annotated[datetime | None, Field(alias="lastTransitionTime")] = None
    observed_generation: Annotated[int | None, Field(alias="observedGeneration")] = None


class ShardStatus(_Status):
    """One shard's (or the anchor's) placement and history."""

    index: Annotated[int, Field(description="Shard index; the anchor is -1.")] = 0
    attempt: Annotated[
        int, Field(description="Pod incarnation: the pod is <job>-shard-<i>-<attempt>.")
    ] = 0
    pod: str = ""
    node: str = ""
    capacity_type: Annotated[
        CapacityType,
        Field(alias="capacityType", description="Where the shard is meant to run now."),
    ] = CapacityType.SPOT
    pod_phase: Annotated[str, Field(alias="podPhase")] = ""
    restarts: Annotated[
        int, Field(description="Failures of this shard that spent the restart budget.")
    ] = 0
    preemptions: Annotated[int, Field(description="Times this shard was preempted.")] = 0
    done: Annotated[bool, Field(description="The shard's worker finished all its rounds.")] = False
    round: int | None = None
    step: int | None = None
    loss: float | None = None
    fallback_reason: Annotated[str, Field(alias="fallbackReason")] = ""


class ProgressStatus(_Status):
    round: int = 0
    rounds: int = 0
    step: Annotated[int, Field(description="Steps done by the slowest shard.")] = 0
    total_steps: Annotated[int, Field(alias="totalSteps")] = 0
    loss: Annotated[float | None, Field(description="Mean of the shards' latest losses.")] = None
    percent: int = 0


class CheckpointStatus(_Status):
    shard: int = 0
    step: int = 0
    uri: str = ""


class CostStatus(_Status):
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


class DistillationStatus(_Status):
    """How the job distils, and where the distillation is."""

    mode: Annotated[str, Field(description="logits.")] = ""
    teacher: Annotated[str, Field(description="The teacher model's URI.")] = ""
    phase: Annotated[
        str,
        Field(
            description="pending, training (the student learns from the teacher's logits in "
            "every shard), suspended, done or failed."
        ),
    ] = ""


class TrainJobStatus(_Status):
    phase: Annotated[
        JobPhase, Field(description="Pending, Running, Suspended, Succeeded or Failed.")
    ] = JobPhase.PENDING
    reason: Annotated[str, Field(description="CamelCase reason of a terminal phase.")] = ""
    message: str = ""
    observed_generation: Annotated[int, Field(alias="observedGeneration")] = 0
    conditions: list[Condition] = []
    anchor: ShardStatus | None = None
    shards: list[ShardStatus] = []
    spot_shards: Annotated[int, Field(alias="spotShards")] = 0
    on_demand_shards: Annotated[int, Field(alias="onDemandShards")] = 0
    shards_display: Annotated[
        str, Field(alias="shardsDisplay", description="spot/on-demand for the printer column.")
    ] = "0/0"
    preemptions: int = 0
    restarts: int = 0
    recent_preemptions: Annotated[
        list[datetime],
        Field(alias="recentPreemptions", description="Preemption times within the last hour."),
    ] = []
    progress: ProgressStatus = ProgressStatus()
    progress_display: Annotated[str, Field(alias="progressDisplay")] = ""
    last_checkpoint: Annotated[CheckpointStatus | None, Field(alias="lastCheckpoint")] = None
    start_time: Annotated[datetime | None, Field(alias="startTime")] = None
    completion_time: Annotated[datetime | None, Field(alias="completionTime")] = None
    cost: CostStatus = CostStatus()
    distillation: DistillationStatus | None = None

    def to_patch(self) -> dict[str, Any]:
        data: dict[str, Any] = self.model_dump(mode="json", by_alias=True, exclude_none=True)
        return data


def parse_spec(raw: dict[str, Any]) -> TrainJobSpec:
    return TrainJobSpec.model_validate(raw)


def parse_status(raw: dict[str, Any] | None) -> TrainJobStatus:
    return TrainJobStatus.model_validate(raw or {})

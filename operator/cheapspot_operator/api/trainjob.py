"""The CheapTrainJob API as pydantic models: the single source of the CRD schema.

``crds/cheaptrainjobs.yaml`` is generated from these models (:mod:`cheapspot_operator.api.crd`),
and a unit test fails when the committed YAML drifts from them. Sub-objects that the worker
receives unchanged (model, dataset, lora, training, rounds, checkpoint) are the contract's own
models, so the spec a user writes, the CRD the API server enforces and the task a pod runs
cannot disagree. The spot, failure and deadline policies are in
:mod:`cheapspot_operator.api.trainjob_policies`.

Rules the API server enforces live next to the field they guard: bounds and enums through
pydantic constraints (they become OpenAPI ``minimum`` / ``enum``), cross-field rules and
immutability through ``x-kubernetes-validations`` (CEL) in ``json_schema_extra``.
"""

from __future__ import annotations

import enum
from datetime import datetime
from typing import Annotated, Any

from pydantic import ConfigDict, Field, field_validator

from cheapspot.contract import (
    CheckpointPolicy,
    DatasetSource,
    DistillationSettings,
    LoraSettings,
    ModelSource,
    RoundSettings,
    TrainingSettings,
    check_uri,
)
from cheapspot_operator.api.common import (
    QUANTITY_PATTERN,
    BudgetSpec,
    BudgetStatus,
    CapacityType,
    Condition,
    CostStatus,
    Resources,
    SpecModel,
    StatusModel,
    cel,
    immutable,
    scheme_rule,
    uri_shape_rules,
)
from cheapspot_operator.api.phases import JobPhase
from cheapspot_operator.api.trainjob_policies import DeadlineSpec, FailurePolicy, SpotPolicy

KIND = "CheapTrainJob"
PLURAL = "cheaptrainjobs"
SINGULAR = "cheaptrainjob"
SHORT_NAMES = ("ctj",)
MAX_SHARDS = 256
MAX_NAME_LENGTH = 40
"""Pod names (``<job>-shard-<i>-<attempt>``) and label values derive from it: kept short."""


class IfOutputExists(enum.StrEnum):
    REFUSE = "Refuse"
    """A prefix another job claimed, or one holding a finished adapter, fails this job."""
    RESUME = "Resume"
    """Take the prefix over and continue from what is there (its checkpoints, its final
    adapter: a finished result makes the job succeed at once). Nothing is deleted."""


class OutputTarget(SpecModel):
    uri: Annotated[
        str,
        Field(
            min_length=6,
            max_length=1024,
            description="Job prefix in object storage (s3:// or file://): checkpoints, round "
            "results and the final PEFT adapter land under it. Kept when the job is deleted.",
        ),
    ]

    if_exists: Annotated[
        IfOutputExists,
        Field(
            alias="ifExists",
            description="When the prefix belongs to another job (also one deleted and "
            "re-applied: a new object is a new job) or holds a finished result: Refuse (the "
            "job fails saying whose it is) or Resume (take it over and continue).",
        ),
    ] = IfOutputExists.REFUSE

    @field_validator("uri")
    @classmethod
    def _uri(cls, v: str) -> str:
        return check_uri(v, ("s3", "file"))


class AnchorSpec(SpecModel):
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


class TrainJobSpec(SpecModel):
    """What a user asks for: a LoRA fine-tuning job, split into shards that run on spot."""

    model: Annotated[
        ModelSource,
        Field(
            description="The base model (Hugging Face format).",
            json_schema_extra={
                "x-kubernetes-validations": [
                    scheme_rule("model", ("s3", "file", "hf")),
                    *uri_shape_rules("model"),
                    immutable("model"),
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
                    scheme_rule("dataset", ("s3", "file")),
                    *uri_shape_rules("dataset"),
                    immutable("dataset"),
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
                    scheme_rule("output", ("s3", "file")),
                    *uri_shape_rules("output"),
                    immutable("output"),
                ]
            },
        ),
    ]
    lora: Annotated[
        LoraSettings,
        Field(
            description="LoRA adapter settings.",
            json_schema_extra={"x-kubernetes-validations": [immutable("lora")]},
        ),
    ] = LoraSettings()
    training: Annotated[
        TrainingSettings,
        Field(
            description="Optimizer settings.",
            json_schema_extra={"x-kubernetes-validations": [immutable("training")]},
        ),
    ] = TrainingSettings()
    shards: Annotated[
        int,
        Field(
            ge=1,
            le=MAX_SHARDS,
            description="Deterministic dataset slices, one spot pod each.",
            json_schema_extra={"x-kubernetes-validations": [immutable("shards")]},
        ),
    ] = 1
    rounds: Annotated[
        RoundSettings,
        Field(
            description="DiLoCo-style rounds: local steps per round and the outer optimizer.",
            json_schema_extra={"x-kubernetes-validations": [immutable("rounds")]},
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
            "resources must fit both; teacher and student must share a tokenizer. sequences "
            "mode: generation pods (the serving image, vLLM) first complete the dataset's "
            "prompts with the teacher, then the student trains on the completions.",
            json_schema_extra={
                "x-kubernetes-validations": [
                    cel(
                        "self.teacher.uri.startsWith('s3://') || "
                        "self.teacher.uri.startsWith('file://') || "
                        "self.teacher.uri.startsWith('hf://')",
                        "distillation.teacher.uri must start with one of s3://, file://, hf://",
                        field_path=".teacher.uri",
                    ),
                    cel(
                        "!has(self.teacher.adapterUri) || "
                        "self.teacher.adapterUri.startsWith('s3://') || "
                        "self.teacher.adapterUri.startsWith('file://')",
                        "distillation.teacher.adapterUri must start with one of s3://, file://",
                        field_path=".teacher.adapterUri",
                    ),
                    immutable("distillation"),
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
    deadline: Annotated[
        DeadlineSpec | None,
        Field(
            description="Finish by a time: shards use spot while the deadline allows and move "
            "to on-demand in time to meet it."
        ),
    ] = None
    budget: Annotated[
        BudgetSpec | None,
        Field(description="A spending limit: warn, then suspend or fail the job at it."),
    ] = None
    max_restarts: Annotated[
        int,
        Field(
            alias="maxRestarts",
            ge=0,
            le=1000,
            description="Failures (not preemptions, not transient failures) tolerated per "
            "shard (and for the anchor) before the job fails.",
        ),
    ] = 3
    failure_policy: Annotated[
        FailurePolicy,
        Field(
            alias="failurePolicy",
            description="How long transient failures and pods that cannot start are waited on.",
        ),
    ] = FailurePolicy()
    priority_class_name: Annotated[
        str | None,
        Field(
            alias="priorityClassName",
            max_length=253,
            description="PriorityClass of the job's pods (default: the operator's setting).",
        ),
    ] = None
    suspend: Annotated[
        bool,
        Field(description="True deletes the job's pods and keeps its checkpoints; false resumes."),
    ] = False

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                cel(
                    "!has(self.rounds) || !has(self.rounds.quorum) "
                    "|| self.rounds.quorum <= self.shards",
                    "rounds.quorum must not exceed shards",
                    field_path=".rounds.quorum",
                ),
                cel(
                    "!has(self.training) || !has(self.rounds) || "
                    "self.rounds.localSteps <= self.training.steps",
                    "rounds.localSteps must not exceed training.steps",
                    field_path=".rounds.localSteps",
                ),
                cel(
                    "has(self.distillation) == has(oldSelf.distillation)",
                    "distillation cannot be added or removed after creation",
                    field_path=".distillation",
                ),
            ]
        }
    )


# --- status -----------------------------------------------------------------------------


class ShardStatus(StatusModel):
    """One shard's (or the anchor's) placement and history."""

    index: Annotated[
        int,
        Field(description="Shard index; the anchor is -1, generation shard i is 1000 + i."),
    ] = 0
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
    transient_failures: Annotated[
        int,
        Field(
            alias="transientFailures",
            description="Transient failures in a row (reset once the slot makes progress).",
        ),
    ] = 0
    transient_since: Annotated[
        datetime | None,
        Field(alias="transientSince", description="The first transient failure in a row."),
    ] = None
    retry_after: Annotated[
        datetime | None,
        Field(
            alias="retryAfter",
            description="After a transient failure the next pod starts after this.",
        ),
    ] = None
    transient_message: Annotated[
        str, Field(alias="transientMessage", description="The last transient failure.")
    ] = ""
    blocked_reason: Annotated[
        str,
        Field(
            alias="blockedReason",
            description="Why the slot's pod cannot start (ImagePullBackOff, CreateRefused...).",
        ),
    ] = ""
    blocked_message: Annotated[str, Field(alias="blockedMessage")] = ""
    blocked_since: Annotated[datetime | None, Field(alias="blockedSince")] = None
    running_seconds: Annotated[
        float,
        Field(
            alias="runningSeconds",
            description="Time this shard's pods were Running (its step rate, for the "
            "deadline policy, lost work and the budget's horizon).",
        ),
    ] = 0.0


class ProgressStatus(StatusModel):
    round: int = 0
    rounds: int = 0
    step: Annotated[int, Field(description="Steps done by the slowest shard.")] = 0
    total_steps: Annotated[int, Field(alias="totalSteps")] = 0
    loss: Annotated[float | None, Field(description="Mean of the shards' latest losses.")] = None
    percent: int = 0


class CheckpointStatus(StatusModel):
    shard: int = 0
    step: int = 0
    uri: str = ""


class DeadlineStatus(StatusModel):
    complete_by: Annotated[
        datetime | None, Field(alias="completeBy", description="The deadline, resolved.")
    ] = None
    evaluated_at: Annotated[datetime | None, Field(alias="evaluatedAt")] = None
    remaining_work_seconds: Annotated[
        float | None,
        Field(
            alias="remainingWorkSeconds",
            description="Estimated training time left for the slowest shard (its step rate).",
        ),
    ] = None
    slack_seconds: Annotated[
        float | None,
        Field(
            alias="slackSeconds",
            description="Time that may still pass without progress before the deadline.",
        ),
    ] = None
    on_demand_shards: Annotated[
        list[int],
        Field(alias="onDemandShards", description="Shards the deadline keeps on on-demand."),
    ] = []


class DistillationStatus(StatusModel):
    """How the job distils, and where the distillation is."""

    mode: Annotated[str, Field(description="logits or sequences.")] = ""
    teacher: Annotated[str, Field(description="The teacher model's URI.")] = ""
    phase: Annotated[
        str,
        Field(
            description="pending, generating (sequences mode: the teacher writes completions "
            "for the prompts), training (the student learns from the teacher's logits, or "
            "from its completions), suspended, done or failed."
        ),
    ] = ""
    generated: Annotated[
        int | None,
        Field(description="sequences mode: records the teacher has completed and published."),
    ] = None
    records: Annotated[
        int | None, Field(description="sequences mode: records to generate (0 until known).")
    ] = None


class TrainJobStatus(StatusModel):
    phase: Annotated[
        JobPhase, Field(description="Pending, Running, Suspended, Succeeded or Failed.")
    ] = JobPhase.PENDING
    reason: Annotated[str, Field(description="CamelCase reason of a terminal phase.")] = ""
    message: str = ""
    observed_generation: Annotated[int, Field(alias="observedGeneration")] = 0
    conditions: list[Condition] = []
    anchor: ShardStatus | None = None
    shards: list[ShardStatus] = []
    generators: Annotated[
        list[ShardStatus],
        Field(
            description="sequences-mode distillation: the generation shards (pods "
            "<job>-gen-<i>-<attempt>), which run before the anchor and the training shards."
        ),
    ] = []
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
    spot_free_since: Annotated[
        datetime | None,
        Field(
            alias="spotFreeSince",
            description="Since when a matching spot node has had a free GPU (return to spot).",
        ),
    ] = None
    start_time: Annotated[datetime | None, Field(alias="startTime")] = None
    completion_time: Annotated[datetime | None, Field(alias="completionTime")] = None
    running_accrued_at: Annotated[
        datetime | None,
        Field(alias="runningAccruedAt", description="When shards' runningSeconds last grew."),
    ] = None
    cost: CostStatus = CostStatus()
    deadline: DeadlineStatus | None = None
    budget: BudgetStatus | None = None
    distillation: DistillationStatus | None = None


def parse_spec(raw: dict[str, Any]) -> TrainJobSpec:
    return TrainJobSpec.model_validate(raw)


def parse_status(raw: dict[str, Any] | None) -> TrainJobStatus:
    return TrainJobStatus.model_validate(raw or {})

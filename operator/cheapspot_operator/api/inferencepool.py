"""The CheapInferencePool API as pydantic models: the single source of its CRD schema.

``crds/cheapinferencepools.yaml`` is generated from these models (:mod:`cheapspot_operator.api.crd`)
like the CheapTrainJob's. What a replica receives unchanged (model, adapters, engine) is the
contract's own models, so the spec, the CRD and the replica's task cannot disagree.

A pool has ``replicas`` replica slots; the first ``anchor.replicas`` are anchors (on-demand,
never drained for a reclaim, never scaled away), the rest run on spot and fall back to
on-demand when spot is missing. ``spec.replicas`` is the scale subresource's field.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from pydantic import ConfigDict, Field, model_validator

from cheapspot.contract import AdapterSource, EngineSettings, ModelSource
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
)
from cheapspot_operator.api.trainjob_policies import FailurePolicy

KIND = "CheapInferencePool"
PLURAL = "cheapinferencepools"
SINGULAR = "cheapinferencepool"
SHORT_NAMES = ("cip",)
MAX_REPLICAS = 256
MAX_ADAPTERS = 256
MAX_NAME_LENGTH = 40
"""Pod names (``<pool>-replica-<i>-<attempt>``) and label values derive from it."""


class PoolAnchor(SpecModel):
    replicas: Annotated[
        int,
        Field(
            ge=0,
            le=MAX_REPLICAS,
            description="Replicas on on-demand capacity: never drained for a reclaim, never "
            "scaled away (spec.replicas cannot go below it).",
        ),
    ] = 1


class PoolSpotPolicy(SpecModel):
    fallback_after_seconds: Annotated[
        int,
        Field(
            alias="fallbackAfterSeconds",
            ge=0,
            le=86400,
            description="A spot replica that stays unschedulable this long moves to on-demand "
            "(condition SpotUnavailable); it returns to spot once a spot node with a free GPU "
            "exists, the new spot replica Ready before the on-demand one is drained.",
        ),
    ] = 120


SECRET_NAME_PATTERN = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"
SECRET_KEY_PATTERN = r"^[-._a-zA-Z0-9]+$"


class ApiKeysSpec(SpecModel):
    """Where the pool's API keys are: a Secret in the pool's namespace, one of whose keys
    holds a YAML list of keys, each with the models it may use."""

    secret_name: Annotated[
        str,
        Field(
            alias="secretName",
            min_length=1,
            max_length=253,
            pattern=SECRET_NAME_PATTERN,
            description="The Secret (in the pool's namespace). Its key holds "
            "`keys: [{name, key, models}]`: `key` the bearer token clients send "
            "(Authorization: Bearer), `name` for logs, `models` the base model and adapter "
            "names it may use (absent: all). Edits reach the routers within seconds.",
        ),
    ]
    key: Annotated[
        str,
        Field(
            min_length=1,
            max_length=253,
            pattern=SECRET_KEY_PATTERN,
            description="The Secret's key that holds the list.",
        ),
    ] = "keys.yaml"


class RouterSpec(SpecModel):
    api_keys: Annotated[
        ApiKeysSpec | None,
        Field(
            alias="apiKeys",
            description="Client authentication: every request needs one of these keys "
            "(401 without, 403 for a model its key may not use). Absent: the endpoint "
            "takes every request from inside the cluster.",
        ),
    ] = None
    replicas: Annotated[
        int, Field(ge=1, le=16, description="Router pods (on on-demand capacity).")
    ] = 1
    max_queue_seconds: Annotated[
        float,
        Field(
            alias="maxQueueSeconds",
            gt=0,
            le=3600,
            description="How long a request may wait for a free replica before it is refused "
            "(HTTP 503).",
        ),
    ] = 30.0
    first_token_seconds: Annotated[
        float,
        Field(
            alias="firstTokenSeconds",
            gt=0,
            le=3600,
            description="How long a replica may take to send a stream's first chunk before "
            "the router counts it stalled and sends the request to another replica.",
        ),
    ] = 60.0
    stall_seconds: Annotated[
        float,
        Field(
            alias="stallSeconds",
            gt=0,
            le=3600,
            description="How long a replica may go silent between two chunks of a stream "
            "before the router counts it stalled and resumes the stream on another replica.",
        ),
    ] = 20.0
    drain_seconds: Annotated[
        int,
        Field(
            alias="drainSeconds",
            ge=0,
            le=86400,
            description="The longest stream the router lets finish when it stops (a rollout, "
            "a node drain): its grace period covers this (and maxQueueSeconds, whichever is "
            "longer) plus a margin to exit. A stream still running then is cut; the router's "
            "own streams cannot be resumed by another router.",
        ),
    ] = 600
    max_request_bytes: Annotated[
        int,
        Field(
            alias="maxRequestBytes",
            ge=1024,
            le=2**30,
            description="The largest request body a router takes (bytes); larger gets a 413. "
            "The default 2 MiB holds a 128k-token prompt as text or token ids.",
        ),
    ] = 2 * 1024 * 1024
    max_concurrent_requests: Annotated[
        int,
        Field(
            alias="maxConcurrentRequests",
            ge=1,
            le=1_000_000,
            description="Client requests one router carries at once, streams until their last "
            "byte; more get a 429 with Retry-After. The default 1024 fits the default memory "
            "(about 75 KiB a stream of an 8k context, with its resume state).",
        ),
    ] = 1024
    max_queued_requests: Annotated[
        int,
        Field(
            alias="maxQueuedRequests",
            ge=0,
            le=1_000_000,
            description="Requests one router lets wait for a free replica (every replica at "
            "its capacity, or none ready); a request that would wait behind more gets a 503 "
            "with Retry-After. Retries and resumes of requests already under way always wait.",
        ),
    ] = 256
    max_buffered_bytes: Annotated[
        int,
        Field(
            alias="maxBufferedBytes",
            ge=1024,
            le=2**40,
            description="Bytes of request bodies one router holds whole at once (a request's "
            "while it waits, a non-streamed one's until it is answered, for a retry); a "
            "request that would pass it gets a 503 with Retry-After. At least "
            "maxRequestBytes. Raise it with memory.",
        ),
    ] = 32 * 1024 * 1024
    cpu: Annotated[
        str, Field(pattern=QUANTITY_PATTERN, max_length=32, description="CPU request per router.")
    ] = "500m"
    memory: Annotated[
        str,
        Field(pattern=QUANTITY_PATTERN, max_length=32, description="Memory request per router."),
    ] = "256Mi"

    @model_validator(mode="after")
    def _body_fits_buffer(self) -> RouterSpec:
        # The CRD's CEL rule says the same.
        if self.max_buffered_bytes < self.max_request_bytes:
            raise ValueError(
                f"router.maxBufferedBytes ({self.max_buffered_bytes}) must be at least "
                f"router.maxRequestBytes ({self.max_request_bytes})"
            )
        return self

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                cel(
                    "!has(self.maxBufferedBytes) || !has(self.maxRequestBytes) "
                    "|| self.maxBufferedBytes >= self.maxRequestBytes",
                    "maxBufferedBytes must be at least maxRequestBytes",
                    field_path=".maxBufferedBytes",
                ),
            ]
        }
    )


class InferencePoolSpec(SpecModel):
    """What a user asks for: one base model with LoRA adapters, served by replicas on spot."""

    model: Annotated[
        ModelSource,
        Field(
            description="The base model (Hugging Face format). Immutable: a new model is a "
            "new pool.",
            json_schema_extra={
                "x-kubernetes-validations": [
                    scheme_rule("model", ("s3", "file", "hf")),
                    immutable("model"),
                ]
            },
        ),
    ]
    adapters: Annotated[
        list[AdapterSource],
        Field(
            max_length=MAX_ADAPTERS,
            description="LoRA adapters, served by name in the OpenAI `model` field. Adding or "
            "removing one loads or unloads it on the running replicas, without a restart.",
            json_schema_extra={
                "x-kubernetes-list-type": "map",
                "x-kubernetes-list-map-keys": ["name"],
            },
        ),
    ] = []
    replicas: Annotated[
        int,
        Field(
            ge=0,
            le=MAX_REPLICAS,
            description="Replicas in all, anchors included (the scale subresource's field: "
            "kubectl scale, an HPA or KEDA drive it). Scaling down removes on-demand "
            "fallback replicas first, then spot ones, never an anchor.",
        ),
    ] = 1
    anchor: Annotated[
        PoolAnchor, Field(description="Replicas on on-demand capacity that are never reclaimed.")
    ] = PoolAnchor()
    engine: Annotated[
        EngineSettings,
        Field(
            description="vLLM options (maxNumSeqs, maxLoras, maxLoraRank, maxModelLen, "
            "shutdownTimeoutSeconds: how long a replica drains on SIGTERM, args).",
            json_schema_extra={"x-kubernetes-validations": [immutable("engine")]},
        ),
    ] = EngineSettings()
    resources: Annotated[
        Resources,
        Field(
            description="What each replica pod gets.",
            json_schema_extra={"x-kubernetes-validations": [immutable("resources")]},
        ),
    ] = Resources()
    spot: Annotated[PoolSpotPolicy, Field(description="When to leave spot and return.")] = (
        PoolSpotPolicy()
    )
    router: Annotated[RouterSpec, Field(description="The pool's endpoint.")] = RouterSpec()
    failure_policy: Annotated[
        FailurePolicy,
        Field(
            alias="failurePolicy",
            description="Replica failures: transient exits (75) are retried with backoff "
            "without counting as failures for transientRetrySeconds; a replica that cannot "
            "start (image pull, missing secret, create refused) holds its slot (condition "
            "Degraded) after startTimeoutSeconds.",
        ),
    ] = FailurePolicy()
    budget: Annotated[
        BudgetSpec | None,
        Field(
            description="A spending limit; the anchors' cost counts. At the limit (with the "
            "running replicas' next 5 minutes projected) Suspend keeps only the anchors "
            "serving, Fail stops every replica; raising the limit brings the replicas back."
        ),
    ] = None

    @model_validator(mode="after")
    def _anchors_fit(self) -> InferencePoolSpec:
        # The CRD's CEL rule says the same; this keeps the operator's own reading honest.
        if self.replicas < self.anchor.replicas:
            raise ValueError(
                f"replicas ({self.replicas}) must not be below anchor.replicas "
                f"({self.anchor.replicas}): anchors are never scaled away"
            )
        return self

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                cel(
                    "!has(self.anchor) || !has(self.replicas) "
                    "|| self.replicas >= self.anchor.replicas",
                    "replicas must not be below anchor.replicas (anchors are never scaled away)",
                    field_path=".replicas",
                ),
                cel(
                    "!has(self.anchor) || !has(oldSelf.anchor) "
                    "|| self.anchor.replicas == oldSelf.anchor.replicas",
                    "anchor.replicas is immutable after creation",
                    field_path=".anchor.replicas",
                ),
            ]
        }
    )


# --- status -----------------------------------------------------------------------------


class ReplicaSlot(StatusModel):
    """One replica slot: its current pod and where it is meant to run."""

    index: Annotated[int, Field(description="Slot index (the pod's cheapspot.dev/replica).")] = 0
    anchor: Annotated[bool, Field(description="An anchor slot: on-demand, never reclaimed.")] = (
        False
    )
    attempt: Annotated[
        int, Field(description="Pod incarnation: the pod is <pool>-replica-<i>-<attempt>.")
    ] = 0
    pod: str = ""
    node: str = ""
    capacity_type: Annotated[
        CapacityType,
        Field(alias="capacityType", description="Where the slot is meant to run now."),
    ] = CapacityType.SPOT
    pod_phase: Annotated[str, Field(alias="podPhase")] = ""
    ready: bool = False
    fallback_reason: Annotated[str, Field(alias="fallbackReason")] = ""
    preemptions: int = 0
    failures: Annotated[
        int, Field(description="Failed pods in a row (not reclaims); reset once Ready.")
    ] = 0
    held: Annotated[
        str,
        Field(
            description="Why the slot is not recreated (a permanent replica error or a crash "
            "loop); cleared when the spec changes."
        ),
    ] = ""
    held_generation: Annotated[int, Field(alias="heldGeneration")] = 0
    transient_failures: Annotated[
        int,
        Field(
            alias="transientFailures",
            description="Transient failures (exit 75) in a row; reset once Ready.",
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
    blocked_reason: Annotated[
        str,
        Field(alias="blockedReason", description="Why the slot's pod cannot start, if it cannot."),
    ] = ""
    blocked_since: Annotated[datetime | None, Field(alias="blockedSince")] = None
    spot_return_after: Annotated[
        datetime | None,
        Field(
            alias="spotReturnAfter",
            description="A return to spot that failed is not tried again before this.",
        ),
    ] = None


class DrainingReplica(StatusModel):
    pod: str
    index: int = 0
    deadline: Annotated[datetime | None, Field(description="Deleted by then at the latest.")] = None
    since: Annotated[datetime | None, Field(description="When the drain began.")] = None
    reason: str = ""


class InferencePoolStatus(StatusModel):
    observed_generation: Annotated[int, Field(alias="observedGeneration")] = 0
    replicas: Annotated[
        int, Field(description="Replica slots with a pod (the scale subresource's status).")
    ] = 0
    ready_replicas: Annotated[int, Field(alias="readyReplicas")] = 0
    selector: Annotated[
        str, Field(description="Label selector of the replica pods (scale subresource).")
    ] = ""
    spot_replicas: Annotated[int, Field(alias="spotReplicas")] = 0
    on_demand_replicas: Annotated[int, Field(alias="onDemandReplicas")] = 0
    replicas_display: Annotated[
        str,
        Field(alias="replicasDisplay", description="ready/replicas for the printer column."),
    ] = "0/0"
    placement_display: Annotated[
        str,
        Field(alias="placementDisplay", description="spot/on-demand for the printer column."),
    ] = "0/0"
    draining_replicas: Annotated[int, Field(alias="drainingReplicas")] = 0
    slots: list[ReplicaSlot] = []
    draining: Annotated[
        list[DrainingReplica], Field(description="Replicas being drained and their deadline.")
    ] = []
    endpoint: Annotated[str, Field(description="The pool's OpenAI base URL (in the cluster).")] = ""
    preemptions: int = 0
    conditions: list[Condition] = []
    cost: CostStatus = CostStatus()
    budget: BudgetStatus | None = None


def parse_spec(raw: dict[str, Any]) -> InferencePoolSpec:
    return InferencePoolSpec.model_validate(raw)


def parse_status(raw: dict[str, Any] | None) -> InferencePoolStatus:
    return InferencePoolStatus.model_validate(raw or {})

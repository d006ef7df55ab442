"""The contract between the operator and the worker pods.

Both sides import this module and nothing else of each other. It holds:

* the task a worker pod receives (:class:`Task`, passed as JSON in the
  ``CHEAPSPOT_TASK`` environment variable),
* the worker's exit codes (:class:`ExitCode`),
* the object-store layout (:class:`Layout`): where checkpoints, round results,
  global adapters, progress records and the final adapter live,
* the progress record a worker publishes (:class:`Progress`), which is how the
  operator learns what a job is doing without worker pods needing any
  Kubernetes access,
* for inference pools: the task a serving replica receives (:class:`ServeTask`, in the same
  environment variable), the pod labels and annotations the operator and the router agree
  on, and the replica's ports.

It imports nothing heavy (pydantic only) so the operator image stays small.
"""

from __future__ import annotations

import enum
import json
import os
import re
from datetime import UTC, datetime
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

TASK_ENV = "CHEAPSPOT_TASK"
"""Environment variable that carries the task as JSON."""

ALLOWED_SCHEMES = ("s3", "file", "hf")
"""URI schemes for models; datasets and outputs take s3 and file only."""

MANIFEST_NAME = "MANIFEST.json"
"""Written last in every published prefix; a reader trusts only what it lists."""


class ExitCode(enum.IntEnum):
    """How a worker process ends. The operator classifies pod failures by these."""

    DONE = 0
    """The role finished its work (a shard finished all rounds, the anchor published the final adapter)."""
    PERMANENT = 65
    """A user error that no retry can fix (bad dataset, unknown target module, unreadable
    model, a quantization the worker's device cannot run). The job fails with the worker's
    message; no retry."""
    TRANSIENT = 75
    """Something outside the worker failed (object store down after retries). Retrying may
    succeed: the operator backs off and retries without spending the restart budget, for a
    bounded time (``failurePolicy.transientRetrySeconds``)."""
    INTERRUPTED = 143
    """Stopped by SIGTERM after publishing a checkpoint (128 + SIGTERM). A preemption, not a failure."""


class Role(enum.StrEnum):
    TRAIN = "train"
    """Trains one shard of the dataset, round after round."""
    ANCHOR = "anchor"
    """Averages shard results into the next global adapter; publishes the final adapter."""
    SERVE = "serve"
    """Serves a base model with LoRA adapters (inference pools)."""
    GENERATE = "generate"
    """Sequence-level distillation: the teacher generates completions for one slice of the
    dataset's prompts (vLLM, in the serving environment), chunk after chunk."""


class Quantization(enum.StrEnum):
    NONE = "none"
    INT8 = "int8"
    NF4 = "nf4"


class DatasetFormat(enum.StrEnum):
    AUTO = "auto"
    TEXT = "text"
    PROMPT_COMPLETION = "prompt-completion"
    CHAT = "chat"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


_BUCKET = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")


def check_uri(uri: str, allowed: tuple[str, ...]) -> str:
    """``uri`` if it has one of the ``allowed`` schemes and a usable shape (an s3:// bucket,
    an absolute file:// path); else ValueError saying what to write instead."""
    scheme, _, rest = uri.partition("://")
    if "://" not in uri or scheme not in allowed:
        raise ValueError(
            f"URI {uri!r} must start with one of {', '.join(s + '://' for s in allowed)}"
        )
    if scheme == "s3" and not _BUCKET.match(rest.split("/", 1)[0]):
        raise ValueError(f"URI {uri!r} names no valid bucket: use s3://bucket/prefix/")
    if scheme == "file" and not rest.startswith("/"):
        raise ValueError(f"URI {uri!r} is not an absolute path: use file:///dir/")
    return uri


class ModelSource(_Strict):
    uri: str = Field(description="Hugging Face model directory: s3://, file:// or hf://<repo id>.")
    quantization: Quantization = Field(
        Quantization.NONE,
        description="Load the base model in int8 or 4-bit NF4 (bitsandbytes, on CUDA or CPU).",
    )

    @field_validator("uri")
    @classmethod
    def _uri(cls, v: str) -> str:
        return check_uri(v, ALLOWED_SCHEMES)


class DatasetSource(_Strict):
    uri: str = Field(description="A JSONL file: s3:// or file://.")
    format: DatasetFormat = Field(
        DatasetFormat.AUTO,
        description="text, prompt-completion (loss on the completion only), chat (messages "
        "through the model's chat template), or auto (detected from the first record).",
    )

    @field_validator("uri")
    @classmethod
    def _uri(cls, v: str) -> str:
        return check_uri(v, ("s3", "file"))


class LoraSettings(_Strict):
    r: Annotated[int, Field(gt=0, description="LoRA rank.")] = 16
    alpha: Annotated[float, Field(gt=0, description="LoRA alpha (scale = alpha / r).")] = 32.0
    dropout: Annotated[float, Field(ge=0, lt=1, description="LoRA dropout.")] = 0.05
    target_modules: str | list[str] = Field(
        "all-linear",
        alias="targetModules",
        description="'all-linear' or a list of module names (q_proj, v_proj, ...).",
    )


class TrainingSettings(_Strict):
    steps: Annotated[
        int, Field(gt=0, description="Optimizer steps per shard, all rounds together.")
    ] = 1000
    batch_size: Annotated[
        int, Field(gt=0, alias="batchSize", description="Sequences per optimizer step.")
    ] = 8
    gradient_accumulation: Annotated[
        int,
        Field(gt=0, alias="gradientAccumulation", description="Micro-batches per optimizer step."),
    ] = 1
    learning_rate: Annotated[
        float, Field(gt=0, alias="learningRate", description="Peak AdamW learning rate.")
    ] = 2e-4
    warmup_steps: Annotated[
        int, Field(ge=0, alias="warmupSteps", description="Linear warmup steps.")
    ] = 0
    max_seq_length: Annotated[
        int, Field(gt=0, alias="maxSeqLength", description="Longer sequences are truncated.")
    ] = 1024
    seed: int = Field(42, description="Seeds LoRA initialisation, data order and dropout.")
    gradient_checkpointing: bool = Field(
        False,
        alias="gradientCheckpointing",
        description="Recompute activations in the backward pass: less memory, about a third "
        "more compute. For long sequences or a base model that barely fits the GPU.",
    )


class RoundSettings(_Strict):
    local_steps: Annotated[
        int,
        Field(gt=0, alias="localSteps", description="Inner steps each shard takes per round (H)."),
    ] = 100
    outer_learning_rate: Annotated[
        float,
        Field(
            gt=0, alias="outerLearningRate", description="Outer SGD learning rate (DiLoCo: 0.7)."
        ),
    ] = 0.7
    outer_momentum: Annotated[
        float,
        Field(
            ge=0, lt=1, alias="outerMomentum", description="Outer Nesterov momentum (DiLoCo: 0.9)."
        ),
    ] = 0.9
    quorum: Annotated[
        int | None,
        Field(
            gt=0, description="Shard results the anchor waits for per round; default all shards."
        ),
    ] = None
    poll_seconds: Annotated[
        float,
        Field(
            gt=0,
            alias="pollSeconds",
            description="How often shards poll for the next global adapter and the anchor for "
            "shard results (object-store reads, so not too often).",
        ),
    ] = 5.0


class CheckpointPolicy(_Strict):
    every_steps: Annotated[
        int, Field(ge=0, alias="everySteps", description="0 turns step checkpoints off.")
    ] = 20
    every_seconds: Annotated[
        float, Field(ge=0, alias="everySeconds", description="0 turns timed checkpoints off.")
    ] = 300.0
    keep: Annotated[int, Field(gt=0, description="Checkpoints kept per shard.")] = 3
    sigterm_budget_seconds: Annotated[
        float,
        Field(
            gt=0,
            alias="sigtermBudgetSeconds",
            description="Time allowed to publish a checkpoint after SIGTERM (the notice minus a margin).",
        ),
    ] = 25.0


class DistillationMode(enum.StrEnum):
    LOGITS = "logits"
    """Token-level: the frozen teacher runs alongside the student in every shard pod and the
    student learns the teacher's next-token distribution (plus, weighted, the data's labels)."""
    SEQUENCES = "sequences"
    """Sequence-level: the teacher first generates completions for the dataset's prompts
    (generation pods, vLLM), then the student fine-tunes on the generated text."""


class GenerationSettings(_Strict):
    """How the teacher generates in sequences mode (vLLM ``SamplingParams``)."""

    max_new_tokens: Annotated[
        int, Field(gt=0, le=65536, alias="maxNewTokens", description="Tokens per completion.")
    ] = 256
    temperature: Annotated[
        float,
        Field(ge=0, le=100, description="Sampling temperature; 0 is greedy (the default)."),
    ] = 0.0
    top_p: Annotated[
        float, Field(gt=0, le=1, alias="topP", description="Nucleus sampling (1: off).")
    ] = 1.0
    seed: int = Field(
        0,
        description="Sampling seed; record i is sampled with seed + i, so what a record gets "
        "does not depend on batching or resumes.",
    )
    records_per_chunk: Annotated[
        int,
        Field(
            gt=0,
            le=100000,
            alias="recordsPerChunk",
            description="Records generated and published together (one vLLM batch). A reclaim "
            "loses at most the chunk in progress; chunks are fixed by record index.",
        ),
    ] = 32
    dtype: str = Field(
        "auto",
        pattern=r"^(auto|float32|bfloat16|float16)$",
        description="vLLM's --dtype for the teacher: auto (the model's, bf16 on CPU for "
        "fp32 models), float32, bfloat16 or float16.",
    )


class TeacherSource(ModelSource):
    """The teacher: a base model (like ``model``) and optionally a PEFT adapter on it."""

    quantization: Quantization = Field(
        Quantization.NONE,
        description="Load the teacher in int8 or 4-bit NF4: logits mode through bitsandbytes, "
        "on CUDA or CPU; sequences mode through vLLM, nf4 only and on CUDA only.",
    )

    adapter_uri: str | None = Field(
        None,
        alias="adapterUri",
        description="A PEFT adapter directory (s3:// or file://; a CheapTrainJob's final/ "
        "prefix works as is) merged into the teacher before distilling.",
    )

    @field_validator("adapter_uri")
    @classmethod
    def _adapter(cls, v: str | None) -> str | None:
        if v is None:
            return v
        check_uri(v, ("s3", "file"))
        return v if v.endswith("/") else v + "/"


class DistillationSettings(_Strict):
    """Train the student (``model`` + LoRA) to imitate a teacher model."""

    teacher: TeacherSource = Field(
        description="The teacher model; in logits mode it must use the student's tokenizer."
    )
    mode: DistillationMode = Field(
        DistillationMode.LOGITS,
        description="logits: token-level distillation against the teacher's next-token "
        "distribution, the teacher frozen in each shard pod. sequences: the teacher generates "
        "completions for the dataset's prompts first (vLLM), the student trains on them.",
    )
    temperature: Annotated[
        float,
        Field(
            gt=0,
            le=100,
            description="Softens both distributions before comparing them (T); the KL term is "
            "scaled by T^2 so its gradients keep their size.",
        ),
    ] = 2.0
    alpha: Annotated[
        float,
        Field(
            ge=0,
            le=1,
            description="Weight of the distillation term: loss = alpha * T^2 * KL(teacher_T || "
            "student_T) + (1 - alpha) * cross-entropy on the data's labels.",
        ),
    ] = 0.5
    generation: GenerationSettings | None = Field(
        None,
        description="sequences mode only: how the teacher generates (defaults: greedy, 256 "
        "new tokens).",
    )

    @model_validator(mode="after")
    def _mode_fields(self) -> DistillationSettings:
        if self.mode is DistillationMode.SEQUENCES:
            if self.teacher.quantization is Quantization.INT8:
                raise ValueError(
                    "distillation.teacher.quantization int8 is not available in sequences "
                    "mode (vLLM loads bitsandbytes models in 4 bits only): use nf4 or none"
                )
            # Compared with the defaults, not model_fields_set: a task round-trips through
            # JSON with every field written out.
            fields = type(self).model_fields
            misused = [f for f in ("temperature", "alpha") if getattr(self, f) != fields[f].default]
            if misused:
                names = " and ".join(f"distillation.{f}" for f in misused)
                verb = "applies" if len(misused) == 1 else "apply"
                raise ValueError(
                    f"{names} {verb} to logits mode only; in sequences mode the student trains "
                    "on the teacher's text (distillation.generation.temperature sets the "
                    "teacher's sampling)"
                )
        elif self.generation is not None:
            raise ValueError(
                "distillation.generation applies to sequences mode only (mode: sequences)"
            )
        return self

    @property
    def sequences(self) -> bool:
        return self.mode is DistillationMode.SEQUENCES

    @property
    def sampling(self) -> GenerationSettings:
        """The generation settings, defaults filled in."""
        return self.generation or GenerationSettings()


class JobRef(_Strict):
    namespace: str
    name: str
    uid: str = ""


class Task(_Strict):
    """Everything a worker pod needs. Serialised to JSON in ``CHEAPSPOT_TASK``."""

    role: Role
    job: JobRef
    shard_index: Annotated[int, Field(ge=0)] = 0
    shard_count: Annotated[int, Field(ge=1, le=256)] = 1
    model: ModelSource
    dataset: DatasetSource
    output_uri: str = Field(
        description="Job prefix in object storage: s3://bucket/prefix/ or file:///dir/."
    )
    lora: LoraSettings = LoraSettings()
    training: TrainingSettings = TrainingSettings()
    rounds: RoundSettings = RoundSettings()
    checkpoint: CheckpointPolicy = CheckpointPolicy()
    distillation: DistillationSettings | None = None
    attempt: Annotated[int, Field(ge=0, description="Pod incarnation, for logs only.")] = 0

    @field_validator("output_uri")
    @classmethod
    def _out(cls, v: str) -> str:
        check_uri(v, ("s3", "file"))
        return v if v.endswith("/") else v + "/"

    @property
    def round_count(self) -> int:
        """Rounds needed to take ``training.steps`` steps, ``rounds.local_steps`` at a time."""
        return -(-self.training.steps // self.rounds.local_steps)

    def steps_in_round(self, round_index: int) -> int:
        """Inner steps of round ``round_index`` (the last round may be shorter)."""
        start = round_index * self.rounds.local_steps
        return max(0, min(self.rounds.local_steps, self.training.steps - start))

    @property
    def layout(self) -> Layout:
        return Layout(self.output_uri)

    def to_env(self) -> str:
        return self.model_dump_json(by_alias=True)

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> Task:
        env = os.environ if environ is None else environ
        raw = env.get(TASK_ENV)
        if not raw:
            raise ValueError(f"environment variable {TASK_ENV} is not set")
        return cls.model_validate_json(raw)


class Layout:
    """Where everything of one job lives, relative to its output prefix.

    ``{root}`` is the job's ``output_uri`` (ends with ``/``)::

        rounds/{r:05d}/global/              global adapter g_r (+ outer optimizer state), MANIFEST.json
        rounds/{r:05d}/shards/{i:04d}/      shard i's adapter after round r, MANIFEST.json
        shards/{i:04d}/checkpoints/{s:08d}/ shard i's checkpoint after global step s, MANIFEST.json
        progress/shard-{i:04d}.json         shard i's progress record
        progress/anchor.json                the anchor's progress record
        progress/generate-{i:04d}.json      generation shard i's progress record (sequences mode)
        generated/{i:04d}/{k:06d}/          chunk k of generation shard i: records.jsonl, MANIFEST.json
        generated/{i:04d}/done/             generation shard i finished: chunks.json, MANIFEST.json
        final/                              the final PEFT adapter + training_summary.json, MANIFEST.json
        OWNER.json                          the job that claimed the prefix (written by the operator)

    Every key has a single writer (shard i writes only shard i's keys, the anchor the
    rest), so no compare-and-swap is needed.
    """

    def __init__(self, root: str) -> None:
        self.root = root if root.endswith("/") else root + "/"

    def _join(self, *parts: str) -> str:
        return self.root + "/".join(parts) + "/"

    def global_adapter(self, round_index: int) -> str:
        return self._join("rounds", f"{round_index:05d}", "global")

    def shard_result(self, round_index: int, shard_index: int) -> str:
        return self._join("rounds", f"{round_index:05d}", "shards", f"{shard_index:04d}")

    def shard_checkpoints(self, shard_index: int) -> str:
        return self._join("shards", f"{shard_index:04d}", "checkpoints")

    def shard_checkpoint(self, shard_index: int, global_step: int) -> str:
        return self._join("shards", f"{shard_index:04d}", "checkpoints", f"{global_step:08d}")

    def progress(self, role: Role, shard_index: int = 0) -> str:
        if role is Role.ANCHOR:
            name = "anchor.json"
        elif role is Role.GENERATE:
            name = f"generate-{shard_index:04d}.json"
        else:
            name = f"shard-{shard_index:04d}.json"
        return self.root + "progress/" + name

    def generated_chunk(self, shard_index: int, chunk: int) -> str:
        """Chunk ``chunk`` of generation shard ``shard_index`` (sequences mode)."""
        return self._join("generated", f"{shard_index:04d}", f"{chunk:06d}")

    def generated_done(self, shard_index: int) -> str:
        """Published once every chunk of generation shard ``shard_index`` is."""
        return self._join("generated", f"{shard_index:04d}", "done")

    @property
    def final(self) -> str:
        return self._join("final")

    @property
    def owner(self) -> str:
        """``OWNER.json``: the job (namespace, name, uid) that claimed this prefix."""
        return self.root + "OWNER.json"


class Phase(enum.StrEnum):
    STARTING = "starting"
    LOADING = "loading"
    GENERATING = "generating"
    """A generation shard (sequences mode): ``step`` records of ``total_steps`` are published."""
    TRAINING = "training"
    WAITING = "waiting"
    """Round done; waiting for the next global adapter (shards) or for shard results (anchor)."""
    CHECKPOINTING = "checkpointing"
    DONE = "done"
    FAILED = "failed"


class Progress(_Strict):
    """The record a worker publishes at ``Layout.progress``. The operator reads it."""

    role: Role
    shard_index: int = 0
    phase: Phase
    round: int = Field(0, description="Current round (0-based).")
    step: int = Field(0, description="Optimizer steps done by this shard, all rounds together.")
    total_steps: int = 0
    loss: float | None = None
    tokens: int = Field(0, description="Tokens trained on so far.")
    last_checkpoint_step: int | None = None
    resumes: int = Field(
        0, description="Times this role resumed from a checkpoint (preemptions survived)."
    )
    steps_lost: int = Field(0, description="Steps redone after resumes, all together.")
    message: str = ""
    updated_at: datetime = Field(default_factory=lambda: datetime.now(UTC))

    def to_json(self) -> bytes:
        return self.model_dump_json().encode()

    @classmethod
    def from_json(cls, data: bytes) -> Progress:
        return cls.model_validate(json.loads(data))


def utcnow() -> datetime:
    return datetime.now(UTC)


# --- serving (CheapInferencePool) ------------------------------------------------------------

LABEL_POOL = "cheapspot.dev/pool"
"""On every pod of an inference pool: the pool's name."""
LABEL_POOL_ROLE = "cheapspot.dev/pool-role"
"""``replica`` (a vLLM server) or ``router`` (the pool's endpoint)."""
LABEL_REPLICA = "cheapspot.dev/replica"
"""A replica pod's slot index (0..replicas-1)."""
ANNOTATION_DRAINING = "cheapspot.dev/draining-until"
"""Set by the operator on a replica that is being drained (RFC 3339 deadline). The router
sends it no new request from the moment it sees the annotation."""
SERVE_PORT = 8000
"""The replica's OpenAI API (vLLM) port: the router sends client requests here."""
ADMIN_PORT = 8001
"""The replica launcher's admin port (operator and router only, never clients):
``GET /cheapspot/status``, ``GET /cheapspot/adapters`` (the adapter versions alone, which the
routers poll) and ``PUT /cheapspot/adapters`` with the desired adapter list."""
ADAPTER_SWAP_SETTLE_SECONDS = 5.0
"""How long a replica announces a new version of an adapter it holds (its desired list)
before it swaps it in vLLM: longer than the routers' bound on the age of the reports they
route by (``cheapspot_operator.router.versions.REPORT_MAX_AGE_SECONDS``), so no router still
believes the replica holds the old version once it answers with the new one."""
ADMIN_TOKEN_ENV = "CHEAPSPOT_ADMIN_TOKEN"
"""The replica's admin token: every request to the admin port but a GET must carry
``Authorization: Bearer <token>``. The operator generates it per pool (a Secret it owns,
``<pool>-admin``, key ``token``) and the replica pod reads it from there; unset, the admin port
takes any request (a replica run by hand)."""
ROUTER_PORT = 8080
"""The router's client-facing port (the pool's Service targets it)."""
ROUTER_READY_PATH = "/readyz"
"""The router's readiness, on its port: 200 once it knows the pool's replica pods, 503 before
that and from SIGTERM on (while it drains)."""


class AdapterSource(_Strict):
    name: str = Field(
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$",
        description="Name clients put in the OpenAI `model` field to use this adapter.",
    )
    uri: str = Field(
        description="A PEFT adapter directory with a MANIFEST.json: s3:// or file:// "
        "(a CheapTrainJob's final/ prefix works as is)."
    )

    @field_validator("uri")
    @classmethod
    def _uri(cls, v: str) -> str:
        check_uri(v, ("s3", "file"))
        return v if v.endswith("/") else v + "/"


class EngineSettings(_Strict):
    max_num_seqs: Annotated[int, Field(ge=1, le=4096, alias="maxNumSeqs")] = 32
    max_loras: Annotated[int, Field(ge=1, le=256, alias="maxLoras")] = 8
    max_lora_rank: Annotated[int, Field(ge=1, le=512, alias="maxLoraRank")] = 16
    max_model_len: Annotated[int | None, Field(ge=16, alias="maxModelLen")] = None
    shutdown_timeout_seconds: Annotated[
        int, Field(ge=0, le=3600, alias="shutdownTimeoutSeconds")
    ] = 30
    args: list[str] = Field(default_factory=list, description="Extra vLLM server arguments.")


class ServeTask(_Strict):
    """What a serving replica needs. Serialised to JSON in ``CHEAPSPOT_TASK`` with role serve."""

    role: Role = Role.SERVE
    pool: JobRef
    replica_index: Annotated[int, Field(ge=0)] = 0
    model: ModelSource
    adapters: list[AdapterSource] = Field(default_factory=list)
    engine: EngineSettings = EngineSettings()
    attempt: Annotated[int, Field(ge=0)] = 0

    def to_env(self) -> str:
        return self.model_dump_json(by_alias=True)

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> ServeTask:
        env = os.environ if environ is None else environ
        raw = env.get(TASK_ENV)
        if not raw:
            raise ValueError(f"environment variable {TASK_ENV} is not set")
        return cls.model_validate_json(raw)

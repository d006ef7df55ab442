"""The ``train`` role: one shard, round after round, surviving preemption exactly.

Round r (DiLoCo-style): load the global adapter g_r, take ``steps_in_round(r)`` inner
AdamW steps on this shard's slice, publish the result at ``Layout.shard_result(r, i)``,
checkpoint, and go on to g_{r+1}. The AdamW moments, the LR schedule (over the shard's
total steps) and the RNG streams carry across rounds, so with one shard this is plain
training.

Exactness: the batch of a step is a function of the step number, every RNG state is in
the checkpoint, torch runs with a fixed thread count and deterministic algorithms. A run
resumed from any checkpoint therefore computes the same bits as one that never stopped
(on CPU, with a quantized base too; on GPU up to the determinism the kernels offer).

SIGTERM: the handler only sets a flag. The step in flight is finished if it fits in the
budget (``checkpoint.sigtermBudgetSeconds``, measured from the signal), otherwise
abandoned (the RNG is rewound to the step's start); then a checkpoint is published and
the role ends with :class:`Interrupted`. At most the step in flight is lost. A checkpoint
still uploading when SIGTERM ends the role some other way (waiting for the next global
adapter) is finished first.

A loss that is not finite fails the shard at once (:class:`PermanentError`, naming the shard
and the step) before the step is applied, so no NaN adapter is ever published.
"""

from __future__ import annotations

import math
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from cheapspot.contract import Layout, Phase, Role, Task
from cheapspot.store import CorruptObjectError, Store, TransientStoreError
from cheapspot_worker.checkpoints import Checkpoint, Checkpoints, rng_state, set_rng_state
from cheapspot_worker.data import (
    IGNORE,
    Batches,
    Example,
    load_examples,
    load_generated_examples,
    shard_slice,
)
from cheapspot_worker.distill import TEACHER, Parts, Teacher
from cheapspot_worker.errors import Interrupted, PermanentError, Stop
from cheapspot_worker.loading import (
    adapter_bytes,
    adapter_from_bytes,
    adapter_state,
    check_quantization,
    compute_dtype,
    load_base_model,
    load_tokenizer,
    resolve_model_dir,
    set_adapter_state,
    wrap_lora,
)
from cheapspot_worker.progress import Reporter, event

ADAPTER_FILE = "adapter.safetensors"
THREADS_ENV = "CHEAPSPOT_CPU_THREADS"


def setup_determinism() -> None:
    """Fixed threads and deterministic kernels: the precondition for bit-exact resumes."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    threads = int(os.environ.get(THREADS_ENV) or os.environ.get("OMP_NUM_THREADS") or 1)
    torch.set_num_threads(max(1, threads))
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False


def wait_for(
    what: str, ready: Any, stop: Stop, poll: float, reporter: Reporter | None = None
) -> None:
    """Poll ``ready()`` until true; SIGTERM while waiting -> Interrupted (nothing to save)."""
    while not ready():
        if stop.requested:
            raise Interrupted(f"SIGTERM while waiting for {what}")
        if reporter is not None:
            reporter.update(phase=Phase.WAITING, message=f"waiting for {what}")
        time.sleep(poll)


def fetch_adapter(store: Store, prefix: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    manifest = store.read_manifest(prefix)
    if manifest is None:
        raise CorruptObjectError(f"{prefix} is not published")
    data = store.fetch_bytes(prefix, ADAPTER_FILE, manifest)
    return adapter_from_bytes(data), dict(manifest.meta)


@dataclass
class RoundLog:
    """What a round's steps produced so far (kept in checkpoints, published with results)."""

    losses: list[float] = field(default_factory=list)
    tokens: int = 0
    kl: list[float] = field(default_factory=list)
    """Distillation jobs: the KL term of each step (per label token, at the temperature)."""


class ShardTrainer:
    def __init__(self, task: Task, store: Store, stop: Stop) -> None:
        self.task = task
        self.store = store
        self.stop = stop
        self.layout: Layout = task.layout
        self.shard = task.shard_index
        self.reporter = Reporter(store, self.layout, Role.TRAIN, self.shard)
        self.checkpoints = Checkpoints(store, self.layout, self.shard, task.checkpoint.keep)
        t = task.training
        if t.batch_size % t.gradient_accumulation:
            raise PermanentError(
                f"training.batchSize {t.batch_size} is not a multiple of "
                f"training.gradientAccumulation {t.gradient_accumulation}"
            )
        self.micro_batch = t.batch_size // t.gradient_accumulation
        self.cuda = torch.cuda.is_available()
        self.step_seconds = 0.0  # running estimate, for the SIGTERM finish-or-abandon call
        self.checkpoint_seconds = 0.0
        self.saved_step = -1
        self._lora_params: dict[str, torch.nn.Parameter] | None = None
        self._pending: threading.Thread | None = None
        self._pending_error: BaseException | None = None
        self._published: tuple[int, float] | None = None
        self.tokens = 0
        self.teacher: Teacher | None = None

    # -- setup -------------------------------------------------------------------

    def setup(self) -> None:
        from accelerate import Accelerator
        from transformers import get_cosine_schedule_with_warmup

        task = self.task
        self.reporter.update(phase=Phase.LOADING, total_steps=task.training.steps, force=True)
        setup_determinism()
        # Before downloading gigabytes it could not load.
        check_quantization(task.model, cuda=self.cuda)
        if task.distillation is not None and not task.distillation.sequences:
            check_quantization(task.distillation.teacher, TEACHER, cuda=self.cuda)
        model_dir = resolve_model_dir(task.model)
        tokenizer = load_tokenizer(model_dir, task.model.uri)
        if task.distillation is not None and task.distillation.sequences:
            # Sequences mode: the teacher's completions, which the generation shards published.
            examples = load_generated_examples(
                self.store, task.layout, task.shard_count, tokenizer, task.training.max_seq_length
            )
        else:
            examples = load_examples(
                task.dataset.uri, task.dataset.format, tokenizer, task.training.max_seq_length
            )
        mine = shard_slice(len(examples), self.shard, task.shard_count, task.training.seed)
        pad = tokenizer.pad_token_id
        if pad is None:
            pad = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
        self.batches = Batches(
            [examples[i] for i in mine],
            micro_batch=self.micro_batch,
            accumulation=task.training.gradient_accumulation,
            seed=task.training.seed,
            shard_index=self.shard,
            pad_id=int(pad),
        )
        base = load_base_model(
            model_dir,
            task.model,
            cuda=self.cuda,
            gradient_checkpointing=task.training.gradient_checkpointing,
        )
        model = wrap_lora(base, task.lora, task.model.uri)
        dtype = compute_dtype(self.cuda)
        precision = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "no")
        self.accelerator = Accelerator(cpu=not self.cuda, mixed_precision=precision)
        if task.distillation is not None and not task.distillation.sequences:
            self.teacher = Teacher.load(
                task.distillation,
                tokenizer,
                task.model.uri,
                int(base.get_output_embeddings().weight.shape[0]),
                cuda=self.cuda,
                device=self.accelerator.device,
            )
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=task.training.learning_rate, weight_decay=0.0)
        self.model, self.optimizer = self.accelerator.prepare(model, optimizer)
        self.scheduler = get_cosine_schedule_with_warmup(
            self.optimizer, task.training.warmup_steps, task.training.steps
        )
        event(
            "setup_done",
            shard=self.shard,
            examples=len(mine),
            trainable_parameters=sum(p.numel() for p in params),
            device=str(self.accelerator.device),
            dtype=str(dtype).removeprefix("torch."),
            quantization=task.model.quantization.value,
            distillation=None if task.distillation is None else task.distillation.mode.value,
        )

    def adapter_snapshot(self) -> dict[str, torch.Tensor]:
        """A CPU fp32 copy of the adapter under PEFT's key names.

        Copies the trainable parameters directly (PEFT's own state-dict walk visits every
        base weight too, which costs more than the copy on small adapters); falls back to it
        when the names do not line up.
        """
        if self._lora_params is None:
            from peft import get_peft_model_state_dict

            expected = set(get_peft_model_state_dict(self.model))
            params = {
                name.replace(".default", ""): p
                for name, p in self.model.named_parameters()
                if p.requires_grad
            }
            self._lora_params = dict(sorted(params.items())) if set(params) == expected else {}
        if not self._lora_params:
            return detached_copy(adapter_state(self.model))  # type: ignore[no-any-return]
        return {
            k: p.detach().to("cpu", torch.float32, copy=True) for k, p in self._lora_params.items()
        }

    def trainer_state(self, rng: dict[str, Any] | None = None) -> dict[str, Any]:
        return {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": rng if rng is not None else rng_state(),
        }

    # -- the role ----------------------------------------------------------------

    def run(self) -> None:
        try:
            self._run()
        except Interrupted:
            # However SIGTERM got here (mid-step, at a round boundary while the checkpoint of
            # the round's end is still uploading, waiting for the next global adapter), what
            # was done is published before the process ends: the upload thread is a daemon.
            self.finish_pending()
            raise

    def _run(self) -> None:
        self.setup()
        task = self.task
        total, per_round = task.training.steps, task.rounds.local_steps
        step, round_log = self.resume()
        self.last_ckpt_time = time.monotonic()
        while step < total:
            r = step // per_round
            round_end = min(total, (r + 1) * per_round)
            if step == r * per_round:
                self.load_global(r)
                round_log = RoundLog()
            self.reporter.update(phase=Phase.TRAINING, round=r, message="")
            while step < round_end:
                rng_before = rng_state()
                done = self.train_step(step, round_log)
                if not done:  # abandoned after SIGTERM: the step in flight is lost
                    self.save_checkpoint(step, r, round_log, rng_before, wait=True)
                    raise Interrupted(f"SIGTERM during step {step + 1}; abandoned it")
                step += 1
                if step == round_end:
                    self.publish_result(r, round_log)
                    self.save_checkpoint(step, r, round_log)
                elif self.checkpoint_due(step):
                    self.save_checkpoint(step, r, round_log)
                if self.stop.requested:
                    self.finish_pending()
                    if self.saved_step != step:
                        self.save_checkpoint(step, r, round_log, wait=True)
                    raise Interrupted(f"SIGTERM; checkpoint at step {step} published")
        self.finish_pending()
        self.reporter.update(
            phase=Phase.DONE, step=total, round=task.round_count - 1, message="", force=True
        )
        peak = {"peak_gpu_bytes": torch.cuda.max_memory_allocated()} if self.cuda else {}
        event("shard_done", shard=self.shard, steps=total, **peak)

    def resume(self) -> tuple[int, RoundLog]:
        previous = self.reporter.previous
        ckpt = self.checkpoints.latest_good()
        if ckpt is None:
            torch.manual_seed(self.task.training.seed * 1009 + self.shard)
            import random

            random.seed(self.task.training.seed * 1009 + self.shard)
            if previous is not None:
                self._count_resume(0, previous.step)
            return 0, RoundLog()
        set_adapter_state(self.model, ckpt.adapter)
        self.optimizer.load_state_dict(ckpt.trainer_state["optimizer"])
        self.scheduler.load_state_dict(ckpt.trainer_state["scheduler"])
        set_rng_state(ckpt.trainer_state["rng"])
        self.tokens = int(ckpt.meta.get("tokens", 0))
        log = RoundLog(
            losses=[float(x) for x in ckpt.meta.get("round_losses", [])],
            tokens=int(ckpt.meta.get("round_tokens", 0)),
            kl=[float(x) for x in ckpt.meta.get("round_kl", [])],
        )
        # A checkpoint without a previous record means the record was lost, still a resume.
        self._count_resume(ckpt.step, previous.step if previous is not None else ckpt.step)
        event("resumed", shard=self.shard, step=ckpt.step)
        return ckpt.step, log

    def _count_resume(self, step: int, previous_step: int) -> None:
        rec = self.reporter.record
        self.reporter.update(
            resumes=rec.resumes + 1,
            steps_lost=rec.steps_lost + max(0, previous_step - step),
            step=step,
            last_checkpoint_step=step,
            tokens=self.tokens,
            force=True,
        )

    def load_global(self, r: int) -> None:
        prefix = self.layout.global_adapter(r)
        wait_for(
            f"global adapter of round {r}",
            lambda: self.store.has_manifest(prefix),
            self.stop,
            self.task.rounds.poll_seconds,
            self.reporter,
        )
        state, _ = fetch_adapter(self.store, prefix)
        set_adapter_state(self.model, state)

    # -- one optimizer step ----------------------------------------------------------

    def _tensors(self, batch: list[Example]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        width = max(len(e.input_ids) for e in batch)
        pad = self.batches.pad_id
        ids = torch.tensor([e.input_ids + [pad] * (width - len(e.input_ids)) for e in batch])
        labels = torch.tensor([e.labels + [IGNORE] * (width - len(e.labels)) for e in batch])
        mask = torch.tensor(
            [[1] * len(e.input_ids) + [0] * (width - len(e.input_ids)) for e in batch]
        )
        device = self.accelerator.device
        return ids.to(device), mask.to(device), labels.to(device)

    def train_step(self, step: int, round_log: RoundLog) -> bool:
        """One optimizer step; False if abandoned after SIGTERM (nothing applied)."""
        started = time.monotonic()
        micro_batches = self.batches.step(step)
        # Loss = mean over all label tokens of the step, however they fall into micro-batches.
        label_tokens = max(1, sum(_shifted_label_tokens(e) for b in micro_batches for e in b))
        total_loss = 0.0
        parts = Parts()
        self.model.train()
        for i, batch in enumerate(micro_batches):
            if self.stop.requested and not self._finish_in_flight(i, len(micro_batches), started):
                self.optimizer.zero_grad(set_to_none=True)
                return False
            ids, mask, labels = self._tensors(batch)
            with self.accelerator.autocast():
                logits = self.model(input_ids=ids, attention_mask=mask).logits
                teacher_logits = None if self.teacher is None else self.teacher.logits(ids, mask)
            if self.teacher is not None and teacher_logits is not None:
                loss, micro = self.teacher.loss(logits, teacher_logits, labels, label_tokens)
                parts.kl += micro.kl
                parts.ce += micro.ce
            else:
                loss = (
                    torch.nn.functional.cross_entropy(
                        logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                        labels[:, 1:].reshape(-1),
                        ignore_index=IGNORE,
                        reduction="sum",
                    )
                    / label_tokens
                )
            value = float(loss.detach())
            if not math.isfinite(value):
                # Nothing of this step is applied: no NaN reaches a checkpoint or a result.
                self.optimizer.zero_grad(set_to_none=True)
                raise PermanentError(
                    f"shard {self.shard}: the loss is {value} at step {step + 1} (round "
                    f"{step // self.task.rounds.local_steps}); lower training.learningRate, "
                    "check the dataset, or raise training.warmupSteps"
                )
            self.accelerator.backward(loss)
            total_loss += value
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        tokens = sum(len(e.input_ids) for b in micro_batches for e in b)
        self.tokens += tokens
        round_log.losses.append(total_loss)
        round_log.tokens += tokens
        distill: dict[str, Any] = {}
        if self.teacher is not None:
            round_log.kl.append(parts.kl)
            distill = {"kl": round(parts.kl, 6), "ce": round(parts.ce, 6)}
        elapsed = time.monotonic() - started
        self.step_seconds = (
            elapsed if self.step_seconds == 0 else 0.8 * self.step_seconds + 0.2 * elapsed
        )
        event(
            "step",
            shard=self.shard,
            step=step + 1,
            loss=round(total_loss, 6),
            lr=self.scheduler.get_last_lr()[0],
            tokens=tokens,
            # CPU seconds of the process so far (every thread): step costs that a busy
            # machine's wall clock would blur.
            cpu_s=round(time.process_time(), 4),
            **distill,
        )
        self.reporter.update(step=step + 1, loss=total_loss, tokens=self.tokens)
        return True

    def _finish_in_flight(self, done: int, of: int, started: float) -> bool:
        """After SIGTERM: can the rest of this step and a checkpoint still fit the budget?"""
        if done == 0:
            return False  # nothing computed yet: checkpointing now loses nothing
        per_micro = (time.monotonic() - started) / done
        needed = per_micro * (of - done) + 2 * self.checkpoint_seconds + 1.0
        return self.stop.elapsed() + needed < self.task.checkpoint.sigterm_budget_seconds

    # -- checkpoints and results ------------------------------------------------------

    def checkpoint_due(self, step: int) -> bool:
        policy = self.task.checkpoint
        if policy.every_steps and step % policy.every_steps == 0:
            return True
        return (
            bool(policy.every_seconds)
            and time.monotonic() - self.last_ckpt_time >= policy.every_seconds
        )

    def save_checkpoint(
        self,
        step: int,
        r: int,
        round_log: RoundLog,
        rng: dict[str, Any] | None = None,
        *,
        wait: bool = False,
    ) -> None:
        """Snapshot the state now; publish it in the background (``wait``: before returning).

        Only the snapshot (a copy of adapter and optimizer tensors) holds up training; the
        upload (serialise, objects, manifest, pruning, the progress record naming the
        checkpoint) overlaps the next steps. One upload at a time: a new checkpoint first waits
        for the previous one, and SIGTERM waits for it before publishing its own.
        """
        self.finish_pending()
        started = time.monotonic()
        if wait:
            self.reporter.update(phase=Phase.CHECKPOINTING)
        ckpt = Checkpoint(
            step=step,
            adapter=self.adapter_snapshot(),
            trainer_state=detached_copy(self.trainer_state(rng)),
            meta={
                "round": r,
                "tokens": self.tokens,
                "round_losses": list(round_log.losses),
                "round_tokens": round_log.tokens,
                "round_kl": list(round_log.kl),
            },
        )
        self.saved_step = step
        self.last_ckpt_time = time.monotonic()
        snapshot_seconds = self.last_ckpt_time - started
        self._pending = threading.Thread(
            target=self._publish, args=(ckpt, snapshot_seconds), name="checkpoint", daemon=True
        )
        self._pending.start()
        if wait:
            self.finish_pending()
            self.reporter.update(phase=Phase.TRAINING)

    def _publish(self, ckpt: Checkpoint, snapshot_seconds: float) -> None:
        started = time.monotonic()
        try:
            self.checkpoints.save(ckpt)
        except BaseException as exc:
            self._pending_error = exc
            return
        upload = time.monotonic() - started
        self._published = (ckpt.step, snapshot_seconds + upload)
        try:
            # From here, not from the training thread: on S3 this is a round trip.
            self.reporter.update(last_checkpoint_step=ckpt.step, force=True)
        except BaseException as exc:
            self._pending_error = exc
            return
        event(
            "checkpoint",
            shard=self.shard,
            step=ckpt.step,
            seconds=round(upload, 3),
            snapshot_seconds=round(snapshot_seconds, 4),
        )

    def finish_pending(self) -> None:
        """Wait for the checkpoint being published; re-raise its failure here."""
        if self._pending is None:
            return
        self._pending.join()
        self._pending = None
        if self._pending_error is not None:
            error, self._pending_error = self._pending_error, None
            raise error
        if self._published is not None:
            _, self.checkpoint_seconds = self._published
            self._published = None

    def publish_result(self, r: int, round_log: RoundLog) -> None:
        state = self.adapter_snapshot()
        published = self.store.publish(
            self.layout.shard_result(r, self.shard),
            {ADAPTER_FILE: adapter_bytes(state)},
            meta={
                "round": r,
                "shard": self.shard,
                "losses": list(round_log.losses),
                "tokens": round_log.tokens,
                "kl": list(round_log.kl),
            },
        )
        event("round_result", shard=self.shard, round=r, published=published)


def detached_copy(obj: Any) -> Any:
    """A copy of ``obj`` whose tensors are on the CPU and share nothing with training."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: detached_copy(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(detached_copy(v) for v in obj)
    return obj


def _shifted_label_tokens(e: Example) -> int:
    """Label tokens that are predicted (the first position has no previous token)."""
    return sum(1 for x in e.labels[1:] if x != IGNORE)


def run_shard(task: Task, store: Store, stop: Stop) -> None:
    trainer = ShardTrainer(task, store, stop)
    try:
        trainer.run()
    except TransientStoreError:
        trainer.reporter.try_flush()
        raise

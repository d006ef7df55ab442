"""The ``generate`` role: sequence-level distillation's first phase.

Generation shard i of N completes records ``[i*n//N, (i+1)*n//N)`` of the dataset's ``n``
prompts with the teacher, through vLLM's offline batched generation (``vllm.LLM.generate``,
the engine and environment serving uses), and publishes them chunk by chunk:

* chunk k holds the shard's records ``k*C .. k*C+C-1`` (``C`` =
  ``distillation.generation.recordsPerChunk``), so chunks, and with them the batches vLLM
  sees, are fixed by record index: a shard resumed after a reclaim skips the published
  chunks and regenerates only the others, with the same batches, so on CPU with greedy
  decoding its records are the bits an undisturbed run writes; no record is generated twice
  into the dataset or lost;
* each chunk is ``records.jsonl`` (``{"prompt", "completion", "index"}``) under
  ``generated/{i:04d}/{k:06d}/`` with a manifest (:meth:`cheapspot.store.Store.publish`),
  and once all are there ``generated/{i:04d}/done/`` says how many; training reads only
  shards with that marker (:func:`cheapspot_worker.data.read_generated`);
* sampling with ``temperature > 0`` gives record j the seed ``seed + j``: what a record gets
  does not depend on the chunk or the resume either.

SIGTERM lets the chunk in progress finish (and publish, if it is done before the notice
ends), then the role exits :attr:`~cheapspot.contract.ExitCode.INTERRUPTED`. The progress
record (role ``generate``) counts records: ``step`` of ``total_steps``.

Records need a ``prompt`` (prompt-completion records, whose completion is replaced by the
teacher's, or prompt-only records). The teacher is read as text, so it need not share the
student's tokenizer.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cheapspot.contract import GenerationSettings, Phase, Quantization, Role, Task
from cheapspot.store import Store
from cheapspot_worker.data import (
    GENERATED_FILE,
    GENERATED_INDEX,
    parse_jsonl,
    read_dataset_bytes,
)
from cheapspot_worker.errors import Interrupted, PermanentError, Stop
from cheapspot_worker.progress import Reporter, event

TEACHER = "distillation.teacher"
READY_ENV = "CHEAPSPOT_GENERATE_ENV"
"""Set once the role runs in vLLM's environment (see :func:`enter_generate_env`)."""


def enter_generate_env(argv: list[str]) -> None:
    """Re-execute this worker command in vLLM's environment, once: the serving environment's
    python when this one lacks vLLM (the trainer's, as the local cluster runs it), with the
    settings the serving launcher gives vLLM, and vLLM's engine in this process (its own
    process would take SIGTERM for itself and leave the chunk in progress broken)."""
    from cheapspot_worker.serving import has_vllm, serve_python, vllm_env

    if os.environ.get(READY_ENV) == "1":
        if not has_vllm():
            raise PermanentError("the generate role needs vLLM, which this environment lacks")
        return
    python = sys.executable if has_vllm() else serve_python()
    if python is None:
        raise PermanentError(
            "sequences-mode generation needs vLLM, which this environment lacks: run the "
            "serving image (operator setting serving.image), or `make serve-venv`"
        )
    env = vllm_env(os.environ)
    env[READY_ENV] = "1"
    env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    event("generate_env", python=python)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(python, [python, "-m", "cheapspot_worker", *argv], env)


@dataclass(frozen=True)
class Chunk:
    index: int
    first: int
    """Dataset index of its first record."""
    end: int

    @property
    def size(self) -> int:
        return self.end - self.first


def shard_range(n: int, shard_index: int, shard_count: int) -> tuple[int, int]:
    """The dataset records generation shard ``shard_index`` completes: contiguous, so the
    shards' chunks, one after another, are the dataset in order."""
    return shard_index * n // shard_count, (shard_index + 1) * n // shard_count


def chunks(first: int, end: int, per_chunk: int) -> list[Chunk]:
    return [
        Chunk(k, lo, min(end, lo + per_chunk)) for k, lo in enumerate(range(first, end, per_chunk))
    ]


def prompts_of(records: list[tuple[int, dict[str, Any]]], uri: str) -> list[str]:
    out = []
    for number, record in records:
        prompt = record.get("prompt")
        if not isinstance(prompt, str):
            raise PermanentError(
                f"dataset {uri} line {number}: sequences-mode distillation needs a string "
                "'prompt' in every record (prompt-completion or prompt-only records; the "
                "teacher writes the completion)"
            )
        out.append(prompt)
    return out


def sampling_params(settings: GenerationSettings, first: int, count: int) -> list[Any]:
    """One ``SamplingParams`` per record; record j sampled with seed ``seed + j``."""
    from vllm import SamplingParams  # type: ignore[import-not-found]

    return [
        SamplingParams(
            max_tokens=settings.max_new_tokens,
            temperature=settings.temperature,
            top_p=settings.top_p,
            seed=settings.seed + j,
        )
        for j in range(first, first + count)
    ]


@dataclass(frozen=True)
class Teacher:
    llm: Any
    """The ``vllm.LLM``."""
    lora: Any = None
    """The teacher's adapter as a ``LoRARequest`` (``distillation.teacher.adapterUri``)."""


def load_teacher(task: Task) -> Teacher:
    """The teacher in vLLM: the model (and adapter) fetched and verified as serving does."""
    from cheapspot_worker.loading import resolve_model_dir

    d = task.distillation
    assert d is not None
    teacher = d.teacher
    cuda = _cuda()
    # Generation's own rule, not training's: vLLM loads the teacher, with bitsandbytes on
    # CUDA only here (the CPU serving environment does not install it), and in 4 bits only
    # (int8 is refused with the spec, see DistillationSettings).
    if teacher.quantization is not Quantization.NONE and not cuda:
        raise PermanentError(
            f"{TEACHER}.quantization {teacher.quantization.value} needs a CUDA GPU in "
            "sequences mode (vLLM loads a quantized teacher on CUDA only here), and this "
            f"generation pod has none: set {TEACHER}.quantization to none, use logits mode "
            "(which runs a quantized teacher on CPU too), or schedule the job on GPU nodes"
        )
    try:
        model_dir = resolve_model_dir(teacher)
    except PermanentError as exc:
        raise PermanentError(f"{TEACHER}.uri: {exc}") from exc
    kwargs: dict[str, Any] = {
        "model": model_dir,
        "seed": d.sampling.seed,
        "dtype": d.sampling.dtype,
        "max_num_seqs": max(1, min(256, d.sampling.records_per_chunk)),
        # A chunk computes the same whatever ran before it in this process: a resumed shard's
        # engine has not seen the chunks before, so nothing may be reused across chunks.
        "enable_prefix_caching": False,
    }
    if teacher.quantization is Quantization.NF4:
        kwargs["quantization"] = "bitsandbytes"
    lora = None
    if teacher.adapter_uri:
        from vllm.lora.request import LoRARequest  # type: ignore[import-not-found]

        from cheapspot_worker.distill import fetch_teacher_adapter

        adapter = fetch_teacher_adapter(teacher.adapter_uri)
        rank = json.loads((Path(adapter) / "adapter_config.json").read_text()).get("r", 16)
        kwargs.update(enable_lora=True, max_loras=1, max_lora_rank=_lora_rank(int(rank)))
        lora = LoRARequest("teacher", 1, adapter)
    from vllm import LLM

    try:
        llm = LLM(**kwargs)
    except (ValueError, OSError) as exc:
        raise PermanentError(f"{TEACHER} {teacher.uri} cannot be loaded by vLLM: {exc}") from exc
    return Teacher(llm, lora)


def _lora_rank(rank: int) -> int:
    from cheapspot_worker.serving import LORA_RANKS

    return next((r for r in LORA_RANKS if r >= rank), LORA_RANKS[-1])


def _cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def generate_chunk(teacher: Teacher, task: Task, prompts: list[str], chunk: Chunk) -> bytes:
    """The chunk's records as JSONL: one ``llm.generate`` call, the whole chunk one batch."""
    d = task.distillation
    assert d is not None
    mine = prompts[chunk.first : chunk.end]
    outputs = teacher.llm.generate(
        mine,
        sampling_params(d.sampling, chunk.first, chunk.size),
        use_tqdm=False,
        lora_request=teacher.lora,
    )
    lines = [
        json.dumps(
            {"prompt": prompt, "completion": out.outputs[0].text, "index": chunk.first + j},
            ensure_ascii=False,
        )
        for j, (prompt, out) in enumerate(zip(mine, outputs, strict=True))
    ]
    return ("\n".join(lines) + "\n").encode()


def run_generate(task: Task, store: Store, stop: Stop) -> int:
    """Complete this shard's prompts, chunk by chunk; the records generated by this call.
    The teacher is loaded only when a chunk is left to generate."""
    d = task.distillation
    if d is None or not d.sequences:
        raise PermanentError("the generate role runs only for distillation.mode sequences")
    layout, shard = task.layout, task.shard_index
    reporter = Reporter(store, layout, Role.GENERATE, shard)
    reporter.update(phase=Phase.LOADING, force=True)
    records = parse_jsonl(read_dataset_bytes(task.dataset.uri), task.dataset.uri)
    prompts = prompts_of(records, task.dataset.uri)
    first, end = shard_range(len(prompts), shard, task.shard_count)
    if end <= first:
        raise PermanentError(
            f"the dataset has {len(prompts)} records, fewer than the {task.shard_count} "
            "shards; add data or lower shards"
        )
    plan = chunks(first, end, d.sampling.records_per_chunk)
    todo = [c for c in plan if not store.has_manifest(layout.generated_chunk(shard, c.index))]
    done = sum(c.size for c in plan if c not in todo)
    previous = reporter.previous
    resumed = bool(todo) and done > 0
    reporter.update(
        phase=Phase.GENERATING,
        step=done,
        total_steps=end - first,
        resumes=(previous.resumes if previous else 0) + (1 if resumed else 0),
        force=True,
    )
    event("generate_plan", shard=shard, records=end - first, chunks=len(plan), left=len(todo))
    generated = 0
    if todo:
        teacher = load_teacher(task)
        for chunk in todo:
            if stop.requested:
                reporter.try_flush()
                raise Interrupted(f"SIGTERM: {done} of {end - first} records published")
            data = generate_chunk(teacher, task, prompts, chunk)
            store.publish(
                layout.generated_chunk(shard, chunk.index),
                {GENERATED_FILE: data},
                meta={"first_record": chunk.first, "records": chunk.size},
            )
            done += chunk.size
            generated += chunk.size
            reporter.update(phase=Phase.GENERATING, step=done)
            event("chunk_published", shard=shard, chunk=chunk.index, records=done)
    index = {
        "chunks": len(plan),
        "records": end - first,
        "first_record": first,
        "teacher": d.teacher.uri,
        "generation": d.sampling.model_dump(by_alias=True),
    }
    store.publish(
        layout.generated_done(shard),
        {GENERATED_INDEX: json.dumps(index, indent=1).encode()},
        meta=index,
    )
    reporter.update(phase=Phase.DONE, step=done, force=True)
    return generated

"""Sequences-mode distillation in the worker, without vLLM: how generation shards cut the
dataset into chunks, the errors that stop a generation shard before it loads anything, how
training reads the generated records (only finished shards, in dataset order), and what the
final adapter says about a sequences-mode run. The generation itself (vLLM) is in
tests/integration/test_generation.py."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from cheapspot.contract import Layout, Role, Task
from cheapspot.store import Store
from cheapspot_worker.data import GENERATED_FILE, GENERATED_INDEX, read_generated
from cheapspot_worker.errors import PermanentError, Stop
from cheapspot_worker.generate import chunks, run_generate, shard_range
from cheapspot_worker.testing import Launcher, job_tasks, make_task
from cheapspot_worker.tiny import learnable_records, write_jsonl

SEQUENCES = {"mode": "sequences", "generation": {"maxNewTokens": 8, "recordsPerChunk": 3}}


def test_chunks_are_fixed_by_record_index_and_shards_cover_the_dataset_in_order() -> None:
    ranges = [shard_range(10, i, 3) for i in range(3)]
    assert ranges == [(0, 3), (3, 6), (6, 10)]
    assert [(c.index, c.first, c.end) for c in chunks(6, 10, 3)] == [(0, 6, 9), (1, 9, 10)]
    every = [j for lo, hi in ranges for c in chunks(lo, hi, 3) for j in range(c.first, c.end)]
    assert every == list(range(10))


def _task(tmp_path: Path, teacher: dict[str, str], dataset: Path) -> Task:
    return make_task(
        f"file://{tmp_path}/out/",
        "file:///nowhere/student",
        f"file://{dataset}",
        role=Role.GENERATE,
        distillation={"teacher": teacher, **SEQUENCES},  # type: ignore[dict-item]
    )


def test_a_teacher_that_does_not_exist_fails_naming_the_field(tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "d.jsonl", learnable_records(6, "prompt-completion"))
    task = _task(tmp_path, {"uri": f"file://{tmp_path}/no-teacher"}, data)
    with pytest.raises(PermanentError, match=r"distillation\.teacher\.uri: model file://"):
        run_generate(task, Store(task.output_uri), Stop())


def test_a_quantized_teacher_without_cuda_fails_naming_the_field(tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "d.jsonl", learnable_records(6, "prompt-completion"))
    task = _task(tmp_path, {"uri": f"file://{tmp_path}/t", "quantization": "nf4"}, data)
    with pytest.raises(PermanentError, match=r"distillation\.teacher\.quantization nf4 needs"):
        run_generate(task, Store(task.output_uri), Stop())


def test_records_without_a_prompt_fail_naming_the_line(tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "d.jsonl", learnable_records(6, "text"))
    task = _task(tmp_path, {"uri": f"file://{tmp_path}/t"}, data)
    with pytest.raises(PermanentError, match=r"line 1: sequences-mode distillation needs"):
        run_generate(task, Store(task.output_uri), Stop())


def _publish_generated(
    store: Store, layout: Layout, shard: int, records: list[dict[str, str]], per_chunk: int
) -> None:
    for k, lo in enumerate(range(0, len(records), per_chunk)):
        lines = "".join(json.dumps(r) + "\n" for r in records[lo : lo + per_chunk])
        store.publish(layout.generated_chunk(shard, k), {GENERATED_FILE: lines.encode()})
    n_chunks = -(-len(records) // per_chunk)
    index = {"chunks": n_chunks, "records": len(records)}
    store.publish(
        layout.generated_done(shard),
        {GENERATED_INDEX: json.dumps(index).encode()},
        meta=index,
    )


def test_training_reads_finished_generation_shards_in_dataset_order(tmp_path: Path) -> None:
    store, layout = Store(f"file://{tmp_path}/"), Layout(f"file://{tmp_path}/")
    first = [{"prompt": f"p{i}", "completion": f" c{i}"} for i in range(5)]
    second = [{"prompt": f"p{i}", "completion": f" c{i}"} for i in range(5, 9)]
    _publish_generated(store, layout, 1, second, 3)
    # Shard 0 has published a chunk but not finished: nothing of it is trusted.
    store.publish(layout.generated_chunk(0, 0), {GENERATED_FILE: b'{"prompt": "x"}\n'})
    with pytest.raises(PermanentError, match="generation shard 0 has not published"):
        read_generated(store, layout, 2)
    store.delete_prefix(layout.generated_chunk(0, 0))
    _publish_generated(store, layout, 0, first, 3)
    got = [json.loads(line) for line in read_generated(store, layout, 2).splitlines()]
    assert got == first + second


def test_a_sequences_job_trains_on_the_generated_records_and_says_how(
    tmp_path: Path, tiny_models: Callable[[str], Path]
) -> None:
    # A teacher that does not exist: training must not load it (it reads the teacher's text).
    generation = {"maxNewTokens": 8, "temperature": 0.0, "seed": 3, "recordsPerChunk": 5}
    template = make_task(
        f"file://{tmp_path}/job/",
        f"file://{tiny_models('llama')}",
        f"file://{tmp_path}/prompts.jsonl",  # never read by training in sequences mode
        shard_count=2,
        distillation={  # type: ignore[arg-type]
            "teacher": {"uri": "s3://models/teacher-that-only-generated/"},
            "mode": "sequences",
            "generation": generation,
        },
        training={"steps": 8},
        rounds={"localSteps": 4},
    )
    store, layout = Store(template.output_uri), template.layout
    records = learnable_records(40, "prompt-completion", seed=5)
    _publish_generated(store, layout, 0, records[:20], 5)
    _publish_generated(store, layout, 1, records[20:], 5)
    codes = Launcher(tmp_path / "logs").run_all(job_tasks(template))
    assert set(codes.values()) == {0}, codes
    final = layout.final
    summary = json.loads(store.get_bytes(final + "training_summary.json"))
    how = summary["distillation"]
    assert how["mode"] == "sequences"
    assert how["teacher"] == "s3://models/teacher-that-only-generated/"
    assert how["generation"]["maxNewTokens"] == 8 and how["generation"]["seed"] == 3
    assert how["generated_records"] == 40
    assert how["generated_dataset"] == f"file://{tmp_path}/job/generated/"
    manifest = store.read_manifest(final)
    assert manifest is not None and manifest.meta["distillation"] == how
    assert summary["loss_curve"][-1]["loss"] < summary["loss_curve"][0]["loss"]

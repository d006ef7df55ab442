"""The gpu tier: real CUDA training of a small model through the worker, as a pod runs it.

Skipped, with the reason, where there is no CUDA device (and the quantized cases where
bitsandbytes, part of the ``worker`` extra, is not installed). ``benchmarks/gpu_check.sh`` runs this
tier and the GPU figures in one go.

What is promised on a GPU:

* NF4 and int8 bases train LoRA adapters that learn, and the adapter trained on the
  quantized base loads in stock PEFT on the unquantized base and helps there too;
* bf16 compute where the GPU has it (fp16 autocast on older ones), with or without
  gradient checkpointing;
* resuming after SIGTERM gives the same adapter bits as a run that never stopped: the same
  kernels on the same GPU, deterministic algorithms on and cuBLAS's workspace fixed
  (``setup_determinism``), and every CUDA RNG state in the checkpoint;
* logits distillation with a 4-bit teacher next to a bf16 student.
"""

from __future__ import annotations

import importlib.util
import json
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from cheapspot.contract import ExitCode, Task
from cheapspot_worker.testing import Interruption, Launcher, job_tasks, make_task, run_interrupted

pytestmark = pytest.mark.gpu

needs_bitsandbytes = pytest.mark.skipif(
    # Without CUDA the tier's own reason (no CUDA device) is the one to show.
    torch.cuda.is_available() and importlib.util.find_spec("bitsandbytes") is None,
    reason="gpu tier: bitsandbytes is not installed (pip install 'cheapspot[worker]')",
)

FINAL = "final/adapter_model.safetensors"


@pytest.fixture(scope="module")
def small_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small random-weight Qwen2 (hidden 256, 4 layers, head size 64), built here."""
    from cheapspot_worker.tiny import build_model

    return build_model(
        tmp_path_factory.mktemp("gpu-model") / "qwen2", "qwen2", hidden=256, layers=4
    )


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from cheapspot_worker.tiny import learnable_records, write_jsonl

    return write_jsonl(tmp_path_factory.mktemp("gpu-data") / "train.jsonl", learnable_records(128))


@pytest.fixture
def launcher(tmp_path: Path) -> Launcher:
    # As a pod runs it: a fresh process, CUDA initialised there and nowhere else.
    return Launcher(tmp_path / "logs", mode="exec")


@pytest.fixture
def job(tmp_path: Path, small_model: Path, data: Path) -> Callable[..., dict[str, Task]]:
    def make(name: str, model_uri: str | None = None, **sections: Any) -> dict[str, Task]:
        sections.setdefault("training", {})
        sections["training"] = {
            "steps": 30,
            "batchSize": 8,
            "gradientAccumulation": 2,
            "learningRate": 2e-2,
            "maxSeqLength": 48,
            **sections["training"],
        }
        sections.setdefault("rounds", {"localSteps": 15})
        return job_tasks(
            make_task(
                f"file://{tmp_path}/{name}/",
                model_uri or f"file://{small_model}",
                f"file://{data}",
                **sections,
            )
        )

    return make


def _root(tasks: dict[str, Task]) -> Path:
    return Path(tasks["anchor"].output_uri[len("file://") :])


def _summary(tasks: dict[str, Task]) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads((_root(tasks) / "final/training_summary.json").read_text())
    return doc


def _run(launcher: Launcher, tasks: dict[str, Task]) -> dict[str, Any]:
    """Run the job; the shard's ``setup_done`` event (device, dtype, quantization)."""
    procs = {name: launcher.start(name, task) for name, task in tasks.items()}
    codes = {name: p.wait(600) for name, p in procs.items()}
    log = procs["shard0"].log_file.read_text()[-3000:]
    assert set(codes.values()) == {0}, f"{codes}\n{log}"
    setup = [e for e in procs["shard0"].events() if e.get("event") == "setup_done"]
    assert setup, log
    return setup[0]


def _assert_learned(summary: dict[str, Any], key: str = "loss", by: float = 0.5) -> None:
    curve = [p[key] for p in summary["loss_curve"]]
    first, last = sum(curve[:5]) / 5, sum(curve[-5:]) / 5
    assert last < first - by, f"{key} went from {first:.3f} to {last:.3f}"


def _mean_loss(model: Any, batches: list[torch.Tensor]) -> float:
    with torch.no_grad():
        return sum(float(model(input_ids=b, labels=b).loss) for b in batches) / len(batches)


@needs_bitsandbytes
@pytest.mark.parametrize("quantization", ["nf4", "int8"])
def test_quantized_base_trains_and_its_adapter_loads_on_the_unquantized_base(
    quantization: str,
    job: Callable[..., dict[str, Task]],
    launcher: Launcher,
    small_model: Path,
    data: Path,
) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tasks = job(f"q-{quantization}", model={"quantization": quantization})
    setup = _run(launcher, tasks)
    assert setup["device"].startswith("cuda") and setup["quantization"] == quantization
    _assert_learned(_summary(tasks))

    tokenizer = AutoTokenizer.from_pretrained(small_model)
    texts = [json.loads(line)["text"] for line in data.read_text().splitlines()[:16]]
    batches = [tokenizer(t, return_tensors="pt").input_ids.cuda() for t in texts]
    base = AutoModelForCausalLM.from_pretrained(small_model, dtype=torch.float32).cuda().eval()
    before = _mean_loss(base, batches)
    stock = PeftModel.from_pretrained(base, _root(tasks) / "final").eval()
    after = _mean_loss(stock, batches)
    # Trained against the quantized weights, the adapter still helps the full-precision ones.
    assert after < before - 0.5, f"unquantized base: loss {before:.3f} -> {after:.3f}"


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "gradient-checkpointing"])
def test_bf16_training_learns(
    checkpointing: bool, job: Callable[..., dict[str, Task]], launcher: Launcher
) -> None:
    tasks = job(f"bf16-{checkpointing}", training={"gradientCheckpointing": checkpointing})
    setup = _run(launcher, tasks)
    expected = "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    assert setup["device"].startswith("cuda") and setup["dtype"] == expected
    _assert_learned(_summary(tasks))


def test_sigterm_resumes_give_the_same_adapter_on_gpu(
    job: Callable[..., dict[str, Task]], launcher: Launcher
) -> None:
    sections = {"checkpoint": {"everySteps": 4, "everySeconds": 0, "keep": 3}}
    reference = job("reference", **sections)
    _run(launcher, reference)
    expected = (_root(reference) / FINAL).read_bytes()

    tasks = job("sigterm", **sections)
    plan = [
        Interruption("shard0", signal.SIGTERM, "shard0", 7),
        Interruption("shard0", signal.SIGTERM, "shard0", 19),
    ]
    happened, codes = run_interrupted(launcher, tasks, plan, timeout=600)
    assert set(codes.values()) == {0}, codes
    assert len(happened) == 2 and all(h.returncode == ExitCode.INTERRUPTED for h in happened)
    got = (_root(tasks) / FINAL).read_bytes()
    if got != expected:
        from safetensors.torch import load

        a, b = load(expected), load(got)
        worst = max(float((a[k] - b[k]).abs().max()) for k in a)
        pytest.fail(f"resumed adapter differs from the uninterrupted one (max |diff| {worst:g})")


@needs_bitsandbytes
def test_logits_distillation_with_a_4bit_teacher(
    job: Callable[..., dict[str, Task]], launcher: Launcher, tmp_path: Path
) -> None:
    from cheapspot_worker.tiny import build_model, build_teacher

    teacher = build_teacher(tmp_path / "teacher", "llama")
    student = build_model(tmp_path / "student", "llama")
    tasks = job(
        "distil",
        model_uri=f"file://{student}",
        distillation={
            "teacher": {"uri": f"file://{teacher}", "quantization": "nf4"},
            "temperature": 1.0,
            "alpha": 0.8,
        },
        training={"learningRate": 1e-2},
    )
    setup = _run(launcher, tasks)
    assert setup["distillation"] == "logits"
    summary = _summary(tasks)
    assert summary["distillation"]["teacher_quantization"] == "nf4"
    _assert_learned(summary, key="kl", by=0.0)

"""Quantized bases (``model.quantization: nf4 | int8``) on the CPU, through the worker.

bitsandbytes runs NF4 and int8 on the CPU as well as on CUDA, so the quantized path is part
of the unit tier: a tiny random-weight model loads with Linear4bit / Linear8bitLt layers,
LoRA trains on top as real worker processes, the published adapter loads with stock PEFT on
the same quantized base, and a job killed mid-way ends with the same adapter bits as one
that never stopped (see test_a_killed_quantized_job_ends_bit_identical for what "the same"
means here and why it holds).

The model is 64 wide, not the usual 32: on CPUs with AVX512-BF16, stock bitsandbytes
repacks a frozen NF4 layer for a bfloat16 kernel at its first inference call, and that
repacking needs 64 or more input features (any real model has them; the 32-wide tiny one
does not). The worker turns the repacking off (``keep_cpu_compute_dtype``); the stock PEFT
check below runs the base as a user would, with it.
"""

from __future__ import annotations

import json
import os
import random
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from cheapspot.contract import ModelSource, Quantization, Task
from cheapspot_worker.errors import PermanentError
from cheapspot_worker.testing import Interruption, Launcher, job_tasks, make_task, run_interrupted

SEED = int(os.environ.get("CHEAPSPOT_TEST_SEED") or random.SystemRandom().randrange(10**6))
FINAL = "final/adapter_model.safetensors"
LAYER = {"nf4": "Linear4bit", "int8": "Linear8bitLt"}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random-weight llama, 64 wide (see the module's docstring)."""
    from cheapspot_worker.tiny import build_model

    return build_model(tmp_path_factory.mktemp("quantized") / "llama", "llama", hidden=64)


@pytest.fixture
def launcher(tmp_path: Path) -> Launcher:
    return Launcher(tmp_path / "logs")


@pytest.fixture
def job(tmp_path: Path, model_dir: Path, learnable_dataset: Path) -> Callable[..., dict[str, Task]]:
    """``job(name, quantization, **sections)``: the tasks of a one-shard job on the base."""

    def make(name: str, quantization: str, **sections: Any) -> dict[str, Task]:
        template = make_task(
            f"file://{tmp_path}/{name}/",
            f"file://{model_dir}",
            f"file://{learnable_dataset}",
            **{"training": {"steps": 12}, "rounds": {"localSteps": 6}, **sections},
        )
        model = template.model.model_copy(update={"quantization": Quantization(quantization)})
        return job_tasks(template.model_copy(update={"model": model}))

    return make


def _root(tasks: dict[str, Task]) -> Path:
    return Path(tasks["anchor"].output_uri[len("file://") :])


def _stock_config(quantization: str) -> Any:
    """What a user writes to load the base as the job did, with stock transformers."""
    from transformers import BitsAndBytesConfig

    if quantization == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_compute_dtype=torch.float32,
        bnb_4bit_use_double_quant=True,
    )


@pytest.mark.parametrize("quantization", ["nf4", "int8"])
def test_loads_quantized_trains_and_stock_peft_loads_the_adapter(
    quantization: str,
    model_dir: Path,
    job: Callable[..., dict[str, Task]],
    launcher: Launcher,
) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from cheapspot.store import Store
    from cheapspot_worker.loading import (
        keep_cpu_compute_dtype,
        load_base_model,
        set_adapter_state,
        wrap_lora,
    )
    from cheapspot_worker.training import fetch_adapter

    source = ModelSource(uri=f"file://{model_dir}", quantization=Quantization(quantization))
    base = load_base_model(str(model_dir), source, cuda=False)
    kinds = {name: type(m).__name__ for name, m in base.named_modules()}
    quantized = [n for n, k in kinds.items() if k == LAYER[quantization]]
    plain = [n for n, k in kinds.items() if k == "Linear"]
    # Every projection of both layers is quantized; the output layer stays as it is.
    assert len(quantized) == 2 * 7, kinds
    assert plain == ["lm_head"], plain

    tasks = job(f"train-{quantization}", quantization)
    codes = launcher.run_all(tasks)
    assert set(codes.values()) == {0}, codes
    summary = json.loads((_root(tasks) / "final/training_summary.json").read_text())
    losses = [p["loss"] for p in summary["loss_curve"]]
    assert len(losses) == 12 and len(set(losses)) == 12, losses
    assert sum(losses[-3:]) < sum(losses[:3]), f"the loss did not fall: {losses}"
    setup = [
        e
        for p in launcher.workdir.glob("shard0-*.log")
        for line in p.read_text().splitlines()
        if line.startswith("{") and (e := json.loads(line)).get("event") == "setup_done"
    ]
    assert setup and setup[0]["quantization"] == quantization and setup[0]["device"] == "cpu"

    ids = torch.tensor([[5, 17, 42, 99, 7, 3, 250, 11]])
    final = str(_root(tasks) / "final")

    def stock(as_the_worker_computes: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits of the base and of the base with the adapter, loaded with stock
        transformers and PEFT."""
        base = AutoModelForCausalLM.from_pretrained(
            str(model_dir), quantization_config=_stock_config(quantization), device_map={"": "cpu"}
        )
        assert any(type(m).__name__ == LAYER[quantization] for m in base.modules())
        if as_the_worker_computes:
            keep_cpu_compute_dtype(base)
        base.eval()
        with torch.no_grad():
            plain = base(ids).logits
            adapted = PeftModel.from_pretrained(base, final).eval()(ids).logits
        return plain, adapted

    base_logits, stock_logits = stock(as_the_worker_computes=False)
    assert torch.isfinite(stock_logits).all()
    assert not torch.allclose(stock_logits, base_logits), "the adapter changed nothing"

    # The worker's own model with the adapter it published gives the same logits as stock
    # PEFT on a base computing as the worker's does.
    task = tasks["shard0"]
    ours = wrap_lora(load_base_model(str(model_dir), task.model, cuda=False), task.lora, "x")
    state, _ = fetch_adapter(Store(task.output_uri), task.layout.global_adapter(2))
    set_adapter_state(ours, state)
    ours.eval()
    with torch.no_grad():
        our_logits = ours(ids).logits
    base_logits, stock_logits = stock(as_the_worker_computes=True)
    assert torch.equal(stock_logits, our_logits)
    assert not torch.allclose(stock_logits, base_logits), "the adapter changed nothing"


@pytest.fixture(scope="module")
def references() -> dict[str, bytes]:
    """Final adapters of uninterrupted quantized runs, by quantization (filled on first use)."""
    return {}


@pytest.mark.parametrize("quantization", ["nf4", "int8"])
def test_a_killed_quantized_job_ends_bit_identical(
    quantization: str,
    job: Callable[..., dict[str, Task]],
    launcher: Launcher,
    references: dict[str, bytes],
) -> None:
    """What "exactly" means on a quantized base: with the same bitsandbytes, torch and CPU
    type, and the worker's fixed thread count, a job whose shard and anchor are SIGKILLed
    and SIGTERMed mid-way publishes the same final adapter bytes as one that never stopped.

    Why it holds: the base is quantized at load from the same weights by the same blockwise
    rule (no randomness), it is frozen, and training's forward and backward go through the
    same dequantize-then-matmul kernels whatever step a process started at; everything that
    does change (the adapter, AdamW's moments, the RNG streams) is in the checkpoint, as on
    an unquantized base. Measured before it was asserted: two such runs, twice each, gave
    byte-identical adapters.
    """
    if quantization not in references:
        tasks = job(f"reference-{quantization}", quantization)
        assert set(launcher.run_all(tasks).values()) == {0}
        references[quantization] = (_root(tasks) / FINAL).read_bytes()
    rng = random.Random(SEED)
    kill, term = sorted(rng.sample(range(2, 10), 2))
    plan = [
        Interruption("shard0", signal.SIGKILL, "shard0", kill),
        Interruption("shard0", signal.SIGTERM, "shard0", term),
        Interruption("anchor", signal.SIGKILL, "shard0", term + 1),
    ]
    tasks = job(f"killed-{quantization}", quantization)
    happened, codes = run_interrupted(launcher, tasks, plan)
    context = f"seed {SEED}, plan {plan}, happened {[(h.target, h.returncode) for h in happened]}"
    assert set(codes.values()) == {0}, context
    assert len(happened) >= 2, context
    assert (_root(tasks) / FINAL).read_bytes() == references[quantization], context


def test_a_worker_without_bitsandbytes_fails_naming_the_field(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import sys

    from cheapspot_worker.loading import check_quantization

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    source = ModelSource(uri="file:///m", quantization=Quantization.INT8)
    with pytest.raises(PermanentError) as err:
        check_quantization(source, cuda=False)
    message = str(err.value)
    assert message.startswith("model.quantization int8 needs the bitsandbytes package"), message
    assert "cheapspot[worker]" in message


def test_a_device_bitsandbytes_cannot_run_fails_naming_the_field(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import bitsandbytes.functional

    from cheapspot_worker.loading import check_quantization

    def no_kernel(*args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError("no kernel for this device")

    monkeypatch.setattr(bitsandbytes.functional, "quantize_4bit", no_kernel)
    source = ModelSource(uri="file:///m", quantization=Quantization.NF4)
    with pytest.raises(PermanentError) as err:
        check_quantization(source, "distillation.teacher", cuda=False)
    message = str(err.value)
    assert message.startswith("distillation.teacher.quantization nf4 cannot run on this "), message
    assert "cpu" in message and "no kernel for this device" in message
    assert "set distillation.teacher.quantization to none" in message


def test_the_quantized_path_on_cpu_needs_no_cuda() -> None:
    from cheapspot_worker.loading import check_quantization

    for q in (Quantization.NF4, Quantization.INT8):
        config = check_quantization(ModelSource(uri="file:///m", quantization=q), cuda=False)
        assert config.load_in_4bit == (q is Quantization.NF4)
        assert config.load_in_8bit == (q is Quantization.INT8)
        assert config.bnb_4bit_compute_dtype == torch.float32
    assert check_quantization(ModelSource(uri="file:///m"), cuda=False) is None

"""Training jobs end to end on tiny models, with workers as real processes.

The promise under test: the final adapter depends only on the spec, the data and the seed,
not on when or how often the processes were killed. Kill points are random; the seed is in
every failure message (set CHEAPSPOT_TEST_SEED to replay one).
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

from cheapspot.contract import ExitCode, Progress, Task
from cheapspot_worker.testing import (
    Happened,
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
def job(
    tmp_path: Path, tiny_models: Callable[[str], Path], learnable_dataset: Path
) -> Callable[..., dict[str, Task]]:
    """``job(name, shards=1, arch="llama", **sections)``: the tasks of one job."""

    def make(name: str, shards: int = 1, arch: str = "llama", **sections: Any) -> dict[str, Task]:
        template = make_task(
            f"file://{tmp_path}/{name}/",
            f"file://{tiny_models(arch)}",
            f"file://{learnable_dataset}",
            shard_count=shards,
            **sections,
        )
        return job_tasks(template)

    return make


def _root(tasks: dict[str, Task]) -> Path:
    return Path(tasks["anchor"].output_uri[len("file://") :])


def _final(tasks: dict[str, Task]) -> bytes:
    return (_root(tasks) / FINAL).read_bytes()


@pytest.fixture(scope="module")
def references() -> dict[int, bytes]:
    """Final adapters of uninterrupted runs, by shard count (filled on first use)."""
    return {}


def _reference(
    shards: int,
    references: dict[int, bytes],
    job: Callable[..., dict[str, Task]],
    launcher: Launcher,
) -> bytes:
    if shards not in references:
        tasks = job(f"reference-{shards}", shards)
        codes = launcher.run_all(tasks)
        assert set(codes.values()) == {0}, codes
        references[shards] = _final(tasks)
    return references[shards]


def test_loss_falls_on_a_learnable_dataset(
    job: Callable[..., dict[str, Task]], launcher: Launcher
) -> None:
    tasks = job("learn", training={"steps": 40, "learningRate": 0.1}, rounds={"localSteps": 20})
    assert set(launcher.run_all(tasks).values()) == {0}
    summary = json.loads((_root(tasks) / "final/training_summary.json").read_text())
    losses = [p["loss"] for p in summary["loss_curve"]]
    assert len(losses) == 40
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < first - 1.0, f"loss went from {first:.3f} to {last:.3f}"
    assert summary["steps"] == 40 and summary["tokens"] > 0


@pytest.mark.parametrize("arch", ["llama", "qwen2", "deepseek_v3"])
def test_architecture_trains_and_stock_peft_gives_the_same_logits(
    arch: str,
    job: Callable[..., dict[str, Task]],
    launcher: Launcher,
    tiny_models: Callable[[str], Path],
) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from cheapspot_worker.loading import load_base_model, set_adapter_state, wrap_lora
    from cheapspot_worker.training import fetch_adapter

    # PEFT adapts fused MoE expert weights only without dropout.
    lora = {"dropout": 0.0} if arch == "deepseek_v3" else {}
    tasks = job(
        f"arch-{arch}", arch=arch, training={"steps": 6}, rounds={"localSteps": 3}, lora=lora
    )
    assert set(launcher.run_all(tasks).values()) == {0}
    final_dir = _root(tasks) / "final"
    config = json.loads((final_dir / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4

    model_dir = tiny_models(arch)
    ids = torch.tensor([[5, 17, 42, 99, 7, 3, 250, 11]])
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    base.eval()
    with torch.no_grad():
        base_logits = base(ids).logits
    stock = PeftModel.from_pretrained(base, final_dir)
    stock.eval()

    task = tasks["shard0"]
    ours = wrap_lora(load_base_model(str(model_dir), task.model, cuda=False), task.lora, "x")
    from cheapspot.store import Store

    state, _ = fetch_adapter(Store(task.output_uri), task.layout.global_adapter(2))
    set_adapter_state(ours, state)
    ours.eval()
    with torch.no_grad():
        stock_logits = stock(ids).logits
        our_logits = ours(ids).logits
    assert torch.equal(stock_logits, our_logits)
    assert not torch.allclose(stock_logits, base_logits), "the adapter changed nothing"


def _plan(
    rng: random.Random, targets: list[str], sig: int, count: int, steps: int
) -> list[Interruption]:
    """``count`` interruptions at increasing random steps, each of a random target.

    The last few steps are left alone: a process that finishes before its signal lands
    would make the interruption a no-op, not a test.
    """
    at = sorted(rng.sample(range(1, steps - 5, 2), count))
    plan = []
    for step in at:
        target = rng.choice(targets)
        watch = target if target != "anchor" else "shard0"
        plan.append(Interruption(target, sig, watch, step))
    return plan


def _assert_sigterm_lost_at_most_the_step_in_flight(happened: list[Happened]) -> None:
    for h in happened:
        if h.sig != signal.SIGTERM or h.target == "anchor" or h.returncode == 0:
            continue
        assert h.returncode == ExitCode.INTERRUPTED, h
        saved = [e["step"] for e in h.log if e.get("event") == "checkpoint"]
        assert saved, f"{h.target}: no checkpoint after SIGTERM"
        # Steps seen done before the signal are all in the checkpoint; only the step in
        # flight (if it could not finish within the budget) may be missing.
        assert saved[-1] >= h.last_step_seen, (saved[-1], h.last_step_seen)


def test_sigkill_at_random_steps_gives_the_same_adapter(
    job: Callable[..., dict[str, Task]], launcher: Launcher, references: dict[int, bytes]
) -> None:
    expected = _reference(1, references, job, launcher)
    rng = random.Random(SEED)
    plan = _plan(rng, ["shard0", "shard0", "anchor"], signal.SIGKILL, 4, 24)
    tasks = job("sigkill")
    happened, codes = run_interrupted(launcher, tasks, plan)
    context = f"seed {SEED}, plan {plan}, happened {[(h.target, h.returncode) for h in happened]}"
    assert set(codes.values()) == {0}, context
    assert len(happened) >= 2, context
    assert all(h.returncode == -signal.SIGKILL for h in happened), context
    assert _final(tasks) == expected, context


def test_sigterm_at_random_steps_loses_at_most_the_step_in_flight(
    job: Callable[..., dict[str, Task]], launcher: Launcher, references: dict[int, bytes]
) -> None:
    expected = _reference(1, references, job, launcher)
    rng = random.Random(SEED + 1)
    plan = _plan(rng, ["shard0"], signal.SIGTERM, 3, 24)
    tasks = job("sigterm")
    happened, codes = run_interrupted(launcher, tasks, plan)
    context = f"seed {SEED}, plan {plan}, happened {[(h.target, h.returncode) for h in happened]}"
    assert set(codes.values()) == {0}, context
    assert len(happened) >= 2, context
    _assert_sigterm_lost_at_most_the_step_in_flight(happened)
    assert _final(tasks) == expected, context
    progress = Progress.from_json((_root(tasks) / "progress/shard-0000.json").read_bytes())
    assert progress.resumes == len(happened)
    summary = json.loads((_root(tasks) / "final/training_summary.json").read_text())
    assert summary["preemptions_survived"] >= len(happened)


def test_two_shards_and_the_anchor_killed_in_varying_order(
    job: Callable[..., dict[str, Task]], launcher: Launcher, references: dict[int, bytes]
) -> None:
    expected = _reference(2, references, job, launcher)
    assert expected != references.get(1), "two shards should not equal one"
    rng = random.Random(SEED + 2)
    plan = _plan(rng, ["shard0", "shard1", "anchor"], signal.SIGKILL, 3, 24)
    plan += _plan(rng, ["shard0", "shard1", "anchor"], signal.SIGTERM, 2, 24)
    plan.sort(key=lambda it: it.at_step)
    tasks = job("two-shards", 2)
    happened, codes = run_interrupted(launcher, tasks, plan)
    context = f"seed {SEED}, plan {plan}, happened {[(h.target, h.returncode) for h in happened]}"
    assert set(codes.values()) == {0}, context
    assert len(happened) >= 3, context
    _assert_sigterm_lost_at_most_the_step_in_flight(happened)
    assert _final(tasks) == expected, context
    # Every global adapter on the way is identical too, not just the last.
    reference_root = _root(job("reference-2", 2))
    for r in range(4):
        rel = f"rounds/{r:05d}/global/adapter.safetensors"
        assert (_root(tasks) / rel).read_bytes() == (reference_root / rel).read_bytes(), rel


def test_corrupted_latest_checkpoint_falls_back_to_the_previous(
    job: Callable[..., dict[str, Task]],
    launcher: Launcher,
    references: dict[int, bytes],
    tmp_path: Path,
) -> None:
    expected = _reference(1, references, job, launcher)
    tasks = job("corrupt")
    # The shard runs as a pod runs it, `python -m cheapspot_worker` (the other tests fork
    # the same main() from a preloaded server to save ~15 s of imports per start).
    command = Launcher(tmp_path / "exec-logs", mode="exec")
    procs = {"anchor": launcher.start("anchor", tasks["anchor"])}
    procs["shard0"] = command.start("shard0", tasks["shard0"])
    shard = procs["shard0"]
    assert shard.wait_for(lambda e: e.get("event") == "step" and e["step"] >= 13)
    shard.send(signal.SIGTERM)
    assert shard.wait() == ExitCode.INTERRUPTED
    checkpoints = _root(tasks) / "shards/0000/checkpoints"
    steps = sorted(int(p.name) for p in checkpoints.iterdir())
    assert len(steps) >= 2, steps
    latest = checkpoints / f"{steps[-1]:08d}" / "adapter.safetensors"
    data = bytearray(latest.read_bytes())
    data[-1] ^= 0xFF
    latest.write_bytes(bytes(data))

    again = command.start("shard0", tasks["shard0"])
    assert again.wait() == 0
    assert procs["anchor"].wait() == 0
    events = again.events()
    skipped = [e for e in events if e.get("event") == "checkpoint_skipped"]
    resumed = [e for e in events if e.get("event") == "resumed"]
    assert skipped and skipped[0]["step"] == steps[-1]
    assert resumed and resumed[0]["step"] == steps[-2]
    assert _final(tasks) == expected

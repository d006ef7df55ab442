"""Worker checkpoint benchmark: what checkpointing costs a training shard.

Measures, on a small random-weight Llama built locally (CPU, one thread):

1. training throughput with a checkpoint every 10 steps against none (target: <= 3 % slower),
2. time from SIGTERM to the checkpoint published and the process exited,
3. adapter and checkpoint sizes: measured here, and computed for real model shapes (the
   meta device: nothing is downloaded).

Run: ``.venv/bin/python benchmarks/worker_checkpoints.py`` (a few minutes). Figures go to
docs/benchmarks.md, section "Worker".
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import signal
import statistics
import tempfile
from datetime import datetime
from pathlib import Path
from typing import Any

from cheapspot.contract import ExitCode, Task
from cheapspot_worker.testing import Launcher, job_tasks, make_task
from cheapspot_worker.tiny import build_model, learnable_records, write_jsonl


def _ts(event: dict[str, Any]) -> float:
    return datetime.fromisoformat(event["ts"]).timestamp()


def _tasks(root: Path, model: Path, data: Path, every_steps: int, steps: int) -> dict[str, Task]:
    return job_tasks(
        make_task(
            f"file://{root}/",
            f"file://{model}",
            f"file://{data}",
            training={
                "steps": steps,
                "batchSize": 8,
                "gradientAccumulation": 1,
                "maxSeqLength": 64,
            },
            rounds={"localSteps": steps},
            checkpoint={"everySteps": every_steps, "everySeconds": 0, "keep": 3},
        )
    )


def throughput(
    work: Path, model: Path, data: Path, steps: int, repeats: int, *, every_n: int = 10
) -> dict[str, Any]:
    """Steps per second between the first and last step, checkpoints every ``every_n`` vs none.

    Runs alternate (none, every 10, none, ...) so drifting machine load hits both alike;
    medians over the repeats. The time the training loop itself is held up per checkpoint
    (the snapshot; the upload overlaps the next steps) is reported separately: on a busy
    shared CPU it is the steadier figure. So is the process's CPU time per step (every
    thread, the upload's too), which other processes on the machine barely move.
    """
    launcher = Launcher(work / "logs")
    runs: dict[int, list[float]] = {0: [], every_n: []}
    cpu: dict[int, list[float]] = {0: [], every_n: []}
    snapshot_s: list[float] = []
    upload_s: list[float] = []
    for i in range(repeats):
        for every in (0, every_n):
            tasks = _tasks(work / f"tp-{every}-{i}", model, data, every, steps)
            procs = {n: launcher.start(n, t) for n, t in tasks.items()}
            assert all(p.wait(600) == 0 for p in procs.values())
            events = procs["shard0"].events()
            times = [_ts(e) for e in events if e.get("event") == "step"]
            runs[every].append((len(times) - 1) / (times[-1] - times[0]))
            cpu_s = [float(e["cpu_s"]) for e in events if e.get("event") == "step"]
            cpu[every].append((cpu_s[-1] - cpu_s[0]) / (len(cpu_s) - 1))
            if every:
                ckpts = [e for e in events if e.get("event") == "checkpoint"]
                snapshot_s += [e["snapshot_seconds"] for e in ckpts]
                upload_s += [e["seconds"] for e in ckpts]
    base, with_ckpt = statistics.median(runs[0]), statistics.median(runs[every_n])
    cpu_base, cpu_ckpt = statistics.median(cpu[0]), statistics.median(cpu[every_n])
    snapshot = statistics.median(snapshot_s)
    return {
        "steps": steps,
        "repeats": repeats,
        "checkpoint_every": every_n,
        "steps_per_s_no_checkpoints": base,
        "steps_per_s_with_checkpoints": with_ckpt,
        "slowdown_percent": 100 * (base - with_ckpt) / base,
        "cpu_s_per_step_no_checkpoints": cpu_base,
        "cpu_s_per_step_with_checkpoints": cpu_ckpt,
        "cpu_overhead_percent": 100 * (cpu_ckpt - cpu_base) / cpu_base,
        "checkpoint_snapshot_s_median": snapshot,
        "checkpoint_upload_s_median": statistics.median(upload_s),
        "blocked_percent": 100 * snapshot / (every_n / base),
    }


def _step_at_least(event: dict[str, Any], at: int) -> bool:
    return event.get("event") == "step" and int(event["step"]) >= at


def sigterm_latency(work: Path, model: Path, data: Path, repeats: int) -> dict[str, Any]:
    """Seconds from SIGTERM to the checkpoint published, and to the process gone."""
    launcher = Launcher(work / "logs-term")
    to_ckpt, to_exit = [], []
    for i in range(repeats):
        tasks = _tasks(work / f"term-{i}", model, data, 0, 400)
        procs = {n: launcher.start(n, t) for n, t in tasks.items()}
        shard = procs["shard0"]
        at = 20 + 7 * i
        assert shard.wait_for(functools.partial(_step_at_least, at=at))
        sent = datetime.now().timestamp()
        shard.send(signal.SIGTERM)
        assert shard.wait() == ExitCode.INTERRUPTED
        gone = datetime.now().timestamp()
        ckpt = [e for e in shard.events() if e.get("event") == "checkpoint"][-1]
        to_ckpt.append(_ts(ckpt) - sent)
        to_exit.append(gone - sent)
        procs["anchor"].kill()
        procs["anchor"].wait()
    return {
        "repeats": repeats,
        "sigterm_to_checkpoint_s_median": statistics.median(to_ckpt),
        "sigterm_to_checkpoint_s_max": max(to_ckpt),
        "sigterm_to_exit_s_median": statistics.median(to_exit),
        "sigterm_to_exit_s_max": max(to_exit),
    }


def sizes(work: Path) -> dict[str, Any]:
    run = next(p for p in work.glob("tp-*-0") if not p.name.startswith("tp-0-"))
    final = run / "final" / "adapter_model.safetensors"
    ckpt_root = run / "shards" / "0000" / "checkpoints"
    ckpt = sorted(ckpt_root.iterdir())[-1]
    return {
        "bench_adapter_bytes": final.stat().st_size,
        "bench_checkpoint_bytes": sum(p.stat().st_size for p in ckpt.iterdir()),
    }


def real_shapes(r: int = 16) -> dict[str, Any]:
    """LoRA adapter sizes for real model shapes, all-linear, fp32, from the meta device."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    shapes = {
        "Llama-3.1-8B": LlamaConfig(
            hidden_size=4096,
            intermediate_size=14336,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=8,
            vocab_size=128256,
        ),
        "DeepSeek-R1-Distill-Qwen-7B": Qwen2Config(
            hidden_size=3584,
            intermediate_size=18944,
            num_hidden_layers=28,
            num_attention_heads=28,
            num_key_value_heads=4,
            vocab_size=152064,
        ),
    }
    out = {}
    for name, config in shapes.items():
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)  # type: ignore[no-untyped-call]
        peft = get_peft_model(model, LoraConfig(r=r, target_modules="all-linear"))
        params = sum(p.numel() for p in peft.parameters() if p.requires_grad)
        # A checkpoint holds the adapter and AdamW's two moments: three fp32 copies.
        out[name] = {
            "lora_r": r,
            "adapter_mib": params * 4 / 2**20,
            "checkpoint_mib": 3 * params * 4 / 2**20,
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--every", type=int, default=10, help="checkpoint every N steps")
    parser.add_argument("--no-sigterm", action="store_true", help="throughput and sizes only")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model = build_model(work / "model", "llama", hidden=args.hidden, layers=args.layers)
        data = write_jsonl(work / "data.jsonl", learnable_records(256))
        result = {
            "model": f"llama hidden {args.hidden}, {args.layers} layers, LoRA r=4 all-linear, CPU 1 thread",
            "throughput": throughput(
                work, model, data, args.steps, args.repeats, every_n=args.every
            ),
            "load_average": os.getloadavg(),
        }
        if not args.no_sigterm:
            result["sigterm"] = sigterm_latency(work, model, data, 5)
        result["sizes"] = sizes(work)
    result["real_shapes"] = real_shapes()
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()

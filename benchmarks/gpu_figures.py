"""GPU figures: training throughput and memory in bf16, NF4 and int8, and checkpoint overhead.

Runs real worker processes (as a pod runs them) on a small random-weight Qwen2 built here
(hidden 1024, 8 layers: about 90 M parameters, so a GPU has something to do), one shard,
LoRA r 16 on all linear layers:

* tokens/s of training (first to last step) and peak GPU memory, per base precision:
  bf16 (or fp16 where the GPU lacks bf16), NF4 and int8 (these two need bitsandbytes);
* checkpoint overhead in the bf16 run: a checkpoint every 10 steps against none, and how
  long each checkpoint holds up the training loop (the snapshot) and takes to publish;
* the same with gradient checkpointing on (bf16), for its memory and speed trade.

Run by ``benchmarks/gpu_check.sh`` (or alone: ``.venv/bin/python benchmarks/gpu_figures.py
--out FILE.json``). Needs a CUDA GPU; says so and exits 2 without one.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import tempfile
from datetime import datetime
from pathlib import Path
from typing import Any

from cheapspot.contract import Task
from cheapspot_worker.testing import Launcher, job_tasks, make_task
from cheapspot_worker.tiny import build_model, learnable_records, write_jsonl


def _ts(event: dict[str, Any]) -> float:
    return datetime.fromisoformat(event["ts"]).timestamp()


def _tasks(
    root: Path, model: Path, data: Path, *, quantization: str, every: int, gc: bool, steps: int
) -> dict[str, Task]:
    return job_tasks(
        make_task(
            f"file://{root}/",
            f"file://{model}",
            f"file://{data}",
            model={"quantization": quantization},
            lora={"r": 16, "alpha": 32, "dropout": 0.05},
            training={
                "steps": steps,
                "batchSize": 16,
                "gradientAccumulation": 1,
                "maxSeqLength": 256,
                "warmupSteps": 2,
                "gradientCheckpointing": gc,
            },
            rounds={"localSteps": steps},
            checkpoint={"everySteps": every, "everySeconds": 0, "keep": 2},
        )
    )


def run_once(
    work: Path, model: Path, data: Path, *, quantization: str, every: int, gc: bool, steps: int
) -> dict[str, Any]:
    name = f"{quantization}-ckpt{every}-gc{int(gc)}"
    tasks = _tasks(
        work / name, model, data, quantization=quantization, every=every, gc=gc, steps=steps
    )
    launcher = Launcher(work / "logs", mode="exec")
    procs = {n: launcher.start(n, t) for n, t in tasks.items()}
    codes = {n: p.wait(600) for n, p in procs.items()}
    events = procs["shard0"].events()
    if set(codes.values()) != {0}:
        return {"run": name, "error": f"exit codes {codes}", "log": events[-3:]}
    stepped = [e for e in events if e.get("event") == "step"]
    # From the end of step 2 on: step 1 carries CUDA warm-up (kernel selection, allocator).
    timed = stepped[2:]
    seconds = _ts(timed[-1]) - _ts(stepped[1])
    tokens = sum(int(e["tokens"]) for e in timed)
    done = next(e for e in events if e.get("event") == "shard_done")
    setup = next(e for e in events if e.get("event") == "setup_done")
    ckpts = [e for e in events if e.get("event") == "checkpoint"]
    return {
        "run": name,
        "quantization": quantization,
        "dtype": setup.get("dtype"),
        "gradient_checkpointing": gc,
        "checkpoint_every": every,
        "steps_timed": len(timed),
        "tokens_per_second": round(tokens / seconds, 1),
        "seconds_per_step": round(seconds / len(timed), 4),
        "peak_gpu_gib": round(int(done.get("peak_gpu_bytes", 0)) / 2**30, 3),
        "checkpoint_snapshot_s_median": (
            round(statistics.median(e["snapshot_seconds"] for e in ckpts), 4) if ckpts else None
        ),
        "checkpoint_publish_s_median": (
            round(statistics.median(e["seconds"] for e in ckpts), 4) if ckpts else None
        ),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, required=True, help="JSON results file")
    parser.add_argument("--steps", type=int, default=40)
    args = parser.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("gpu_figures: no CUDA device here; these figures need one", file=sys.stderr)
        return 2
    quantized = importlib.util.find_spec("bitsandbytes") is not None
    results: dict[str, Any] = {
        "gpu": torch.cuda.get_device_name(0),
        "gpu_memory_gib": round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "bf16": torch.cuda.is_bf16_supported(),
        "bitsandbytes": quantized,
        "model": "random-weight Qwen2, hidden 1024, 8 layers, LoRA r16 all-linear",
        "batch": "16 sequences of up to 256 tokens",
        "runs": [],
    }
    with tempfile.TemporaryDirectory(prefix="cheapspot-gpu-") as tmp:
        work = Path(tmp)
        model = build_model(work / "model", "qwen2", hidden=1024, layers=8)
        records = learnable_records(512)
        # Longer sequences than the toy facts: several records per line.
        lines = [
            {"text": " ".join(r["text"] for r in records[i : i + 24])} for i in range(0, 512, 4)
        ]
        data = write_jsonl(work / "train.jsonl", lines)
        plan = [("none", 0, False), ("none", 10, False), ("none", 0, True)]
        if quantized:
            plan += [("nf4", 0, False), ("int8", 0, False)]
        for quantization, every, gc in plan:
            result = run_once(
                work, model, data, quantization=quantization, every=every, gc=gc, steps=args.steps
            )
            print(json.dumps(result), flush=True)
            results["runs"].append(result)
    args.out.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

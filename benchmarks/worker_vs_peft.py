"""cheapspot's training shard against a plain PEFT + accelerate loop: peak RSS and step time.

Builds a random-weight model of a real architecture (Qwen2, a few hundred million
parameters, vocabulary of the tiny tokenizer) once, cached under
``~/.cache/cheapspot-bench/``, and a text dataset whose every record fills the sequence
length. Then, for each base precision, alternately:

* ``cheapspot``: one shard through the real worker entry a pod runs
  (``python -m cheapspot_worker --task FILE``, with its anchor beside it, a file:// store,
  checkpoints at the default interval: every 20 steps or 300 s);
* ``plain``: the loop a user writes with PEFT and accelerate (``get_peft_model``,
  ``AdamW``, cosine schedule, ``accelerator.backward``), the same model, data, batch,
  sequence length, LoRA settings (cheapspot's defaults: r 16, alpha 32, dropout 0.05,
  all linear layers), optimizer, learning rate and torch threads.

Each run is its own child process, so peak RSS (``ru_maxrss`` from ``os.wait4`` of that
child) is that run's alone. Step time: wall time between consecutive optimizer steps after
``--warmup`` steps, mean; for cheapspot it includes whatever its loop adds (data, progress
records, the checkpoint snapshot and the background upload sharing the CPU).

bf16 on the CPU: the worker computes in float32 on a CPU and bf16 on a GPU
(``loading.compute_dtype``); no task field picks the base dtype. ``bf16`` therefore runs the
plain loop alone and says so.

Run: ``.venv/bin/python benchmarks/worker_vs_peft.py`` (about half an hour on two shared
cores; ``--precisions fp32`` for one). Figures go to docs/benchmarks.md, section "Worker".
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

PRECISIONS = ("fp32", "bf16", "int8", "nf4")
QUANTIZATION = {"fp32": "none", "bf16": "none", "int8": "int8", "nf4": "nf4"}
DEFAULT_CHECKPOINT = {"everySteps": 20, "everySeconds": 300.0}


@dataclass(frozen=True)
class Setup:
    """What both loops share."""

    model: str
    data: str
    precision: str
    steps: int
    batch: int
    seq: int
    threads: int
    lr: float = 2e-4
    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.05


@dataclass
class Run:
    impl: str
    precision: str
    peak_rss_mib: float
    step_s: float
    cpu_step_s: float
    steps_timed: int
    tokens_per_step: float
    checkpoints: int


# -- the model and the data ---------------------------------------------------------------


def cached_model(arch: str, hidden: int, layers: int) -> Path:
    """A random-weight model under ~/.cache/cheapspot-bench, built once."""
    from cheapspot_worker.tiny import build_model

    root = Path.home() / ".cache" / "cheapspot-bench"
    directory = root / f"{arch}-h{hidden}-l{layers}"
    if not (directory / "config.json").exists():
        # build_model's intermediate size is twice the width; a real Qwen2 uses ~5.4x, so
        # widen the MLP to a real shape before saving. Built in a temporary directory first:
        # a half-written model is never cached.
        import torch
        from transformers import AutoModelForCausalLM

        with tempfile.TemporaryDirectory(dir=root.parent) as tmp:
            staging = build_model(Path(tmp) / "m", arch, hidden=hidden, layers=layers)  # type: ignore[arg-type]
            config = json.loads((staging / "config.json").read_text())
            config.update(intermediate_size=hidden * 11 // 4, initializer_range=0.02)
            (staging / "config.json").write_text(json.dumps(config))
            from transformers import AutoConfig

            torch.manual_seed(0)
            model = AutoModelForCausalLM.from_config(  # type: ignore[no-untyped-call]
                AutoConfig.from_pretrained(staging), dtype=torch.float32
            )
            model.save_pretrained(staging)
            root.mkdir(parents=True, exist_ok=True)
            staging.rename(directory)
    return directory


def write_data(path: Path, records: int = 512) -> Path:
    """Text records long enough to fill any sequence length up to ~300 tokens."""
    from cheapspot_worker.tiny import learnable_records

    lines = [" ".join(r["text"] for r in learnable_records(40, seed=i)) for i in range(records)]
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in lines))
    return path


# -- one run, in a child process ---------------------------------------------------------


def _child_env(threads: int) -> dict[str, str]:
    return {
        **os.environ,
        "CHEAPSPOT_CPU_THREADS": str(threads),
        "OMP_NUM_THREADS": str(threads),
        "PYTHONUNBUFFERED": "1",
    }


def _wait(proc: subprocess.Popen[bytes]) -> tuple[int, float]:
    """Exit status and peak RSS (MiB) of this child alone."""
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, usage.ru_maxrss / 1024


def _ts(event: dict[str, Any]) -> float:
    return datetime.fromisoformat(event["ts"]).timestamp()


def _events(log: Path) -> list[dict[str, Any]]:
    from cheapspot_localcluster.trainjobs import worker_events

    return worker_events(log.read_text(errors="replace"))


def _mean_step(times: list[float], warmup: int) -> tuple[float, int]:
    timed = times[warmup:]
    return (timed[-1] - timed[0]) / (len(timed) - 1), len(timed) - 1


def run_cheapspot(s: Setup, work: Path, warmup: int) -> Run:
    from cheapspot_worker.testing import job_tasks, make_task

    work.mkdir(parents=True)
    template = make_task(
        f"file://{work}/store/",
        f"file://{s.model}",
        f"file://{s.data}",
        training={
            "steps": s.steps,
            "batchSize": s.batch,
            "gradientAccumulation": 1,
            "learningRate": s.lr,
            "warmupSteps": 0,
            "maxSeqLength": s.seq,
            "seed": 7,
        },
        rounds={"localSteps": s.steps, "pollSeconds": 1.0},
        lora={"r": s.r, "alpha": s.alpha, "dropout": s.dropout},
        checkpoint={**DEFAULT_CHECKPOINT, "keep": 3, "sigtermBudgetSeconds": 25},
        model={"uri": f"file://{s.model}", "quantization": QUANTIZATION[s.precision]},
    )
    procs: dict[str, subprocess.Popen[bytes]] = {}
    for name, task in job_tasks(template).items():
        (work / f"{name}.json").write_text(task.model_dump_json(by_alias=True))
        with (work / f"{name}.log").open("wb") as log:
            procs[name] = subprocess.Popen(
                [sys.executable, "-m", "cheapspot_worker", "--task", str(work / f"{name}.json")],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=_child_env(s.threads),
            )
    rc, rss = _wait(procs["shard0"])
    anchor_rc = procs["anchor"].wait(300)
    if rc != 0 or anchor_rc != 0:
        raise RuntimeError(f"cheapspot run failed (shard {rc}, anchor {anchor_rc}); see {work}")
    events = _events(work / "shard0.log")
    steps = [e for e in events if e.get("event") == "step"]
    step_s, timed = _mean_step([_ts(e) for e in steps], warmup)
    cpu_step_s, _ = _mean_step([float(e["cpu_s"]) for e in steps], warmup)
    return Run(
        "cheapspot",
        s.precision,
        rss,
        step_s,
        cpu_step_s,
        timed,
        statistics.mean(e["tokens"] for e in steps),
        sum(1 for e in events if e.get("event") == "checkpoint"),
    )


def run_plain(s: Setup, work: Path, warmup: int) -> Run:
    work.mkdir(parents=True)
    out = work / "plain.json"
    with (work / "plain.log").open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, __file__, "plain", json.dumps(asdict(s)), str(out)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=_child_env(s.threads),
        )
    rc, rss = _wait(proc)
    if rc != 0:
        raise RuntimeError(f"plain run failed ({rc}); see {work / 'plain.log'}")
    doc = json.loads(out.read_text())
    step_s, timed = _mean_step(doc["times"], warmup)
    cpu_step_s, _ = _mean_step(doc["cpu"], warmup)
    return Run(
        "plain", s.precision, rss, step_s, cpu_step_s, timed, statistics.mean(doc["tokens"]), 0
    )


# -- the plain PEFT + accelerate loop (runs in its own process) ---------------------------


def plain_loop(s: Setup, out: Path) -> None:
    """A LoRA fine-tuning loop as the PEFT and accelerate documentation write it."""
    import torch
    from accelerate import Accelerator
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        BitsAndBytesConfig,
        get_cosine_schedule_with_warmup,
    )

    torch.set_num_threads(s.threads)
    torch.manual_seed(7)
    tokenizer = AutoTokenizer.from_pretrained(s.model)
    texts = [json.loads(line)["text"] for line in Path(s.data).read_text().splitlines()]
    ids = [
        tokenizer(t, truncation=True, max_length=s.seq - 1)["input_ids"] + [tokenizer.eos_token_id]
        for t in texts
    ]
    kwargs: dict[str, Any] = {"dtype": torch.bfloat16 if s.precision == "bf16" else torch.float32}
    if s.precision == "int8":
        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)  # type: ignore[no-untyped-call]
    elif s.precision == "nf4":
        kwargs["quantization_config"] = BitsAndBytesConfig(  # type: ignore[no-untyped-call]
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=torch.float32,
            bnb_4bit_use_double_quant=True,
        )
    if "quantization_config" in kwargs:
        kwargs["device_map"] = {"": "cpu"}
    model = AutoModelForCausalLM.from_pretrained(s.model, **kwargs)
    if "quantization_config" in kwargs:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)  # type: ignore[no-untyped-call]
    config = LoraConfig(
        r=s.r,
        lora_alpha=s.alpha,  # type: ignore[arg-type]
        lora_dropout=s.dropout,
        target_modules="all-linear",
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(model, config)
    accelerator = Accelerator(cpu=True)
    optimizer = torch.optim.AdamW(
        [p for p in peft_model.parameters() if p.requires_grad], lr=s.lr, weight_decay=0.0
    )
    scheduler = get_cosine_schedule_with_warmup(optimizer, 0, s.steps)
    model, optimizer, scheduler = accelerator.prepare(peft_model, optimizer, scheduler)
    model.train()
    generator = torch.Generator().manual_seed(7)
    times: list[float] = []
    cpu: list[float] = []
    tokens: list[int] = []
    for _ in range(s.steps):
        picked = torch.randint(0, len(ids), (s.batch,), generator=generator).tolist()
        batch = tokenizer.pad({"input_ids": [ids[i] for i in picked]}, return_tensors="pt")
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        loss = model(**batch, labels=labels).loss
        accelerator.backward(loss)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        times.append(time.time())
        cpu.append(time.process_time())
        tokens.append(int(batch["attention_mask"].sum()))
        print(json.dumps({"step": len(times), "loss": float(loss)}), flush=True)
    out.write_text(json.dumps({"times": times, "cpu": cpu, "tokens": tokens}))


# -- the table -------------------------------------------------------------------------------


def summarise(runs: list[Run]) -> list[dict[str, Any]]:
    rows = []
    for precision in PRECISIONS:
        mine = [r for r in runs if r.precision == precision]
        if not mine:
            continue
        row: dict[str, Any] = {"precision": precision}
        for impl in ("cheapspot", "plain"):
            of = [r for r in mine if r.impl == impl]
            if of:
                row[impl] = {
                    "peak_rss_mib": max(r.peak_rss_mib for r in of),
                    "step_s_median": statistics.median(r.step_s for r in of),
                    "cpu_step_s_median": statistics.median(r.cpu_step_s for r in of),
                    "step_s_all": [round(r.step_s, 3) for r in of],
                    "cpu_step_s_all": [round(r.cpu_step_s, 3) for r in of],
                    "tokens_per_step": of[0].tokens_per_step,
                    "checkpoints": of[0].checkpoints,
                }
        if "cheapspot" in row and "plain" in row:
            # cheapspot's steps/s over the plain loop's = plain step time / cheapspot's
            # (target >= 0.97), by wall clock and by CPU time.
            for key in ("step_s_median", "cpu_step_s_median"):
                ratio = row["plain"][key] / row["cheapspot"][key]
                row["speed_ratio_" + key.removesuffix("_s_median")] = ratio
        rows.append(row)
    return rows


def print_table(rows: list[dict[str, Any]], title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for column in (
        "base",
        "peak RSS MiB cheapspot / plain",
        "s/step wall cheapspot / plain",
        "CPU s/step cheapspot / plain",
        "steps/s ratio wall / CPU (>= 0.97)",
    ):
        table.add_column(column)

    def pair(row: dict[str, Any], key: str, fmt: str) -> str:
        return " / ".join(
            format(row[impl][key], fmt) if impl in row else "n/a" for impl in ("cheapspot", "plain")
        )

    for row in rows:
        ratios = ""
        if "speed_ratio_step" in row:
            ratios = f"{row['speed_ratio_step']:.3f} / {row['speed_ratio_cpu_step']:.3f}"
        table.add_row(
            row["precision"],
            pair(row, "peak_rss_mib", ".0f"),
            pair(row, "step_s_median", ".3f"),
            pair(row, "cpu_step_s_median", ".3f"),
            ratios,
        )
    Console().print(table)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "plain":
        plain_loop(Setup(**json.loads(sys.argv[2])), Path(sys.argv[3]))
        return
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--arch", default="qwen2", choices=("llama", "qwen2"))
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--steps", type=int, default=24, help="> 20: a checkpoint falls inside")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--precisions", default="fp32,int8,nf4,bf16")
    parser.add_argument(
        "--first", default="cheapspot", choices=("cheapspot", "plain"), help="who runs first"
    )
    args = parser.parse_args()
    precisions = args.precisions.split(",")
    unknown = set(precisions) - set(PRECISIONS)
    if unknown:
        parser.error(f"--precisions: unknown {sorted(unknown)}; choose from {PRECISIONS}")
    model = cached_model(args.arch, args.hidden, args.layers)
    params = _parameters(model)
    runs: list[Run] = []
    load = [os.getloadavg()[0]]
    with tempfile.TemporaryDirectory() as tmp:
        data = write_data(Path(tmp) / "data.jsonl")
        for i in range(args.repeats):
            for precision in precisions:
                s = Setup(
                    str(model), str(data), precision, args.steps, args.batch, args.seq, args.threads
                )
                impls = ["cheapspot", "plain"] if precision != "bf16" else ["plain"]
                if (i % 2) != (args.first == "plain"):
                    impls.reverse()  # alternate who goes first, against drifting load
                for impl in impls:
                    work = Path(tmp) / f"{impl}-{precision}-{i}"
                    run = (run_cheapspot if impl == "cheapspot" else run_plain)(
                        s, work, args.warmup
                    )
                    load.append(os.getloadavg()[0])
                    print(json.dumps(asdict(run)), flush=True)
                    runs.append(run)
    rows = summarise(runs)
    title = (
        f"{args.arch} {params / 1e6:.0f}M params (hidden {args.hidden}, {args.layers} layers), "
        f"batch {args.batch} x {args.seq} tokens, LoRA r 16 all-linear, {args.threads} thread(s), "
        f"{args.steps} steps ({args.warmup} warm-up), load average {min(load):.1f}-{max(load):.1f}"
    )
    print(json.dumps({"setup": title, "rows": rows}, indent=1))
    print_table(rows, title)


def _parameters(model: Path) -> int:
    from safetensors import safe_open

    total = 0
    for f in model.glob("*.safetensors"):
        with safe_open(str(f), "pt") as st:
            for key in st.keys():  # noqa: SIM118 (safe_open is no mapping)
                total += math.prod(int(d) for d in st.get_slice(key).get_shape())
    return total


if __name__ == "__main__":
    main()

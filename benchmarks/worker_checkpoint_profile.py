"""Where a checkpoint's cost goes, on the small model of benchmarks/worker_checkpoints.py.

In one process, on a real :class:`ShardTrainer` (set up from a task as a pod's, file://
store, one torch thread), it times each part of a checkpoint alone, wall and CPU of the
calling thread, medians over ``--repeats``:

* snapshot: adapter and optimizer state copied to CPU memory (holds up training),
* serialise: ``torch.save`` of optimizer, schedule and RNG; safetensors of the adapter,
* sha256 of both,
* writes: the objects and the manifest (each written, fsynced, linked into place),
* prune: listing checkpoints, reading their manifests, deleting the oldest,
* progress: the progress record written after a checkpoint.

Then the interference: training steps alone against the same steps while a background
thread publishes checkpoints back to back (as the worker's upload thread does), to show
what an upload costs the training thread beyond its own CPU.

Run: ``.venv/bin/python benchmarks/worker_checkpoint_profile.py`` (a minute or two).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cheapspot.store import Store
from cheapspot_worker.checkpoints import Checkpoint
from cheapspot_worker.errors import Stop
from cheapspot_worker.testing import make_task
from cheapspot_worker.tiny import build_model, learnable_records, write_jsonl
from cheapspot_worker.training import RoundLog, ShardTrainer, detached_copy


def _timed(fn: Callable[[], Any], repeats: int) -> dict[str, float]:
    wall, cpu = [], []
    for _ in range(repeats):
        w, c = time.perf_counter(), time.thread_time()
        fn()
        cpu.append(time.thread_time() - c)
        wall.append(time.perf_counter() - w)
    return {"wall_ms": 1e3 * statistics.median(wall), "cpu_ms": 1e3 * statistics.median(cpu)}


def trainer(work: Path, hidden: int, layers: int) -> ShardTrainer:
    model = build_model(work / "model", "llama", hidden=hidden, layers=layers)
    data = write_jsonl(work / "data.jsonl", learnable_records(256))
    task = make_task(
        f"file://{work}/store/",
        f"file://{model}",
        f"file://{data}",
        training={"steps": 10_000, "batchSize": 8, "gradientAccumulation": 1, "maxSeqLength": 64},
        rounds={"localSteps": 10_000},
        checkpoint={"everySteps": 10, "everySeconds": 0, "keep": 3},
    )
    os.environ["CHEAPSPOT_CPU_THREADS"] = "1"
    t = ShardTrainer(task, Store(task.output_uri), Stop())
    t.setup()
    return t


def parts(t: ShardTrainer, repeats: int) -> dict[str, dict[str, float]]:
    from cheapspot_worker.loading import adapter_bytes

    log = RoundLog()
    for step in range(3):  # the optimizer has moments only after a step
        t.train_step(step, log)
    adapter = t.adapter_snapshot()
    state = detached_copy(t.trainer_state())

    def serialise() -> tuple[bytes, bytes]:
        buf = io.BytesIO()
        import torch

        torch.save(state, buf)
        return adapter_bytes(adapter), buf.getvalue()

    blobs = serialise()
    counter = iter(range(1_000_000))

    def publish() -> None:
        step = 100 + next(counter)
        t.store.publish(
            t.layout.shard_checkpoint(t.shard, step),
            {"adapter.safetensors": blobs[0], "trainer_state.pt": blobs[1]},
            meta={"step": step, "round": 0, "round_losses": [1.0] * 10},
        )

    out = {
        "snapshot": _timed(
            lambda: (t.adapter_snapshot(), detached_copy(t.trainer_state())), repeats
        ),
        "serialise": _timed(serialise, repeats),
        "sha256": _timed(lambda: [hashlib.sha256(b).hexdigest() for b in blobs], repeats),
        "publish (sha256, writes, manifest)": _timed(publish, repeats),
        "prune": _timed(t.checkpoints.prune, repeats),
        "progress record": _timed(t.reporter.flush, repeats),
    }
    out["sizes_kib"] = {"adapter": len(blobs[0]) / 1024, "trainer_state": len(blobs[1]) / 1024}
    return out


def interference(t: ShardTrainer, steps: int, repeats: int) -> dict[str, float]:
    """Seconds per training step alone and with checkpoints uploading in the background."""
    log = RoundLog()
    step = 10

    def run_steps() -> tuple[float, float]:
        nonlocal step
        w, c = time.perf_counter(), time.thread_time()
        for _ in range(steps):
            t.train_step(step, log)
            step += 1
        return (time.perf_counter() - w) / steps, (time.thread_time() - c) / steps

    def uploads(stop: threading.Event, count: list[float]) -> None:
        n = 1000
        while not stop.is_set():
            ckpt = Checkpoint(
                step=n,
                adapter=t.adapter_snapshot(),
                trainer_state=detached_copy(t.trainer_state()),
                meta={"round": 0},
            )
            c = time.thread_time()
            t.checkpoints.save(ckpt)
            count[0] += 1
            count[1] += time.thread_time() - c
            n += 1

    alone, busy, uploads_per_s, upload_cpu = [], [], [], []
    for _ in range(repeats):
        alone.append(run_steps())
        stop, count = threading.Event(), [0.0, 0.0]
        thread = threading.Thread(target=uploads, args=(stop, count))
        w = time.perf_counter()
        thread.start()
        busy.append(run_steps())
        stop.set()
        thread.join()
        uploads_per_s.append(count[0] / (time.perf_counter() - w))
        upload_cpu.append(count[1] / max(1.0, count[0]))
    return {
        "step_ms_alone": 1e3 * statistics.median(a[0] for a in alone),
        "step_cpu_ms_alone": 1e3 * statistics.median(a[1] for a in alone),
        "step_ms_with_uploads": 1e3 * statistics.median(b[0] for b in busy),
        "step_cpu_ms_with_uploads": 1e3 * statistics.median(b[1] for b in busy),
        "uploads_per_s": statistics.median(uploads_per_s),
        "upload_thread_cpu_ms_each": 1e3 * statistics.median(upload_cpu),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        t = trainer(Path(tmp), args.hidden, args.layers)
        result: dict[str, Any] = {"load_average": os.getloadavg()[0]}
        result["parts"] = parts(t, args.repeats)
        result["interference"] = interference(t, 20, 3)
        result["load_average_after"] = os.getloadavg()[0]
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()

"""Replica start: how long a serving replica (the worker's serve role: vLLM on CPU) takes from
its process starting to Ready, and which phase takes the time. Tiny Qwen2 with two LoRA
adapters, published as a training job leaves them (files + MANIFEST.json), fetched through
the store like in a pod. Phases come from the launcher's own structured log events:

    python up    process start -> the launcher's ``start`` event (Python and its imports)
    fetch        -> ``model_ready`` and the last ``adapter_ready`` (manifests verified)
    vLLM up      ``vllm_start`` -> ``ready`` (vLLM's three processes import torch and vLLM,
                 load the model, profile, start the OpenAI server; adapters registered)

    .venv/bin/python benchmarks/serving_replica_start.py          # --trials 3

Needs the serving environment (``make serve-venv``). On the local cluster a pod adds the pod
runner's spawn (milliseconds) and the readiness probe period (1 s) on top.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from serving_batching import MODELS

from cheapspot.contract import ServeTask
from cheapspot_worker.serve_testing import ServeReplica, publish_dir
from cheapspot_worker.tiny import build_adapter, build_model


def _at(events: list[dict[str, Any]], name: str, last: bool = False) -> float | None:
    stamps = [datetime.fromisoformat(e["ts"]).timestamp() for e in events if e.get("event") == name]
    if not stamps:
        return None
    return stamps[-1] if last else stamps[0]


def _events(log: Path) -> list[dict[str, Any]]:
    out = []
    for line in log.read_text(errors="replace").splitlines():
        if line.startswith("{"):
            with contextlib.suppress(ValueError):
                out.append(json.loads(line))
    return out


def one_start(work: Path, trial: int, hidden: int) -> dict[str, float]:
    model = build_model(work / "tiny", "qwen2", hidden=hidden, layers=4)
    adapters = {n: build_adapter(work / n, model, seed=i) for i, n in enumerate(MODELS[1:], 1)}
    uris = {n: publish_dir(f"file://{work}/published/{n}/", "", p) for n, p in adapters.items()}
    task = ServeTask.model_validate(
        {
            "pool": {"namespace": "bench", "name": "bench"},
            "model": {"uri": publish_dir(f"file://{work}/published/model/", "", model)},
            "adapters": [{"name": n, "uri": u} for n, u in uris.items()],
            "engine": {"maxNumSeqs": 32, "maxLoras": 2, "maxLoraRank": 8},
        }
    )
    # A fresh cache per trial: every start fetches, as a new pod on a new node does.
    env = {"CHEAPSPOT_CACHE_DIR": str(work / f"cache-{trial}")}
    started = time.time()
    replica = ServeReplica(f"start-{trial}", task, work / f"replica-{trial}", env)
    try:
        replica.wait_ready(1800)
        ready_seen = time.time()
    finally:
        replica.stop()
    events = _events(replica.log_file)
    python_up = _at(events, "start")
    fetched = max(
        t for t in (_at(events, "model_ready"), _at(events, "adapter_ready", last=True)) if t
    )
    vllm_start = _at(events, "vllm_start")
    ready = _at(events, "ready") or ready_seen
    if python_up is None or vllm_start is None:
        raise RuntimeError(f"missing launcher events in {replica.log_file}")
    return {
        "python_up_s": python_up - started,
        "fetch_s": fetched - python_up,
        "vllm_up_s": ready - vllm_start,
        "total_s": ready - started,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--trials", type=int, default=3)
    p.add_argument("--hidden", type=int, default=256)
    args = p.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for trial in range(args.trials):
            row = one_start(Path(tmp), trial, args.hidden)
            rows.append(row)
            print(
                f"trial {trial}: python up {row['python_up_s']:.1f} s, fetch "
                f"{row['fetch_s']:.1f} s, vLLM up {row['vllm_up_s']:.1f} s, "
                f"total {row['total_s']:.1f} s",
                flush=True,
            )
    summary = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
    print(json.dumps({"replica_start": rows, "median": summary}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Serving throughput: vLLM on CPU (the worker's serve role) with a tiny Qwen2 and two LoRA
adapters, mixed-adapter requests at concurrency 1, 8 and 32, sent straight to the replica
and through the router (``cheapspot router`` as its own process). Prints tokens/s and
p50/p99 request latency for each, and the router's share of direct tokens/s.

    .venv/bin/python benchmarks/serving_batching.py        # --requests 64 --tokens 32

Needs the serving environment (``make serve-venv``). Each run starts one replica (about
a minute on two cores) and one router.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

from cheapspot.contract import ServeTask
from cheapspot_worker.serve_testing import ServeReplica, free_port, http_json, publish_dir
from cheapspot_worker.tiny import build_adapter, build_model

MODELS = ("tiny", "qa", "sums")


def start_replica(work: Path, hidden: int) -> ServeReplica:
    model = build_model(work / "tiny", "qwen2", hidden=hidden, layers=4)
    adapters = {
        "qa": build_adapter(work / "qa", model, seed=1),
        "sums": build_adapter(work / "sums", model, seed=2),
    }
    # adapters travel as published prefixes (files + MANIFEST.json), as a training job leaves them
    uris = {n: publish_dir(f"file://{work}/published/{n}/", "", p) for n, p in adapters.items()}
    task = ServeTask.model_validate(
        {
            "pool": {"namespace": "bench", "name": "bench"},
            "model": {"uri": f"file://{model}"},
            "adapters": [{"name": n, "uri": u} for n, u in uris.items()],
            "engine": {"maxNumSeqs": 32, "maxLoras": 2, "maxLoraRank": 8},
        }
    )
    replica = ServeReplica("bench", task, work / "replica", {"CHEAPSPOT_CACHE_DIR": str(work)})
    replica.wait_ready(1800)
    return replica


def start_router(replica_url: str) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "cheapspot.cli",
            "router",
            "--replica",
            replica_url,
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--capacity",
            "64",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if http_json("GET", url + "/healthz", timeout=2)[0] == 200:
                return proc, url
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("router did not start")


async def run_load(url: str, concurrency: int, requests: int, tokens: int) -> dict[str, Any]:
    latencies: list[float] = []
    produced = 0
    counter = iter(range(requests))

    async def client(session: aiohttp.ClientSession) -> None:
        nonlocal produced
        for i in counter:
            body = {
                "model": MODELS[i % len(MODELS)],
                "prompt": f"{i % 10} plus {i % 7} is",
                "max_tokens": tokens,
                "temperature": 0,
                "ignore_eos": True,
            }
            t0 = time.perf_counter()
            async with session.post(url + "/v1/completions", json=body) as resp:
                doc = await resp.json()
            latencies.append(time.perf_counter() - t0)
            produced += int(doc["usage"]["completion_tokens"])

    async with aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0), timeout=aiohttp.ClientTimeout(total=900)
    ) as session:
        t0 = time.perf_counter()
        await asyncio.gather(*(client(session) for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    latencies.sort()
    return {
        "tokens_per_s": produced / wall,
        "p50_ms": 1000 * statistics.median(latencies),
        "p99_ms": 1000 * latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))],
        "requests": len(latencies),
    }


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def measure_overhead(direct: str, routed: str, requests: int, stream: bool) -> dict[str, Any]:
    times: dict[str, list[float]] = {"direct": [], "router": []}
    body = {"model": "qa", "prompt": "3 plus 4 is", "max_tokens": 1, "temperature": 0}
    if stream:
        body["stream"] = True
    async with aiohttp.ClientSession() as session:
        for i in range(requests + 20):
            for name, url in (("direct", direct), ("router", routed)):
                t0 = time.perf_counter()
                async with session.post(url + "/v1/completions", json=body) as resp:
                    await resp.read()
                    assert resp.status == 200
                if i >= 20:  # warm-up
                    times[name].append(1000 * (time.perf_counter() - t0))
    d, r = times["direct"], times["router"]
    return {
        "stream": stream,
        "direct_p50_ms": statistics.median(d),
        "direct_p99_ms": pct(d, 0.99),
        "router_p50_ms": statistics.median(r),
        "router_p99_ms": pct(r, 0.99),
        "added_p50_ms": statistics.median(r) - statistics.median(d),
        "added_p99_ms": pct(r, 0.99) - pct(d, 0.99),
        "requests": len(d),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--requests", type=int, default=64, help="requests per run")
    p.add_argument("--tokens", type=int, default=32, help="completion tokens per request")
    p.add_argument("--hidden", type=int, default=256, help="tiny model width")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument(
        "--overhead",
        type=int,
        default=0,
        help="also measure the router's added latency over this many one-token requests "
        "(as benchmarks/serving_router_overhead.py does), on the same replica",
    )
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        replica = start_replica(Path(tmp), args.hidden)
        router, router_url = start_router(replica.url)
        results: list[dict[str, Any]] = []
        try:
            asyncio.run(run_load(replica.url, 4, 8, args.tokens))  # warm-up
            for c in args.concurrency:
                n = max(args.requests, c * 2)
                direct = asyncio.run(run_load(replica.url, c, n, args.tokens))
                routed = asyncio.run(run_load(router_url, c, n, args.tokens))
                row = {
                    "concurrency": c,
                    "direct": direct,
                    "router": routed,
                    "router_share": routed["tokens_per_s"] / direct["tokens_per_s"],
                }
                results.append(row)
                print(
                    f"c={c:>2}  direct {direct['tokens_per_s']:7.0f} tok/s "
                    f"p50 {direct['p50_ms']:7.1f} ms p99 {direct['p99_ms']:7.1f} ms | "
                    f"router {routed['tokens_per_s']:7.0f} tok/s p50 {routed['p50_ms']:7.1f} ms "
                    f"p99 {routed['p99_ms']:7.1f} ms | router/direct {row['router_share']:.1%}",
                    flush=True,
                )
            overhead = [
                asyncio.run(measure_overhead(replica.url, router_url, args.overhead, stream))
                for stream in (False, True)
                if args.overhead
            ]
            for row in overhead:
                print(
                    f"overhead {'stream' if row['stream'] else 'plain'}: added p50 "
                    f"{row['added_p50_ms']:.2f} ms p99 {row['added_p99_ms']:.2f} ms "
                    f"(direct p50 {row['direct_p50_ms']:.2f} ms)",
                    flush=True,
                )
        finally:
            router.kill()
            replica.stop()
        print(json.dumps({"serving_batching": results, "router_overhead": overhead}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

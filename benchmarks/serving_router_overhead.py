"""Router overhead: the latency the router adds to one request, against calling the replica
directly. One-token completions (so the replica's own time is short and steady), sent one
at a time, alternating direct and routed; p50 / p99 of each and of the difference, for a
plain request and for a stream.

    .venv/bin/python benchmarks/serving_router_overhead.py     # --requests 300

Needs the serving environment (``make serve-venv``): one replica and one router process.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
from serving_batching import start_replica, start_router


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def measure(direct: str, routed: str, requests: int, stream: bool) -> dict[str, Any]:
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
    p.add_argument("--requests", type=int, default=300)
    p.add_argument("--hidden", type=int, default=256)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        replica = start_replica(Path(tmp), args.hidden)
        router, router_url = start_router(replica.url)
        try:
            rows = [
                asyncio.run(measure(replica.url, router_url, args.requests, stream))
                for stream in (False, True)
            ]
        finally:
            router.kill()
            replica.stop()
    for row in rows:
        print(
            f"{'stream' if row['stream'] else 'plain ':6}  direct p50 {row['direct_p50_ms']:.2f} "
            f"p99 {row['direct_p99_ms']:.2f} ms | router p50 {row['router_p50_ms']:.2f} "
            f"p99 {row['router_p99_ms']:.2f} ms | added p50 {row['added_p50_ms']:.2f} "
            f"p99 {row['added_p99_ms']:.2f} ms"
        )
    print(json.dumps({"router_overhead": rows}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

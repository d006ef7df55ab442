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
import tempfile
from pathlib import Path

from serving_batching import measure_overhead, start_replica, start_router


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
                asyncio.run(measure_overhead(replica.url, router_url, args.requests, stream))
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

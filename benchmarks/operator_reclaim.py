"""Reclaim-to-replacement-scheduled latency of the operator on the local cluster.

    python benchmarks/operator_reclaim.py [--reclaims 20] [--notice 10]

Starts a private local cluster (real control plane, kwok nodes) and an S3 endpoint, installs
the CRD, runs ``cheapspot operator`` in a subprocess and a 3-shard CheapTrainJob. Then,
``--reclaims`` times: reclaims the node of a running shard the way a cloud does (interruption
taint = the notice, then the machine goes away) and measures from the notice to the moment
the shard's replacement pod is bound to another node by the real scheduler. Prints each
latency and p50 / p95 / max. Target: p95 under 2 s.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "integration"))


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[index]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reclaims", type=int, default=20)
    parser.add_argument("--notice", type=float, default=10.0, help="notice length, seconds")
    args = parser.parse_args(argv)

    from operator_harness import Harness, make_harness, restore_nodes, wait_for

    from cheapspot_localcluster.s3 import start_s3
    from cheapspot_localcluster.testing import make_test_cluster

    with tempfile.TemporaryDirectory(prefix="cheapspot-bench-") as tmp:
        root = Path(tmp)
        s3 = start_s3(port=0)
        cluster = make_test_cluster(root / "cluster")
        print("starting the local cluster ...", flush=True)
        cluster.start(progress=lambda m: print(f"  {m}", flush=True))
        harnesses = make_harness(cluster, s3, root)
        h: Harness = next(harnesses)
        try:
            h.apply("bench", shards=3)
            wait_for("all pods running", lambda: h.running_on_nodes("bench", 4), timeout_s=120)
            latencies: list[float] = []
            for i in range(args.reclaims):
                shard = i % 3

                def running(s: int = shard) -> Any:
                    for p in h.shard_pods("bench", s):
                        if (p.get("status") or {}).get("phase") == "Running" and p["spec"].get(
                            "nodeName"
                        ):
                            return p
                    return None

                old = wait_for(f"shard {shard} running", running, timeout_s=60)
                node = old["spec"]["nodeName"]
                started = time.monotonic()
                reclaim = cluster.preempt_in_background(node, notice_s=args.notice)

                def replaced(s: int = shard, old_name: str = old["metadata"]["name"]) -> Any:
                    for p in h.shard_pods("bench", s):
                        if p["metadata"]["name"] != old_name and p["spec"].get("nodeName"):
                            return p
                    return None

                wait_for("the replacement to be scheduled", replaced, timeout_s=30, poll_s=0.02)
                latency = time.monotonic() - started
                latencies.append(latency)
                print(
                    f"reclaim {i + 1:>3}: shard {shard} off {node}: {latency * 1000:7.0f} ms",
                    flush=True,
                )
                reclaim.result(timeout=180)
                # The cloud brings a fresh spot node; measure the next reclaim once it is up,
                # so node boot time does not count as operator latency.
                restore_nodes(h.api, cluster)
            p50 = statistics.median(latencies)
            p95 = _percentile(latencies, 0.95)
            print(
                f"\nreclaim -> replacement scheduled, {len(latencies)} reclaims: "
                f"p50 {p50 * 1000:.0f} ms, p95 {p95 * 1000:.0f} ms, max {max(latencies) * 1000:.0f} ms"
            )
            return 0 if p95 < 2.0 else 1
        finally:
            for _ in harnesses:
                pass
            cluster.stop()
            s3.stop()


if __name__ == "__main__":
    sys.exit(main())

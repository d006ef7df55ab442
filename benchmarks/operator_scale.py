"""What the operator asks of the API server at rest, and its memory, with many jobs and nodes.

    python benchmarks/operator_scale.py [--nodes 200] [--jobs 50] [--shards 2] [--seconds 120]

Starts a private local cluster with ``--nodes`` kwok nodes (three quarters spot GPU nodes in
two zones, the rest on-demand) where kwok fakes every pod (no workers run), an S3 endpoint,
and ``cheapspot operator`` as a subprocess at the production reconcile interval (2 s). Applies
``--jobs`` CheapTrainJobs of ``--shards`` shards, waits until every pod runs, then for
``--seconds`` touches nothing and reads the API server's own request counters
(``apiserver_request_total``) before and after: requests per second by verb and resource.
Once started, the other components watch rather than list, so the LISTs and GETs counted are
the operator's. Also prints the operator's resident memory at the start and the end.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "integration"))

KWOK_HEARTBEATS = {"leases", "nodes/status"}
"""kwok renewing its nodes' leases and status: the simulated kubelets, not the operator."""
COUNTER = re.compile(r"^apiserver_request_total\{(?P<labels>[^}]*)\} (?P<value>[0-9.e+]+)$")


def pools(nodes: int) -> dict[str, Any]:
    spot = max(2, nodes * 3 // 4) // 2
    on_demand = max(1, (nodes - 1 - 2 * spot) // 2)
    gpu = {"cpu": "8", "memory": "32Gi", "nvidia.com/gpu": 1, "pods": 110}
    return {
        "profile": "local",
        "region": "local",
        "pools": [
            {
                "name": "spot-gpu",
                "capacityType": "spot",
                "instanceType": "g5.xlarge",
                "zones": ["zone-a", "zone-b"],
                "countPerZone": spot,
                "capacity": gpu,
            },
            {
                "name": "ondemand-gpu",
                "capacityType": "on-demand",
                "instanceType": "g5.xlarge",
                "zones": ["zone-a", "zone-b"],
                "countPerZone": on_demand,
                "capacity": gpu,
            },
            {
                "name": "ondemand-cpu",
                "capacityType": "on-demand",
                "instanceType": "m5.xlarge",
                "zones": ["zone-a"],
                "countPerZone": 1,
                "capacity": {"cpu": "16", "memory": "64Gi", "pods": 110},
            },
        ],
    }


def requests(kubectl: Path, kubeconfig: Path) -> Counter[tuple[str, str]]:
    """The API server's request counters, summed by (verb, resource[/subresource])."""
    text = subprocess.run(
        [str(kubectl), "--kubeconfig", str(kubeconfig), "get", "--raw", "/metrics"],
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout
    out: Counter[tuple[str, str]] = Counter()
    for line in text.splitlines():
        m = COUNTER.match(line)
        if not m:
            continue
        labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group("labels")))
        resource = labels.get("resource", "")
        if labels.get("subresource"):
            resource += "/" + labels["subresource"]
        out[(labels.get("verb", ""), resource)] += int(float(m.group("value")))
    return out


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--nodes", type=int, default=200)
    parser.add_argument("--jobs", type=int, default=50)
    parser.add_argument("--shards", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=120.0)
    args = parser.parse_args(argv)

    from operator_harness import Harness, make_harness, wait_for

    from cheapspot_localcluster import build
    from cheapspot_localcluster.cluster import LocalCluster
    from cheapspot_localcluster.components import PodLifecycle, Ports
    from cheapspot_localcluster.s3 import start_s3

    with tempfile.TemporaryDirectory(prefix="cheapspot-scale-") as tmp:
        root = Path(tmp)
        pools_file = root / "pools.yaml"
        pools_file.write_text(yaml.safe_dump(pools(args.nodes)))
        s3 = start_s3(port=0)
        cluster = LocalCluster(
            name="cheapspot-scale",
            state_dir=root / "cluster",
            ports=Ports.free(),
            pools_file=pools_file,
            pod_lifecycle=PodLifecycle.KWOK,
            with_s3=False,
            die_with_parent=True,
        )
        print(f"starting the local cluster with {args.nodes} nodes ...", flush=True)
        cluster.start(progress=lambda m: print(f"  {m}", flush=True))
        harnesses = make_harness(cluster, s3, root, reconcileIntervalSeconds=2)
        h: Harness = next(harnesses)
        try:
            started = time.monotonic()
            for i in range(args.jobs):
                h.apply(f"j{i}", shards=args.shards)
            pods = args.jobs * (args.shards + 1)

            def all_running() -> bool:
                running = [
                    p
                    for p in h.api.list(f"/api/v1/namespaces/{h.namespace}/pods")
                    if (p.get("status") or {}).get("phase") == "Running"
                ]
                return len(running) >= pods

            wait_for(f"{pods} pods running", all_running, timeout_s=1800, poll_s=2)
            print(f"{args.jobs} jobs, {pods} pods running after {time.monotonic() - started:.0f}s")
            time.sleep(10)  # let the start settle (claims, first status writes)
            kubectl = build.bin_dir() / "kubectl"
            assert h.operator.proc is not None
            pid = h.operator.proc.pid
            rss_start = rss_mb(pid)
            before = requests(kubectl, cluster.kubeconfig_path)
            time.sleep(args.seconds)
            after = requests(kubectl, cluster.kubeconfig_path)
            rss_end = rss_mb(pid)
            delta = after - before
            print(
                f"\nat rest, {args.nodes} nodes, {args.jobs} jobs x {args.shards} shards, "
                f"{args.seconds:.0f} s (the metrics reads themselves are 2 GETs):"
            )
            print(f"  {'verb':<8} {'resource':<28} {'per second':>10}")
            total = 0.0
            for (verb, resource), n in sorted(delta.items(), key=lambda kv: -kv[1]):
                if verb in ("WATCH", "") or not resource:
                    continue
                rate = n / args.seconds
                kwok = resource in KWOK_HEARTBEATS
                total += 0.0 if kwok else rate
                print(f"  {verb:<8} {resource:<28} {rate:10.2f}" + ("  (kwok)" if kwok else ""))
            print(
                f"  all but kwok's node heartbeats: {total:.1f} requests/s, "
                f"{100 * total / args.jobs:.0f} per 100 jobs"
            )
            print(f"operator RSS: {rss_start:.0f} MB at the start, {rss_end:.0f} MB at the end")
            return 0
        finally:
            for _ in harnesses:
                pass
            cluster.stop()
            s3.stop()


if __name__ == "__main__":
    sys.exit(main())

"""What the operator asks of the API server at rest and in a burst of reclaims, its reaction
time and its memory, with many jobs and nodes.

    python benchmarks/operator_scale.py [--nodes 200] [--jobs 50] [--shards 2] [--seconds 120]
                                        [--burst 0] [--gpus-per-node 1]

The issue's size: ``--nodes 1000 --jobs 200 --shards 9 --gpus-per-node 8 --seconds 1800
--burst 50`` (2,000 pods, 30 minutes at rest, then 50 nodes reclaimed at once).

Starts a private local cluster with ``--nodes`` kwok nodes (three quarters spot GPU nodes in
two zones, the rest on-demand) where kwok fakes every pod (no workers run), an S3 endpoint,
and ``cheapspot operator`` as a subprocess at the production reconcile interval (2 s). Applies
``--jobs`` CheapTrainJobs of ``--shards`` shards, waits until every pod runs, then for
``--seconds`` touches nothing and reads the API server's own request counters
(``apiserver_request_total``) before and after: requests per second by verb and resource.
Once started, the other components watch rather than list, so the LISTs and GETs counted are
the operator's. Prints the operator's resident memory every minute of the rest.

``--burst N`` then reclaims N spot nodes that run shards, all at once, with the profile's
notice (the interruption taint, then the node goes), and measures for every shard on them the
time from its node's notice to its replacement pod being created (seen on a pod watch started
before the burst), p50 / p99 / max, and the requests the operator made in the minute after.

With a burst it ends with the operator's own cost per replacement against the issue's
targets (``operator_cost.py``): its CPU (``/proc``), its API writes (the API server's
counters, less what the same time at rest costs), its reconcile stages (queued, planning,
writing: its own histograms), its object-store requests and progress reads, and every
component's CPU over the burst's minute.
"""

from __future__ import annotations

import argparse
import io
import os
import re
import signal
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import yaml
from rich.console import Console

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "integration"))
sys.path.insert(0, str(REPO / "benchmarks"))

import operator_cost as cost  # noqa: E402 (beside this script)

PRODUCTION_CHECKPOINT = {"everySteps": 20, "everySeconds": cost.REST_CHECKPOINT_SECONDS}

KWOK_HEARTBEATS = {"leases", "nodes/status"}
"""kwok renewing its nodes' leases and status: the simulated kubelets, not the operator."""
COUNTER = re.compile(r"^apiserver_request_total\{(?P<labels>[^}]*)\} (?P<value>[0-9.e+]+)$")


SHARD_POD = re.compile(r"^(?P<job>.+)-shard-(?P<shard>\d+)-(?P<attempt>\d+)$")


def pools(nodes: int, gpus: int = 1) -> dict[str, Any]:
    """Three quarters spot, the rest on-demand, in as many zones as a pool file allows (at
    most 100 nodes of a pool per zone), plus one CPU node."""
    spot_total = max(2, nodes * 3 // 4)
    zones = [f"zone-{chr(ord('a') + i)}" for i in range(max(2, -(-spot_total // 100)))]
    spot = spot_total // len(zones)
    on_demand = max(1, (nodes - 1 - spot * len(zones)) // len(zones))
    gpu = {"cpu": str(8 * gpus), "memory": f"{32 * gpus}Gi", "nvidia.com/gpu": gpus, "pods": 110}
    return {
        "profile": "local",
        "region": "local",
        "pools": [
            {
                "name": "spot-gpu",
                "capacityType": "spot",
                "instanceType": "g5.xlarge",
                "zones": zones,
                "countPerZone": spot,
                "capacity": gpu,
            },
            {
                "name": "ondemand-gpu",
                "capacityType": "on-demand",
                "instanceType": "g5.xlarge",
                "zones": zones,
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
    text = cost.apiserver_metrics(kubectl, kubeconfig)
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


def print_rates(delta: Counter[tuple[str, str]], seconds: float, jobs: int, title: str) -> float:
    print(f"\n{title}:")
    print(f"  {'verb':<8} {'resource':<28} {'per second':>10}")
    total = 0.0
    for (verb, resource), n in sorted(delta.items(), key=lambda kv: -kv[1]):
        if verb in ("WATCH", "") or not resource:
            continue
        rate = n / seconds
        kwok = resource in KWOK_HEARTBEATS
        total += 0.0 if kwok else rate
        print(f"  {verb:<8} {resource:<28} {rate:10.2f}" + ("  (kwok)" if kwok else ""))
    print(
        f"  all but kwok's node heartbeats: {total:.2f} requests/s, "
        f"{100 * total / jobs:.2f} per 100 jobs"
    )
    return total


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def burst(h: Any, cluster: Any, count: int) -> list[float]:
    """Reclaim ``count`` spot nodes running shards at once; seconds from each node's notice
    (its interruption taint seen on a node watch) to the replacement of each shard on it
    being created."""
    import threading

    from kubernetes import client, watch

    from cheapspot_localcluster.profiles import capacity_type_of

    ns = h.namespace
    profile = cluster.pools.placement
    spot = {
        n["metadata"]["name"]
        for n in h.api.list("/api/v1/nodes")
        if capacity_type_of(n["metadata"].get("labels") or {}, profile).value == "spot"
    }
    core = client.CoreV1Api(cluster.api_client())
    listed: Any = core.list_namespaced_pod(ns)
    on_node: dict[str, list[tuple[str, int, int]]] = {}
    pod: Any
    for pod in listed.items:
        m = SHARD_POD.match(pod.metadata.name)
        node = pod.spec.node_name
        if m and node in spot and pod.status.phase == "Running":
            slot = (m["job"], int(m["shard"]), int(m["attempt"]))
            on_node.setdefault(node, []).append(slot)
    victims = sorted(on_node)[:count]
    nodes: Any = core.list_node(limit=1)
    nodes_version = nodes.metadata.resource_version
    watched = {(j, s): a for node in victims for (j, s, a) in on_node[node]}
    created: dict[tuple[str, int], float] = {}
    done = threading.Event()

    def follow() -> None:
        w = watch.Watch()  # type: ignore[no-untyped-call]
        try:
            for event in w.stream(  # type: ignore[no-untyped-call]
                core.list_namespaced_pod, ns, resource_version=listed.metadata.resource_version
            ):
                if event["type"] == "ADDED":
                    m = SHARD_POD.match(event["object"].metadata.name)
                    if m:
                        slot = (m["job"], int(m["shard"]))
                        if slot in watched and int(m["attempt"]) > watched[slot]:
                            created.setdefault(slot, time.monotonic())
                if done.is_set() or len(created) == len(watched):
                    w.stop()  # type: ignore[no-untyped-call]
        except Exception as exc:  # the cluster going away at the end
            if not done.is_set():
                print(f"  the pod watch ended: {exc}", flush=True)

    # When each notice is on the API server, as any watcher sees it: 50 reclaim threads of
    # this process apply their taints over a few seconds, and the operator can only react to
    # a notice that exists.
    interruption = {t.key for t in profile.interruption_taints}
    tainted: dict[str, float] = {}

    def follow_nodes() -> None:
        w = watch.Watch()  # type: ignore[no-untyped-call]
        try:
            for event in w.stream(core.list_node, resource_version=nodes_version):  # type: ignore[no-untyped-call]
                node = event["object"]
                keys = {t.key for t in node.spec.taints or []}
                if node.metadata.name in victims and keys & interruption:
                    tainted.setdefault(node.metadata.name, time.monotonic())
                if done.is_set() or len(tainted) == len(victims):
                    w.stop()  # type: ignore[no-untyped-call]
        except Exception as exc:
            if not done.is_set():
                print(f"  the node watch ended: {exc}", flush=True)

    watcher = threading.Thread(target=follow, daemon=True)
    watcher.start()
    threading.Thread(target=follow_nodes, daemon=True).start()
    time.sleep(1)
    notices: dict[str, float] = {}
    futures = []
    for node in victims:
        notices[node] = time.monotonic()
        futures.append(cluster.preempt_in_background(node))
    print(f"reclaiming {len(victims)} nodes running {len(watched)} shards ...", flush=True)
    deadline = time.monotonic() + 120
    while len(created) < len(watched) and time.monotonic() < deadline:
        time.sleep(0.2)
    done.set()
    # The nodes' removal is the cluster's business, not the operator's reaction: a removal
    # that does not finish (kwok slow to let a node go NotReady on a busy machine) is
    # reported, not fatal.
    unfinished = []
    for node, f in zip(victims, futures, strict=True):
        try:
            f.result(timeout=300)
        except Exception as exc:
            unfinished.append(f"{node}: {exc}")
    if unfinished:
        print(f"  {len(unfinished)} node removals did not finish, e.g. {unfinished[0]}")
    latencies = [
        created[(j, s)] - tainted.get(node, notices[node])
        for node in victims
        for (j, s, _a) in on_node[node]
        if (j, s) in created
    ]
    requested = [
        created[(j, s)] - notices[node]
        for node in victims
        for (j, s, _a) in on_node[node]
        if (j, s) in created
    ]
    apply = sorted(tainted[n] - notices[n] for n in victims if n in tainted)
    if apply:
        print(
            f"  the notices reached the API server {percentile(apply, 0.5):.2f} s (p50), "
            f"{apply[-1]:.2f} s (max) after this process asked; {len(victims) - len(apply)} "
            "not seen (timed from the request)"
        )
    if requested:
        print(
            f"  from the request of each notice (not its arrival): p50 "
            f"{percentile(requested, 0.5):.2f} s, p99 {percentile(requested, 0.99):.2f} s"
        )
    missing = len(watched) - len(latencies)
    if missing:
        print(f"  {missing} shards had no replacement within 120 s")
    return latencies


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
    parser.add_argument("--gpus-per-node", type=int, default=1)
    parser.add_argument("--burst", type=int, default=0, help="spot nodes reclaimed at once")
    parser.add_argument(
        "--baseline",
        type=float,
        default=60.0,
        help="seconds counted at the end with the operator stopped (0: skip)",
    )
    args = parser.parse_args(argv)

    from operator_harness import Harness, make_harness

    from cheapspot_localcluster import build
    from cheapspot_localcluster.cluster import LocalCluster
    from cheapspot_localcluster.components import KUBELET_TIMING, PodLifecycle, Ports
    from cheapspot_localcluster.dashboard import free_port
    from cheapspot_localcluster.s3 import start_s3
    from cheapspot_localcluster.waiting import wait_for

    with tempfile.TemporaryDirectory(prefix="cheapspot-scale-") as tmp:
        root = Path(tmp)
        pools_file = root / "pools.yaml"
        pools_file.write_text(yaml.safe_dump(pools(args.nodes, args.gpus_per_node)))
        s3 = start_s3(port=0)
        cluster = LocalCluster(
            name="cheapspot-scale",
            state_dir=root / "cluster",
            ports=Ports.free(),
            pools_file=pools_file,
            pod_lifecycle=PodLifecycle.KWOK,
            with_s3=False,
            die_with_parent=True,
            # A kubelet's lease and the controller-manager's grace, not the tests' seconds.
            node_timing=KUBELET_TIMING,
        )
        print(f"starting the local cluster with {args.nodes} nodes ...", flush=True)
        # A thousand kwok nodes take minutes to report Ready on 2 cores.
        cluster.start(progress=lambda m: print(f"  {m}", flush=True), timeout_s=900)
        # The production settings (the tests' harness writes cost every 15 s).
        metrics_port = free_port()
        harnesses = make_harness(
            cluster,
            s3,
            root,
            reconcileIntervalSeconds=2,
            statusRefreshSeconds=120,
            metricsPort=metrics_port,
        )
        h: Harness = next(harnesses)
        metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
        try:
            started = time.monotonic()
            for i in range(args.jobs):
                # The default checkpoint interval (the tests' harness reads every 2 s).
                h.apply(f"j{i}", shards=args.shards, checkpoint=PRODUCTION_CHECKPOINT)
            pods = args.jobs * (args.shards + 1)

            def all_running() -> bool:
                running = [
                    p
                    for p in h.api.list(f"/api/v1/namespaces/{h.namespace}/pods")
                    if (p.get("status") or {}).get("phase") == "Running"
                ]
                return len(running) >= int(pods)

            wait_for(f"{pods} pods running", all_running, timeout_s=3600, poll_s=5)
            print(f"{args.jobs} jobs, {pods} pods running after {time.monotonic() - started:.0f}s")
            time.sleep(30)  # let the start settle (claims, first status writes)
            kubectl = build.bin_dir() / "kubectl"
            assert h.operator.proc is not None
            pid = h.operator.proc.pid
            samples = [rss_mb(pid)]
            pids = {"operator": pid, **cluster.running(), "benchmark and moto S3": os.getpid()}

            def snapshot() -> cost.Snapshot:
                return cost.take(
                    time.monotonic(), pids, metrics_url, kubectl, cluster.kubeconfig_path
                )

            rest_from = snapshot()
            before = requests(kubectl, cluster.kubeconfig_path)
            rest_started = time.monotonic()
            while (left := args.seconds - (time.monotonic() - rest_started)) > 0:
                time.sleep(min(60.0, left))
                samples.append(rss_mb(pid))
                print(
                    f"  at rest {time.monotonic() - rest_started:5.0f} s: RSS {samples[-1]:.0f} MB"
                )
            after = requests(kubectl, cluster.kubeconfig_path)
            rest = cost.Window.between(rest_from, snapshot())
            print_rates(
                after - before,
                args.seconds,
                args.jobs,
                f"at rest, {args.nodes} nodes, {args.jobs} jobs x {args.shards} shards + anchor, "
                f"{args.seconds:.0f} s (the metrics reads themselves are 2 GETs)",
            )
            print(
                f"operator RSS over the rest: start {samples[0]:.0f} MB, "
                f"min {min(samples):.0f}, max {max(samples):.0f}, end {samples[-1]:.0f} MB"
            )
            if args.burst:
                burst_from = snapshot()
                before = requests(kubectl, cluster.kubeconfig_path)
                burst_started = time.monotonic()
                latencies = burst(h, cluster, args.burst)
                time.sleep(max(0.0, 60 - (time.monotonic() - burst_started)))
                window = time.monotonic() - burst_started
                after = requests(kubectl, cluster.kubeconfig_path)
                burst_window = cost.Window.between(burst_from, snapshot())
                print_rates(
                    after - before, window, args.jobs, f"the {window:.0f} s from the burst on"
                )
                if latencies:
                    print(
                        f"\nnotice -> replacement created, {len(latencies)} shards on "
                        f"{args.burst} nodes reclaimed at once: p50 "
                        f"{percentile(latencies, 0.5):.2f} s, p99 {percentile(latencies, 0.99):.2f}"
                        f" s, max {max(latencies):.2f} s"
                    )
                print(f"operator RSS after the burst: {rss_mb(pid):.0f} MB")
                print(f"load average after the burst: {os.getloadavg()}")
                cost.report(rest, burst_window, len(latencies), args.jobs, Console(width=120))
            if args.baseline:
                # The same counters with the operator frozen: what the rest of the cluster
                # (kube-apiserver's own loopback, controller-manager, scheduler) asks for.
                os.kill(pid, signal.SIGSTOP)
                try:
                    before = requests(kubectl, cluster.kubeconfig_path)
                    time.sleep(args.baseline)
                    after = requests(kubectl, cluster.kubeconfig_path)
                finally:
                    os.kill(pid, signal.SIGCONT)
                print_rates(
                    after - before,
                    args.baseline,
                    args.jobs,
                    f"{args.baseline:.0f} s with the operator stopped (SIGSTOP): not its requests",
                )
            return 0
        finally:
            for _ in harnesses:
                pass
            cluster.stop()
            s3.stop()


if __name__ == "__main__":
    if isinstance(sys.stdout, io.TextIOWrapper):
        sys.stdout.reconfigure(line_buffering=True)
    sys.exit(main())

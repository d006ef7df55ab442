"""Reclaims under steady load: failed requests, latency during reclaims, notice to Ready.

    python benchmarks/serving_reclaims.py [--reclaims 20] [--notice 15] [--threads 4]
                                          [--pause 2] [--steady 60]

Starts a private local cluster whose pods run as local processes, its S3 endpoint and
``cheapspot operator``; publishes a tiny Qwen2-architecture model and two LoRA adapters; applies
the example CheapInferencePool shrunk to an on-demand anchor and one spot replica (vLLM on CPU
in the serving environment, ``make serve-venv``) and drives it through its router with the
official ``openai`` client: ``--threads`` clients, streaming and not, base model and adapters,
each pausing ``--pause`` seconds between requests (steady load that leaves the cores room to
start a replacement). After ``--steady`` seconds of load alone it reclaims the spot replica's
node ``--reclaims`` times, every other one with ``--notice`` seconds of notice and the rest
without, each once the pool is whole again (the cloud gives the node back, as an autoscaler
would).

Each reclaim starts once the router has requests in flight on the victim (its count is
recorded). Per reclaim: the time from the reclaim's start (the interruption taint; without notice, the
machine vanishing) to the replacement replica Ready, and the requests that started while the
pool was short of it. Then: failed or truncated requests (target 0), p50/p99 latency in the
steady phase against the reclaim windows, as a table and as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

POOL = "bench"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reclaims", type=int, default=20)
    parser.add_argument("--notice", type=float, default=15.0, help="notice, seconds")
    parser.add_argument("--threads", type=int, default=4, help="client threads")
    parser.add_argument("--pause", type=float, default=2.0, help="each client's pause, seconds")
    parser.add_argument("--steady", type=float, default=60.0, help="load alone first, seconds")
    parser.add_argument("--timeout", type=float, default=900.0, help="per replacement, seconds")
    args = parser.parse_args(argv)

    from cheapspot_localcluster.demo import quiet_libraries
    from cheapspot_localcluster.inference import (
        Load,
        Pools,
        busiest,
        latency_ms,
        pool_from_example,
        publish_adapters,
    )
    from cheapspot_localcluster.stack import LocalBackend, private_cluster
    from cheapspot_localcluster.trainjobs import publish_materials
    from cheapspot_localcluster.waiting import wait_for

    quiet_libraries()
    workdir = Path(tempfile.mkdtemp(prefix="cheapspot-bench-"))
    cluster = private_cluster(workdir / "cluster")
    rows: list[dict[str, Any]] = []
    cluster.start(progress=print)
    load: Load | None = None
    backend: LocalBackend | None = None
    try:
        os.environ.update(cluster.s3.env())
        materials = publish_materials(cluster.s3.uri(""), workdir)
        adapters = publish_adapters(
            cluster.s3.uri("pool/"), materials.model_dir, workdir, ["qa", "sums"]
        )
        backend = LocalBackend(cluster, cluster.s3, "bench", workdir / "op", notice_s=15)
        backend.install()
        pools = Pools(cluster.api_client(), backend.namespace)
        pools.apply(pool_from_example(POOL, materials.model_uri, adapters))
        started = time.monotonic()
        pools.wait_ready(POOL, 2, args.timeout)
        print(f"pool ready (anchor + 1 spot replica) in {time.monotonic() - started:.0f}s")
        url = pools.router_url(POOL)
        base = materials.model_uri.rstrip("/").rsplit("/", 1)[-1]
        load = Load(
            url, [base, *adapters], threads=args.threads, pause_s=args.pause, max_tokens=16
        ).start()
        time.sleep(args.steady)
        steady_end = time.monotonic()

        for i in range(args.reclaims):
            notice = args.notice if i % 2 == 0 else 0.0
            spot = set(backend.spot_nodes())
            victim = wait_for(
                "a ready spot replica",
                lambda spot=spot: next(  # type: ignore[misc]
                    (p for p in pools.ready_replicas(POOL) if p["spec"].get("nodeName") in spot),
                    None,
                ),
                args.timeout,
            )
            name, node = victim["metadata"]["name"], victim["spec"]["nodeName"]
            slot = victim["metadata"]["labels"]["cheapspot.dev/replica"]
            # The reclaim starts while the victim serves (fails the run otherwise): a reclaim
            # of an idle replica measures nothing of what the router does with its work.
            _, busy = busiest(url, [name], args.timeout)
            began = time.monotonic()
            reclaim = threading.Thread(target=backend.reclaim, args=(node, notice), daemon=True)
            reclaim.start()

            def replacement_ready(slot: str = slot, name: str = name) -> dict[str, Any] | None:
                for p in pools.ready_replicas(POOL):
                    labels = p["metadata"]["labels"]
                    if labels["cheapspot.dev/replica"] == slot and p["metadata"]["name"] != name:
                        return p
                return None

            wait_for(f"the replacement of {name}", replacement_ready, args.timeout, poll_s=0.2)
            ready_after = time.monotonic() - began
            reclaim.join(300)
            cluster.create_nodes()  # the cloud gives the machine back
            rows.append(
                {
                    "reclaim": i + 1,
                    "notice_s": notice,
                    "replica": name,
                    "victim_in_flight": busy,
                    "to_replacement_ready_s": round(ready_after, 1),
                    "began": began,
                    "ended": time.monotonic(),
                }
            )
            lost = len(load.failed) + len(load.truncated)
            print(
                f"reclaim {i + 1}/{args.reclaims} ({notice:g}s notice): {name} "
                f"({busy} requests in flight) replaced, "
                f"Ready after {ready_after:.1f}s; {len(load.outcomes)} requests, {lost} failed"
            )
        outcomes = load.stop()
        load = None
    finally:
        if load is not None:
            load.stop()
        if backend is not None:
            backend.operator.stop()
        cluster.stop()

    def during(o: Any) -> bool:
        return any(r["began"] <= o.started <= r["ended"] for r in rows)

    steady = [o for o in outcomes if o.started < steady_end]
    reclaiming = [o for o in outcomes if during(o)]
    failed = [o for o in outcomes if not o.ok or o.tokens < 16]
    s50, s99 = latency_ms(steady)
    r50, r99 = latency_ms(reclaiming)
    summary: dict[str, Any] = {
        "requests": len(outcomes),
        "failed": len(failed),
        "errors": sorted({o.error for o in failed})[:5],
        "reclaims": len(rows),
        "steady_requests": len(steady),
        "steady_p50_ms": s50,
        "steady_p99_ms": s99,
        "reclaim_requests": len(reclaiming),
        "reclaim_p50_ms": r50,
        "reclaim_p99_ms": r99,
    }
    print(f"{'reclaim':>7} {'notice':>6} {'in flight':>9} {'to Ready':>9}")
    for r in rows:
        print(
            f"{r['reclaim']:>7} {r['notice_s']:>5g}s {r['victim_in_flight']:>9} "
            f"{r['to_replacement_ready_s']:>8.1f}s"
        )
    for kind, pick in (("with_notice", True), ("without_notice", False)):
        secs = [r["to_replacement_ready_s"] for r in rows if (r["notice_s"] > 0) == pick]
        if secs:
            summary[f"{kind}_to_ready_median_s"] = round(statistics.median(secs), 1)
            summary[f"{kind}_to_ready_max_s"] = round(max(secs), 1)
    print(
        f"{summary['requests']} requests, {summary['failed']} failed; p50/p99 steady "
        f"{s50:.0f}/{s99:.0f} ms, during reclaims {r50:.0f}/{r99:.0f} ms"
    )
    for r in rows:
        del r["began"], r["ended"]
    print(json.dumps({"rows": rows, "summary": summary, "at": time.strftime("%Y-%m-%d")}))
    return 0 if not failed else 1


if __name__ == "__main__":
    sys.exit(main())

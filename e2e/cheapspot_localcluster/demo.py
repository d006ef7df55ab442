"""``cheapspot demo`` (``make demo``): a LoRA job on spot nodes that get reclaimed, end to end.

On this machine, with nothing but Python and the cluster binaries (built on first use):

1. brings up the local cluster (a real control plane, simulated spot and on-demand GPU nodes,
   pods run as local processes), an S3 endpoint and the operator;
2. builds a tiny Qwen2-architecture model and a dataset locally and uploads them;
3. applies the quickstart example from ``crds/examples`` (the YAML a user applies on EKS or
   ACK) with the model, data and output locations pointed at the local S3, and its steps
   shrunk to fit a laptop;
4. shows each shard's progress live while it reclaims two spot nodes: one with notice, one
   without;
5. checks the adapter loads in stock PEFT;
6. serves the adapter it just trained from a CheapInferencePool (the example in
   ``crds/examples``: an on-demand anchor and two spot replicas, vLLM on CPU behind the
   pool's router), drives concurrent requests at it with the official ``openai`` client
   (streaming and not, base model and adapter) and reclaims one spot replica with notice and
   another without, counting every failed or truncated answer (there must be none);
7. prints a summary, and as its last line the same summary as one JSON object; then tears
   everything down (``--keep-cluster`` leaves the cluster and its S3 endpoint up to explore).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.panel import Panel
from rich.progress_bar import ProgressBar
from rich.table import Table

from cheapspot.contract import Phase
from cheapspot_localcluster.cluster import LocalCluster
from cheapspot_localcluster.components import PodLifecycle, Ports
from cheapspot_localcluster.stack import LocalBackend
from cheapspot_localcluster.trainjobs import (
    SMALL,
    Resume,
    TrainJobs,
    deep_merge,
    fetch_final,
    job_from_example,
    load_in_peft,
    publish_materials,
    read_progress,
    resumes_from_logs,
)

console = Console(highlight=False)
NAMESPACE = "demo"
JOB = "qa-lora"
POOL = "qa-serve"
NOTICE_S = 5
SERVE_TIMEOUT_S = 900
LOAD_CLIENTS = 3
LOAD_PAUSE_S = 0.5


@dataclass
class Reclaim:
    """A reclaim the demo injects: which shard's node, with how much notice, at what share of
    that shard's steps."""

    shard: int
    notice_s: float
    at_fraction: float
    node: str = ""
    started_at: float = 0.0
    done: bool = False


@dataclass
class Story:
    """What happened, for the live view and the summary."""

    lines: list[str] = field(default_factory=list)
    reclaims: list[Reclaim] = field(default_factory=list)

    def say(self, line: str) -> None:
        self.lines.append(f"[dim]{time.strftime('%H:%M:%S')}[/] {line}")


def demo_overrides(steps: int, shards: int) -> dict[str, Any]:
    return deep_merge(
        SMALL,
        {
            "training": {"steps": steps},
            "shards": shards,
            "rounds": {"localSteps": max(1, steps // 4)},
            # Far above what the demo spends (cents): there to show budget status and metrics.
            "budget": {"limitUSD": 2},
        },
    )


def shard_table(status: dict[str, Any], progress: dict[int, Any], shards: int, total: int) -> Table:
    table = Table(box=None, pad_edge=False)
    for column in ("shard", "", "round", "step", "loss", "node", "capacity"):
        table.add_column(column, no_wrap=True)
    slots = {int(s.get("index", i)): s for i, s in enumerate(status.get("shards") or [])}
    for i in range(shards):
        slot, rec = slots.get(i, {}), progress.get(i)
        step = rec.step if rec is not None else int(slot.get("step") or 0)
        loss = rec.loss if rec is not None else slot.get("loss")
        rnd = rec.round if rec is not None else slot.get("round")
        capacity = str(slot.get("capacityType", ""))
        colour = "green" if capacity == "spot" else "yellow"
        table.add_row(
            str(i),
            ProgressBar(total=total, completed=min(step, total), width=16),
            "" if rnd is None else str(rnd),
            f"{step}/{total}",
            "" if loss is None else f"{loss:.3f}",
            str(slot.get("node", "")),
            f"[{colour}]{capacity}[/]",
        )
    return table


@dataclass
class Showing:
    """The job being shown: where to look, and what the demo did to it."""

    backend: LocalBackend
    jobs: TrainJobs
    output_uri: str
    shards: int
    total: int
    story: Story
    started: float = field(default_factory=time.monotonic)


def view(run: Showing, status: dict[str, Any], progress: dict[int, Any]) -> Panel:
    cost = status.get("cost") or {}
    head = (
        f"job [bold]{JOB}[/]  phase [bold]{status.get('phase', 'Pending')}[/]  "
        f"elapsed {time.monotonic() - run.started:.0f}s  "
        f"preemptions {status.get('preemptions', 0)}  "
        f"cost ${float(cost.get('dollars', 0)):.4f} "
        f"(on-demand ${float(cost.get('onDemandDollars', 0)):.4f})"
    )
    table = shard_table(status, progress, run.shards, run.total)
    return Panel(
        Group(head, table, *run.story.lines[-6:]), title="cheapspot demo: LoRA on spot nodes"
    )


def inject(run: Showing, stop: threading.Event) -> None:
    """Reclaim the planned shards' nodes once they are far enough along.

    Each reclaim runs in a thread of its own: one only ends once its node is gone (notice,
    NotReady, pod GC), and the next one is due while that is still under way."""
    under_way: list[threading.Thread] = []
    try:
        _inject(run, stop, under_way)
    finally:
        for thread in under_way:
            thread.join()


def _reclaim(run: Showing, plan: Reclaim) -> None:
    run.backend.reclaim(plan.node, plan.notice_s)
    plan.done = True
    run.story.say(f"{plan.node} is gone; shard {plan.shard} carried on elsewhere")


def _inject(run: Showing, stop: threading.Event, under_way: list[threading.Thread]) -> None:
    for plan in run.story.reclaims:
        while not stop.is_set():
            rec = read_progress(run.output_uri, run.shards).get(plan.shard)
            # Mid-round, while it trains: a shard waiting for the others has nothing to lose.
            if (
                rec is not None
                and rec.phase is Phase.TRAINING
                and rec.step >= plan.at_fraction * run.total
            ):
                break
            stop.wait(0.3)
        status = run.jobs.status(JOB)
        if stop.is_set() or status.get("phase") != "Running":
            return
        slots = status.get("shards") or []
        slot = slots[plan.shard] if plan.shard < len(slots) else {}
        plan.node = str(slot.get("node", ""))
        if not plan.node or slot.get("done") or slot.get("podPhase") != "Running":
            continue  # the shard finished meanwhile (progress records lag a little)
        plan.started_at = time.time()
        how = f"with {plan.notice_s:g}s notice" if plan.notice_s else "without notice"
        run.story.say(f"[red]reclaiming[/] {plan.node} (shard {plan.shard}) {how}")
        thread = threading.Thread(target=_reclaim, args=(run, plan), daemon=True)
        thread.start()
        under_way.append(thread)


def pod_logs(backend: LocalBackend, job: str, shards: int) -> dict[tuple[int, int], str]:
    """The logs of every shard pod the job had, by (shard, attempt), from the pod runner."""
    root = backend.cluster.layout.root / "podrunner" / "pods"
    logs: dict[tuple[int, int], str] = {}
    for path in root.glob(f"{backend.namespace}_{job}-shard-*/log"):
        pod = path.parent.name.split("_")[1]  # qa-lora-shard-<i>-<attempt>
        *_, shard, attempt = pod.rsplit("-", 2)
        if shard.isdigit() and attempt.isdigit() and int(shard) < shards:
            logs[int(shard), int(attempt)] = path.read_text(errors="replace")
    return logs


def summary_table(summary: dict[str, Any], resumes: list[Resume]) -> Table:
    table = Table(title="summary", show_header=False, box=None)
    table.add_column(style="bold")
    table.add_column()
    table.add_row("result", "[green]succeeded[/]" if summary["succeeded"] else "[red]failed[/]")
    table.add_row("wall time", f"{summary['wall_seconds']:.0f}s")
    table.add_row("reclaims survived", str(summary["reclaims"]))
    per = ", ".join(
        f"shard {r.shard}: {r.steps_lost} lost, training again after {r.first_step_at - t:.1f}s"
        for r, t in resume_times(resumes, summary)
    )
    table.add_row(
        "steps lost", f"{summary['steps_lost']}  ({per})" if per else str(summary["steps_lost"])
    )
    saved = summary["cost_on_demand_usd"] - summary["cost_spot_usd"]
    table.add_row(
        "cost",
        f"${summary['cost_spot_usd']:.4f} on spot vs ${summary['cost_on_demand_usd']:.4f} "
        f"on-demand (saved ${saved:.4f})",
    )
    sources = ", ".join(summary.get("price_sources") or []) or "-"
    estimated = " (estimated: no live price)" if summary.get("cost_estimated") else ""
    table.add_row("prices from", f"{sources}{estimated}")
    if "serve_requests" in summary:
        table.add_row(
            "serving",
            f"{summary['serve_requests']} requests, {summary['serve_failed']} failed, "
            f"{summary['serve_reclaims']} replicas reclaimed; latency p50 "
            f"{summary['serve_p50_ms']:.0f} ms, p99 {summary['serve_p99_ms']:.0f} ms",
        )
    table.add_row(
        "adapter", f"{summary['adapter_uri']}  (loads in stock PEFT: {summary['adapter_loads']})"
    )
    return table


def resume_times(resumes: list[Resume], summary: dict[str, Any]) -> list[tuple[Resume, float]]:
    starts = summary.get("_reclaim_starts", {})
    return [(r, starts[r.shard]) for r in resumes if r.shard in starts]


def run(args: argparse.Namespace) -> dict[str, Any]:
    started = time.monotonic()
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="cheapspot-demo-"))
    cluster = LocalCluster(
        "cheapspot-demo",
        ports=Ports.free(),
        pod_lifecycle=PodLifecycle.EXTERNAL,
        with_s3=True,
        die_with_parent=not args.keep_cluster,
    )
    backend: LocalBackend | None = None
    try:
        with console.status("starting the local cluster, its S3 endpoint and the pod runner") as st:
            cluster.start(progress=st.update)
        nodes = len(cluster.node_objects())
        console.print(
            f"cluster up in {time.monotonic() - started:.0f}s: {nodes} simulated nodes "
            f"(spot: {', '.join(cluster.spot_nodes())}), S3 at {cluster.s3.url}"
        )
        os.environ.update(cluster.s3.env())
        with console.status("building a tiny Qwen2 model and a dataset, uploading them"):
            materials = publish_materials(cluster.s3.uri(""), workdir)
        backend = LocalBackend(cluster, cluster.s3, NAMESPACE, workdir, notice_s=NOTICE_S)
        recorder = None
        if args.dashboard:
            from cheapspot_localcluster.dashboard import MetricsRecorder, free_port

            port = free_port()
            backend.operator.config["metricsPort"] = port
            recorder = MetricsRecorder(f"http://127.0.0.1:{port}/metrics")
        with console.status("installing the CRD and starting the operator"):
            backend.install()
        if recorder is not None:
            recorder.start()
        output_uri = cluster.s3.uri(f"jobs/{JOB}/")
        body = job_from_example(
            JOB,
            model_uri=materials.model_uri,
            dataset_uri=materials.dataset_uri,
            output_uri=output_uri,
            overrides=demo_overrides(args.steps, args.shards),
        )
        jobs = TrainJobs(cluster.api_client(), NAMESPACE)
        jobs.apply(body)
        console.print(
            f"applied crds/examples/quickstart.yaml as {NAMESPACE}/{JOB}: model {materials.model_uri}, data {materials.dataset_uri}"
        )

        total, shards = args.steps, args.shards
        story = Story(reclaims=[Reclaim(0, NOTICE_S, 0.25), Reclaim(min(1, shards - 1), 0, 0.6)])
        live_run = Showing(backend, jobs, output_uri, shards, total, story)
        stop = threading.Event()
        injector = threading.Thread(target=inject, args=(live_run, stop), daemon=True)
        injector.start()
        status: dict[str, Any] = {}
        with Live(console=console, refresh_per_second=4, transient=False) as live:
            while True:
                status = jobs.status(JOB)
                live.update(view(live_run, status, read_progress(output_uri, shards)))
                if status.get("phase") in ("Succeeded", "Failed"):
                    break
                if time.monotonic() - live_run.started > args.timeout:
                    story.say("[red]timed out[/]")
                    break
                time.sleep(0.5)
        stop.set()
        injector.join(timeout=120)

        succeeded = status.get("phase") == "Succeeded"
        adapter_dir = workdir / "adapter"
        loads = False
        if succeeded:
            fetch_final(output_uri, adapter_dir)
            with console.status("loading the adapter with stock PEFT"):
                loads = load_in_peft(materials.model_dir, adapter_dir) > 0
        resumes = resumes_from_logs(pod_logs(backend, JOB, shards))
        served: dict[str, Any] = {}
        if succeeded and not args.no_serve:
            served = serve(backend, materials.model_uri, f"{output_uri}final/")
        cost = status.get("cost") or {}
        summary: dict[str, Any] = {
            "succeeded": bool(succeeded and loads),
            "reclaims": int(status.get("preemptions", 0)),
            "steps_lost": sum(r.steps_lost for r in resumes),
            "cost_spot_usd": round(float(cost.get("dollars", 0.0)), 6),
            "cost_on_demand_usd": round(float(cost.get("onDemandDollars", 0.0)), 6),
            "price_sources": list(cost.get("sources") or []),
            "cost_estimated": bool(cost.get("estimated", False)),
            "adapter_uri": adapter_dir.as_uri() if loads else "",
            "adapter_s3_uri": f"{output_uri}final/",
            "adapter_loads": loads,
            "wall_seconds": round(time.monotonic() - started, 1),
            "phase": status.get("phase", ""),
            "reason": status.get("reason", ""),
            "_reclaim_starts": {p.shard: p.started_at for p in story.reclaims if p.done},
            **served,
        }
        if served:
            summary["succeeded"] = bool(summary["succeeded"] and served["serve_failed"] == 0)
        if recorder is not None:
            from cheapspot_localcluster.dashboard import render, save

            samples = recorder.stop()
            kept = save(samples, workdir / "metrics-samples.json")
            drawn = render(
                samples,
                Path(args.dashboard),
                "cheapspot dashboard panels, from the operator's /metrics during `make demo`",
            )
            console.print(f"dashboard panels drawn from the run's metrics: {drawn} ({kept})")
        console.print()
        console.print(summary_table(summary, resumes))
        if args.keep_cluster:
            console.print(
                f"The cluster stays up: export KUBECONFIG={cluster.kubeconfig_path}; "
                f"kubectl -n {NAMESPACE} get ctj; stop it with "
                f"`cheapspot down --state-dir {cluster.layout.root}`"
            )
        summary.pop("_reclaim_starts")
        return summary
    finally:
        if backend is not None:
            backend.operator.stop()
        if not args.keep_cluster:
            with console.status("tearing down"):
                cluster.stop()
            with contextlib.suppress(OSError):
                shutil.rmtree(cluster.layout.root / "podrunner", ignore_errors=True)


def replacement_line(pods: Sequence[dict[str, Any]], load: Any, since: float) -> str:
    """What the demo waits for while replacements start, in one line: each replica that is
    not Ready yet (pod phase, how long it has been starting) and how serving is going
    meanwhile."""
    from cheapspot_localcluster.inference import Pools

    waiting = [
        f"{p['metadata']['name']} {(p.get('status') or {}).get('phase') or 'Pending'}"
        for p in pods
        if not Pools.is_ready(p)
    ]
    starting = ", ".join(waiting) or "the pool to report Ready"
    return (
        f"waiting {time.monotonic() - since:.0f}s for {starting} (vLLM starts in about a "
        f"minute on an idle core); meanwhile {len(load.outcomes)} requests served, "
        f"{len(load.failed) + len(load.truncated)} failed"
    )


def serve(backend: LocalBackend, model_uri: str, adapter_uri: str) -> dict[str, Any]:
    """Serve the trained adapter from a pool under load; reclaim one spot replica with
    notice and, right after, the other without, so both replacements start together while
    the on-demand anchor carries the load; the serving part of the summary."""
    from cheapspot_localcluster.inference import (
        SMALL_POOL,
        Load,
        Pools,
        busiest,
        latency_ms,
        pool_from_example,
    )

    pools = Pools(backend.api_client(), NAMESPACE)
    # The cloud replaces reclaimed machines (an autoscaler would): the nodes the training
    # part lost come back, and so does each node reclaimed below.
    backend.cluster.create_nodes()
    overrides = deep_merge(SMALL_POOL, {"replicas": 3, "budget": {"limitUSD": 2}})
    pools.apply(pool_from_example(POOL, model_uri, {"qa": adapter_uri}, overrides))
    console.print(
        f"applied crds/examples/inference-pool.yaml as {NAMESPACE}/{POOL}: serving the "
        f"trained adapter {adapter_uri} as model 'qa' (an on-demand anchor, 2 spot replicas)"
    )
    with console.status("starting 3 vLLM replicas and the router (about a minute each on CPU)"):
        pools.wait_ready(POOL, 3, SERVE_TIMEOUT_S)
        url = pools.router_url(POOL)
    base = model_uri.rstrip("/").rsplit("/", 1)[-1]
    # Clients that pause between requests, as people do: replicas serving back-to-back
    # requests on 2 cores would starve the replacements' start (on a cluster each starts
    # on a machine of its own).
    load = Load(url, [base, "qa"], threads=LOAD_CLIENTS, pause_s=LOAD_PAUSE_S).start()
    reclaims = 0
    try:
        with console.status(
            f"serving: {LOAD_CLIENTS} clients, streaming and not, base and adapter"
        ):
            load.wait_requests(12, SERVE_TIMEOUT_S)
        for notice in (NOTICE_S, 0):
            spot = backend.spot_nodes()
            on_spot = {
                p["metadata"]["name"]: p["spec"]["nodeName"]
                for p in pools.ready_replicas(POOL)
                if p["spec"].get("nodeName") in spot
            }
            # The busiest spot replica, once it has work: a reclaim of an idle one shows
            # nothing of what happens to requests under way.
            name, busy = busiest(url, sorted(on_spot), SERVE_TIMEOUT_S)
            node = on_spot[name]
            how = f"with {notice}s notice" if notice else "without notice"
            with console.status(f"reclaiming {node} ({name}, {busy} requests in flight) {how}"):
                backend.reclaim(node, notice)
                reclaims += 1
            console.print(f"reclaimed {node} {how}: {name} had {busy} requests in flight")
        backend.cluster.create_nodes()
        since = time.monotonic()
        with console.status("replacing both spot replicas") as st:
            poll = threading.Event()

            def show() -> None:
                while not poll.wait(1.0):
                    with contextlib.suppress(Exception):
                        st.update(replacement_line(pools.live_replicas(POOL), load, since))

            shower = threading.Thread(target=show, name="replacements", daemon=True)
            shower.start()
            try:
                pools.wait_ready(POOL, 3, SERVE_TIMEOUT_S)
            finally:
                poll.set()
                shower.join(5)
            load.wait_requests(len(load.outcomes) + 8, SERVE_TIMEOUT_S)
        console.print(
            f"both replaced in {time.monotonic() - since:.0f}s; {len(load.outcomes)} requests "
            f"so far, {len(load.failed) + len(load.truncated)} failed"
        )
    finally:
        load.stop()
    p50, p99 = latency_ms(load.outcomes)
    return {
        "serve_requests": len(load.outcomes),
        "serve_failed": len(load.failed) + len(load.truncated),
        "serve_reclaims": int(pools.status(POOL).get("preemptions", reclaims)),
        "serve_p50_ms": p50,
        "serve_p99_ms": p99,
    }


def quiet_libraries() -> None:
    """The demo shows its own progress: no loading bars or deprecation notes from the ML stack."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cheapspot demo", description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40, help="steps per shard (default 40)")
    parser.add_argument("--shards", type=int, default=2, help="shards (default 2)")
    parser.add_argument("--timeout", type=float, default=600, help="give up after this long")
    parser.add_argument(
        "--workdir", help="where the model, data and adapter go (default: a temp dir)"
    )
    parser.add_argument("--keep-cluster", action="store_true", help="leave the cluster and S3 up")
    parser.add_argument(
        "--no-serve", action="store_true", help="stop after training (skip the serving part)"
    )
    parser.add_argument(
        "--dashboard",
        metavar="PNG",
        help="scrape the operator's metrics during the run and draw the dashboard's panels here",
    )
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    quiet_libraries()
    summary = run(args)
    print(json.dumps({k: v for k, v in summary.items()}, sort_keys=False))
    return 0 if summary["succeeded"] else 1


if __name__ == "__main__":
    sys.exit(main())

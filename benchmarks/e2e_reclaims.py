"""Steps lost per reclaim, and time from reclaim to training resumed, end to end.

    python benchmarks/e2e_reclaims.py [--jobs 2] [--notice 5] [--steps 64]

Starts a private local cluster whose pods run as local processes, its S3 endpoint and
``cheapspot operator``; uploads a tiny Qwen2-architecture model and dataset; then runs
``--jobs`` times the quickstart CheapTrainJob (2 shards, checkpoints every 2 steps) while
reclaiming spot nodes mid-round: shard 0's node with ``--notice`` seconds of notice, then
shard 1's without. Both figures come from the workers' own logs:

* steps lost: the highest step a shard had logged before its pod went, minus the step its
  replacement resumed from (what had to be trained again);
* reclaim to training resumed: from the start of the reclaim (the interruption taint; for a
  reclaim without notice, the machine vanishing) to the replacement's first training step.

Prints one row per reclaim, then mean / max per kind, then the same as JSON.
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--jobs", type=int, default=3, help="jobs to run, 2 reclaims each")
    parser.add_argument("--notice", type=float, default=5.0, help="notice length, seconds")
    parser.add_argument("--steps", type=int, default=64, help="steps per shard")
    args = parser.parse_args(argv)

    from cheapspot_localcluster.demo import (
        JOB,
        Reclaim,
        Showing,
        Story,
        demo_overrides,
        inject,
        pod_logs,
        quiet_libraries,
    )
    from cheapspot_localcluster.stack import LocalBackend, private_cluster
    from cheapspot_localcluster.trainjobs import (
        TrainJobs,
        job_from_example,
        publish_materials,
        resumes_from_logs,
    )

    quiet_libraries()
    notice = int(args.notice)
    workdir = Path(tempfile.mkdtemp(prefix="cheapspot-bench-"))
    cluster = private_cluster(workdir / "cluster")
    rows: list[dict[str, Any]] = []
    cluster.start(progress=print)
    try:
        os.environ.update(cluster.s3.env())
        materials = publish_materials(cluster.s3.uri(""), workdir)
        for trial in range(args.jobs):
            backend = LocalBackend(
                cluster, cluster.s3, f"bench-{trial}", workdir / f"op-{trial}", notice_s=notice
            )
            backend.install()
            jobs = TrainJobs(cluster.api_client(), backend.namespace)
            output_uri = cluster.s3.uri(f"bench/{trial}/")
            jobs.apply(
                job_from_example(
                    JOB,
                    model_uri=materials.model_uri,
                    dataset_uri=materials.dataset_uri,
                    output_uri=output_uri,
                    overrides=demo_overrides(args.steps, 2),
                )
            )
            story = Story(reclaims=[Reclaim(0, args.notice, 0.15), Reclaim(1, 0, 0.45)])
            showing = Showing(backend, jobs, output_uri, 2, args.steps, story)
            stop = threading.Event()
            injector = threading.Thread(target=inject, args=(showing, stop), daemon=True)
            injector.start()
            status = jobs.wait_finished(JOB, 900, on_poll=lambda _s: None)
            stop.set()
            injector.join(timeout=60)
            for line in story.lines:
                print(line)
            if status.get("phase") != "Succeeded":
                print(f"job {trial} ended {status.get('phase')}: {status.get('message')}")
                backend.close()
                return 1
            resumes = resumes_from_logs(pod_logs(backend, JOB, 2))
            for shard in (0, 1):
                planned = [p for p in story.reclaims if p.shard == shard and p.done]
                replaced = [r for r in resumes if r.shard == shard]
                for plan, resume in zip(planned, replaced, strict=False):
                    rows.append(
                        {
                            "job": trial,
                            "shard": shard,
                            "notice_s": plan.notice_s,
                            "steps_lost": resume.steps_lost,
                            "seconds_to_resume": round(resume.first_step_at - plan.started_at, 2),
                        }
                    )
            backend.close()
            cluster.create_nodes()
    finally:
        cluster.stop()

    print(f"{'job':>3} {'shard':>5} {'notice':>6} {'steps lost':>10} {'to resumed':>10}")
    for r in rows:
        print(
            f"{r['job']:>3} {r['shard']:>5} {r['notice_s']:>5g}s {r['steps_lost']:>10}"
            f" {r['seconds_to_resume']:>9.1f}s"
        )
    summary: dict[str, Any] = {}
    for kind, with_notice in (("with_notice", True), ("without_notice", False)):
        chosen = [r for r in rows if (r["notice_s"] > 0) == with_notice]
        if not chosen:
            continue
        lost = [r["steps_lost"] for r in chosen]
        secs = [r["seconds_to_resume"] for r in chosen]
        summary[kind] = {
            "reclaims": len(chosen),
            "steps_lost_mean": round(statistics.mean(lost), 2),
            "steps_lost_max": max(lost),
            "seconds_to_resume_mean": round(statistics.mean(secs), 1),
            "seconds_to_resume_max": round(max(secs), 1),
        }
        print(
            f"{kind}: {len(chosen)} reclaims, steps lost mean {summary[kind]['steps_lost_mean']}"
            f" max {max(lost)}; reclaim to training resumed mean "
            f"{summary[kind]['seconds_to_resume_mean']}s max {summary[kind]['seconds_to_resume_max']}s"
        )
    print(json.dumps({"rows": rows, "summary": summary, "at": time.strftime("%Y-%m-%d")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

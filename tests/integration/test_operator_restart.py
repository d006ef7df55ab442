"""The operator SIGKILLed and restarted mid-job, again and again: no duplicate pods, no lost
state."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from operator_harness import Harness, make_harness, wait_for

from cheapspot_localcluster.processes import process_alive


@pytest.fixture
def h(local_cluster: Any, s3_endpoint: Any, tmp_path: Path) -> Iterator[Harness]:
    yield from make_harness(local_cluster, s3_endpoint, tmp_path)


def _no_duplicates(h: Harness, job: str) -> None:
    slots = Counter(
        p["metadata"]["labels"].get("cheapspot.dev/shard", "anchor") for p in h.live_pods(job)
    )
    assert all(n <= 1 for n in slots.values()), f"duplicate live pods: {slots}"


def test_sigkill_and_restart_lose_nothing_and_duplicate_nothing(h: Harness) -> None:
    h.apply("tough", shards=3)
    wait_for("all running", lambda: h.running_on_nodes("tough", 4), timeout_s=60)
    wait_for(
        "the status to record them",
        lambda: (h.condition("tough", "Progressing") or {}).get("reason") == "AllPodsRunning",
    )
    before = h.status("tough")

    for round_ in range(4):
        h.operator.kill()
        if round_ == 1:
            # Something happens while nobody watches: a shard's node vanishes.
            node = next(
                p["spec"]["nodeName"]
                for p in h.live_pods("tough")
                if p["metadata"]["labels"].get("cheapspot.dev/shard") == "2"
            )
            h.api.delete(f"/api/v1/nodes/{node}")
        if round_ == 2:
            h.write_progress("tough", 0, round=1, step=120, loss=2.0)
        h.operator.start()
        time.sleep(1.5 + round_)  # kill at different points of the reconciliation
        _no_duplicates(h, "tough")

    # The lost shard's pod still reads Running (nobody tells a vanished node's pods): wait for
    # the last operator to have seen the node gone, not for four Running pods.
    wait_for("the lost shard replaced", lambda: h.status("tough")["preemptions"] == 1, timeout_s=60)
    wait_for("all running again", lambda: h.running_on_nodes("tough", 4), timeout_s=60)
    _no_duplicates(h, "tough")
    after = h.status("tough")
    assert after["startTime"] == before["startTime"]
    assert after["preemptions"] == 1 and after["restarts"] == 0, json.dumps(after)
    assert after["shards"][2]["attempt"] == 1
    assert [s["attempt"] for s in after["shards"][:2]] == [0, 0]
    assert after["anchor"]["attempt"] == 0
    wait_for(
        "progress read after restarts", lambda: h.status("tough")["shards"][0].get("step") == 120
    )
    assert h.operator.starts == 5


STARTER = """
import json, sys, time
from pathlib import Path
from cheapspot_localcluster.stack import OperatorProcess
args = json.loads(sys.argv[1])
op = OperatorProcess(Path(args["kubeconfig"]), args["config"], Path(args["workdir"]), args["env"])
op.start()
print(op.proc.pid, flush=True)
time.sleep(600)
"""


def test_an_operator_goes_with_the_process_that_started_it(h: Harness, tmp_path: Path) -> None:
    """A test or benchmark killed mid-run leaves no operator behind to act on the next run's
    cluster: the process that starts one is SIGKILLed, and the operator goes too."""
    h.operator.stop()
    op = h.operator
    args = {
        "kubeconfig": str(op.kubeconfig),
        "config": op.config,
        "workdir": str(tmp_path / "starter"),
        "env": op.env,
    }
    starter = subprocess.Popen(
        [sys.executable, "-c", STARTER, json.dumps(args)], stdout=subprocess.PIPE, text=True
    )
    assert starter.stdout is not None
    pid = int(starter.stdout.readline())
    try:
        log = tmp_path / "starter" / "operator.log"
        wait_for(
            "the operator up",
            lambda: "authentication has finished" in log.read_text(errors="replace"),
        )
        assert process_alive(pid)
        starter.kill()
        starter.wait(10)
        wait_for("the operator gone with its starter", lambda: not process_alive(pid), timeout_s=10)
    finally:
        starter.kill()
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)

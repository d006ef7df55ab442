"""Whole jobs through the operator and real workers, with reclaims injected.

Every job is the quickstart example (crds/examples/quickstart.yaml) pointed at a tiny
Qwen2-architecture model and a dataset built here, with its steps shrunk. The promise under
test is cheapspot's: the final adapter depends only on the spec, the data and the seed, so
every scenario that finishes compares its adapter, byte for byte, with one job run without
interference.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from cheapspot_localcluster.stack import NOTICE_SECONDS, Backend
from cheapspot_localcluster.trainjobs import (
    DISTILLATION,
    MALFORMED_LINE,
    Materials,
    TrainJobs,
    fetch_final,
    job_from_example,
    load_in_peft,
    publish_teacher,
    read_progress,
    repo_root,
    wait_for,
)

ADAPTER = "adapter_model.safetensors"
JOB_TIMEOUT_S = 300


@pytest.fixture(scope="module")
def jobs(backend: Backend) -> TrainJobs:
    return TrainJobs(backend.api_client(), backend.namespace)  # type: ignore[attr-defined]


@dataclass(frozen=True)
class World:
    """What every scenario works with: the cluster backend, its jobs, the tiny materials and
    where this module's jobs write."""

    backend: Backend
    jobs: TrainJobs
    materials: Materials
    outputs: str

    def run(self, **overrides: Any) -> Run:
        return Run(self.jobs, self.materials, self.outputs, **overrides)


@pytest.fixture(scope="module")
def world(backend: Backend, jobs: TrainJobs, materials: Materials, outputs: str) -> World:
    return World(backend, jobs, materials, outputs)


@pytest.fixture(autouse=True)
def restored(backend: Backend) -> Iterator[None]:
    """Each scenario starts with every node there, spot on and the operator running."""
    backend.restore()
    yield
    backend.restore()


class Run:
    """One job of a scenario: its name, where it writes, and how to look at it."""

    def __init__(
        self, jobs: TrainJobs, materials: Materials, outputs: str, **overrides: Any
    ) -> None:
        self.jobs = jobs
        self.name = f"{overrides.pop('prefix', 'job')}-{uuid.uuid4().hex[:5]}"
        self.output_uri = f"{outputs}{self.name}/"
        dataset = overrides.pop("dataset_uri", materials.dataset_uri)
        example = overrides.pop("example", None)
        from cheapspot_localcluster.trainjobs import SMALL, deep_merge, load_example

        self.body = job_from_example(
            self.name,
            model_uri=materials.model_uri,
            dataset_uri=dataset,
            output_uri=self.output_uri,
            overrides=deep_merge(SMALL, overrides),
            example=None if example is None else load_example(repo_root() / example),
        )
        self.shards = int(self.body["spec"]["shards"])

    def apply(self) -> Run:
        self.jobs.apply(self.body)
        return self

    def status(self) -> dict[str, Any]:
        return self.jobs.status(self.name)

    def finish(self, timeout_s: float = JOB_TIMEOUT_S) -> dict[str, Any]:
        return self.jobs.wait_finished(self.name, timeout_s, on_poll=lambda _s: None)

    def shard_step(self, shard: int) -> int:
        rec = read_progress(self.output_uri, self.shards).get(shard)
        return rec.step if rec is not None else 0

    def wait_step(self, shard: int, at_least: int, timeout_s: float = 120) -> int:
        return wait_for(
            f"{self.name} shard {shard} at step {at_least}",
            lambda: (s := self.shard_step(shard)) >= at_least and s,
            timeout_s,
        )

    def node_of(self, shard: int) -> str:
        def placed() -> str | None:
            for pod in self.jobs.live_pods(self.name):
                labels = pod["metadata"].get("labels") or {}
                if labels.get("cheapspot.dev/shard") == str(shard) and pod["spec"].get("nodeName"):
                    return str(pod["spec"]["nodeName"])
            return None

        return wait_for(f"{self.name} shard {shard} placed", placed, 60)

    def adapter(self, dest: Path) -> bytes:
        return (fetch_final(self.output_uri, dest) / ADAPTER).read_bytes()

    def live_slots(self) -> Counter[str]:
        return Counter(
            (p["metadata"].get("labels") or {}).get("cheapspot.dev/shard", "anchor")
            for p in self.jobs.live_pods(self.name)
        )


def finish_through_a_reclaim(
    world: World, run: Run, timeout_s: float = JOB_TIMEOUT_S
) -> dict[str, Any]:
    """The job's final status, shard 0's node reclaimed with notice while it runs. The
    reclaim runs in the background, as in scenario a: it ends only once the node is gone."""
    with ThreadPoolExecutor(max_workers=1) as pool:
        reclaim = pool.submit(world.backend.reclaim, run.node_of(0), NOTICE_SECONDS)
        status = run.finish(timeout_s)
        reclaim.result(timeout=300)
    return status


def succeeded(status: dict[str, Any]) -> None:
    assert status.get("phase") == "Succeeded", (
        f"job ended {status.get('phase')}: {status.get('reason')}: {status.get('message')}"
    )


@pytest.fixture(scope="module")
def reference(
    jobs: TrainJobs,
    materials: Materials,
    outputs: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> bytes:
    """The adapter of the job run without any interference."""
    run = Run(jobs, materials, outputs, prefix="reference").apply()
    status = run.finish()
    succeeded(status)
    assert status["preemptions"] == 0 and status["restarts"] == 0
    dest = tmp_path_factory.mktemp("reference")
    adapter = run.adapter(dest)
    assert load_in_peft(materials.model_dir, dest) > 0, "no LoRA parameters loaded"
    return adapter


def test_a_two_shard_job_survives_two_reclaims_bit_identically(
    world: World, reference: bytes, tmp_path: Path
) -> None:
    backend = world.backend
    run = world.run(prefix="reclaims").apply()

    # One reclaim with notice: the shard checkpoints on SIGTERM and moves. It runs in the
    # background: a reclaim only ends once the node is gone (notice, NotReady, pod GC), and
    # a job this small could finish meanwhile.
    run.wait_step(0, 2)
    first = run.node_of(0)
    with ThreadPoolExecutor(max_workers=1) as pool:
        first_reclaim = pool.submit(backend.reclaim, first, NOTICE_SECONDS)
        # One without, while shard 1 is mid-job (it cannot pass round 0 before shard 0's
        # replacement has): the machine is simply gone; it resumes from its last checkpoint.
        run.wait_step(1, 2)
        second = run.node_of(1)
        assert run.status().get("phase") == "Running", "the job finished before the 2nd reclaim"
        backend.reclaim(second, 0)
        first_reclaim.result(timeout=300)

    status = run.finish()
    succeeded(status)
    assert status["preemptions"] == 2
    assert status["restarts"] == 0, "a preemption spent the restart budget"
    nodes_after = {s["node"] for s in status["shards"]}
    assert not nodes_after & {first, second}, "a shard still claims a reclaimed node"
    assert run.adapter(tmp_path) == reference, "the adapter depends on the reclaims"


def test_b_all_spot_lost_falls_back_to_on_demand_and_finishes(
    world: World, reference: bytes, tmp_path: Path
) -> None:
    backend, jobs = world.backend, world.jobs
    run = world.run(prefix="nospot").apply()
    run.wait_step(0, 2)
    backend.spot_off()

    status = run.finish()
    succeeded(status)
    for shard in status["shards"]:
        assert shard["capacityType"] == "on-demand", shard
    events = {e.get("reason") for e in jobs.events(run.name)}
    assert any("Fall" in (r or "") or "OnDemand" in (r or "") for r in events), events
    assert run.adapter(tmp_path) == reference


def test_c_operator_sigkilled_three_times_finishes_without_duplicates(
    world: World, reference: bytes, tmp_path: Path
) -> None:
    backend = world.backend
    run = world.run(prefix="killop").apply()
    worst: Counter[str] = Counter()
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            for slot, n in run.live_slots().items():
                worst[slot] = max(worst[slot], n)
            time.sleep(0.2)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        for at_step in (1, 4, 7):
            run.wait_step(0, at_step)
            backend.kill_operator()
            time.sleep(1.0)
            backend.start_operator()
        status = run.finish()
    finally:
        stop.set()
        watcher.join()
    succeeded(status)
    assert all(n <= 1 for n in worst.values()), f"duplicate live pods: {dict(worst)}"
    assert set(worst) == {"anchor", "0", "1"}
    assert run.adapter(tmp_path) == reference


def test_d_malformed_dataset_fails_with_an_actionable_reason_and_no_retry(world: World) -> None:
    broken = world.materials.malformed_dataset_uri
    run = world.run(prefix="malformed", dataset_uri=broken).apply()
    status = run.finish()
    assert status["phase"] == "Failed"
    message = f"{status.get('reason')}: {status.get('message')}"
    assert f"line {MALFORMED_LINE}" in message and "malformed.jsonl" in message, message
    assert "not valid JSON" in message, message
    assert status["restarts"] == 0
    attempts = [
        int(p["metadata"]["annotations"]["cheapspot.dev/attempt"]) for p in run.jobs.pods(run.name)
    ]
    assert max(attempts, default=0) == 0, f"a permanent error was retried: {attempts}"
    succeeded_cond = next(c for c in status["conditions"] if c["type"] == "Succeeded")
    assert succeeded_cond["status"] == "False"


def test_e_suspend_then_resume_continues_from_the_checkpoint(
    world: World, reference: bytes, tmp_path: Path
) -> None:
    jobs = world.jobs
    run = world.run(prefix="suspend").apply()
    run.wait_step(0, 4)
    jobs.patch_spec(run.name, {"suspend": True})
    wait_for("Suspended", lambda: run.status().get("phase") == "Suspended", 60)
    wait_for("no pods while suspended", lambda: not run.jobs.live_pods(run.name), 60)
    paused = read_progress(run.output_uri, run.shards)
    saved = {i: p.last_checkpoint_step or 0 for i, p in paused.items() if i >= 0}
    assert max(saved.values()) >= 2, f"nothing checkpointed before the suspend: {saved}"

    jobs.patch_spec(run.name, {"suspend": False})
    status = run.finish()
    succeeded(status)
    resumed = read_progress(run.output_uri, run.shards)
    assert all(resumed[i].resumes >= 1 for i in saved if saved[i] > 0), resumed
    # Resuming from a checkpoint loses at most the steps since it (SIGTERM checkpoints: none).
    lost = sum(resumed[i].steps_lost for i in saved)
    assert lost <= 2 * run.shards, f"{lost} steps redone after resume"
    assert run.adapter(tmp_path) == reference


def test_g_a_budget_suspends_a_running_job_and_raising_it_resumes_it(
    world: World, reference: bytes, tmp_path: Path
) -> None:
    jobs = world.jobs
    run = world.run(prefix="budget", budget={"limitUSD": 50}).apply()
    run.wait_step(0, 4)
    # The user lowers the limit below what the job has spent: at the next pass the job is
    # over budget, checkpoints on SIGTERM and stops.
    jobs.patch_spec(run.name, {"budget": {"limitUSD": 0.000001}})
    wait_for("Suspended", lambda: run.status().get("phase") == "Suspended", 60)
    status = run.status()
    conditions = {c["type"]: c for c in status["conditions"]}
    assert conditions["WithinBudget"]["reason"] == "BudgetExceeded"
    assert conditions["Suspended"]["reason"] == "BudgetExceeded"
    assert status["budget"]["exceededAtLimitUSD"] == 0.000001
    assert "BudgetExceeded" in {e.get("reason") for e in jobs.events(run.name)}
    wait_for("no pods over budget", lambda: not run.jobs.live_pods(run.name), 60)
    time.sleep(3)
    assert run.status().get("phase") == "Suspended", "restarted without a higher limit"

    jobs.patch_spec(run.name, {"budget": {"limitUSD": 50}})
    status = run.finish()
    succeeded(status)
    assert "Resumed" in {e.get("reason") for e in jobs.events(run.name)}
    assert status["budget"]["limitUSD"] == 50 and status["budget"]["remainingUSD"] > 0
    assert status["cost"]["dollars"] > 0 and status["cost"]["sources"]
    assert run.adapter(tmp_path) == reference, "the adapter depends on the suspension"


def test_h_a_deadline_moves_shards_to_on_demand_when_spot_is_taken_away_and_is_met(
    world: World, reference: bytes, tmp_path: Path
) -> None:
    backend, jobs = world.backend, world.jobs
    changeover = 90
    run = world.run(
        prefix="deadline",
        # Only the deadline may move a shard: the unschedulable fallback waits an hour.
        spot={"fallbackAfterSeconds": 3600, "maxPreemptionsPerHour": 100},
        deadline={"maxDuration": "1h", "changeoverSeconds": changeover, "policy": "Greedy"},
    ).apply()
    run.wait_step(0, 4, timeout_s=300)
    run.wait_step(1, 4, timeout_s=300)
    # Spot goes while the shards have most of their 24 steps left (taking it later raced the
    # job's end: a shard reclaimed after its last round was published needs no move). With
    # the loose deadline the shards wait for spot: Greedy waits while the deadline allows.
    backend.spot_off()
    wait_for(
        "both shards reclaimed and waiting for spot",
        lambda: (
            (st := run.status()).get("preemptions", 0) >= run.shards
            and all(sh["capacityType"] == "spot" and sh["attempt"] >= 1 for sh in st["shards"])
        ),
        60,
    )
    remaining = wait_for(
        "the shards' measured pace",
        lambda: (run.status().get("deadline") or {}).get("remainingWorkSeconds"),
        60,
    )
    # Tighten the deadline to what the measured pace needs plus a changeover, one decision
    # step (60 s) and 40 s to spare: enough to wait for spot a little, not enough to wait long.
    complete_by = datetime.now(UTC) + timedelta(seconds=float(remaining) + changeover + 100)
    stamp = complete_by.strftime("%Y-%m-%dT%H:%M:%SZ")
    jobs.patch_spec(run.name, {"deadline": {"maxDuration": None, "completeBy": stamp}})
    wait_for(
        "the new deadline taken",
        lambda: (run.status().get("deadline") or {}).get("completeBy") == stamp,
        30,
    )

    status = run.finish()
    succeeded(status)
    done = datetime.fromisoformat(status["completionTime"].replace("Z", "+00:00"))
    assert done <= complete_by, f"finished {done}, deadline {complete_by}"
    for shard in status["shards"]:
        assert (shard["capacityType"], shard["fallbackReason"]) == ("on-demand", "Deadline"), shard
    assert "FellBackToOnDemand" in {e.get("reason") for e in jobs.events(run.name)}
    assert run.adapter(tmp_path) == reference, "the adapter depends on the move"


def test_j_an_nf4_base_survives_a_reclaim_bit_identically(world: World, tmp_path: Path) -> None:
    # The base loaded in 4-bit NF4 (bitsandbytes on the CPU here), LoRA training on top. A
    # shard reclaimed with notice resumes on another node from its checkpoint, and the job
    # ends with the adapter bytes of the same NF4 job run without interference.
    nf4 = {"model": {"quantization": "nf4"}}
    reference = world.run(prefix="nf4-ref", **nf4).apply()
    status = reference.finish()
    succeeded(status)
    assert status["preemptions"] == 0
    expected = reference.adapter(tmp_path / "reference")

    run = world.run(prefix="nf4", **nf4).apply()
    run.wait_step(0, 2)
    status = finish_through_a_reclaim(world, run)
    succeeded(status)
    assert status["preemptions"] >= 1 and status["restarts"] == 0
    final = fetch_final(run.output_uri, tmp_path / "nf4")
    assert (final / ADAPTER).read_bytes() == expected, "the NF4 job's adapter depends on reclaims"
    summary = json.loads((final / "training_summary.json").read_text())
    assert summary["preemptions_survived"] >= 1
    # A stock PEFT adapter: it loads on the unquantized base too.
    assert load_in_peft(world.materials.model_dir, final) > 0


@pytest.fixture(scope="module")
def teacher_uri(backend: Backend, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A tiny trained Qwen2 teacher for the tiny Qwen2 student, built here and uploaded."""
    return publish_teacher(backend.s3.uri(""), tmp_path_factory.mktemp("teacher"))


def test_f_logits_distillation_survives_a_reclaim_bit_identically(
    world: World, teacher_uri: str, tmp_path: Path
) -> None:
    # The distillation example as a user copies it; its 7B NF4 teacher becomes the tiny
    # teacher, unquantized (no CUDA here).
    distil = {
        "example": DISTILLATION,
        "distillation": {"teacher": {"uri": teacher_uri, "quantization": "none"}},
    }
    reference = world.run(prefix="distil-ref", **distil).apply()
    status = reference.finish()
    succeeded(status)
    assert status["distillation"] == {"mode": "logits", "teacher": teacher_uri, "phase": "done"}
    expected = reference.adapter(tmp_path / "reference")

    run = world.run(prefix="distil", **distil).apply()
    run.wait_step(0, 2)
    assert run.status().get("distillation", {}).get("phase") == "training"
    status = finish_through_a_reclaim(world, run)
    succeeded(status)
    assert status["preemptions"] >= 1 and status["restarts"] == 0
    final = fetch_final(run.output_uri, tmp_path / "distilled")
    assert (final / ADAPTER).read_bytes() == expected, "the distilled adapter depends on reclaims"
    summary = json.loads((final / "training_summary.json").read_text())
    assert summary["distillation"]["mode"] == "logits"
    assert summary["distillation"]["teacher"] == teacher_uri
    assert summary["preemptions_survived"] >= 1
    assert load_in_peft(world.materials.model_dir, final) > 0


SEQUENCE_PROMPTS = 1024
"""Enough prompts that generation lasts long enough to be reclaimed in the middle of it."""


@pytest.fixture(scope="module")
def prompts_uri(backend: Backend) -> str:
    """Prompt-completion records for the teacher to complete (its completions replace theirs)."""
    if backend.name != "local":
        pytest.skip("generation pods on kind need the serving image built (local cluster only)")
    from cheapspot_worker.serving import serve_python

    if serve_python() is None:
        pytest.skip("no serving environment for the generation pods (make serve-venv)")
    from cheapspot.store import Store
    from cheapspot_worker.tiny import learnable_records

    lines = [json.dumps(r) for r in learnable_records(SEQUENCE_PROMPTS, "prompt-completion")]
    Store(backend.s3.uri("")).put_bytes("data/prompts.jsonl", ("\n".join(lines) + "\n").encode())
    return backend.s3.uri("data/prompts.jsonl")


@pytest.mark.timeout(3000)  # two jobs, each loading vLLM in its generation pods first
def test_i_sequences_distillation_survives_a_reclaim_during_generation_bit_identically(
    world: World, teacher_uri: str, prompts_uri: str, tmp_path: Path
) -> None:
    from cheapspot.contract import Layout, Progress, Role
    from cheapspot.store import Store
    from cheapspot_worker.data import read_generated

    generation = {"maxNewTokens": 12, "recordsPerChunk": 2, "dtype": "float32"}
    distil = {
        "example": DISTILLATION,
        "dataset_uri": prompts_uri,
        "distillation": {
            "teacher": {"uri": teacher_uri, "quantization": "none"},
            "mode": "sequences",
            "generation": generation,
        },
    }
    reference = world.run(prefix="seq-ref", **distil).apply()
    status = reference.finish(900)
    succeeded(status)
    assert status["distillation"] == {
        "mode": "sequences",
        "teacher": teacher_uri,
        "phase": "done",
        "generated": SEQUENCE_PROMPTS,
        "records": SEQUENCE_PROMPTS,
    }
    expected = reference.adapter(tmp_path / "reference")

    run = world.run(prefix="seq", **distil).apply()
    store, layout = Store(run.output_uri), Layout(run.output_uri)

    def generated(shard: int) -> int:
        doc = store.get_json(layout.progress(Role.GENERATE, shard))
        return Progress.model_validate(doc).step if doc else 0

    wait_for(f"{run.name} generation under way", lambda: generated(0) >= 4, 600)
    seen = run.status().get("distillation", {})
    assert seen.get("phase") == "generating", seen
    assert not any(s.get("pod") for s in run.status().get("shards", [])), "training started early"
    status = finish_through_a_reclaim(world, run, 900)
    succeeded(status)
    assert status["preemptions"] >= 1 and status["restarts"] == 0
    # A generation shard resumed from its published chunks, and nothing was generated twice
    # into the dataset or lost.
    resumes = [
        Progress.model_validate(store.get_json(layout.progress(Role.GENERATE, i))).resumes
        for i in range(run.shards)
    ]
    assert sum(resumes) >= 1, resumes
    records = [json.loads(line) for line in read_generated(store, layout, run.shards).splitlines()]
    assert [r["index"] for r in records] == list(range(SEQUENCE_PROMPTS))

    final = fetch_final(run.output_uri, tmp_path / "distilled")
    assert (final / ADAPTER).read_bytes() == expected, "the distilled adapter depends on reclaims"
    summary = json.loads((final / "training_summary.json").read_text())
    how = summary["distillation"]
    assert (how["mode"], how["teacher"]) == ("sequences", teacher_uri)
    assert how["generation"]["maxNewTokens"] == 12
    assert how["generated_records"] == SEQUENCE_PROMPTS
    # The student learns the teacher's text: its loss on the completions falls.
    curve = summary["loss_curve"]
    assert curve[-1]["loss"] < 0.7 * curve[0]["loss"], curve
    assert load_in_peft(world.materials.model_dir, final) > 0

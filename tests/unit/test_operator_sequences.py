"""Sequences-mode distillation in the planner: generation shards run first, in the serving
image; the anchor and the training shards start once every generation shard is done; a
reclaim during generation starts a replacement without spending the restart budget."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from cheapspot.contract import TASK_ENV, DistillationMode, Phase, Role, Task
from cheapspot_operator.api.common import CapacityType
from cheapspot_operator.cluster.placement import PROFILES
from cheapspot_operator.cluster.pods import Placement
from cheapspot_operator.cluster.views import LABEL_ROLE
from cheapspot_operator.runtime.config import ServingSettings, WorkerSettings
from cheapspot_operator.testing.train import World, make_job, make_progress
from cheapspot_operator.testing.world import make_node
from cheapspot_operator.trainjob.manifests import JobInfo, build_generator_pod
from cheapspot_operator.trainjob.observed import GENERATOR_BASE, LABEL_SHARD, pod_view

TEACHER = {"uri": "s3://models/teacher/"}
SEQUENCES = {
    "teacher": TEACHER,
    "mode": "sequences",
    "generation": {"maxNewTokens": 64, "seed": 7, "recordsPerChunk": 4},
}
G0, G1 = GENERATOR_BASE, GENERATOR_BASE + 1


def _world() -> World:
    return World(spec=make_job(distillation=SEQUENCES))


def test_generation_shards_run_first_and_training_starts_when_all_are_done() -> None:
    w = _world()
    w.step()
    assert {c.index for c in w.creates()} == {G0, G1}
    assert set(w.pods) == {"qa-lora-gen-0-0", "qa-lora-gen-1-0"}
    assert w.status.distillation is not None
    assert w.status.distillation.phase == "pending"
    w.run_all()
    w.progress[G0] = make_progress(G0, step=3, total_steps=10)
    w.progress[G1] = make_progress(G1, step=1, total_steps=10)
    w.step()
    d = w.status.distillation
    assert (d.mode, d.phase, d.generated, d.records) == ("sequences", "generating", 4, 20)
    assert w.status.phase == "Running"
    assert not w.creates()

    # One generation shard done: the other still works, training waits.
    w.set_pod("qa-lora-gen-0-0", phase="Succeeded", exit_code=0)
    w.progress[G0] = make_progress(G0, phase=Phase.DONE, step=10, total_steps=10)
    w.step()
    assert not w.creates()
    assert w.status.generators[0].done and not w.status.generators[1].done
    assert w.status.distillation.phase == "generating"

    # All done: the anchor and the training shards start in the same pass.
    w.set_pod("qa-lora-gen-1-0", phase="Succeeded", exit_code=0)
    w.progress[G1] = make_progress(G1, phase=Phase.DONE, step=10, total_steps=10)
    w.step()
    assert {c.index for c in w.creates()} == {-1, 0, 1}
    w.run_all()
    w.step()
    d = w.status.distillation
    assert (d.phase, d.generated, d.records) == ("training", 20, 20)
    for name in ("qa-lora-shard-0-0", "qa-lora-shard-1-0", "qa-lora-anchor-0"):
        w.set_pod(name, phase="Succeeded", exit_code=0)
    w.step()
    assert w.condition("Succeeded") == ("True", "Completed")
    assert w.status.distillation.phase == "done"


def test_a_reclaim_during_generation_replaces_the_pod_without_spending_restarts() -> None:
    w = _world()
    w.spec = w.spec.model_copy(update={"max_restarts": 0})
    w.started()
    w.progress[G1] = make_progress(G1, step=4, total_steps=10)
    w.nodes["spot-1"] = make_node("spot-1", taints=PROFILES["local"].interruption_taints)
    w.step()
    assert [e.reason for e in w.events("Preempted")] == ["Preempted", "Preempted"]
    assert {(c.index, c.attempt) for c in w.creates()} == {(G0, 1), (G1, 1)}
    assert all("spot-1" in c.avoid_nodes for c in w.creates())
    assert w.status.restarts == 0 and w.status.preemptions == 2
    assert w.status.phase == "Running"
    # A generation shard that fails for real spends the budget like a training shard.
    w.run_all({"qa-lora-gen-0-1": "spot-2", "qa-lora-gen-1-1": "spot-2"})
    w.step()
    w.set_pod("qa-lora-gen-0-1", phase="Failed", exit_code=1)
    w.step()
    assert w.status.phase == "Failed"
    assert w.status.reason == "BackoffLimitExceeded"
    assert "generator 0" in w.status.message


def _generator_on_demand_after_fallback() -> World:
    spot = {"fallbackAfterSeconds": 10, "returnAfterSeconds": 0}
    w = World(spec=make_job(shards=1, distillation=SEQUENCES, spot=spot))
    w.step()
    w.set_pod("qa-lora-gen-0-0", node_name="", unschedulable_since=w.clock.now)
    w.step(10)
    assert [(c.index, c.capacity) for c in w.creates()] == [(G0, CapacityType.ON_DEMAND)]
    assert [e.message for e in w.events("FellBackToOnDemand")] == [
        "generator 0: no spot capacity for 10s"
    ]
    w.run_all()
    w.step(1)
    assert w.pods["qa-lora-gen-0-1"].capacity == "on-demand"
    return w


def test_a_generation_shard_returns_to_spot_between_chunks_like_a_training_shard() -> None:
    w = _generator_on_demand_after_fallback()
    # Still loading the teacher: nothing generated to keep, but nothing gained yet either.
    w.progress[G0] = make_progress(G0, phase=Phase.LOADING, step=0, total_steps=40)
    w.step(1)
    assert w.creates() == []
    # Generating, with more left than the chunk in progress (4 records): it moves; the
    # leaving pod finishes and publishes that chunk on its SIGTERM.
    w.progress[G0] = make_progress(G0, phase=Phase.GENERATING, step=12, total_steps=40)
    w.step(1)
    (create,) = w.creates()
    assert (create.index, create.attempt, create.capacity) == (G0, 2, CapacityType.SPOT)
    assert [d.name for d in w.deletes()] == ["qa-lora-gen-0-1"]
    assert [e.message for e in w.events("ReturnedToSpot")] == ["generator 0: a spot GPU is free"]
    assert w.status.restarts == 0 and w.status.preemptions == 0
    assert w.status.generators[0].fallback_reason == ""


def test_a_generation_shard_with_only_its_last_chunk_left_stays_on_demand() -> None:
    w = _generator_on_demand_after_fallback()
    w.progress[G0] = make_progress(G0, phase=Phase.GENERATING, step=36, total_steps=40)
    w.step(1)
    assert w.creates() == [] and w.deletes() == []
    assert w.status.generators[0].capacity_type is CapacityType.ON_DEMAND


def _generating_with_a_deadline(max_duration: str, policy: str = "CheapSpot") -> World:
    """1 generation shard of 1000 records: after 1000 s Running it has published 100, so it
    measures 10 s a record: 10000 s of work, 9000 s left. Changeover 600 s."""
    spec = make_job(
        shards=1,
        distillation=SEQUENCES,
        deadline={"changeoverSeconds": 600, "maxDuration": max_duration, "policy": policy},
        spot={"fallbackAfterSeconds": 3600, "maxPreemptionsPerHour": 0},
    )
    w = World(spec=spec).started()
    w.progress[G0] = make_progress(G0, phase=Phase.GENERATING, step=100, total_steps=1000)
    w.step(1000)
    return w


def test_the_deadline_counts_the_generation_phase_and_reserves_the_trainings_start() -> None:
    w = _generating_with_a_deadline("10h")
    assert w.status.generators[0].running_seconds == 1000
    d = w.status.deadline
    assert d is not None
    assert d.remaining_work_seconds == 9000
    # The generation is held to the deadline less one changeover: training starts after it.
    assert d.slack_seconds == 36000 - 600 - 1000 - 9000
    assert d.on_demand_shards == []


@pytest.mark.parametrize(
    ("max_duration", "after_wait"),
    [
        # 3h8m20s = 11300 s: 699 s of slack once the training's start is reserved, below
        # Greedy's safety net; without the reservation it would be 1299 s and Greedy would
        # still wait for spot.
        ("3h8m20s", CapacityType.ON_DEMAND),
        ("10h", CapacityType.SPOT),
    ],
)
def test_when_spot_is_taken_away_the_deadline_decides_where_a_generation_shard_runs(
    max_duration: str, after_wait: CapacityType
) -> None:
    w = _generating_with_a_deadline(max_duration, policy="Greedy")
    for name in ("spot-1", "spot-2"):
        w.nodes[name] = make_node(name, taints=PROFILES["local"].interruption_taints)
    w.step(1)
    (create,) = w.creates()
    assert (create.index, create.capacity) == (G0, CapacityType.SPOT)
    assert w.status.restarts == 0
    w.step(300)  # the replacement waits for spot, Pending
    slot = w.status.generators[0]
    assert slot.capacity_type is after_wait
    if after_wait is CapacityType.ON_DEMAND:
        assert slot.fallback_reason == "Deadline"
        assert w.pods[slot.pod].capacity == "on-demand"
        assert w.status.deadline is not None and w.status.deadline.on_demand_shards == []


def test_a_permanent_generation_error_fails_the_job_with_its_message() -> None:
    w = _world().started()
    w.set_pod(
        "qa-lora-gen-1-0",
        phase="Failed",
        exit_code=65,
        termination_message="distillation.teacher s3://models/teacher/: nothing there",
    )
    w.step()
    assert w.status.phase == "Failed"
    assert w.status.reason == "PermanentError"
    assert w.status.message.startswith("generator 1: ")
    assert "distillation.teacher" in w.status.message
    assert w.status.distillation is not None and w.status.distillation.phase == "failed"


def test_suspend_during_generation_recreates_generation_pods_on_resume() -> None:
    w = _world().started()
    w.spec = w.spec.model_copy(update={"suspend": True})
    w.step()
    assert {d.name for d in w.deletes()} == {"qa-lora-gen-0-0", "qa-lora-gen-1-0"}
    assert w.status.distillation is not None and w.status.distillation.phase == "suspended"
    w.pods.clear()
    w.spec = w.spec.model_copy(update={"suspend": False})
    w.step()
    assert {(c.index, c.attempt) for c in w.creates()} == {(G0, 1), (G1, 1)}


def test_generation_pods_run_the_serving_image_with_a_generate_task() -> None:
    spec = make_job(distillation=SEQUENCES)
    job = JobInfo("ns", "distil", "uid", spec)
    worker = WorkerSettings(image="registry.example/worker:1", env={"AWS_REGION": "x"})
    serving = ServingSettings(image="registry.example/serve:1", command=["cheapspot", "worker"])
    pod = build_generator_pod(
        job, 1, 2, Placement(PROFILES["local"], CapacityType.SPOT), worker, serving=serving
    )
    assert pod["metadata"]["name"] == "distil-gen-1-2"
    assert pod["metadata"]["labels"][LABEL_ROLE] == "generate"
    assert pod["metadata"]["labels"][LABEL_SHARD] == "1"
    container = pod["spec"]["containers"][0]
    assert container["image"] == "registry.example/serve:1"
    assert container["resources"]["requests"]["nvidia.com/gpu"] == "1"
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["AWS_REGION"] == "x"
    task = Task.model_validate_json(env[TASK_ENV])
    assert (task.role, task.shard_index, task.shard_count) == (Role.GENERATE, 1, 2)
    assert task.distillation is not None
    assert task.distillation.mode is DistillationMode.SEQUENCES
    assert task.distillation.sampling.records_per_chunk == 4
    # The operator's view of the pod maps it back to the generator's slot.
    view = pod_view({**pod, "status": {"phase": "Running"}})
    assert view is not None and (view.index, view.attempt) == (G0 + 1, 2)


@pytest.mark.parametrize(
    ("distillation", "message"),
    [
        ({**SEQUENCES, "alpha": 0.9}, "distillation.alpha applies to logits mode only"),
        (
            {**SEQUENCES, "temperature": 1.0, "alpha": 0.9},
            "distillation.temperature and distillation.alpha apply to logits mode only",
        ),
        (
            {"teacher": TEACHER, "generation": {"maxNewTokens": 8}},
            "distillation.generation applies to sequences mode only",
        ),
        ({**SEQUENCES, "generation": {"temperature": -1}}, "generation.temperature"),
        ({**SEQUENCES, "generation": {"maxNewTokens": 0}}, "generation.maxNewTokens"),
        (
            {**SEQUENCES, "teacher": {**TEACHER, "quantization": "int8"}},
            "distillation.teacher.quantization int8 is not available in sequences mode",
        ),
    ],
)
def test_fields_of_the_other_mode_are_rejected_naming_them(
    distillation: dict[str, object], message: str
) -> None:
    with pytest.raises(ValidationError) as err:
        make_job(distillation=distillation)
    assert message in str(err.value)


def test_a_task_round_trips_with_the_defaults_written_out() -> None:
    spec = make_job(distillation={"teacher": TEACHER, "mode": "sequences"})
    assert spec.distillation is not None
    again = Task.model_validate_json(
        Task(
            role=Role.GENERATE,
            job={"namespace": "n", "name": "j"},  # type: ignore[arg-type]
            model=spec.model,
            dataset=spec.dataset,
            output_uri=spec.output.uri,
            distillation=spec.distillation,
        ).to_env()
    )
    assert again.distillation == spec.distillation
    assert again.distillation.sampling.temperature == 0.0

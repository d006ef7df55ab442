"""Sequences-mode distillation in the planner: generation shards run first, in the serving
image; the anchor and the training shards start once every generation shard is done; a
reclaim during generation starts a replacement without spending the restart budget."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from cheapspot.contract import TASK_ENV, DistillationMode, Phase, Role, Task
from cheapspot_operator.config import ServingSettings, WorkerSettings
from cheapspot_operator.manifests import JobInfo, Placement, build_generator_pod
from cheapspot_operator.observed import GENERATOR_BASE, LABEL_ROLE, LABEL_SHARD, pod_view
from cheapspot_operator.placement import PROFILES
from cheapspot_operator.spec import CapacityType
from cheapspot_operator.testing import World, make_job, make_node, make_progress

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

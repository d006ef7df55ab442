"""A distillation job: the spec carries the teacher to every pod's task, and the status says
how and where the job distils."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from cheapspot.contract import TASK_ENV, DistillationMode, Task
from cheapspot_operator.api.common import CapacityType
from cheapspot_operator.cluster.placement import PROFILES
from cheapspot_operator.cluster.pods import Placement
from cheapspot_operator.runtime.config import WorkerSettings
from cheapspot_operator.testing.train import World, make_job
from cheapspot_operator.trainjob.manifests import (
    JobInfo,
    build_anchor_pod,
    build_shard_pod,
)

TEACHER = {"uri": "s3://models/teacher/", "adapterUri": "s3://ckpt/teacher-sft/final"}
WORKER = WorkerSettings(image="registry.example/worker:1")


def _distilling(**overrides: object) -> World:
    spec = make_job(distillation={"teacher": TEACHER, "temperature": 3.0, "alpha": 0.7})
    return World(spec=spec.model_copy(update=overrides))


def test_every_pod_gets_the_teacher_in_its_task() -> None:
    job = JobInfo("ns", "distil", "uid", make_job(distillation={"teacher": TEACHER}))
    placement = Placement(PROFILES["local"], CapacityType.SPOT)
    for pod in (
        build_shard_pod(job, 1, 0, placement, WORKER),
        build_anchor_pod(job, 0, placement, WORKER),
    ):
        env = {e["name"]: e.get("value") for e in pod["spec"]["containers"][0]["env"]}
        task = Task.model_validate_json(env[TASK_ENV])
        assert task.distillation is not None
        assert task.distillation.teacher.uri == "s3://models/teacher/"
        assert task.distillation.teacher.adapter_uri == "s3://ckpt/teacher-sft/final/"
        assert task.distillation.mode is DistillationMode.LOGITS


def test_status_shows_mode_teacher_and_phase_through_the_job() -> None:
    w = _distilling()
    w.step()
    assert w.status.distillation is not None
    assert w.status.distillation.phase == "pending"
    w.run_all()
    w.step()
    d = w.status.distillation
    assert (d.mode, d.teacher, d.phase) == ("logits", "s3://models/teacher/", "training")
    for name in ("qa-lora-shard-0-0", "qa-lora-shard-1-0", "qa-lora-anchor-0"):
        w.set_pod(name, phase="Succeeded", exit_code=0)
    w.step()
    assert w.condition("Succeeded") == ("True", "Completed")
    assert w.status.distillation.phase == "done"
    patch = w.status.to_patch()
    assert patch["distillation"] == {
        "mode": "logits",
        "teacher": "s3://models/teacher/",
        "phase": "done",
    }


def test_a_job_without_distillation_has_no_distillation_status() -> None:
    w = World().started()
    assert w.status.distillation is None
    assert "distillation" not in w.status.to_patch()


@pytest.mark.parametrize(
    ("distillation", "field"),
    [
        ({"teacher": {"uri": "gs://t/"}}, "uri"),
        ({"teacher": {"uri": "s3://t/", "adapterUri": "hf://x"}}, "adapter"),
        ({"teacher": {"uri": "s3://t/"}, "alpha": 2}, "alpha"),
        ({"teacher": {"uri": "s3://t/"}, "mode": "features"}, "mode"),
        ({"teacher": {"uri": "s3://t/"}, "temperature": 0}, "temperature"),
    ],
)
def test_bad_distillation_specs_are_rejected(distillation: dict[str, object], field: str) -> None:
    with pytest.raises(ValidationError) as err:
        make_job(distillation=distillation)
    assert field in str(err.value)

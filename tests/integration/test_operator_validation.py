"""Invalid specs are rejected by the API server itself, with messages naming the field."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from operator_harness import Harness, job_body, jobs_path, make_harness

from cheapspot_operator.runtime.kubeapi import ApiError


@pytest.fixture(scope="module")
def h(
    local_cluster: Any, s3_endpoint: Any, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Harness]:
    yield from make_harness(local_cluster, s3_endpoint, tmp_path_factory.mktemp("validation"))


# (id, spec changes, text the API server's message must contain)
INVALID: list[tuple[str, dict[str, Any], str]] = [
    ("no shards", {"shards": 0}, "spec.shards"),
    ("too many shards", {"shards": 257}, "spec.shards"),
    ("model scheme", {"model": {"uri": "ftp://models/x/"}}, "model.uri must start with"),
    ("dataset scheme", {"dataset": {"uri": "hf://data"}}, "dataset.uri must start with"),
    ("output scheme", {"output": {"uri": "gs://bucket/out/"}}, "output.uri must start with"),
    ("output without a bucket", {"output": {"uri": "s3:///x"}}, "output.uri names no bucket"),
    ("dataset without a bucket", {"dataset": {"uri": "s3:///d.jsonl"}}, "names no bucket"),
    ("relative file path", {"model": {"uri": "file://models/x"}}, "not an absolute path"),
    ("lora rank zero", {"lora": {"r": 0}}, "spec.lora.r"),
    ("negative steps", {"training": {"steps": -5}}, "spec.training.steps"),
    ("zero local steps", {"rounds": {"localSteps": 0}}, "spec.rounds.localSteps"),
    (
        "unknown quantization",
        {"model": {"uri": "s3://m/", "quantization": "fp4"}},
        "spec.model.quantization",
    ),
    (
        "unknown dataset format",
        {"dataset": {"uri": "s3://d", "format": "csv"}},
        "spec.dataset.format",
    ),
    ("dropout one", {"lora": {"dropout": 1.0}}, "spec.lora.dropout"),
    (
        "quorum above shards",
        {"shards": 2, "rounds": {"quorum": 3}},
        "rounds.quorum must not exceed shards",
    ),
    (
        "round longer than training",
        {"training": {"steps": 50}, "rounds": {"localSteps": 100}},
        "rounds.localSteps",
    ),
    ("bad cpu quantity", {"resources": {"cpu": "four"}}, "spec.resources.cpu"),
    ("negative restarts", {"maxRestarts": -1}, "spec.maxRestarts"),
    ("missing output", {"output": None}, "spec.output"),
    (
        "teacher scheme",
        {"distillation": {"teacher": {"uri": "ftp://models/teacher/"}}},
        "distillation.teacher.uri must start with",
    ),
    (
        "teacher adapter scheme",
        {"distillation": {"teacher": {"uri": "s3://m/t/", "adapterUri": "hf://a"}}},
        "distillation.teacher.adapterUri must start with",
    ),
    (
        "distillation alpha above one",
        {"distillation": {"teacher": {"uri": "s3://m/t/"}, "alpha": 1.5}},
        "spec.distillation.alpha",
    ),
    (
        "zero temperature",
        {"distillation": {"teacher": {"uri": "s3://m/t/"}, "temperature": 0}},
        "spec.distillation.temperature",
    ),
    (
        "unknown distillation mode",
        {"distillation": {"teacher": {"uri": "s3://m/t/"}, "mode": "features"}},
        "spec.distillation.mode",
    ),
    ("teacher missing", {"distillation": {"alpha": 0.5}}, "spec.distillation.teacher"),
]


def _message(exc: ApiError) -> str:
    return str(json.loads(exc.body).get("message", exc.body))


def _create(h: Harness, body: dict[str, Any], strict: bool = True) -> None:
    query = {"fieldValidation": "Strict"} if strict else None
    h.api.request("POST", jobs_path(h.namespace), body=body, query=query)


@pytest.mark.parametrize(
    ("changes", "expect"), [c[1:] for c in INVALID], ids=[c[0] for c in INVALID]
)
def test_invalid_specs_are_rejected_naming_the_field(
    h: Harness, changes: dict[str, Any], expect: str
) -> None:
    body = job_body("invalid", h.output_uri("invalid"))
    for key, value in changes.items():
        if value is None:
            del body["spec"][key]
        else:
            body["spec"][key] = value
    with pytest.raises(ApiError) as info:
        _create(h, body)
    assert info.value.status == 422, info.value.body
    assert expect in _message(info.value)


@pytest.mark.parametrize(
    ("where", "expect"),
    [("spec", 'unknown field "spec.gpus"'), ("spec.lora", 'unknown field "spec.lora.rank"')],
)
def test_unknown_fields_are_rejected_under_strict_field_validation(
    h: Harness, where: str, expect: str
) -> None:
    body = job_body("typo", h.output_uri("typo"))
    body["spec"]["lora"] = {"r": 8}
    target = body["spec"] if where == "spec" else body["spec"]["lora"]
    target["gpus" if where == "spec" else "rank"] = 2
    with pytest.raises(ApiError) as info:
        _create(h, body)
    assert expect in _message(info.value)


@pytest.mark.parametrize(
    ("patch", "expect"),
    [
        ({"model": {"uri": "s3://cheapspot/models/other/"}}, "model is immutable"),
        ({"dataset": {"uri": "s3://cheapspot/data/other.jsonl"}}, "dataset is immutable"),
        ({"output": {"uri": "s3://cheapspot/elsewhere/"}}, "output is immutable"),
        ({"shards": 5}, "shards is immutable"),
        (
            {"distillation": {"teacher": {"uri": "s3://cheapspot/models/teacher/"}}},
            "distillation cannot be added or removed",
        ),
    ],
)
def test_immutable_fields_cannot_change(h: Harness, patch: dict[str, Any], expect: str) -> None:
    name = "frozen"
    if h.api.get(jobs_path(h.namespace, name)) is None:
        _create(h, job_body(name, h.output_uri(name), suspend=True))
    with pytest.raises(ApiError) as info:
        h.api.merge_patch(jobs_path(h.namespace, name), {"spec": patch})
    assert info.value.status == 422
    assert expect in _message(info.value)


def test_mutable_fields_can_change_and_defaults_are_filled_in(h: Harness) -> None:
    name = "mutable"
    body = job_body(name, h.output_uri(name), suspend=True)
    del body["spec"]["checkpoint"]  # the harness's short interval: the schema's default here
    _create(h, body)
    got = h.api.merge_patch(jobs_path(h.namespace, name), {"spec": {"maxRestarts": 7}})
    assert got["spec"]["maxRestarts"] == 7
    assert got["spec"]["lora"]["r"] == 16  # schema defaults
    assert got["spec"]["checkpoint"]["everySteps"] == 20
    assert got["spec"]["lora"]["targetModules"] == "all-linear"


def test_the_quickstart_example_is_accepted_as_is(h: Harness) -> None:
    import yaml

    root = Path(__file__).resolve().parents[2]
    doc = yaml.safe_load((root / "crds" / "examples" / "quickstart.yaml").read_text())
    doc["spec"]["suspend"] = True  # accepted is the point; nothing needs to run
    _create(h, doc)


def test_a_distillation_job_cannot_change_or_drop_its_teacher(h: Harness) -> None:
    name = "distil-frozen"
    body = job_body(name, h.output_uri(name), suspend=True)
    body["spec"]["distillation"] = {"teacher": {"uri": "s3://cheapspot/models/teacher/"}}
    _create(h, body)
    path = jobs_path(h.namespace, name)
    got = h.api.get(path)
    assert got is not None
    assert got["spec"]["distillation"] == {
        "teacher": {"uri": "s3://cheapspot/models/teacher/", "quantization": "none"},
        "mode": "logits",
        "temperature": 2.0,
        "alpha": 0.5,
    }
    for patch, expect in [
        ({"distillation": {"teacher": {"uri": "s3://cheapspot/models/t2/"}}}, "is immutable"),
        ({"distillation": None}, "cannot be added or removed"),
    ]:
        with pytest.raises(ApiError) as info:
            h.api.merge_patch(path, {"spec": patch})
        assert info.value.status == 422
        assert expect in _message(info.value)

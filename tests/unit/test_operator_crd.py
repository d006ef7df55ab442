"""The CRD is generated from the pydantic models and must not drift from them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import ValidationError

from cheapspot_operator.api.crd import CRD_PATHS, build_crd, build_pool_crd, render
from cheapspot_operator.api.inferencepool import InferencePoolSpec, parse_spec
from cheapspot_operator.api.trainjob import TrainJobSpec
from cheapspot_operator.testing.train import spec_dict

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("rel", CRD_PATHS, ids=str)
def test_the_committed_crd_is_what_the_models_generate(rel: Path) -> None:
    assert (ROOT / rel).read_text() == render(rel), (
        f"{rel} is stale: run `python -m cheapspot_operator.api.crd`"
    )


def _walk(node: Any, path: str = "") -> list[tuple[str, dict[str, Any]]]:
    out = []
    if isinstance(node, dict):
        if "type" in node or "x-kubernetes-preserve-unknown-fields" in node or "properties" in node:
            out.append((path, node))
        for key, child in (node.get("properties") or {}).items():
            out += _walk(child, f"{path}.{key}")
        if "items" in node:
            out += _walk(node["items"], f"{path}[]")
    return out


def test_the_schema_is_structural() -> None:
    schema = build_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    for path, node in _walk(schema):
        assert "type" in node or node.get("x-kubernetes-preserve-unknown-fields"), path
        for banned in ("$ref", "anyOf", "title", "additionalProperties", "$defs"):
            assert banned not in node, (path, banned)
        if isinstance(node.get("exclusiveMinimum"), bool):
            assert "minimum" in node, path


def test_every_spec_field_has_a_description() -> None:
    spec = build_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    missing = [p for p, n in _walk(spec) if p and not p.endswith("[]") and "description" not in n]
    assert missing == []


def test_crd_names_columns_and_subresources() -> None:
    crd = build_crd()
    assert crd["metadata"]["name"] == "cheaptrainjobs.cheapspot.dev"
    assert crd["spec"]["names"]["shortNames"] == ["ctj"]
    assert crd["spec"]["scope"] == "Namespaced"
    (version,) = crd["spec"]["versions"]
    assert version["name"] == "v1alpha1" and version["subresources"] == {"status": {}}
    columns = [c["name"] for c in version["additionalPrinterColumns"]]
    for name in ("Phase", "Progress", "Spot/OD", "Preemptions", "Cost", "Age"):
        assert name in columns
    spec = version["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]
    for field in ("model", "dataset", "output", "shards"):
        rules = [r["rule"] for r in spec[field]["x-kubernetes-validations"]]
        assert "self == oldSelf" in rules, field
    conditions = version["schema"]["openAPIV3Schema"]["properties"]["status"]["properties"][
        "conditions"
    ]
    assert conditions["x-kubernetes-list-type"] == "map"


def _examples() -> list[Path]:
    return sorted((ROOT / "crds" / "examples").glob("*.yaml"))


@pytest.mark.parametrize("path", _examples(), ids=lambda p: p.name)
def test_examples_are_valid_specs(path: Path) -> None:
    doc = yaml.safe_load(path.read_text())
    models = {"CheapTrainJob": TrainJobSpec, "CheapInferencePool": InferencePoolSpec}
    assert doc["apiVersion"] == "cheapspot.dev/v1alpha1" and doc["kind"] in models
    models[doc["kind"]].model_validate(doc["spec"])


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"shards": 0}, "shards"),
        ({"shards": 257}, "shards"),
        ({"model": {"uri": "ftp://x/"}}, "model"),
        ({"lora": {"r": 0}}, "lora"),
        ({"training": {"steps": -1}}, "training"),
        ({"dataset": {"uri": "s3://d", "format": "csv"}}, "dataset"),
        ({"surprise": 1}, "surprise"),
    ],
)
def test_pydantic_rejects_what_the_crd_rejects(change: dict[str, Any], field: str) -> None:
    with pytest.raises(ValidationError) as info:
        TrainJobSpec.model_validate(spec_dict(**change))
    assert field in str(info.value)


@pytest.mark.parametrize(
    ("uri", "expect"),
    [
        ("s3:///x", "names no valid bucket"),
        ("s3:///", "names no valid bucket"),
        ("file://relative/dir", "not an absolute path"),
    ],
)
def test_uris_that_cannot_work_are_rejected_with_what_to_use(uri: str, expect: str) -> None:
    with pytest.raises(ValidationError) as info:
        TrainJobSpec.model_validate(spec_dict(output={"uri": uri}))
    assert expect in str(info.value)
    TrainJobSpec.model_validate(spec_dict(output={"uri": "s3://bucket-1/jobs/a/"}))


def test_the_pool_crd_has_scale_short_name_columns_and_is_structural() -> None:
    crd = build_pool_crd()
    assert crd["metadata"]["name"] == "cheapinferencepools.cheapspot.dev"
    assert crd["spec"]["names"]["shortNames"] == ["cip"]
    (version,) = crd["spec"]["versions"]
    assert version["subresources"]["scale"] == {
        "specReplicasPath": ".spec.replicas",
        "statusReplicasPath": ".status.replicas",
        "labelSelectorPath": ".status.selector",
    }
    columns = [c["name"] for c in version["additionalPrinterColumns"]]
    assert columns[:2] == ["Ready", "Spot/OD"] and "Cost" in columns
    schema = version["schema"]["openAPIV3Schema"]
    for path, node in _walk(schema):
        assert "type" in node or node.get("x-kubernetes-preserve-unknown-fields"), path
        for banned in ("$ref", "anyOf", "title", "additionalProperties", "$defs"):
            assert banned not in node, (path, banned)
    adapters = schema["properties"]["spec"]["properties"]["adapters"]
    assert adapters["x-kubernetes-list-type"] == "map"
    assert adapters["x-kubernetes-list-map-keys"] == ["name"]


def test_the_pool_example_is_a_valid_spec() -> None:
    doc = yaml.safe_load((ROOT / "crds" / "examples" / "inference-pool.yaml").read_text())
    assert doc["kind"] == "CheapInferencePool"
    spec = parse_spec(doc["spec"])
    assert spec.anchor.replicas == 1 and spec.replicas == 3

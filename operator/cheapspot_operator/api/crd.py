"""Generate the CustomResourceDefinitions (CheapTrainJob, CheapInferencePool) from the models.

``python -m cheapspot_operator.api.crd`` rewrites ``crds/cheaptrainjobs.yaml``,
``crds/cheapinferencepools.yaml`` and the Helm chart's copies; ``python -m
cheapspot_operator.api.crd --check`` fails when any differs from what the models say (the unit
tests run the same comparison).

Pydantic emits JSON Schema 2020-12; the API server wants a structural OpenAPI v3 schema. The
translation here: ``$ref`` inlined, ``title`` dropped, ``anyOf [X, null]`` folded into ``X``,
``exclusiveMinimum: n`` turned into ``minimum: n`` + ``exclusiveMinimum: true``, object
defaults reduced to ``{}`` (the API server fills nested defaults itself), and the one
string-or-list field (``lora.targetModules``) kept open (the operator's models check it).
"""

from __future__ import annotations

import copy
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from cheapspot_operator.api import common
from cheapspot_operator.api import inferencepool as ps
from cheapspot_operator.api import trainjob as s

_DROP = {"title", "additionalProperties"}
_REPO_ROOT = Path(__file__).resolve().parents[3]
CRD_FILES = ("cheaptrainjobs.yaml", "cheapinferencepools.yaml")
CRD_PATHS = tuple(
    folder / name
    for name in CRD_FILES
    for folder in (Path("crds"), Path("helm") / "cheapspot" / "crds")
)


def _inline(node: Any, defs: dict[str, Any]) -> Any:
    if isinstance(node, list):
        return [_inline(x, defs) for x in node]
    if not isinstance(node, dict):
        return node
    node = dict(node)
    if "$ref" in node:
        target = copy.deepcopy(defs[node.pop("$ref").rsplit("/", 1)[1]])
        # Field-level keys (description, default, CEL rules) win over the referenced model's.
        merged = {**target, **node}
        rules = target.get("x-kubernetes-validations", []) + node.get(
            "x-kubernetes-validations", []
        )
        if rules:
            merged["x-kubernetes-validations"] = rules
        node = merged
    return {k: _inline(v, defs) for k, v in node.items()}


def _openapi(node: Any) -> Any:
    if isinstance(node, list):
        return [_openapi(x) for x in node]
    if not isinstance(node, dict):
        return node
    node = {k: v for k, v in node.items() if k not in _DROP}
    if "anyOf" in node:
        options = [o for o in node["anyOf"] if o.get("type") != "null"]
        nullable = len(options) < len(node["anyOf"])
        if len(options) == 1:
            del node["anyOf"]
            node = {k: v for k, v in {**options[0], **node}.items() if k not in _DROP}
            if nullable and node.get("default", 0) is None:
                del node["default"]
        else:
            # String or list of strings: a structural schema cannot say that, and the API
            # server compiles no CEL for an untyped field, so it stays open here and the
            # operator's models check it (a wrong shape fails the job with InvalidSpec).
            del node["anyOf"]
            node["x-kubernetes-preserve-unknown-fields"] = True
            node["description"] = (
                node.get("description", "") + " A string or a list of strings."
            ).strip()
    for key in ("exclusiveMinimum", "exclusiveMaximum"):
        if isinstance(node.get(key), int | float) and not isinstance(node.get(key), bool):
            bound = "minimum" if key == "exclusiveMinimum" else "maximum"
            node[bound] = node[key]
            node[key] = True
    if "default" in node and node.get("type") == "object":
        node["default"] = {}
    if "default" in node and node["default"] is None:
        del node["default"]
    if "properties" in node:
        node["properties"] = {k: _openapi(v) for k, v in node["properties"].items()}
    if "items" in node:
        node["items"] = _openapi(node["items"])
    for key in ("x-kubernetes-validations",):
        if key in node:
            node[key] = list(node[key])
    return node


def openapi_schema(model: type[Any]) -> dict[str, Any]:
    """The structural OpenAPI v3 schema of a pydantic model."""
    raw = model.model_json_schema(by_alias=True, mode="validation")
    defs = raw.pop("$defs", {})
    result: dict[str, Any] = _openapi(_inline(raw, defs))
    return result


def _without_defaults(node: Any) -> Any:
    if isinstance(node, list):
        return [_without_defaults(x) for x in node]
    if not isinstance(node, dict):
        return node
    return {k: _without_defaults(v) for k, v in node.items() if k != "default"}


def _status_schema(model: type[Any]) -> dict[str, Any]:
    # Only the operator writes status: defaults there would only hide what it has not set.
    schema: dict[str, Any] = _without_defaults(openapi_schema(model))
    conditions = schema["properties"]["conditions"]
    conditions["x-kubernetes-list-type"] = "map"
    conditions["x-kubernetes-list-map-keys"] = ["type"]
    conditions["items"]["required"] = ["type", "status"]
    # kopf keeps its handler progress here (see handlers.py: persistence settings).
    schema["properties"]["kopf"] = {
        "type": "object",
        "x-kubernetes-preserve-unknown-fields": True,
        "description": "Handler progress of the operator (kopf).",
    }
    return schema


PRINTER_COLUMNS: list[dict[str, Any]] = [
    {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
    {"name": "Progress", "type": "string", "jsonPath": ".status.progressDisplay"},
    {
        "name": "Spot/OD",
        "type": "string",
        "jsonPath": ".status.shardsDisplay",
        "description": "Shards on spot / on on-demand capacity.",
    },
    {"name": "Preemptions", "type": "integer", "jsonPath": ".status.preemptions"},
    {"name": "Cost", "type": "string", "jsonPath": ".status.cost.display"},
    {"name": "Loss", "type": "number", "jsonPath": ".status.progress.loss", "priority": 1},
    {"name": "Restarts", "type": "integer", "jsonPath": ".status.restarts", "priority": 1},
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
]


POOL_PRINTER_COLUMNS: list[dict[str, Any]] = [
    {
        "name": "Ready",
        "type": "string",
        "jsonPath": ".status.replicasDisplay",
        "description": "Ready replicas / replicas.",
    },
    {
        "name": "Spot/OD",
        "type": "string",
        "jsonPath": ".status.placementDisplay",
        "description": "Replicas on spot / on on-demand capacity.",
    },
    {"name": "Draining", "type": "integer", "jsonPath": ".status.drainingReplicas"},
    {"name": "Preemptions", "type": "integer", "jsonPath": ".status.preemptions"},
    {"name": "Cost", "type": "string", "jsonPath": ".status.cost.display"},
    {"name": "Endpoint", "type": "string", "jsonPath": ".status.endpoint", "priority": 1},
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
]


def _root(
    description: str, spec_model: type[Any], status_model: type[Any], max_name: int
) -> dict[str, Any]:
    spec_schema = openapi_schema(spec_model)
    spec_schema["description"] = spec_model.__doc__
    return {
        "type": "object",
        "description": description,
        "required": ["spec"],
        "properties": {
            "apiVersion": {"type": "string"},
            "kind": {"type": "string"},
            "metadata": {"type": "object"},
            "spec": spec_schema,
            "status": _status_schema(status_model),
        },
        "x-kubernetes-validations": [
            {
                "rule": f"self.metadata.name.size() <= {max_name}",
                "message": f"metadata.name must be at most {max_name} characters "
                "(pod names and labels derive from it)",
            }
        ],
    }


def build_crd() -> dict[str, Any]:
    """The CheapTrainJob CustomResourceDefinition as a dict."""
    root = _root(
        "A LoRA fine-tuning job whose shards run on spot GPU nodes.",
        s.TrainJobSpec,
        s.TrainJobStatus,
        s.MAX_NAME_LENGTH,
    )
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": f"{s.PLURAL}.{common.GROUP}",
            "labels": {"app.kubernetes.io/part-of": "cheapspot"},
        },
        "spec": {
            "group": common.GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": s.KIND,
                "listKind": f"{s.KIND}List",
                "plural": s.PLURAL,
                "singular": s.SINGULAR,
                "shortNames": list(s.SHORT_NAMES),
                "categories": ["cheapspot"],
            },
            "versions": [
                {
                    "name": common.VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": PRINTER_COLUMNS,
                    "schema": {"openAPIV3Schema": root},
                }
            ],
        },
    }


def build_pool_crd() -> dict[str, Any]:
    """The CheapInferencePool CustomResourceDefinition as a dict."""
    root = _root(
        "An OpenAI-compatible pool of vLLM replicas on spot GPU nodes, with on-demand anchors.",
        ps.InferencePoolSpec,
        ps.InferencePoolStatus,
        ps.MAX_NAME_LENGTH,
    )
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": f"{ps.PLURAL}.{common.GROUP}",
            "labels": {"app.kubernetes.io/part-of": "cheapspot"},
        },
        "spec": {
            "group": common.GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": ps.KIND,
                "listKind": f"{ps.KIND}List",
                "plural": ps.PLURAL,
                "singular": ps.SINGULAR,
                "shortNames": list(ps.SHORT_NAMES),
                "categories": ["cheapspot"],
            },
            "versions": [
                {
                    "name": common.VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {
                        "status": {},
                        "scale": {
                            "specReplicasPath": ".spec.replicas",
                            "statusReplicasPath": ".status.replicas",
                            "labelSelectorPath": ".status.selector",
                        },
                    },
                    "additionalPrinterColumns": POOL_PRINTER_COLUMNS,
                    "schema": {"openAPIV3Schema": root},
                }
            ],
        },
    }


HEADER = "# Generated from cheapspot_operator.api.trainjob by `python -m cheapspot_operator.api.crd`: do not edit.\n"


def render_crd() -> str:
    return HEADER + yaml.safe_dump(build_crd(), sort_keys=False, width=100)


def render_pool_crd() -> str:
    header = HEADER.replace(
        "cheapspot_operator.api.trainjob", "cheapspot_operator.api.inferencepool"
    )
    return header + yaml.safe_dump(build_pool_crd(), sort_keys=False, width=100)


def render(rel: Path) -> str:
    """The text that belongs in the CRD file ``rel`` (one of :data:`CRD_PATHS`)."""
    return render_pool_crd() if rel.name == "cheapinferencepools.yaml" else render_crd()


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    stale = []
    for rel in CRD_PATHS:
        text = render(rel)
        path = _REPO_ROOT / rel
        if "--check" in args:
            if not path.exists() or path.read_text() != text:
                stale.append(str(rel))
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
    if stale:
        print(
            f"stale, run `python -m cheapspot_operator.api.crd`: {', '.join(stale)}",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The Helm chart, checked without a helm binary: values against the schema, every value a
template uses exists, the config the chart writes is one the operator accepts."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from cheapspot_operator.runtime.config import (
    OperatorConfig,
    PricingSettings,
    ServingSettings,
    WorkerSettings,
)

# jsonschema comes with the dev tools (moto); the chart check needs nothing else.
jsonschema = pytest.importorskip("jsonschema")

CHART = Path(__file__).resolve().parents[2] / "helm" / "cheapspot"


def _values() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((CHART / "values.yaml").read_text())
    return data


def test_default_values_match_the_schema() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    jsonschema.validate(_values(), schema)
    bad = _values() | {"profile": "azure"}
    try:
        jsonschema.validate(bad, schema)
    except jsonschema.ValidationError:
        pass
    else:
        raise AssertionError("an unknown profile passed the values schema")


def test_every_value_a_template_uses_exists() -> None:
    values = _values()
    for template in (CHART / "templates").glob("*"):
        for ref in re.findall(r"\.Values\.([A-Za-z0-9_.]+)", template.read_text()):
            node: Any = values
            for part in ref.split("."):
                assert isinstance(node, dict) and part in node, f"{template.name}: .Values.{ref}"
                node = node[part]


def test_the_config_the_chart_writes_uses_the_operators_keys() -> None:
    text = (CHART / "templates" / "configmap.yaml").read_text()
    body = text.split("config.yaml: |", 1)[1]
    sections: dict[str, set[str]] = {}
    for line in body.splitlines():
        if top := re.match(r"^    ([A-Za-z]+):", line):
            current = sections.setdefault(top.group(1), set())
        elif nested := re.match(r"^      ([A-Za-z]+):", line):
            current.add(nested.group(1))
    known = {f.alias or n for n, f in OperatorConfig.model_fields.items()}
    assert set(sections) <= known, set(sections) - known
    for name, model in (
        ("worker", WorkerSettings),
        ("serving", ServingSettings),
        ("pricing", PricingSettings),
    ):
        keys = {f.alias or n for n, f in model.model_fields.items()}
        assert sections[name] and sections[name] <= keys, (name, sections[name] - keys)


def test_the_chart_runs_one_operator_with_least_privilege() -> None:
    deployment = (CHART / "templates" / "deployment.yaml").read_text()
    assert "replicas: 1" in deployment and "type: Recreate" in deployment
    rbac = (CHART / "templates" / "rbac.yaml").read_text()
    assert '"*"' not in rbac
    # Secrets: created (each pool's admin token), never listed or watched, and read only by
    # name: the operator's own key.
    rules = [yaml.safe_load(r) for r in re.findall(r"(?m)^  - apiGroups:.*\n(?:^    .*\n)+", rbac)]
    secret_rules = [r[0] for r in rules if "secrets" in r[0]["resources"]]
    assert secret_rules
    for rule in secret_rules:
        assert rule["verbs"] in (["create"], ["get"]), rule
        if rule["verbs"] == ["get"]:
            assert rule["resourceNames"] == ["cheapspot-admin-key"], rule
    assert "cheaptrainjobs/status" in rbac
    assert (CHART / "crds" / "cheaptrainjobs.yaml").exists()
    assert "cheapinferencepools/status" in rbac
    assert (CHART / "crds" / "cheapinferencepools.yaml").exists()


def test_the_grafana_dashboard_queries_only_metrics_the_operator_exports() -> None:
    from prometheus_client import REGISTRY

    import cheapspot_operator.runtime.metrics  # noqa: F401  (registers the metrics)

    exported = {s.name for m in REGISTRY.collect() for s in m.samples}
    exported |= {m.name for m in REGISTRY.collect()}
    exported |= {f"{m.name}_total" for m in REGISTRY.collect() if m.type == "counter"}
    dashboard = json.loads((CHART / "dashboards" / "cheapspot-cost.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    used = {n for e in exprs for n in re.findall(r"\b(cheapspot_[a-z_]+)\b", e)}
    assert used and used <= exported, used - exported
    template = (CHART / "templates" / "grafana-dashboard.yaml").read_text()
    assert 'grafana_dashboard: "1"' in template
    assert "dashboards/cheapspot-cost.json" in template


def _rules(template_text: str) -> list[dict[str, Any]]:
    """The RBAC rules in a piece of template, its template lines left out."""
    lines = [line for line in template_text.splitlines() if "{{" not in line]
    rules: list[dict[str, Any]] = yaml.safe_load("\n".join(lines)) or []
    return rules


def test_with_namespaces_listed_the_cluster_role_only_reads() -> None:
    rbac = (CHART / "templates" / "rbac.yaml").read_text()
    namespaced = rbac.split('define "cheapspot.namespacedRules" }}', 1)[1].split("{{- end }}")[0]
    writes = {v for r in _rules(namespaced) for v in r["verbs"]} - {"get", "list", "watch"}
    assert writes == {"create", "delete", "patch"}
    cluster_role = rbac.split("kind: ClusterRole\n", 1)[1].split("\n---", 1)[0]
    listed = cluster_role.split("{{- else }}", 1)[1]  # the namespaces-listed branch on
    read_only = _rules(listed.split("\n", 1)[1])
    assert {r["resources"][0] for r in read_only} >= {"pods", "nodes"}
    assert {v for r in read_only for v in r["verbs"]} <= {"get", "list", "watch"}
    # Each listed namespace gets the writes through a Role bound to the operator.
    per_namespace = rbac.split("{{- range .Values.namespaces }}", 1)[1].split("{{- end }}")[0]
    assert "kind: Role\n" in per_namespace and "kind: RoleBinding" in per_namespace
    assert 'include "cheapspot.namespacedRules" $' in per_namespace


def test_the_worker_service_account_is_made_where_jobs_run() -> None:
    sa = (CHART / "templates" / "serviceaccount.yaml").read_text()
    assert "range (.Values.namespaces | default .Values.worker.serviceAccount.namespaces)" in sa
    assert "namespace: {{ . }}" in sa
    quickstart = yaml.safe_load((CHART.parents[1] / "crds/examples/quickstart.yaml").read_text())
    where = quickstart["metadata"].get("namespace", "default")
    assert where in _values()["worker"]["serviceAccount"]["namespaces"]


def test_the_operator_may_create_every_object_a_pool_owns() -> None:
    """Each kind the pool's builders make (router RBAC, Service, Deployment, the PDBs) is
    granted to the operator in the namespaced rules, with the verbs its act layer uses."""
    from cheapspot_operator.inferencepool.manifests import (
        PoolInfo,
        build_pdbs,
        build_router_rbac,
        build_router_service,
    )
    from cheapspot_operator.testing.pool import make_pool

    rbac = (CHART / "templates" / "rbac.yaml").read_text()
    namespaced = rbac.split('define "cheapspot.namespacedRules" }}', 1)[1].split("{{- end }}")[0]
    rules = _rules(namespaced)

    def granted(group: str, resource: str, verb: str) -> bool:
        return any(
            group in r["apiGroups"] and resource in r["resources"] and verb in r["verbs"]
            for r in rules
        )

    info = PoolInfo("default", "qa-serve", "uid-1", make_pool())
    objects = [*build_router_rbac(info), build_router_service(info), *build_pdbs(info)]
    assert {o["kind"] for o in objects} >= {"PodDisruptionBudget", "Service", "Role"}
    for obj in objects:
        group = obj["apiVersion"].rpartition("/")[0]
        resource = obj["kind"].lower() + ("es" if obj["kind"].endswith("s") else "s")
        assert granted(group, resource, "create"), (group, resource)
    assert granted("apps", "deployments", "patch"), "a router's new template is patched in"

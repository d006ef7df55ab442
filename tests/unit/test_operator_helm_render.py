"""The Helm chart as helm itself lints and renders it: the README's installs give the operator
and the quickstart's pods what they need.

Needs a helm binary: the kind tier's pinned build where it is cached (``cheapspot kind up``
builds it), else ``helm`` on the PATH; skipped without either.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from cheapspot_localcluster import kindnode
from cheapspot_operator.runtime.config import OperatorConfig

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "cheapspot"
RELEASE_NS = "cheapspot"
WORKER_SA = "cheapspot-worker"

Manifest = dict[str, Any]


@dataclass(frozen=True)
class Helm:
    binary: str
    env: dict[str, str]

    def run(self, *args: str) -> str:
        done = subprocess.run(
            [self.binary, *args],
            capture_output=True,
            text=True,
            env=self.env,
            check=False,
            timeout=120,
        )
        assert done.returncode == 0, f"helm {' '.join(args)}:\n{done.stdout}\n{done.stderr}"
        return done.stdout

    def template(self, *args: str) -> list[Manifest]:
        """``helm template`` of the chart, installed as the README installs it."""
        out = self.run("template", "cheapspot", str(CHART), "--namespace", RELEASE_NS, *args)
        return [doc for doc in yaml.safe_load_all(out) if doc]


@pytest.fixture
def helm(tmp_path: Path) -> Helm:
    pinned = kindnode.tool_binary(kindnode.HELM)
    binary = str(pinned) if os.access(pinned, os.X_OK) else shutil.which("helm")
    if binary is None:
        pytest.skip(
            "no helm binary: `cheapspot kind up` builds the pinned one, or put helm on PATH"
        )
    # helm's own configuration and caches stay out of the user's.
    homes = {
        f"HELM_{kind}_HOME": str(tmp_path / kind.lower()) for kind in ("CONFIG", "CACHE", "DATA")
    }
    return Helm(binary, {**os.environ, **homes})


def readme_values(tmp_path: Path) -> tuple[Path, str]:
    """The README's values.yaml for an S3-compatible store, and the namespace it applies the
    quickstart in: the text a user copies is the text tested."""
    readme = (ROOT / "README.md").read_text()
    values = re.search(r"cat > values\.yaml <<YAML\n(.*?)\nYAML\n", readme, re.S)
    applied = re.search(r"kubectl -n (\S+) apply -f crds/examples/quickstart\.yaml", readme)
    assert values and applied, "the README's S3-compatible-store install moved"
    path = tmp_path / "values.yaml"
    path.write_text(values.group(1))
    return path, applied.group(1)


def find(manifests: list[Manifest], kind: str, name: str, namespace: str | None = None) -> Manifest:
    """The rendered object; ``namespace`` None: one the release's namespace will hold."""
    for m in manifests:
        meta = m["metadata"]
        if m["kind"] == kind and meta["name"] == name and meta.get("namespace") == namespace:
            return m
    rendered = [
        f"{m['kind']} {m['metadata'].get('namespace')}/{m['metadata']['name']}" for m in manifests
    ]
    raise AssertionError(f"no {kind} {namespace}/{name} rendered; there are {rendered}")


def operator_config(manifests: list[Manifest]) -> OperatorConfig:
    configmap = find(manifests, "ConfigMap", "cheapspot")
    return OperatorConfig.model_validate(yaml.safe_load(configmap["data"]["config.yaml"]))


def grants(rules: list[dict[str, Any]], verb: str, resource: str) -> bool:
    return any(verb in r["verbs"] and resource in r["resources"] for r in rules)


def test_the_chart_lints_strict_with_the_defaults_and_the_readmes_values(
    helm: Helm, tmp_path: Path
) -> None:
    helm.run("lint", "--strict", str(CHART))
    values, _ = readme_values(tmp_path)
    helm.run("lint", "--strict", str(CHART), "--values", str(values))
    for profile in ("local", "eks-karpenter", "eks-managed", "ack", "gke"):
        helm.run("lint", "--strict", str(CHART), "--set", f"profile={profile}")


def test_the_default_install_runs_the_quickstart(helm: Helm) -> None:
    rendered = helm.template("--set", "profile=eks-karpenter", "--include-crds")
    quickstart = yaml.safe_load((ROOT / "crds" / "examples" / "quickstart.yaml").read_text())
    where = quickstart["metadata"].get("namespace", "default")
    # The quickstart's pods run as the worker service account, made where the job is applied.
    worker_sa = find(rendered, "ServiceAccount", WORKER_SA, where)
    assert worker_sa["automountServiceAccountToken"] is False
    config = operator_config(rendered)
    assert config.profile == "eks-karpenter"
    assert config.worker.service_account == WORKER_SA
    assert config.namespaces == []
    # Watching every namespace, the operator may create the job's pods in any of them.
    operator_sa = find(rendered, "ServiceAccount", "cheapspot")
    binding = find(rendered, "ClusterRoleBinding", "cheapspot")
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "cheapspot", "namespace": RELEASE_NS}
    ]
    rules = find(rendered, "ClusterRole", binding["roleRef"]["name"])["rules"]
    assert grants(rules, "create", "pods") and grants(rules, "patch", "cheaptrainjobs/status")
    assert grants(rules, "create", "poddisruptionbudgets")
    # Each pool's NetworkPolicy and admin token Secret.
    assert grants(rules, "create", "networkpolicies") and grants(rules, "create", "secrets")
    assert grants(rules, "get", "secrets") and not grants(rules, "list", "secrets")
    deployment = find(rendered, "Deployment", "cheapspot")
    # The pools' NetworkPolicies admit exactly the operator's pods, in its namespace.
    assert config.serving.network_policies is True
    assert config.serving.operator_namespace == RELEASE_NS
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert config.serving.operator_pod_labels.items() <= pod_labels.items()
    assert config.allowed_uri_prefixes == {}
    assert (
        deployment["spec"]["template"]["spec"]["serviceAccountName"]
        == operator_sa["metadata"]["name"]
    )
    # The CRD the quickstart's kind needs comes with the chart.
    crds = [m for m in rendered if m["kind"] == "CustomResourceDefinition"]
    assert quickstart["kind"] in {c["spec"]["names"]["kind"] for c in crds}


def test_the_readmes_s3_compatible_install_reaches_the_store(helm: Helm, tmp_path: Path) -> None:
    values, job_namespace = readme_values(tmp_path)
    wanted = yaml.safe_load(values.read_text())
    rendered = helm.template("--values", str(values))
    # The operator reads progress and claims prefixes in the store: endpoint and region as
    # plain environment, keys from the Secret.
    container = find(rendered, "Deployment", "cheapspot")["spec"]["template"]["spec"]["containers"][
        0
    ]
    env = {e["name"]: e.get("value") for e in container["env"]}
    for name, value in wanted["env"].items():
        assert env[name] == value, (name, env)
    assert container.get("envFrom") == [{"secretRef": {"name": wanted["envFromSecret"]}}]
    assert not any("KEY" in name for name in env), "keys only ever come from the Secret"
    # Its workers get the same, through the config the operator reads.
    config = operator_config(rendered)
    assert config.profile == wanted["profile"]
    assert config.namespaces == [job_namespace]
    assert config.worker.env == wanted["worker"]["env"]
    assert config.worker.env_from_secret == wanted["worker"]["envFromSecret"]
    assert config.worker.service_account == WORKER_SA
    # The namespace the README applies the quickstart in has the worker service account
    # (and no other does), and a Role letting the operator create the job's pods there.
    worker_sas = [
        m for m in rendered if m["kind"] == "ServiceAccount" and m["metadata"]["name"] == WORKER_SA
    ]
    assert [m["metadata"]["namespace"] for m in worker_sas] == [job_namespace]
    role = find(rendered, "Role", "cheapspot", job_namespace)
    assert grants(role["rules"], "create", "pods")
    binding = find(rendered, "RoleBinding", "cheapspot", job_namespace)
    assert binding["roleRef"]["name"] == "cheapspot"
    assert binding["subjects"][0]["namespace"] == RELEASE_NS


def test_the_uri_allowlist_reaches_the_operator(helm: Helm) -> None:
    rendered = helm.template(
        "--set-json",
        'allowedUriPrefixes={"*": ["s3://models/{namespace}/"], "research": ["s3://lab/"]}',
        "--set",
        "serving.networkPolicies=false",
    )
    config = operator_config(rendered)
    assert config.allowed_uri_prefixes == {
        "*": ["s3://models/{namespace}/"],
        "research": ["s3://lab/"],
    }
    assert config.serving.network_policies is False

"""Every pod the operator builds, for every placement profile and capacity, is accepted by a
real API server (server-side dry run): the unit tests check shapes, this checks validity."""

from __future__ import annotations

import uuid
from typing import Any

import pytest

from cheapspot_operator.api.common import CapacityType
from cheapspot_operator.cluster.placement import PROFILES
from cheapspot_operator.cluster.pods import Placement
from cheapspot_operator.inferencepool.manifests import (
    PoolInfo,
    build_admin_secret,
    build_network_policy,
    build_pdbs,
    build_replica_pod,
    build_router_deployment,
)
from cheapspot_operator.runtime.config import OperatorConfig
from cheapspot_operator.runtime.kubeapi import ApiError, KubeApi
from cheapspot_operator.testing.pool import make_pool
from cheapspot_operator.testing.train import make_job
from cheapspot_operator.trainjob.manifests import (
    JobInfo,
    build_anchor_pod,
    build_shard_pod,
)

CONFIG = OperatorConfig()
# Three doomed nodes at once: what a zone-wide reclaim or `spot off` produces.
AVOID = ("spot-a", "spot-b", "spot-c")


@pytest.fixture(scope="module")
def namespaced(local_cluster: Any) -> tuple[KubeApi, str]:
    api = KubeApi(local_cluster.api_client())
    namespace = f"m-{uuid.uuid4().hex[:8]}"
    api.create("/api/v1/namespaces", {"metadata": {"name": namespace}})
    return api, namespace


def _dry_run(api: KubeApi, namespace: str, pod: dict[str, Any]) -> dict[str, Any]:
    try:
        accepted: dict[str, Any] = api.request(
            "POST", f"/api/v1/namespaces/{namespace}/pods", query={"dryRun": "All"}, body=pod
        )
    except ApiError as exc:
        pytest.fail(f"the API server rejected {pod['metadata']['name']}: {exc.message}")
    return accepted


@pytest.mark.parametrize("profile", sorted(PROFILES))
@pytest.mark.parametrize("capacity", [CapacityType.SPOT, CapacityType.ON_DEMAND])
def test_training_and_serving_pods_are_valid_with_several_doomed_nodes(
    namespaced: tuple[KubeApi, str], profile: str, capacity: CapacityType
) -> None:
    api, namespace = namespaced
    placement = Placement(PROFILES[profile], capacity, avoid_nodes=AVOID)
    job = JobInfo(namespace, "qa-lora", "uid-1", make_job(shards=3))
    pool = PoolInfo(namespace, "qa-serve", "uid-2", make_pool())
    pods = [
        build_shard_pod(job, 1, 2, placement, CONFIG.worker),
        build_anchor_pod(
            job, 0, Placement(PROFILES[profile], CapacityType.ON_DEMAND), CONFIG.worker
        ),
        build_replica_pod(pool, 1, 2, placement, CONFIG.worker, serving=CONFIG.serving),
    ]
    for pod in pods:
        accepted = _dry_run(api, namespace, pod)
        assert accepted["metadata"]["name"] == pod["metadata"]["name"]
        terms = accepted["spec"]["affinity"]["nodeAffinity"][
            "requiredDuringSchedulingIgnoredDuringExecution"
        ]["nodeSelectorTerms"]
        if pod is not pods[1]:
            for term in terms:
                avoided = {v for f in term["matchFields"] for v in f["values"]}
                assert avoided == set(AVOID)


def test_the_pools_disruption_budgets_are_valid(namespaced: tuple[KubeApi, str]) -> None:
    api, namespace = namespaced
    pool = PoolInfo(namespace, "qa-serve", "uid-2", make_pool(replicas=3, anchor={"replicas": 2}))
    for pdb in build_pdbs(pool):
        # The owner (uid-2) does not exist; a dry run does not check owners.
        try:
            accepted = api.request(
                "POST",
                f"/apis/policy/v1/namespaces/{namespace}/poddisruptionbudgets",
                query={"dryRun": "All"},
                body=pdb,
            )
        except ApiError as exc:
            pytest.fail(f"the API server rejected {pdb['metadata']['name']}: {exc.message}")
        assert accepted["spec"]["selector"] == pdb["spec"]["selector"]
        assert accepted["spec"]["unhealthyPodEvictionPolicy"] == "AlwaysAllow"


def _dry_run_object(api: KubeApi, path: str, obj: dict[str, Any]) -> dict[str, Any]:
    try:
        accepted: dict[str, Any] = api.request("POST", path, query={"dryRun": "All"}, body=obj)
    except ApiError as exc:
        pytest.fail(
            f"the API server rejected {obj['kind']} {obj['metadata']['name']}: {exc.message}"
        )
    return accepted


def test_the_pools_admin_secret_network_policy_and_keyed_router_are_valid(
    namespaced: tuple[KubeApi, str],
) -> None:
    api, namespace = namespaced
    spec = make_pool(router={"apiKeys": {"secretName": "qa-keys"}})
    pool = PoolInfo(namespace, "qa-serve", "uid-2", spec)
    secret = _dry_run_object(
        api, f"/api/v1/namespaces/{namespace}/secrets", build_admin_secret(pool, "t" * 64)
    )
    assert secret["type"] == "Opaque" and set(secret["data"]) == {"token"}
    policy = build_network_policy(pool, "cheapspot", CONFIG.serving.operator_pod_labels)
    accepted = _dry_run_object(
        api, f"/apis/networking.k8s.io/v1/namespaces/{namespace}/networkpolicies", policy
    )
    assert accepted["spec"]["ingress"] == policy["spec"]["ingress"]
    router = build_router_deployment(
        pool, 1, Placement(PROFILES["local"], CapacityType.ON_DEMAND), CONFIG.worker, CONFIG.serving
    )
    accepted = _dry_run_object(api, f"/apis/apps/v1/namespaces/{namespace}/deployments", router)
    volumes = {v["name"]: v for v in accepted["spec"]["template"]["spec"]["volumes"]}
    assert volumes["api-keys"]["secret"]["secretName"] == "qa-keys"

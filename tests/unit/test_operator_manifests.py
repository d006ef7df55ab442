"""Pod builders: what a pod must carry to be placed right, stay safe and run the worker."""

from __future__ import annotations

import json
from typing import Any

import pytest

from cheapspot.contract import TASK_ENV, Role, Task
from cheapspot_operator.api.common import CapacityType
from cheapspot_operator.cluster.placement import PROFILES
from cheapspot_operator.cluster.pods import Placement
from cheapspot_operator.runtime.config import WorkerSettings
from cheapspot_operator.testing.train import make_job
from cheapspot_operator.trainjob.manifests import (
    JobInfo,
    build_anchor_pod,
    build_shard_pod,
)

WORKER = WorkerSettings(image="registry.example/worker:1", env={"AWS_REGION": "us-east-1"})


def _job(**overrides: Any) -> JobInfo:
    return JobInfo("team-a", "qa-lora", "uid-123", make_job(**overrides))


def _shard(
    profile: str = "local", capacity: CapacityType = CapacityType.SPOT, **kw: Any
) -> dict[str, Any]:
    placement = Placement(PROFILES[profile], capacity, **kw)
    return build_shard_pod(_job(shards=4), 2, 3, placement, WORKER)


def _task(pod: dict[str, Any]) -> Task:
    env = {e["name"]: e.get("value") for e in pod["spec"]["containers"][0]["env"]}
    return Task.model_validate_json(env[TASK_ENV])


def test_a_shard_pod_is_named_labelled_and_owned_by_its_job() -> None:
    pod = _shard()
    meta = pod["metadata"]
    assert meta["name"] == "qa-lora-shard-2-3"
    assert meta["namespace"] == "team-a"
    assert meta["labels"]["cheapspot.dev/job"] == "qa-lora"
    assert meta["labels"]["cheapspot.dev/role"] == "train"
    assert meta["labels"]["cheapspot.dev/shard"] == "2"
    assert meta["labels"]["cheapspot.dev/capacity-type"] == "spot"
    assert meta["annotations"]["cheapspot.dev/attempt"] == "3"
    (owner,) = meta["ownerReferences"]
    assert owner == {
        "apiVersion": "cheapspot.dev/v1alpha1",
        "kind": "CheapTrainJob",
        "name": "qa-lora",
        "uid": "uid-123",
        "controller": True,
        "blockOwnerDeletion": True,
    }


def test_the_task_in_the_environment_is_the_contract_task() -> None:
    task = _task(_shard())
    assert task.role is Role.TRAIN
    assert (task.shard_index, task.shard_count, task.attempt) == (2, 4, 3)
    assert task.job.uid == "uid-123"
    assert task.output_uri == "s3://ckpt/qa-lora/"
    # the SIGTERM checkpoint budget fits inside the local profile's 10 s notice
    assert task.checkpoint.sigterm_budget_seconds == 5


def test_pods_meet_pod_security_restricted() -> None:
    pod = _shard()
    spec = pod["spec"]
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    (c,) = spec["containers"]
    sc = c["securityContext"]
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert sc["runAsNonRoot"] is True
    assert spec["automountServiceAccountToken"] is False
    assert all("hostPath" not in v for v in spec["volumes"])


def test_pods_run_once_with_the_profiles_grace_period_and_report_failures() -> None:
    for name, profile in PROFILES.items():
        pod = _shard(name)
        assert pod["spec"]["restartPolicy"] == "Never"
        assert pod["spec"]["terminationGracePeriodSeconds"] == profile.notice_seconds
        (c,) = pod["spec"]["containers"]
        assert c["terminationMessagePolicy"] == "FallbackToLogsOnError"
        assert c["command"] == ["cheapspot", "worker"]
        assert c["image"] == "registry.example/worker:1"


def test_spot_placement_selects_spot_nodes_avoids_doomed_ones_and_prefers_instance_types() -> None:
    pod = _shard(avoid_nodes=("spot-a", "spot-b"))
    affinity = pod["spec"]["affinity"]["nodeAffinity"]
    (term,) = affinity["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
    assert term["matchExpressions"] == [
        {"key": "cheapspot.dev/capacity-type", "operator": "In", "values": ["spot"]}
    ]
    # The API server rejects a node-field requirement with more than one value.
    assert term["matchFields"] == [
        {"key": "metadata.name", "operator": "NotIn", "values": ["spot-a"]},
        {"key": "metadata.name", "operator": "NotIn", "values": ["spot-b"]},
    ]
    (pref,) = affinity["preferredDuringSchedulingIgnoredDuringExecution"]
    assert pref["preference"]["matchExpressions"][0]["values"] == ["g5.xlarge"]


def test_tolerations_short_for_lost_nodes_spot_taints_on_spot_never_the_interruption() -> None:
    tolerations = _shard("gke")["spec"]["tolerations"]
    keys = {t["key"]: t for t in tolerations}
    for key in ("node.kubernetes.io/not-ready", "node.kubernetes.io/unreachable"):
        assert keys[key]["tolerationSeconds"] == 5 and keys[key]["effect"] == "NoExecute"
    assert "cloud.google.com/gke-spot" in keys
    assert "cloud.google.com/impending-node-termination" not in keys
    on_demand = _shard("gke", CapacityType.ON_DEMAND)["spec"]["tolerations"]
    assert "cloud.google.com/gke-spot" not in {t["key"] for t in on_demand}


def test_gpu_requests_equal_limits() -> None:
    c = _shard()["spec"]["containers"][0]
    assert c["resources"]["requests"]["nvidia.com/gpu"] == "1"
    assert c["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert c["resources"]["requests"]["cpu"] == "4"


@pytest.mark.parametrize(("gpu", "expect_gpu"), [(0, False), (1, True)])
def test_the_anchor_is_on_demand_and_cpu_only_unless_asked(gpu: int, expect_gpu: bool) -> None:
    job = JobInfo("team-a", "qa-lora", "uid-123", make_job(anchor={"gpu": gpu}))
    pod = build_anchor_pod(
        job, 0, Placement(PROFILES["eks-karpenter"], CapacityType.ON_DEMAND), WORKER
    )
    assert pod["metadata"]["name"] == "qa-lora-anchor-0"
    assert pod["metadata"]["labels"]["cheapspot.dev/role"] == "anchor"
    assert "cheapspot.dev/shard" not in pod["metadata"]["labels"]
    term = pod["spec"]["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert term["nodeSelectorTerms"][0]["matchExpressions"][0] == {
        "key": "karpenter.sh/capacity-type",
        "operator": "In",
        "values": ["on-demand"],
    }
    requests = pod["spec"]["containers"][0]["resources"]["requests"]
    assert ("nvidia.com/gpu" in requests) is expect_gpu
    assert _task(pod).role is Role.ANCHOR


def test_worker_env_and_secret_reference_never_inline_credentials() -> None:
    worker = WORKER.model_copy(update={"env_from_secret": "store-keys"})
    pod = build_shard_pod(_job(), 0, 0, Placement(PROFILES["local"], CapacityType.SPOT), worker)
    c = pod["spec"]["containers"][0]
    assert c["envFrom"] == [{"secretRef": {"name": "store-keys"}}]
    names = [e["name"] for e in c["env"]]
    assert "AWS_REGION" in names and "AWS_SECRET_ACCESS_KEY" not in names
    json.dumps(pod)  # plain JSON, ready for the API server


def test_ack_selects_spot_by_strategy_and_on_demand_by_nospot_or_absence() -> None:
    ack = PROFILES["ack"]
    assert (
        ack.capacity_of({"node.alibabacloud.com/spot-strategy": "SpotAsPriceGo"})
        is CapacityType.SPOT
    )
    assert (
        ack.capacity_of({"node.alibabacloud.com/spot-strategy": "NoSpot"}) is CapacityType.ON_DEMAND
    )
    assert ack.capacity_of({}) is CapacityType.ON_DEMAND
    pod = _shard("ack", CapacityType.ON_DEMAND)
    terms = pod["spec"]["affinity"]["nodeAffinity"][
        "requiredDuringSchedulingIgnoredDuringExecution"
    ]
    assert len(terms["nodeSelectorTerms"]) == 2  # NoSpot, or no label at all


@pytest.mark.parametrize(
    ("profile", "labels", "capacity"),
    [
        ("eks-karpenter", {"karpenter.sh/capacity-type": "spot"}, CapacityType.SPOT),
        ("eks-karpenter", {"karpenter.sh/capacity-type": "on-demand"}, CapacityType.ON_DEMAND),
        ("eks-managed", {"eks.amazonaws.com/capacityType": "SPOT"}, CapacityType.SPOT),
        ("eks-managed", {"eks.amazonaws.com/capacityType": "ON_DEMAND"}, CapacityType.ON_DEMAND),
        ("gke", {"cloud.google.com/gke-spot": "true"}, CapacityType.SPOT),
        ("gke", {}, CapacityType.ON_DEMAND),
        ("local", {"cheapspot.dev/capacity-type": "spot"}, CapacityType.SPOT),
        ("local", {}, None),
    ],
)
def test_profiles_read_capacity_from_node_labels(
    profile: str, labels: dict[str, str], capacity: CapacityType | None
) -> None:
    assert PROFILES[profile].capacity_of(labels) is capacity


def test_the_scratch_volume_has_the_size_limit_the_spec_gives() -> None:
    pod = build_shard_pod(
        _job(resources={"gpu": 1, "scratchSize": "40Gi"}),
        0,
        0,
        Placement(PROFILES["local"], CapacityType.SPOT),
        WORKER,
    )
    (volume,) = pod["spec"]["volumes"]
    assert volume == {"name": "tmp", "emptyDir": {"sizeLimit": "40Gi"}}
    default = _shard()["spec"]["volumes"][0]
    assert default["emptyDir"]["sizeLimit"]  # never unbounded


def test_training_pods_ask_autoscalers_not_to_consolidate_their_nodes() -> None:
    for pod in (
        _shard(),
        build_anchor_pod(_job(), 0, Placement(PROFILES["local"], CapacityType.ON_DEMAND), WORKER),
    ):
        annotations = pod["metadata"]["annotations"]
        assert annotations["karpenter.sh/do-not-disrupt"] == "true"
        assert annotations["cluster-autoscaler.kubernetes.io/safe-to-evict"] == "false"


def test_the_spec_priority_class_wins_over_the_operator_default() -> None:
    placement = Placement(PROFILES["local"], CapacityType.SPOT)
    worker = WorkerSettings(image="w:1", priorityClass="batch-low")
    assert (
        build_shard_pod(_job(), 0, 0, placement, worker)["spec"]["priorityClassName"] == "batch-low"
    )
    pod = build_shard_pod(_job(priorityClassName="training-high"), 0, 0, placement, worker)
    assert pod["spec"]["priorityClassName"] == "training-high"
    assert "priorityClassName" not in build_shard_pod(_job(), 0, 0, placement, WORKER)["spec"]

"""The local cluster against its REAL control plane: scheduler placement, reclaims evicted by
Kubernetes' own controllers, and a clean shutdown."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cheapspot_localcluster import cli, versions
from cheapspot_localcluster.cluster import LocalCluster
from cheapspot_localcluster.components import Ports
from cheapspot_localcluster.processes import process_alive
from cheapspot_localcluster.waiting import wait_for

CAPACITY = "cheapspot.dev/capacity-type"
NS = "default"


def make_pod(capacity_type: str, gpus: int = 1, name: str | None = None) -> dict[str, Any]:
    """A pod that must run on ``capacity_type`` nodes, with the short not-ready/unreachable
    tolerations cheapspot's own pods carry."""
    resources = {"limits": {"nvidia.com/gpu": str(gpus)}} if gpus else {}
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name or f"probe-{uuid.uuid4().hex[:8]}", "namespace": NS},
        "spec": {
            "restartPolicy": "Never",
            "terminationGracePeriodSeconds": 5,
            "affinity": {
                "nodeAffinity": {
                    "requiredDuringSchedulingIgnoredDuringExecution": {
                        "nodeSelectorTerms": [
                            {
                                "matchExpressions": [
                                    {"key": CAPACITY, "operator": "In", "values": [capacity_type]}
                                ]
                            }
                        ]
                    }
                }
            },
            "tolerations": [
                {
                    "key": "node.kubernetes.io/not-ready",
                    "operator": "Exists",
                    "effect": "NoExecute",
                    "tolerationSeconds": 5,
                },
                {
                    "key": "node.kubernetes.io/unreachable",
                    "operator": "Exists",
                    "effect": "NoExecute",
                    "tolerationSeconds": 5,
                },
            ],
            "containers": [
                {"name": "main", "image": "cheapspot/worker:test", "resources": resources}
            ],
        },
    }


def read_pod(core: Any, name: str) -> Any | None:
    from kubernetes.client.exceptions import ApiException

    try:
        return core.read_namespaced_pod(name, NS)
    except ApiException as exc:
        if exc.status == 404:
            return None
        raise


def running_on(core: Any, name: str) -> str | None:
    pod = read_pod(core, name)
    if pod and pod.status.phase == "Running" and pod.spec.node_name:
        return str(pod.spec.node_name)
    return None


def node_capacity_type(core: Any, node: str) -> str:
    return str(core.read_node(node).metadata.labels[CAPACITY])


@pytest.fixture
def cluster(local_cluster: LocalCluster) -> Iterator[LocalCluster]:
    """The session cluster, with all spot capacity given back after each test."""
    yield local_cluster
    local_cluster.spot_on()


def test_api_server_reports_the_built_version(cluster: LocalCluster) -> None:
    assert cluster.version() == versions.KUBERNETES_VERSION


def test_gpu_pod_with_spot_affinity_runs_on_a_spot_node(cluster: LocalCluster) -> None:
    core = cluster.core()
    pod = make_pod("spot")
    core.create_namespaced_pod(NS, pod)
    node = wait_for("the pod to run", lambda: running_on(core, pod["metadata"]["name"]))
    assert node_capacity_type(core, node) == "spot"
    assert core.read_node(node).status.allocatable["nvidia.com/gpu"] == "1"
    core.delete_namespaced_pod(pod["metadata"]["name"], NS)


def test_on_demand_pods_never_land_on_spot(cluster: LocalCluster) -> None:
    core = cluster.core()
    pods = [make_pod("on-demand", gpus=0) for _ in range(4)]
    for pod in pods:
        core.create_namespaced_pod(NS, pod)
    for pod in pods:
        node = wait_for(
            "an on-demand pod to run", lambda p=pod: running_on(core, p["metadata"]["name"])
        )
        assert node_capacity_type(core, node) == "on-demand"
        core.delete_namespaced_pod(pod["metadata"]["name"], NS)


def test_preempt_taints_first_then_the_real_controllers_evict(cluster: LocalCluster) -> None:
    core = cluster.core()
    pod = make_pod("spot")
    name = pod["metadata"]["name"]
    core.create_namespaced_pod(NS, pod)
    node = wait_for("the pod to run", lambda: running_on(core, name))

    reclaim = cluster.preempt_in_background(node, notice_s=4)

    def tainted() -> bool:
        taints = core.read_node(node).spec.taints or []
        return any(t.key == "cheapspot.dev/interruption" for t in taints)

    wait_for("the interruption taint", tainted, timeout_s=20)
    # The notice comes first: the pod is still running, not yet being deleted.
    during_notice = read_pod(core, name)
    assert during_notice is not None and during_notice.metadata.deletion_timestamp is None
    assert during_notice.status.phase == "Running"

    # Then Kubernetes' controllers act: the node is lost, the pod evicted and collected.
    wait_for("the pod to go", lambda: read_pod(core, name) is None, timeout_s=90, poll_s=0.5)
    reclaim.result(timeout=60)
    events = core.list_namespaced_event(NS, field_selector=f"involvedObject.name={name}").items
    reasons = {e.reason for e in events}
    assert reasons & {"TaintManagerEviction"}, reasons
    assert node not in {n.metadata.name for n in core.list_node().items}


def test_spot_off_leaves_spot_pods_pending_until_spot_is_back(cluster: LocalCluster) -> None:
    core = cluster.core()
    gone = cluster.spot_off()
    assert gone and cluster.spot_nodes() == []
    pod = make_pod("spot")
    name = pod["metadata"]["name"]
    core.create_namespaced_pod(NS, pod)

    def unschedulable() -> bool:
        p = read_pod(core, name)
        conds = (p.status.conditions or []) if p else []
        return any(c.type == "PodScheduled" and c.reason == "Unschedulable" for c in conds)

    wait_for("the scheduler to report the spot pod unschedulable", unschedulable, timeout_s=30)
    assert sorted(cluster.spot_on()) == sorted(gone)
    node = wait_for(
        "the pod to run once spot is back", lambda: running_on(core, name), timeout_s=90
    )
    assert node_capacity_type(core, node) == "spot"
    core.delete_namespaced_pod(name, NS)


def test_down_leaves_no_process(tmp_path: Path) -> None:
    pools = tmp_path / "pools.yaml"
    pools.write_text(
        "profile: local\npools:\n"
        "  - {name: one, capacityType: spot, instanceType: t, zones: [z], capacity: {cpu: '1', memory: 1Gi}}\n"
    )
    second = LocalCluster(
        name="cheapspot-down-test",
        state_dir=tmp_path / "state",
        ports=Ports.free(),
        pools_file=pools,
        with_s3=True,
        die_with_parent=True,
    )
    second.start()
    pids = second.running()
    assert set(pids) == {
        "etcd",
        "kube-apiserver",
        "kube-controller-manager",
        "kube-scheduler",
        "kwok",
        "s3",
    }
    # `cheapspot down`, the way a user stops a cluster from another shell.
    assert cli.down_main(["--state-dir", str(tmp_path / "state")]) == 0
    second.stop()  # reaps our own children (a CLI `up` would have left them to init)
    assert not [name for name, pid in pids.items() if process_alive(pid)]

"""The router's view of a pool against the real API server: replica pods appear when Ready,
turn draining the moment the operator annotates them, and vanish when deleted."""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from cheapspot.contract import ANNOTATION_DRAINING, LABEL_POOL, LABEL_POOL_ROLE, LABEL_REPLICA
from cheapspot_localcluster.cluster import LocalCluster
from cheapspot_operator.router.replicas import ReplicaSet, watch_pods
from cheapspot_operator.router.routing import Load, choose
from cheapspot_operator.runtime.kubeapi import KubeApi

NS = "default"


def replica_pod(pool: str, name: str, index: int) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "namespace": NS,
            "labels": {LABEL_POOL: pool, LABEL_POOL_ROLE: "replica", LABEL_REPLICA: str(index)},
        },
        "spec": {
            # never scheduled: this test plays the kubelet's part in the pod's status
            "nodeSelector": {"cheapspot.dev/test": "nowhere"},
            "terminationGracePeriodSeconds": 0,
            "containers": [{"name": "vllm", "image": "unused"}],
        },
    }


@pytest.fixture
def watched(local_cluster: LocalCluster) -> Iterator[tuple[ReplicaSet, KubeApi, str]]:
    pool = f"pool-{uuid.uuid4().hex[:6]}"
    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True).start()
    replicas = asyncio.run_coroutine_threadsafe(_make_replicas(), loop).result(10)
    stop = threading.Event()
    kubeconfig = str(local_cluster.kubeconfig_path)
    thread = threading.Thread(
        target=watch_pods,
        args=(replicas, loop, NS, pool, stop),
        kwargs={"kubeconfig": kubeconfig},
        daemon=True,
    )
    thread.start()
    api = KubeApi.from_config(kubeconfig)
    try:
        yield replicas, api, pool
    finally:
        stop.set()
        for pod in api.list(f"/api/v1/namespaces/{NS}/pods", f"{LABEL_POOL}={pool}"):
            api.delete(f"/api/v1/namespaces/{NS}/pods/{pod['metadata']['name']}", 0)
        thread.join(40)
        loop.call_soon_threadsafe(loop.stop)


async def _make_replicas() -> ReplicaSet:
    return ReplicaSet(capacity=4)


def _until(check: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


def _ready(api: KubeApi, name: str, ip: str) -> None:
    api.merge_patch(
        f"/api/v1/namespaces/{NS}/pods/{name}/status",
        {
            "status": {
                "phase": "Running",
                "podIP": ip,
                "podIPs": [{"ip": ip}],
                "conditions": [{"type": "Ready", "status": "True"}],
            }
        },
    )


def test_router_follows_replica_pods(watched: tuple[ReplicaSet, KubeApi, str]) -> None:
    replicas, api, pool = watched
    pods = f"/api/v1/namespaces/{NS}/pods"
    api.create(pods, replica_pod(pool, f"{pool}-0", 0))
    api.create(pods, replica_pod(pool, f"{pool}-1", 1))
    # an unrelated pod of another pool is never a replica here
    api.create(pods, replica_pod(pool + "x", f"{pool}x-0", 0))
    try:
        time.sleep(1.0)
        assert replicas.by_name == {}, "a pod without an IP is nobody to send to"
        _ready(api, f"{pool}-0", "127.0.0.41")
        _ready(api, f"{pool}-1", "127.0.0.42")
        _until(
            lambda: (
                {n for n, r in replicas.by_name.items() if r.usable} == {f"{pool}-0", f"{pool}-1"}
            ),
            "ready replicas not seen",
        )
        assert replicas.by_name[f"{pool}-0"].url == "http://127.0.0.41:8000"

        started = time.monotonic()
        api.merge_patch(
            f"{pods}/{pool}-0",
            {"metadata": {"annotations": {ANNOTATION_DRAINING: "2030-01-01T00:00:00Z"}}},
        )
        _until(lambda: replicas.by_name[f"{pool}-0"].draining, "draining not seen")
        seen_after = time.monotonic() - started
        assert seen_after < 5, f"the router saw the drain after {seen_after:.1f}s"
        for _ in range(5):
            chosen = choose(replicas.by_name.values(), "qa", Load(), capacity=4)
            assert chosen is not None and chosen.name == f"{pool}-1"

        api.delete(f"{pods}/{pool}-0", 0)
        _until(lambda: f"{pool}-0" not in replicas.by_name, "deletion not seen")
        assert set(replicas.by_name) == {f"{pool}-1"}
    finally:
        api.delete(f"{pods}/{pool}x-0", 0)

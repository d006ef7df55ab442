"""The node LIST shared by every reconcile: reused within its time to live, never across a
node change the watch reported."""

from __future__ import annotations

import builtins
import threading
import time
from typing import Any

from cheapspot_operator.runtime.nodelist import NODES_PATH, PODS_PATH, SharedNodeList


class FakeApi:
    def __init__(self) -> None:
        self.calls = 0
        self.pod_lists = 0
        self.version = 0
        self.during_list: Any = None

    def list(
        self, path: str, label_selector: str | None = None, field_selector: str | None = None
    ) -> list[dict[str, Any]]:
        if path == PODS_PATH:
            self.pod_lists += 1
            gpu = {"requests": {"nvidia.com/gpu": str(self.version + 1)}}
            return [{"spec": {"nodeName": "n", "containers": [{"resources": gpu}]}}]
        assert path == NODES_PATH
        self.calls += 1
        if self.during_list is not None:
            self.during_list()
        return [{"metadata": {"name": "n", "resourceVersion": str(self.version)}}]

    def list_versioned(
        self, path: str, label_selector: str | None = None, field_selector: str | None = None
    ) -> tuple[builtins.list[dict[str, Any]], int]:
        return self.list(path, label_selector, field_selector), self.version


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _version(nodes: Any) -> str:
    return str(nodes[0]["metadata"]["resourceVersion"])


def test_one_list_serves_every_reconcile_within_its_time_to_live() -> None:
    api, clock = FakeApi(), Clock()
    nodes = SharedNodeList(api, ttl=1.0, clock=clock)
    for _ in range(50):
        nodes.get()
    assert api.calls == 1 and nodes.lists == 1
    clock.now += 1.0
    api.version = 1
    assert _version(nodes.get()) == "1"
    assert api.calls == 2


def test_a_node_change_is_read_by_the_next_reconcile_at_once() -> None:
    api, clock = FakeApi(), Clock()
    nodes = SharedNodeList(api, ttl=60.0, clock=clock)
    nodes.get()
    api.version = 1  # a taint: the watch sees it and invalidates before waking the loops
    nodes.invalidate()
    assert _version(nodes.get()) == "1"
    assert api.calls == 2


def test_a_list_that_began_before_a_change_is_not_reused_after_it() -> None:
    api, clock = FakeApi(), Clock()
    nodes = SharedNodeList(api, ttl=60.0, clock=clock)
    api.during_list = nodes.invalidate  # the change lands while the LIST is on the wire
    nodes.get()
    api.during_list = None
    api.version = 1
    assert _version(nodes.get()) == "1"
    assert api.calls == 2


def test_no_time_to_live_lists_every_time() -> None:
    api = FakeApi()
    nodes = SharedNodeList(api, ttl=0)
    nodes.get()
    nodes.get()
    assert api.calls == 2


def test_reconciles_asking_together_share_one_list() -> None:
    api = FakeApi()
    api.during_list = lambda: time.sleep(0.05)
    nodes = SharedNodeList(api, ttl=5.0)
    threads = [threading.Thread(target=nodes.get) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(5)
    assert api.calls == 1


def test_what_pods_request_on_each_node_is_one_pod_list_for_jobs_and_pools() -> None:
    api, clock = FakeApi(), Clock()
    nodes = SharedNodeList(api, ttl=0, clock=clock, usage_ttl=2.0)
    first = nodes.usage()
    assert nodes.usage() is first and api.pod_lists == 1
    assert first["n"]["nvidia.com/gpu"] == 1.0
    clock.now += 2.0
    api.version = 1
    assert nodes.usage()["n"]["nvidia.com/gpu"] == 2.0
    assert api.pod_lists == 2


def _node(name: str, version: int, taints: list[str] = ()) -> dict[str, Any]:  # type: ignore[assignment]
    return {
        "metadata": {"name": name, "resourceVersion": str(version)},
        "spec": {"taints": [{"key": k, "effect": "NoSchedule"} for k in taints]},
        "status": {"conditions": [{"type": "Ready", "status": "True"}]},
    }


def test_a_watched_list_is_listed_once_and_then_fed_by_the_watch() -> None:
    api, clock = FakeApi(), Clock()
    nodes = SharedNodeList(api, clock=clock, resync=300)
    nodes.watch()
    nodes.observe(None, _node("m", 1))
    assert {n["metadata"]["name"] for n in nodes.get()} == {"m", "n"}  # primed: one LIST
    nodes.observe("MODIFIED", _node("m", 2, ["cheapspot.dev/interruption"]))
    for _ in range(20):
        views = nodes.views()
    assert api.calls == 1
    assert views["m"].taint_keys == {"cheapspot.dev/interruption"}
    nodes.observe("DELETED", _node("m", 3))
    assert set(nodes.views()) == {"n"}
    clock.now += 300
    nodes.get()
    assert api.calls == 2  # the resync


def test_a_node_view_is_made_once_per_version_unless_pods_use_the_node() -> None:
    api = FakeApi()
    nodes = SharedNodeList(api)
    nodes.watch()
    first = nodes.views()["n"]
    assert nodes.views()["n"] is first
    used = nodes.views({"n": {"nvidia.com/gpu": 1.0}})["n"]
    assert used.requested == {"nvidia.com/gpu": 1.0} and first.requested == {}
    nodes.observe("MODIFIED", _node("n", 5, ["cheapspot.dev/interruption"]))
    assert nodes.views()["n"] is not first


def test_the_views_are_computed_again_only_after_a_change_a_view_shows() -> None:
    api = FakeApi()
    nodes = SharedNodeList(api)
    nodes.watch()
    nodes.observe("ADDED", _node("m", 1))
    first = nodes.views()
    assert set(first) == {"m", "n"}
    nodes.observe("MODIFIED", _node("m", 2))  # a heartbeat: a new version, the same view
    assert nodes.views() is first
    nodes.observe("MODIFIED", _node("m", 3, ["cheapspot.dev/interruption"]))
    second = nodes.views()
    assert second is not first and second["m"].taint_keys == {"cheapspot.dev/interruption"}
    nodes.observe("DELETED", _node("m", 4))
    assert set(nodes.views()) == {"n"}
    with_usage = nodes.views({"n": {"nvidia.com/gpu": 1.0}})
    assert with_usage["n"].requested == {"nvidia.com/gpu": 1.0}
    assert nodes.views()["n"].requested == {}

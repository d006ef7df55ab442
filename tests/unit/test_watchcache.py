"""The watch-fed object cache: newest version wins, deletions stick, LISTs merge."""

from __future__ import annotations

from typing import Any

from cheapspot_operator.runtime.watchcache import Primed, WatchCache


def pod(name: str, version: int, job: str = "a", namespace: str = "ns") -> dict[str, Any]:
    return {
        "metadata": {
            "name": name,
            "namespace": namespace,
            "resourceVersion": str(version),
            "labels": {"cheapspot.dev/job": job},
        }
    }


def test_an_older_event_never_replaces_a_newer_object() -> None:
    c = WatchCache()
    c.observe("MODIFIED", pod("p", 5) | {"status": {"phase": "Running"}})
    c.observe("MODIFIED", pod("p", 3) | {"status": {"phase": "Pending"}})
    held = c.get("ns", "p")
    assert held is not None and held["status"]["phase"] == "Running"


def test_a_deleted_object_is_not_brought_back_by_a_late_event_but_a_new_one_is_taken() -> None:
    c = WatchCache()
    c.observe(None, pod("p", 5))
    c.observe("DELETED", pod("p", 7))
    c.observe("MODIFIED", pod("p", 6))
    assert c.get("ns", "p") is None
    c.observe("ADDED", pod("p", 9))  # re-created under the same name
    assert c.get("ns", "p") is not None


def test_a_list_drops_what_was_deleted_before_it_and_keeps_what_came_after() -> None:
    c = WatchCache(group_label="cheapspot.dev/job")
    c.observe(None, pod("old", 3))
    c.observe(None, pod("new", 12))
    c.observe(None, pod("other-ns", 3, namespace="elsewhere"))
    c.merge_list("ns", [pod("listed", 8)], list_version=10)
    assert [p["metadata"]["name"] for p in c.group("ns", "a")] == ["listed", "new"]
    assert c.get("elsewhere", "other-ns") is not None  # another namespace's LIST: untouched


def test_groups_follow_the_label() -> None:
    c = WatchCache(group_label="cheapspot.dev/job")
    c.observe(None, pod("p", 1, job="a"))
    c.observe(None, pod("q", 1, job="a"))
    c.observe("MODIFIED", pod("p", 2, job="b"))
    assert [p["metadata"]["name"] for p in c.group("ns", "a")] == ["q"]
    assert [p["metadata"]["name"] for p in c.group("ns", "b")] == ["p"]
    c.observe("DELETED", pod("q", 3))
    assert c.group("ns", "a") == []


def test_versions_that_are_not_integers_are_simply_taken() -> None:
    c = WatchCache()
    c.observe(None, pod("p", 5))
    odd = pod("p", 0)
    odd["metadata"]["resourceVersion"] = "opaque"
    c.observe("MODIFIED", odd)
    held = c.get("ns", "p")
    assert held is not None and held["metadata"]["resourceVersion"] == "opaque"


def test_a_namespace_is_listed_once_then_again_after_the_resync() -> None:
    now = [0.0]
    primed = Primed(resync=300, clock=lambda: now[0])
    listed: list[float] = []
    for t in (0.0, 1.0, 299.0, 300.0, 301.0):
        now[0] = t
        primed.prime("ns", lambda: listed.append(now[0]))
    assert listed == [0.0, 300.0]
    assert primed.lists == 2

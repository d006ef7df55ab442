"""Both kinds' test worlds delete a pod as the API server does: at once when there is no grace
period, no kubelet to wait for (unbound) or nothing left to stop (ended); otherwise the pod stays,
terminating, until its kubelet reports it gone."""

from __future__ import annotations

from typing import Any

import pytest

from cheapspot_operator.cluster.views import PodView
from cheapspot_operator.planning.actions import DeletePod
from cheapspot_operator.testing.pool import PoolWorld, make_replica
from cheapspot_operator.testing.train import World, make_pod
from cheapspot_operator.testing.world import WorkloadWorld

CASES = [
    ("running, its grace period", {}, None, "terminating"),
    ("running, no grace period", {}, 0, "gone"),
    ("pending and bound (pulling its image)", {"phase": "Pending"}, None, "terminating"),
    ("pending, unbound", {"phase": "Pending", "node_name": ""}, None, "gone"),
    ("failed", {"phase": "Failed"}, None, "gone"),
    ("succeeded", {"phase": "Succeeded"}, None, "gone"),
    ("unknown (its node lost)", {"phase": "Unknown"}, None, "terminating"),
]


def _train(changes: dict[str, Any]) -> tuple[WorkloadWorld[Any, Any, Any], str]:
    pod = make_pod(0, **changes)
    return World(pods={pod.name: pod}), pod.name


def _pool(changes: dict[str, Any]) -> tuple[WorkloadWorld[Any, Any, Any], str]:
    rp = make_replica(0, **changes)
    return PoolWorld(pods={rp.name: rp}), rp.name


@pytest.mark.parametrize("make", [_train, _pool], ids=["train", "pool"])
@pytest.mark.parametrize(("pod", "changes", "grace", "after"), CASES, ids=[c[0] for c in CASES])
def test_a_deleted_pod_stays_terminating_only_while_a_kubelet_has_something_to_stop(
    make: Any, pod: str, changes: dict[str, Any], grace: int | None, after: str
) -> None:
    world, name = make(changes)
    world.delete(DeletePod(name, grace))
    if after == "gone":
        assert name not in world.pods
    else:
        view: PodView = world.view_of(world.pods[name])
        assert view.deleting
        assert view.phase == changes.get("phase", "Running")


def test_deleting_a_pod_that_is_gone_changes_nothing() -> None:
    world = World()
    world.delete(DeletePod("nobody"))
    assert world.pods == {}

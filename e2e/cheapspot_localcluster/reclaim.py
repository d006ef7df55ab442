"""Simulated spot reclaims, done the way a cloud does them, then left to the real controllers.

A reclaim has two halves:

1. The notice: the profile's interruption taint goes on the node (nothing for ``ack``, whose
   signal is the node going away). Workloads have ``notice`` seconds to react.
2. The machine goes away: kwok stops acting as the node's kubelet (its lease is no longer
   renewed). From here on only Kubernetes' own controllers act: the node lifecycle controller
   marks the node NotReady and taints it unreachable; we then add the
   ``node.kubernetes.io/out-of-service`` taint, the signal Kubernetes defines for "this machine
   is shut down" (non-graceful node shutdown), so the taint-eviction controller evicts the pods
   (condition ``DisruptionTarget``) and pod GC force-deletes them; finally the Node object is
   deleted, as a cloud controller does once the instance no longer exists.

The Kubernetes calls are thin; what to patch is decided by the pure ``*_patch`` functions.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from cheapspot_localcluster.nodepool import KWOK_MANAGED_LABEL
from cheapspot_localcluster.profiles import Profile, Taint

OUT_OF_SERVICE = Taint("node.kubernetes.io/out-of-service", "NoExecute", "nodeshutdown")


def with_taints(
    existing: list[dict[str, Any]] | None, add: tuple[Taint, ...]
) -> list[dict[str, Any]]:
    """``existing`` plus ``add``, without duplicating a key/effect already there."""
    taints = [dict(t) for t in existing or []]
    have = {(t.get("key"), t.get("effect")) for t in taints}
    for taint in add:
        if (taint.key, taint.effect) not in have:
            taints.append(taint.manifest())
    return taints


def taint_patch(node: dict[str, Any], add: tuple[Taint, ...]) -> dict[str, Any] | None:
    """A merge patch adding ``add`` to the node's taints, guarded by its resourceVersion so a
    concurrent change (the node lifecycle controller tainting it) is retried, not lost."""
    current = node.get("spec", {}).get("taints") or []
    wanted = with_taints(current, add)
    if wanted == current:
        return None
    return {
        "metadata": {"resourceVersion": node["metadata"]["resourceVersion"]},
        "spec": {"taints": wanted},
    }


def switch_off_patch() -> dict[str, Any]:
    """kwok manages only nodes with this label; removing it stops the simulated kubelet."""
    return {"metadata": {"labels": {KWOK_MANAGED_LABEL: None}}}


def is_ready(node: dict[str, Any]) -> bool:
    for cond in node.get("status", {}).get("conditions") or []:
        if cond.get("type") == "Ready":
            return bool(cond.get("status") == "True")
    return False


class NodeOps:
    """The Kubernetes calls a reclaim needs, over the official client's CoreV1Api."""

    def __init__(self, core: Any) -> None:
        self.core = core
        self._serialize = core.api_client.sanitize_for_serialization

    def get(self, name: str) -> dict[str, Any] | None:
        from kubernetes.client.exceptions import ApiException

        try:
            node: dict[str, Any] = self._serialize(self.core.read_node(name))
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise
        return node

    def add_taints(self, name: str, add: tuple[Taint, ...]) -> None:
        from kubernetes.client.exceptions import ApiException

        for _ in range(10):
            node = self.get(name)
            if node is None:
                raise LookupError(f"node {name!r} not found")
            patch = taint_patch(node, add)
            if patch is None:
                return
            try:
                self.core.patch_node(name, patch)
                return
            except ApiException as exc:
                if exc.status != 409:  # conflict: somebody else changed the node; retry
                    raise
        raise RuntimeError(f"could not taint node {name!r}: it keeps changing")

    def switch_off(self, name: str) -> None:
        self.core.patch_node(name, switch_off_patch())

    def pods_on(self, name: str) -> list[str]:
        """Pods still bound to the node, finished ones excepted: those stay until pod GC
        collects them as orphans once the node is deleted, as on a real cluster."""
        pods = self.core.list_pod_for_all_namespaces(field_selector=f"spec.nodeName={name}")
        return [
            f"{p.metadata.namespace}/{p.metadata.name}"
            for p in pods.items
            if (p.status.phase if p.status else None) not in ("Succeeded", "Failed")
        ]

    def delete(self, name: str) -> None:
        from kubernetes.client.exceptions import ApiException

        try:
            self.core.delete_node(name)
        except ApiException as exc:
            if exc.status != 404:
                raise


def _wait(what: str, check: Callable[[], bool], timeout_s: float, poll_s: float = 0.5) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(poll_s)
    raise TimeoutError(f"timed out after {timeout_s:.0f}s waiting for {what}")


def reclaim(
    ops: NodeOps,
    name: str,
    profile: Profile,
    notice_s: float,
    *,
    log: Callable[[str], None] = lambda _msg: None,
    timeout_s: float = 120.0,
) -> None:
    """Reclaim node ``name``: notice, then the machine goes away (see the module docstring)."""
    if ops.get(name) is None:
        raise LookupError(f"node {name!r} not found")
    if profile.interruption_taints:
        ops.add_taints(name, profile.interruption_taints)
        keys = ", ".join(t.key for t in profile.interruption_taints)
        log(f"{name}: interruption notice ({keys}), reclaimed in {notice_s:g}s")
    else:
        log(f"{name}: reclaimed in {notice_s:g}s (profile {profile.name} gives no taint)")
    time.sleep(max(0.0, notice_s))

    ops.switch_off(name)
    log(f"{name}: machine gone; waiting for the node lifecycle controller to notice")
    _wait(
        f"node {name} to become NotReady",
        lambda: not is_ready(ops.get(name) or {}),
        timeout_s,
    )
    ops.add_taints(name, (OUT_OF_SERVICE,))
    log(f"{name}: NotReady; out-of-service, waiting for its pods to be evicted and collected")
    _wait(f"pods on node {name} to go", lambda: not ops.pods_on(name), timeout_s, poll_s=1.0)
    ops.delete(name)
    log(f"{name}: node deleted")

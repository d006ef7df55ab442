"""Reclaim decisions and the nodes table, on plain Node dictionaries."""

from __future__ import annotations

from typing import Any

from cheapspot_localcluster.nodepool import KWOK_MANAGED_LABEL, build_node, expand, load_pool_file
from cheapspot_localcluster.profiles import PROFILES, Taint
from cheapspot_localcluster.reclaim import is_ready, switch_off_patch, taint_patch, with_taints
from cheapspot_localcluster.table import node_rows


def make_node(taints: list[dict[str, str]] | None = None, ready: str = "True") -> dict[str, Any]:
    node = build_node(expand(load_pool_file())[0])
    node["metadata"]["resourceVersion"] = "42"
    node["spec"] = {"taints": taints} if taints is not None else {}
    node["status"]["conditions"] = [{"type": "Ready", "status": ready}]
    return node


def test_interruption_taint_is_added_once_and_guarded_by_resource_version() -> None:
    local = PROFILES["local"]
    patch = taint_patch(make_node(), local.interruption_taints)
    assert patch == {
        "metadata": {"resourceVersion": "42"},
        "spec": {"taints": [{"key": "cheapspot.dev/interruption", "effect": "NoSchedule"}]},
    }
    already = make_node(taints=patch["spec"]["taints"])
    assert taint_patch(already, local.interruption_taints) is None


def test_existing_taints_are_kept() -> None:
    unreachable = {"key": "node.kubernetes.io/unreachable", "effect": "NoExecute"}
    taints = with_taints(
        [unreachable], (Taint("node.kubernetes.io/out-of-service", "NoExecute", "nodeshutdown"),)
    )
    assert taints[0] == unreachable
    assert taints[1]["value"] == "nodeshutdown"


def test_switching_a_node_off_removes_the_kwok_label() -> None:
    assert switch_off_patch() == {"metadata": {"labels": {KWOK_MANAGED_LABEL: None}}}


def test_readiness_and_table_rows() -> None:
    assert is_ready(make_node())
    assert not is_ready(make_node(ready="Unknown"))
    (row,) = node_rows(
        [make_node(taints=[{"key": "cheapspot.dev/interruption", "effect": "NoSchedule"}])],
        PROFILES["local"],
    )
    assert (row.capacity_type, row.zone, row.instance_type, row.gpus) == (
        "spot",
        "zone-a",
        "g5.xlarge",
        "1",
    )
    assert row.taints == ("cheapspot.dev/interruption:NoSchedule",)

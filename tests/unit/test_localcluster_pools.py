"""Node-pool files: the default pools, profile labels, and errors that name the bad field."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from cheapspot_localcluster.nodepool import (
    KWOK_MANAGED_LABEL,
    PoolFileError,
    build_node,
    expand,
    load_pool_file,
    parse_pool_file,
)
from cheapspot_localcluster.profiles import CapacityType


def make_pools(**pool_overrides: Any) -> dict[str, Any]:
    pool: dict[str, Any] = {
        "name": "spot-gpu",
        "capacityType": "spot",
        "instanceType": "g5.xlarge",
        "zones": ["zone-a"],
        "countPerZone": 1,
        "capacity": {"cpu": "4", "memory": "16Gi", "nvidia.com/gpu": 1},
    }
    pool.update(pool_overrides)
    return {"profile": "local", "pools": [pool]}


def test_default_pools_have_spot_and_on_demand_gpus_in_two_zones_and_a_cpu_node() -> None:
    nodes = expand(load_pool_file())
    spot_gpu = [n for n in nodes if n.capacity_type is CapacityType.SPOT and n.gpus > 0]
    od_gpu = [n for n in nodes if n.capacity_type is CapacityType.ON_DEMAND and n.gpus > 0]
    od_cpu = [n for n in nodes if n.capacity_type is CapacityType.ON_DEMAND and n.gpus == 0]
    assert {n.zone for n in spot_gpu} == {"zone-a", "zone-b"}
    assert {n.zone for n in od_gpu} == {"zone-a", "zone-b"}
    assert len(od_cpu) == 1
    assert len({n.name for n in nodes}) == len(nodes)


def test_local_profile_node_manifest() -> None:
    node = build_node(expand(parse_pool_file(make_pools()))[0])
    labels = node["metadata"]["labels"]
    assert labels["cheapspot.dev/capacity-type"] == "spot"
    assert labels["node.kubernetes.io/instance-type"] == "g5.xlarge"
    assert labels["topology.kubernetes.io/zone"] == "zone-a"
    assert labels[KWOK_MANAGED_LABEL] == "true"
    assert node["status"]["capacity"]["nvidia.com/gpu"] == "1"
    assert node["status"]["allocatable"]["pods"] == "110"


@pytest.mark.parametrize(
    ("profile", "capacity", "label", "value"),
    [
        ("eks-karpenter", "spot", "karpenter.sh/capacity-type", "spot"),
        ("eks-karpenter", "on-demand", "karpenter.sh/capacity-type", "on-demand"),
        ("eks-managed", "spot", "eks.amazonaws.com/capacityType", "SPOT"),
        ("eks-managed", "on-demand", "eks.amazonaws.com/capacityType", "ON_DEMAND"),
        ("ack", "on-demand", "node.alibabacloud.com/spot-strategy", "NoSpot"),
        ("gke", "spot", "cloud.google.com/gke-spot", "true"),
    ],
)
def test_profiles_label_nodes_like_their_cloud(
    profile: str, capacity: str, label: str, value: str
) -> None:
    data = make_pools(capacityType=capacity)
    data["profile"] = profile
    (node,) = expand(parse_pool_file(data))
    assert node.labels[label] == value
    assert "cheapspot.dev/capacity-type" not in node.labels


def test_gke_on_demand_nodes_carry_no_spot_label() -> None:
    data = make_pools(capacityType="on-demand")
    data["profile"] = "gke"
    (node,) = expand(parse_pool_file(data))
    assert "cloud.google.com/gke-spot" not in node.labels


@pytest.mark.parametrize(
    ("overrides", "field", "words"),
    [
        ({"capacityType": "spotty"}, "pools[0].capacityType", "spot"),
        ({"capacity": {"cpu": "4"}}, "pools[0].capacity", "memory"),
        ({"capacity": {"cpu": "four", "memory": "1Gi"}}, "pools[0].capacity", "quantity"),
        ({"zones": []}, "pools[0].zones", "at least 1"),
        ({"name": "Spot_GPU"}, "pools[0].name", "DNS label"),
        ({"countPerZone": -1}, "pools[0].countPerZone", "greater than or equal"),
        ({"gpus": 1}, "pools[0].gpus", "Extra inputs"),
    ],
)
def test_bad_pool_field_is_named(overrides: dict[str, Any], field: str, words: str) -> None:
    with pytest.raises(PoolFileError) as info:
        parse_pool_file(make_pools(**overrides), "pools.yaml")
    message = str(info.value)
    assert message.startswith("pools.yaml: invalid node-pool file")
    assert f"{field}: " in message
    assert words in message


def test_unknown_profile_and_duplicate_pools_are_errors() -> None:
    data = make_pools()
    data["profile"] = "azure"
    with pytest.raises(PoolFileError, match=r"profile: "):
        parse_pool_file(data)
    data = make_pools()
    data["pools"] = data["pools"] * 2
    with pytest.raises(PoolFileError, match="repeated: spot-gpu"):
        parse_pool_file(data)


def test_unreadable_and_invalid_yaml_files(tmp_path: Path) -> None:
    with pytest.raises(PoolFileError, match="cannot read"):
        load_pool_file(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("pools: [unclosed\n")
    with pytest.raises(PoolFileError, match="not valid YAML"):
        load_pool_file(bad)

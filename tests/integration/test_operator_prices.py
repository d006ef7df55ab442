"""Live prices in the running operator: EC2 spot prices from the EC2 API (moto's server over
HTTP: its prices are fake, so this checks plumbing, not values), the Pricing API failing
(moto has none) and degrading to the table with a warning event, the last known good kept in
a ConfigMap, and a job's cost naming the live source."""

from __future__ import annotations

import contextlib
import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from operator_harness import Harness, make_harness, wait_for

from cheapspot_operator.api.common import CapacityType
from cheapspot_operator.pricing.table import default_prices
from cheapspot_operator.runtime.kubeapi import ApiError, KubeApi

NODE = "spot-priced-us-east-1a"


@pytest.fixture
def home(local_cluster: Any) -> Iterator[str]:
    """The operator's own namespace (the chart's release namespace): where the ConfigMap
    and its events go."""
    api = KubeApi(local_cluster.api_client())
    namespace = f"op-{uuid.uuid4().hex[:8]}"
    api.create("/api/v1/namespaces", {"metadata": {"name": namespace}})
    yield namespace
    with contextlib.suppress(ApiError):
        api.delete(f"/api/v1/namespaces/{namespace}")


@pytest.fixture
def h(local_cluster: Any, s3_endpoint: Any, tmp_path: Path, home: str) -> Iterator[Harness]:
    pricing = {
        "provider": "aws",
        "region": "us-east-1",
        "checkSeconds": 1,
        "retrySeconds": 5,
        "namespace": home,
    }
    yield from make_harness(local_cluster, s3_endpoint, tmp_path, pricing=pricing)


@pytest.fixture
def priced_zone_only(h: Harness) -> Iterator[None]:
    """One spot node in a zone EC2 quotes (the pool file's zones are made up); the other spot
    nodes cordoned, so the job's shard lands there."""
    spot = [
        n
        for n in h.api.list("/api/v1/nodes")
        if n["metadata"]["labels"].get("cheapspot.dev/capacity-type") == "spot"
    ]
    template = spot[0]
    labels = dict(template["metadata"]["labels"])
    labels.update(
        {
            "kubernetes.io/hostname": NODE,
            "topology.kubernetes.io/zone": "us-east-1a",
            "node.kubernetes.io/instance-type": "g5.xlarge",
        }
    )
    allocatable = template["status"]["allocatable"]
    h.api.create(
        "/api/v1/nodes",
        {
            "metadata": {
                "name": NODE,
                "labels": labels,
                "annotations": {"kwok.x-k8s.io/node": "fake"},
            },
            "status": {"capacity": allocatable, "allocatable": allocatable},
        },
    )
    for n in spot:
        h.api.merge_patch(
            f"/api/v1/nodes/{n['metadata']['name']}", {"spec": {"unschedulable": True}}
        )
    try:
        yield
    finally:
        for n in spot:
            with contextlib.suppress(ApiError):
                h.api.merge_patch(
                    f"/api/v1/nodes/{n['metadata']['name']}", {"spec": {"unschedulable": False}}
                )
        with contextlib.suppress(ApiError):
            h.api.delete(f"/api/v1/nodes/{NODE}", 0)


def test_live_spot_prices_reach_the_configmap_and_the_jobs_cost(
    h: Harness, home: str, priced_zone_only: None
) -> None:
    cm_path = f"/api/v1/namespaces/{home}/configmaps/cheapspot-prices"

    def kept() -> dict[str, Any] | None:
        data = (h.api.get(cm_path) or {}).get("data") or {}
        raw = data.get("g5.xlarge.spot.us-east-1a")
        return json.loads(raw) if raw else None

    quote = wait_for("the spot price kept in the ConfigMap", kept, timeout_s=60)
    assert quote["source"] == "aws-ec2-spot" and quote["usdPerHour"] > 0

    def warned() -> dict[str, Any] | None:
        return next(
            (
                e
                for e in h.api.list(f"/api/v1/namespaces/{home}/events")
                if e["involvedObject"].get("kind") == "ConfigMap"
                and e["reason"] == "PriceSourceUnavailable"
            ),
            None,
        )

    event = wait_for("a warning about the Pricing API", warned, timeout_s=30)
    assert event["type"] == "Warning" and event["message"].startswith("aws-pricing: ")

    h.apply("priced", shards=1)
    wait_for("the shard on the priced node", lambda: _shard_node(h) == NODE, timeout_s=60)

    def cost() -> dict[str, Any] | None:
        c = h.status("priced").get("cost") or {}
        live = "aws-ec2-spot" in (c.get("sources") or [])
        return c if live and c.get("spotSeconds", 0) > 0 else None

    c = wait_for("the job's cost from the live spot price", cost, timeout_s=60)
    # The anchor's on-demand node has no live price (the Pricing API failed): the table, and
    # the figure says it is estimated.
    assert "table" in c["sources"] and c["estimated"] is True
    # moto's spot price is $0.00001/h: far below the table's, so the shard was priced live.
    table_spot = default_prices().hourly("g5.xlarge", CapacityType.SPOT)
    assert c["spotDollars"] < table_spot * c["spotSeconds"] / 3600 / 10


def _shard_node(h: Harness) -> str | None:
    for p in h.live_pods("priced"):
        if p["metadata"]["labels"].get("cheapspot.dev/role") == "train":
            return str(p["spec"].get("nodeName") or "") or None
    return None

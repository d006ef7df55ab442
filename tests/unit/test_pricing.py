"""Price providers against their APIs' shapes, and the fallback chain.

AWS: botocore's Stubber with responses shaped like the real ones (it also checks our
requests against the service model); an unreachable endpoint for the failure path. Alibaba
Cloud: the official SDK talking HTTP to a loopback server that answers like the ECS API.
The moto EC2 server is in tests/integration/test_pricing_moto.py.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any
from urllib.parse import parse_qs

import boto3
import pytest
from botocore.config import Config
from botocore.stub import ANY, Stubber

from cheapspot_operator.api.common import CapacityType
from cheapspot_operator.pricing.alibaba import AlibabaPrices
from cheapspot_operator.pricing.aws import AwsOnDemandPrices, AwsSpotPrices, on_demand_usd
from cheapspot_operator.pricing.quotes import (
    PriceKey,
    ProviderUnavailableError,
    Quote,
    decode,
    encode,
    remember,
    resolve,
    undecodable,
)
from cheapspot_operator.pricing.static import StaticPrices
from cheapspot_operator.pricing.table import PriceTable, default_prices

NOW = datetime(2026, 11, 28, 12, 0, tzinfo=UTC)
SPOT = CapacityType.SPOT
OD = CapacityType.ON_DEMAND


def _client(service: str, **kw: Any) -> Any:
    return boto3.client(
        service,
        region_name="us-east-1",
        aws_access_key_id="test",
        aws_secret_access_key="test",
        **kw,
    )


# --- AWS ------------------------------------------------------------------------------------


def test_spot_prices_are_the_newest_record_per_zone() -> None:
    ec2 = _client("ec2")
    history = [
        ("us-east-1a", "0.3920", NOW - timedelta(minutes=50)),
        ("us-east-1a", "0.4011", NOW - timedelta(minutes=5)),
        ("us-east-1b", "0.3622", NOW - timedelta(hours=2)),
    ]
    with Stubber(ec2) as stub:
        stub.add_response(
            "describe_spot_price_history",
            {
                "SpotPriceHistory": [
                    {
                        "AvailabilityZone": zone,
                        "InstanceType": "g5.xlarge",
                        "ProductDescription": "Linux/UNIX",
                        "SpotPrice": price,
                        "Timestamp": at,
                    }
                    for zone, price, at in history
                ],
                "NextToken": "",
            },
            {
                "InstanceTypes": ["g5.xlarge"],
                "ProductDescriptions": ["Linux/UNIX"],
                "StartTime": NOW,
            },
        )
        quotes = AwsSpotPrices(ec2).quotes(["g5.xlarge"], NOW)
        stub.assert_no_pending_responses()
    a = quotes[PriceKey("g5.xlarge", SPOT, "us-east-1a")]
    assert (a.usd_per_hour, a.source, a.observed_at, a.estimated) == (
        0.4011,
        "aws-ec2-spot",
        NOW - timedelta(minutes=5),
        False,
    )
    assert quotes[PriceKey("g5.xlarge", SPOT, "us-east-1b")].usd_per_hour == 0.3622


def _price_list_entry(instance_type: str, usd: str) -> str:
    """One GetProducts PriceList item, as the API returns it: a JSON document in a string."""
    return json.dumps(
        {
            "product": {
                "productFamily": "Compute Instance",
                "attributes": {
                    "instanceType": instance_type,
                    "regionCode": "us-east-1",
                    "operatingSystem": "Linux",
                    "tenancy": "Shared",
                    "preInstalledSw": "NA",
                    "capacitystatus": "Used",
                },
                "sku": "8QCUFFK8J7TVPZMV",
            },
            "serviceCode": "AmazonEC2",
            "terms": {
                "OnDemand": {
                    "8QCUFFK8J7TVPZMV.JRTCKXETXF": {
                        "priceDimensions": {
                            "8QCUFFK8J7TVPZMV.JRTCKXETXF.6YS6EN2CT7": {
                                "unit": "Hrs",
                                "endRange": "Inf",
                                "description": f"${usd} per On Demand Linux {instance_type}",
                                "appliesTo": [],
                                "rateCode": "8QCUFFK8J7TVPZMV.JRTCKXETXF.6YS6EN2CT7",
                                "beginRange": "0",
                                "pricePerUnit": {"USD": usd},
                            }
                        },
                        "sku": "8QCUFFK8J7TVPZMV",
                        "effectiveDate": "2026-11-01T00:00:00Z",
                        "offerTermCode": "JRTCKXETXF",
                        "termAttributes": {},
                    }
                }
            },
            "version": "20261101000000",
            "publicationDate": "2026-11-01T00:00:00Z",
        }
    )


def test_on_demand_prices_come_from_the_pricing_api_price_list() -> None:
    pricing = _client("pricing")
    with Stubber(pricing) as stub:
        stub.add_response(
            "get_products",
            {
                "FormatVersion": "aws_v1",
                "PriceList": [_price_list_entry("g5.xlarge", "1.0060000000")],
            },
            {"ServiceCode": "AmazonEC2", "Filters": ANY},
        )
        quotes = AwsOnDemandPrices("us-east-1", pricing).quotes(["g5.xlarge"], NOW)
    q = quotes[PriceKey("g5.xlarge", OD)]
    assert (q.usd_per_hour, q.source, q.estimated) == (1.006, "aws-pricing", False)


def test_a_price_list_entry_without_an_hourly_price_is_ignored() -> None:
    assert on_demand_usd({"terms": {"OnDemand": {}}}) is None
    entry = json.loads(_price_list_entry("g5.xlarge", "0.0000000000"))
    assert on_demand_usd(entry) is None


def test_an_api_error_is_a_provider_that_is_unavailable_not_a_crash() -> None:
    ec2 = _client("ec2")
    with Stubber(ec2) as stub:
        stub.add_client_error(
            "describe_spot_price_history", "UnauthorizedOperation", "not authorized"
        )
        with pytest.raises(ProviderUnavailableError, match="UnauthorizedOperation"):
            AwsSpotPrices(ec2).quotes(["g5.xlarge"], NOW)


def test_an_unreachable_endpoint_is_a_provider_that_is_unavailable() -> None:
    pricing = _client(
        "pricing",
        endpoint_url="http://127.0.0.1:9",
        config=Config(retries={"max_attempts": 1}, connect_timeout=1, read_timeout=1),
    )
    with pytest.raises(ProviderUnavailableError, match="GetProducts"):
        AwsOnDemandPrices("us-east-1", pricing).quotes(["g5.xlarge"], NOW)


# --- Alibaba Cloud ---------------------------------------------------------------------------


class _EcsApi(BaseHTTPRequestHandler):
    """Answers DescribeSpotPriceHistory like the ECS API (RPC style, form-encoded POST)."""

    answer: dict[str, Any] = {}
    status = 200
    seen: list[dict[str, list[str]]] = []

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length", 0))
        form = parse_qs(self.rfile.read(length).decode())
        query = parse_qs(self.path.split("?", 1)[1]) if "?" in self.path else {}
        headers = {k.lower(): [v] for k, v in self.headers.items()}
        type(self).seen.append({**headers, **query, **form})
        body = json.dumps(type(self).answer).encode()
        self.send_response(type(self).status)
        self.send_header("Content-Type", "application/json;charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def ecs_api() -> Iterator[tuple[str, type[_EcsApi]]]:
    handler = type("Handler", (_EcsApi,), {"answer": {}, "status": 200, "seen": []})
    server = HTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{server.server_address[1]}", handler
    finally:
        server.shutdown()
        server.server_close()


def _ecs_client(endpoint: str) -> Any:
    from alibabacloud_ecs20140526.client import Client
    from alibabacloud_tea_openapi.utils_models import Config as AliConfig

    return Client(
        AliConfig(
            access_key_id="test",
            access_key_secret="test",
            region_id="cn-hangzhou",
            endpoint=endpoint,
            protocol="http",
        )
    )


def _ecs_answer(currency: str) -> dict[str, Any]:
    rec = {
        "IoOptimized": "optimized",
        "NetworkType": "vpc",
        "InstanceType": "ecs.gn7i-c8g1.2xlarge",
    }
    return {
        "RequestId": "A5A8F5E3-1F3F-5C2B-9A7E-6C9D0F1B2E3D",
        "Currency": currency,
        "NextOffset": 0,
        "SpotPrices": {
            "SpotPriceType": [
                {
                    **rec,
                    "ZoneId": "cn-hangzhou-i",
                    "SpotPrice": 3.2,
                    "OriginPrice": 11.21,
                    "Timestamp": "2026-11-28T10:00:00Z",
                },
                {
                    **rec,
                    "ZoneId": "cn-hangzhou-i",
                    "SpotPrice": 2.9,
                    "OriginPrice": 11.21,
                    "Timestamp": "2026-11-28T11:00:00Z",
                },
                {
                    **rec,
                    "ZoneId": "cn-hangzhou-j",
                    "SpotPrice": 4.1,
                    "OriginPrice": 11.21,
                    "Timestamp": "2026-11-28T11:30:00Z",
                },
            ]
        },
    }


def test_alibaba_spot_and_pay_as_you_go_prices_come_from_one_call_in_usd(
    ecs_api: tuple[str, type[_EcsApi]],
) -> None:
    endpoint, api = ecs_api
    api.answer = _ecs_answer("CNY")
    provider = AlibabaPrices("cn-hangzhou", _ecs_client(endpoint), usd_per={"CNY": 0.14})
    quotes = provider.quotes(["ecs.gn7i-c8g1.2xlarge"], NOW)
    spot = quotes[PriceKey("ecs.gn7i-c8g1.2xlarge", SPOT, "cn-hangzhou-i")]
    assert spot.usd_per_hour == pytest.approx(2.9 * 0.14)  # the newest record
    assert spot.observed_at == datetime(2026, 11, 28, 11, 0, tzinfo=UTC)
    assert spot.source == "alibaba-ecs"
    od = quotes[PriceKey("ecs.gn7i-c8g1.2xlarge", OD, "cn-hangzhou-j")]
    assert od.usd_per_hour == pytest.approx(11.21 * 0.14)
    (request,) = api.seen
    assert request.get("Action", request.get("x-acs-action")) == ["DescribeSpotPriceHistory"]
    assert request["InstanceType"] == ["ecs.gn7i-c8g1.2xlarge"]
    assert request["NetworkType"] == ["vpc"]


def test_alibaba_prices_in_a_currency_without_a_configured_rate_are_refused(
    ecs_api: tuple[str, type[_EcsApi]],
) -> None:
    endpoint, api = ecs_api
    api.answer = _ecs_answer("CNY")
    with pytest.raises(ProviderUnavailableError, match="CNY"):
        AlibabaPrices("cn-hangzhou", _ecs_client(endpoint)).quotes(["ecs.gn7i-c8g1.2xlarge"], NOW)


def test_an_alibaba_api_error_is_a_provider_that_is_unavailable(
    ecs_api: tuple[str, type[_EcsApi]],
) -> None:
    endpoint, api = ecs_api
    api.status = 403
    api.answer = {
        "RequestId": "x",
        "Code": "Forbidden.RAM",
        "Message": "User not authorized to operate on the specified resource.",
    }
    with pytest.raises(ProviderUnavailableError, match=r"Forbidden\.RAM"):
        AlibabaPrices("cn-hangzhou", _ecs_client(endpoint)).quotes(["ecs.gn7i-c8g1.2xlarge"], NOW)


# --- the chain ------------------------------------------------------------------------------

TABLE = PriceTable({"g5.xlarge": {"spot": 0.40, "on-demand": 1.006}})


def test_the_chain_prefers_live_then_last_known_then_the_table_and_says_so() -> None:
    key = PriceKey("g5.xlarge", SPOT, "us-east-1a")
    live = {key: Quote(0.39, "aws-ec2-spot", NOW)}
    old = {key: Quote(0.41, "aws-ec2-spot", NOW - timedelta(days=1))}
    assert resolve(key, live, old, TABLE) == live[key]
    known = resolve(key, {}, old, TABLE)
    assert (known.usd_per_hour, known.source, known.estimated) == (
        0.41,
        "last-known/aws-ec2-spot",
        True,
    )
    table = resolve(key, {}, {}, TABLE)
    assert (table.usd_per_hour, table.source, table.estimated) == (0.40, "table", True)


def test_a_spot_node_is_never_priced_at_on_demand() -> None:
    key = PriceKey("g5.xlarge", SPOT, "us-east-1a")
    only_on_demand = {PriceKey("g5.xlarge", OD): Quote(1.006, "aws-pricing", NOW)}
    q = resolve(key, only_on_demand, only_on_demand, TABLE)
    assert q.usd_per_hour == 0.40 and q.estimated and q.source == "table"


def test_a_zone_without_its_own_price_does_not_borrow_another_zones() -> None:
    live = {PriceKey("g5.xlarge", SPOT, "us-east-1b"): Quote(0.30, "aws-ec2-spot", NOW)}
    assert resolve(PriceKey("g5.xlarge", SPOT, "us-east-1a"), live, {}, TABLE).source == "table"
    # A node whose zone is unknown gets the cheapest zone's live price.
    assert resolve(PriceKey("g5.xlarge", SPOT), live, {}, TABLE).usd_per_hour == 0.30


def test_the_last_known_good_keeps_the_newest_observation_and_survives_a_round_trip() -> None:
    key = PriceKey("g5.xlarge", SPOT, "us-east-1a")
    newer = Quote(0.39, "aws-ec2-spot", NOW)
    older = Quote(0.41, "aws-ec2-spot", NOW - timedelta(hours=1))
    kept = remember({key: newer}, {key: older})
    assert kept[key] == newer
    estimated = {PriceKey("x", SPOT): Quote(0.1, "table", None, estimated=True)}
    assert remember({}, estimated) == {}
    data = encode(kept)
    assert decode(data) == kept
    data["bogus"] = "{"
    assert decode(data) == kept and undecodable(data) == ["bogus"]


def test_the_static_table_always_answers_and_is_always_estimated() -> None:
    quotes = StaticPrices(default_prices()).quotes(["g5.xlarge"], NOW)
    assert all(q.estimated and q.source == "table" for q in quotes.values())
    assert (
        quotes[PriceKey("g5.xlarge", SPOT)].usd_per_hour
        < quotes[PriceKey("g5.xlarge", OD)].usd_per_hour
    )

"""AWS prices: spot from EC2 ``DescribeSpotPriceHistory``, on-demand from the Pricing API.

What Karpenter does: spot per instance type and zone (refresh hourly), on-demand per
instance type and region from ``GetProducts`` (refresh daily). boto3's standard credential
chain (IRSA, Pod Identity, instance profile); the operator's role needs
``ec2:DescribeSpotPriceHistory`` and ``pricing:GetProducts``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import boto3
from botocore.exceptions import BotoCoreError, ClientError

from cheapspot_operator.api.common import CapacityType
from cheapspot_operator.pricing.quotes import PriceKey, ProviderUnavailableError, Quote

SPOT_SOURCE = "aws-ec2-spot"
ON_DEMAND_SOURCE = "aws-pricing"
PRICING_REGION = "us-east-1"
"""The Pricing API answers from us-east-1 (and a few others) for every region."""


def _client(service: str, region: str | None) -> Any:
    session: Any = boto3.session.Session(region_name=region)
    return session.client(service)


class AwsSpotPrices:
    """Current spot price per instance type and zone."""

    def __init__(self, client: Any = None, *, region: str | None = None) -> None:
        self._client = client if client is not None else _client("ec2", region)

    def quotes(self, instance_types: Sequence[str], now: datetime) -> dict[PriceKey, Quote]:
        if not instance_types:
            return {}
        newest: dict[PriceKey, tuple[datetime, float]] = {}
        try:
            pages = self._client.get_paginator("describe_spot_price_history").paginate(
                InstanceTypes=list(instance_types),
                ProductDescriptions=["Linux/UNIX"],
                # The price in force at StartTime is included: asking from now gives the
                # current price of every zone without paging through history.
                StartTime=now,
            )
            for page in pages:
                for rec in page.get("SpotPriceHistory", []):
                    if not str(rec.get("ProductDescription", "")).startswith("Linux/UNIX"):
                        continue
                    key = PriceKey(
                        str(rec["InstanceType"]), CapacityType.SPOT, str(rec["AvailabilityZone"])
                    )
                    at = rec["Timestamp"]
                    at = at if at.tzinfo else at.replace(tzinfo=UTC)
                    price = float(rec["SpotPrice"])
                    if key not in newest or newest[key][0] < at:
                        newest[key] = (at, price)
        except (BotoCoreError, ClientError, KeyError, ValueError) as e:
            raise ProviderUnavailableError(f"EC2 DescribeSpotPriceHistory: {e}") from e
        return {k: Quote(p, SPOT_SOURCE, at) for k, (at, p) in newest.items()}


def on_demand_usd(product: dict[str, Any]) -> float | None:
    """The hourly USD price in one ``GetProducts`` price-list entry (already parsed)."""
    for term in product.get("terms", {}).get("OnDemand", {}).values():
        for dim in term.get("priceDimensions", {}).values():
            if dim.get("unit") in ("Hrs", "Hours"):
                usd = dim.get("pricePerUnit", {}).get("USD")
                if usd is not None and float(usd) > 0:
                    return float(usd)
    return None


class AwsOnDemandPrices:
    """On-demand Linux, shared-tenancy price per instance type in one region."""

    def __init__(self, region: str, client: Any = None) -> None:
        self.region = region
        self._client = client if client is not None else _client("pricing", PRICING_REGION)

    def _filters(self, instance_type: str) -> list[dict[str, str]]:
        wanted = {
            "instanceType": instance_type,
            "regionCode": self.region,
            "operatingSystem": "Linux",
            "tenancy": "Shared",
            "preInstalledSw": "NA",
            "capacitystatus": "Used",
        }
        return [{"Type": "TERM_MATCH", "Field": k, "Value": v} for k, v in wanted.items()]

    def quotes(self, instance_types: Sequence[str], now: datetime) -> dict[PriceKey, Quote]:
        out: dict[PriceKey, Quote] = {}
        try:
            for instance_type in instance_types:
                pages = self._client.get_paginator("get_products").paginate(
                    ServiceCode="AmazonEC2", Filters=self._filters(instance_type)
                )
                prices = [
                    usd
                    for page in pages
                    for item in page.get("PriceList", [])
                    if (usd := on_demand_usd(json.loads(item) if isinstance(item, str) else item))
                ]
                if prices:
                    key = PriceKey(instance_type, CapacityType.ON_DEMAND)
                    out[key] = Quote(min(prices), ON_DEMAND_SOURCE, now)
        except (BotoCoreError, ClientError, ValueError) as e:
            raise ProviderUnavailableError(f"Pricing GetProducts: {e}") from e
        return out

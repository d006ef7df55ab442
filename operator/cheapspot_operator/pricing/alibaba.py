"""Alibaba Cloud prices: ECS ``DescribeSpotPriceHistory``, through the official SDK.

Each record carries both the spot price and the pay-as-you-go (``OriginPrice``) price of an
instance type in a zone, so one call prices both capacity types. Credentials come from the
SDK's default chain (RRSA on ACK, environment, profile); the RAM role needs
``ecs:DescribeSpotPriceHistory``. Prices are in the currency the API reports (``Currency``,
CNY on the China site); they are converted to USD only with a rate the operator is given,
never guessed: without one, a non-USD answer is unusable and the provider says so.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from alibabacloud_credentials.client import Client as CredentialClient
from alibabacloud_ecs20140526 import models
from alibabacloud_ecs20140526.client import Client
from alibabacloud_tea_openapi.utils_models import Config

from cheapspot_operator.api.common import CapacityType
from cheapspot_operator.pricing.quotes import PriceKey, ProviderUnavailableError, Quote

SOURCE = "alibaba-ecs"
WINDOW = timedelta(hours=3)
"""How far back to ask: the newest record per zone is the current price."""


def make_client(region: str, endpoint: str | None = None, protocol: str = "https") -> Any:
    config = Config(credential=CredentialClient(), region_id=region, protocol=protocol)
    if endpoint:
        config.endpoint = endpoint
    return Client(config)


def _when(text: str) -> datetime:
    at = datetime.fromisoformat(text.replace("Z", "+00:00"))
    return at if at.tzinfo else at.replace(tzinfo=UTC)


class AlibabaPrices:
    """Spot and pay-as-you-go prices per instance type and zone in one region."""

    def __init__(
        self,
        region: str,
        client: Any = None,
        *,
        usd_per: Mapping[str, float] | None = None,
    ) -> None:
        self.region = region
        self._client = client if client is not None else make_client(region)
        self._usd_per = {"USD": 1.0, **(usd_per or {})}
        """Configured conversion rates: USD per unit of each currency."""

    def quotes(self, instance_types: Sequence[str], now: datetime) -> dict[PriceKey, Quote]:
        out: dict[PriceKey, Quote] = {}
        start = (now - WINDOW).astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        for instance_type in instance_types:
            newest: dict[str, Any] = {}
            offset = 0
            currency = "USD"
            while True:
                request = models.DescribeSpotPriceHistoryRequest(
                    region_id=self.region,
                    instance_type=instance_type,
                    network_type="vpc",
                    ostype="linux",
                    start_time=start,
                    offset=offset,
                )
                try:
                    body = self._client.describe_spot_price_history(request).body
                except Exception as e:  # the SDK raises its own and transport errors alike
                    raise ProviderUnavailableError(f"ECS DescribeSpotPriceHistory: {e}") from e
                currency = body.currency or currency
                records = body.spot_prices.spot_price_type if body.spot_prices else []
                for rec in records or []:
                    if rec.instance_type != instance_type or rec.timestamp is None:
                        continue
                    old = newest.get(rec.zone_id)
                    if old is None or _when(old.timestamp) < _when(rec.timestamp):
                        newest[rec.zone_id] = rec
                if not records or not body.next_offset or body.next_offset <= offset:
                    break
                offset = body.next_offset
            rate = self._usd_per.get(currency)
            if rate is None:
                raise ProviderUnavailableError(
                    f"ECS prices are in {currency} and no USD rate for it is configured "
                    "(pricing.usdPer)"
                )
            for zone, rec in newest.items():
                at = _when(rec.timestamp)
                if rec.spot_price is not None:
                    key = PriceKey(instance_type, CapacityType.SPOT, zone)
                    out[key] = Quote(float(rec.spot_price) * rate, SOURCE, at)
                if rec.origin_price is not None:
                    key = PriceKey(instance_type, CapacityType.ON_DEMAND, zone)
                    out[key] = Quote(float(rec.origin_price) * rate, SOURCE, at)
        return out

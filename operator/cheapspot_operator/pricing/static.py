"""The static price table (Helm values) as a provider: always answers, always estimated."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from cheapspot_operator.api.common import CapacityType
from cheapspot_operator.pricing.quotes import TABLE, PriceKey, Quote
from cheapspot_operator.pricing.table import PriceTable


class StaticPrices:
    def __init__(self, table: PriceTable) -> None:
        self.table = table

    def quotes(self, instance_types: Sequence[str], now: datetime) -> dict[PriceKey, Quote]:
        return {
            PriceKey(t, c): Quote(self.table.hourly(t, c), TABLE, None, estimated=True)
            for t in instance_types
            for c in CapacityType
        }

"""A static price table: instance type and capacity type to dollars per hour. Pure.

Defaults ship in ``prices.yaml``; the operator configuration overrides entries.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources

import yaml

from cheapspot_operator.api.common import CapacityType

DEFAULT_KEY = "default"


@dataclass(frozen=True)
class PriceTable:
    prices: Mapping[str, Mapping[str, float]]

    def hourly(self, instance_type: str, capacity: CapacityType) -> float:
        row = self.prices.get(instance_type) or self.prices.get(DEFAULT_KEY) or {}
        return float(row.get(capacity.value, 0.0))

    def on_demand_hourly(self, instance_type: str) -> float:
        return self.hourly(instance_type, CapacityType.ON_DEMAND)

    def merged(self, overrides: Mapping[str, Mapping[str, float]]) -> PriceTable:
        table = {k: dict(v) for k, v in self.prices.items()}
        for key, row in overrides.items():
            table.setdefault(key, {}).update({str(c): float(p) for c, p in row.items()})
        return PriceTable(table)


def default_prices() -> PriceTable:
    text = resources.files("cheapspot_operator.pricing").joinpath("prices.yaml").read_text()
    raw = yaml.safe_load(text) or {}
    return PriceTable({str(k): {str(c): float(p) for c, p in v.items()} for k, v in raw.items()})

"""Quotes and the fallback chain. Pure.

A :class:`Quote` is a price in USD per hour with where it came from and when it was observed.
:func:`resolve` picks, for one node, the live quote, else the last known good one (kept in
the cluster so a restart does not forget it), else the static table; every answer says
whether it is estimated and from which source. A spot node is never priced at on-demand:
if no spot price is known at all, the answer is the table's spot price, marked estimated.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from cheapspot_operator.api.common import CapacityType
from cheapspot_operator.pricing.table import PriceTable

_NEVER = datetime.min.replace(tzinfo=UTC)
TABLE = "table"
LAST_KNOWN = "last-known"


class ProviderUnavailableError(Exception):
    """A price API could not be reached or answered nonsense; the message says which."""


@dataclass(frozen=True, order=True)
class PriceKey:
    instance_type: str
    capacity: CapacityType
    zone: str = ""
    """Availability zone; empty for a price that holds region-wide (on-demand)."""

    def encode(self) -> str:
        return f"{self.instance_type}.{self.capacity.value}.{self.zone or '_'}"

    @classmethod
    def decode(cls, text: str) -> PriceKey:
        instance_type, capacity, zone = text.rsplit(".", 2)
        return cls(instance_type, CapacityType(capacity), "" if zone == "_" else zone)


@dataclass(frozen=True)
class Quote:
    usd_per_hour: float
    source: str
    """``aws-ec2-spot``, ``aws-pricing``, ``alibaba-ecs``, ``last-known/<source>``, ``table``."""
    observed_at: datetime | None = None
    estimated: bool = False
    """Not a current observation: the last known good, or the table."""

    def to_json(self) -> str:
        return json.dumps(
            {
                "usdPerHour": self.usd_per_hour,
                "source": self.source,
                "observedAt": self.observed_at.isoformat() if self.observed_at else None,
            }
        )

    @classmethod
    def from_json(cls, text: str) -> Quote:
        raw = json.loads(text)
        observed = raw.get("observedAt")
        return cls(
            usd_per_hour=float(raw["usdPerHour"]),
            source=str(raw["source"]),
            observed_at=datetime.fromisoformat(observed) if observed else None,
        )


Quotes = Mapping[PriceKey, Quote]


def _lookup(quotes: Quotes, key: PriceKey) -> Quote | None:
    """The zone's quote, else the region-wide one, else the cheapest of any zone (spot)."""
    exact = quotes.get(key)
    if exact is not None:
        return exact
    wide = quotes.get(PriceKey(key.instance_type, key.capacity))
    if wide is not None:
        return wide
    if key.zone:
        return None
    zones = [
        q
        for k, q in quotes.items()
        if k.instance_type == key.instance_type and k.capacity is key.capacity
    ]
    return min(zones, key=lambda q: q.usd_per_hour) if zones else None


def resolve(key: PriceKey, live: Quotes, last_good: Quotes, table: PriceTable) -> Quote:
    """The price of one node: live, else last known good (estimated), else table (estimated)."""
    quote = _lookup(live, key)
    if quote is not None:
        return quote
    known = _lookup(last_good, key)
    if known is not None:
        return Quote(
            usd_per_hour=known.usd_per_hour,
            source=f"{LAST_KNOWN}/{known.source}",
            observed_at=known.observed_at,
            estimated=True,
        )
    return Quote(
        usd_per_hour=table.hourly(key.instance_type, key.capacity),
        source=TABLE,
        estimated=True,
    )


def remember(last_good: Quotes, live: Quotes) -> dict[PriceKey, Quote]:
    """The last known good prices after a refresh: each key's newest observation."""
    out = dict(last_good)
    for key, quote in live.items():
        if quote.estimated or quote.usd_per_hour <= 0:
            continue
        old = out.get(key)
        if old is None or (old.observed_at or _NEVER) <= (quote.observed_at or _NEVER):
            out[key] = quote
    return out


def encode(quotes: Quotes) -> dict[str, str]:
    """ConfigMap ``data``: one key per price."""
    return {k.encode(): q.to_json() for k, q in sorted(quotes.items())}


def decode(data: Mapping[str, str]) -> dict[PriceKey, Quote]:
    """The inverse of :func:`encode`; entries that do not parse are skipped (named by the
    caller's warning through :func:`undecodable`)."""
    out: dict[PriceKey, Quote] = {}
    for name, text in data.items():
        try:
            out[PriceKey.decode(name)] = Quote.from_json(text)
        except (ValueError, KeyError, TypeError):
            continue
    return out


def undecodable(data: Mapping[str, str]) -> list[str]:
    return sorted(set(data) - {k.encode() for k in decode(data)})


def age(quote: Quote, now: datetime) -> timedelta | None:
    return None if quote.observed_at is None else now - quote.observed_at

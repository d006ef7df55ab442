"""The price book: sources asked when due, a failing source dropping to the last known good
(marked so), never to on-demand, and the last known good surviving a restart."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

from cheapspot_operator.api.common import CapacityType
from cheapspot_operator.pricing.quotes import (
    PriceKey,
    ProviderUnavailableError,
    Quote,
    resolve,
)
from cheapspot_operator.pricing.table import default_prices
from cheapspot_operator.runtime.pricebook import PriceBook, Source

NOW = datetime(2026, 11, 29, 12, 0, tzinfo=UTC)
SPOT_A = PriceKey("g5.xlarge", CapacityType.SPOT, "zone-a")


class FakeSpot:
    def __init__(self) -> None:
        self.asked: list[list[str]] = []
        self.down = False
        self.price = 0.41

    def quotes(self, instance_types: Sequence[str], now: datetime) -> dict[PriceKey, Quote]:
        self.asked.append(list(instance_types))
        if self.down:
            raise ProviderUnavailableError("EC2 DescribeSpotPriceHistory: connection refused")
        return {
            PriceKey(t, CapacityType.SPOT, "zone-a"): Quote(self.price, "aws-ec2-spot", now)
            for t in instance_types
        }


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def _book(spot: FakeSpot, clock: Clock, **kw: object) -> PriceBook:
    return PriceBook([Source("aws-ec2-spot", spot, 3600)], retry_s=300, monotonic=clock, **kw)  # type: ignore[arg-type]


def test_sources_are_asked_when_due_or_when_a_new_instance_type_appears() -> None:
    spot, clock = FakeSpot(), Clock()
    book = _book(spot, clock)
    assert book.refresh(["g5.xlarge"], NOW) == ([], True)
    assert book.snapshot()[SPOT_A] == Quote(0.41, "aws-ec2-spot", NOW)
    clock.t += 60
    book.refresh(["g5.xlarge"], NOW)
    assert len(spot.asked) == 1  # not due
    book.refresh(["g5.xlarge", "g6.xlarge"], NOW)
    assert spot.asked[-1] == ["g5.xlarge", "g6.xlarge"]  # a new type: asked at once
    clock.t += 3600
    spot.price = 0.52
    later = NOW + timedelta(hours=1)
    assert book.refresh(["g5.xlarge"], later) == ([], True)
    assert book.snapshot()[SPOT_A].usd_per_hour == 0.52


def test_a_failing_source_drops_to_the_last_known_good_marked_estimated_then_recovers() -> None:
    spot, clock = FakeSpot(), Clock()
    book = _book(spot, clock)
    book.refresh(["g5.xlarge"], NOW)
    clock.t += 3600
    spot.down = True
    failures, changed = book.refresh(["g5.xlarge"], NOW + timedelta(hours=1))
    assert failures == ["aws-ec2-spot: EC2 DescribeSpotPriceHistory: connection refused"]
    assert not changed
    quote = resolve(SPOT_A, book.snapshot(), {}, default_prices())
    assert quote.usd_per_hour == 0.41 and quote.estimated
    assert quote.source == "last-known/aws-ec2-spot"
    # Still down at the retry: not reported again. Back: live again.
    clock.t += 300
    assert book.refresh(["g5.xlarge"], NOW + timedelta(hours=1, minutes=5))[0] == []
    assert len(spot.asked) == 3
    spot.down = False
    clock.t += 300
    book.refresh(["g5.xlarge"], NOW + timedelta(hours=1, minutes=10))
    assert not book.snapshot()[SPOT_A].estimated


def test_with_nothing_known_a_spot_node_is_priced_from_the_tables_spot_column() -> None:
    spot, clock = FakeSpot(), Clock()
    spot.down = True
    book = _book(spot, clock)
    book.refresh(["g5.xlarge"], NOW)
    table = default_prices()
    quote = resolve(SPOT_A, book.snapshot(), {}, table)
    assert quote.source == "table" and quote.estimated
    assert quote.usd_per_hour == table.hourly("g5.xlarge", CapacityType.SPOT)
    assert quote.usd_per_hour < table.hourly("g5.xlarge", CapacityType.ON_DEMAND)


def test_a_restarted_book_starts_from_the_kept_prices() -> None:
    spot, clock = FakeSpot(), Clock()
    first = _book(spot, clock)
    first.refresh(["g5.xlarge"], NOW)
    spot.down = True
    second = _book(spot, clock, last_good=first.last_good)
    second.refresh(["g5.xlarge"], NOW + timedelta(minutes=1))
    quote = second.snapshot()[SPOT_A]
    assert (quote.usd_per_hour, quote.source) == (0.41, "last-known/aws-ec2-spot")


def test_a_provider_bug_is_a_reported_failure_not_a_crash() -> None:
    class Broken:
        def quotes(self, instance_types: Sequence[str], now: datetime) -> dict[PriceKey, Quote]:
            raise KeyError("SpotPrice")

    book = PriceBook([Source("aws-ec2-spot", Broken(), 3600)])
    failures, _ = book.refresh(["g5.xlarge"], NOW)
    assert failures == ["aws-ec2-spot: unexpected KeyError: 'SpotPrice'"]

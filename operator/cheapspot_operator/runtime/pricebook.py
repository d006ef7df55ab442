"""The operator's price book: live quotes refreshed in the background, the last known good
kept in a ConfigMap, and the snapshot the planners price nodes with.

The pure parts (what a quote is, the fallback chain, how the last known good is kept) are in
:mod:`.quotes`; this module is the I/O around them:

* :class:`PriceBook` asks each configured source when it is due (spot hourly, on-demand
  daily by default; at once when a new instance type appears among the nodes), keeps what
  they answered, and merges it into the last known good. A source that fails drops to the
  last known good (its quotes then say ``last-known/<source>``, estimated) and is asked again
  after ``retrySeconds``; the static table stays the last fallback, in :func:`.quotes.resolve`.
* :class:`ConfigMapKeeper` keeps the last known good in a ConfigMap, so a restarted
  operator starts from it; the warning events about failing sources are posted on it.
* :class:`PriceRefresher` is the thread that does both every ``checkSeconds`` and exports
  each node's price and the age of that price as metrics, with OpenCost / Karpenter label
  names (``node``, ``instance_type``, ``capacity_type``, ``zone``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

from cheapspot_operator.api.common import CapacityType
from cheapspot_operator.cluster.placement import PlacementProfile
from cheapspot_operator.cluster.views import node_view
from cheapspot_operator.pricing.aws import (
    ON_DEMAND_SOURCE,
    SPOT_SOURCE,
    AwsOnDemandPrices,
    AwsSpotPrices,
)
from cheapspot_operator.pricing.quotes import (
    LAST_KNOWN,
    PriceKey,
    ProviderUnavailableError,
    Quote,
    age,
    decode,
    encode,
    remember,
    resolve,
    undecodable,
)
from cheapspot_operator.pricing.table import PriceTable
from cheapspot_operator.runtime import events, metrics
from cheapspot_operator.runtime.config import PricingSettings
from cheapspot_operator.runtime.kubeapi import ApiError, KubeApi

log = logging.getLogger(__name__)


class PriceProvider(Protocol):
    def quotes(self, instance_types: Sequence[str], now: datetime) -> dict[PriceKey, Quote]: ...


@dataclass
class Source:
    """One provider and when to ask it."""

    name: str
    provider: PriceProvider
    every_s: float
    due_at: float = 0.0
    asked_for: frozenset[str] = frozenset()
    live: dict[PriceKey, Quote] = field(default_factory=dict)
    error: str = ""


def sources_for(settings: PricingSettings) -> list[Source]:
    """The sources ``settings.provider`` names (none for ``table``)."""
    if settings.provider == "aws":
        region = (
            settings.region
            or os.environ.get("AWS_REGION")
            or os.environ.get("AWS_DEFAULT_REGION")
            or ""
        )
        if not region:
            raise ValueError("pricing.provider aws needs pricing.region (or $AWS_REGION)")
        return [
            Source(SPOT_SOURCE, AwsSpotPrices(region=region), settings.spot_refresh_seconds),
            Source(ON_DEMAND_SOURCE, AwsOnDemandPrices(region), settings.on_demand_refresh_seconds),
        ]
    if settings.provider == "alibaba":
        # Lazy: Alibaba Cloud's SDK takes about 2 s to import; only operators set up for
        # its prices pay that.
        from cheapspot_operator.pricing.alibaba import SOURCE, AlibabaPrices  # noqa: PLC0415

        if not settings.region:
            raise ValueError("pricing.provider alibaba needs pricing.region (e.g. cn-hangzhou)")
        provider = AlibabaPrices(settings.region, usd_per=settings.usd_per)
        return [Source(SOURCE, provider, settings.spot_refresh_seconds)]
    return []


class PriceBook:
    """Live quotes per source plus the last known good; thread-safe."""

    def __init__(
        self,
        sources: Sequence[Source],
        *,
        retry_s: float = 300.0,
        last_good: Mapping[PriceKey, Quote] | None = None,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.sources = list(sources)
        self.retry_s = retry_s
        self._last_good: dict[PriceKey, Quote] = dict(last_good or {})
        self._monotonic = monotonic
        self._lock = threading.Lock()

    @property
    def last_good(self) -> dict[PriceKey, Quote]:
        with self._lock:
            return dict(self._last_good)

    def refresh(self, instance_types: Iterable[str], now: datetime) -> tuple[list[str], bool]:
        """Ask the sources that are due; returns (new failures, whether the last known good
        changed). A failure is reported once, when it starts or its message changes."""
        types = frozenset(t for t in instance_types if t)
        failures: list[str] = []
        for src in self.sources:
            if self._monotonic() < src.due_at and types <= src.asked_for:
                continue
            try:
                live = src.provider.quotes(sorted(types), now)
                error = ""
            except ProviderUnavailableError as exc:
                live, error = {}, f"{src.name}: {exc}"
            except Exception as exc:  # a provider bug must not stop the operator
                live, error = {}, f"{src.name}: unexpected {type(exc).__name__}: {exc}"
            if error and error != src.error:
                failures.append(error)
            wait_s = min(self.retry_s, src.every_s) if error else src.every_s
            with self._lock:
                src.live, src.error = live, error
                src.due_at = self._monotonic() + wait_s
                src.asked_for = types
        with self._lock:
            merged: dict[PriceKey, Quote] = {}
            for src in self.sources:
                merged.update(src.live)
            good = remember(self._last_good, merged)
            changed = good != self._last_good
            self._last_good = good
        return failures, changed

    def snapshot(self) -> dict[PriceKey, Quote]:
        """What the planners price with: every live quote, and the last known good (marked
        estimated, source ``last-known/<source>``) where a source has nothing live."""
        with self._lock:
            out = {
                k: Quote(q.usd_per_hour, f"{LAST_KNOWN}/{q.source}", q.observed_at, estimated=True)
                for k, q in self._last_good.items()
            }
            for src in self.sources:
                out.update(src.live)
        return out


class ConfigMapKeeper:
    """The last known good prices in a ConfigMap (one key per price)."""

    def __init__(self, api: KubeApi, namespace: str, name: str) -> None:
        self.api = api
        self.namespace = namespace
        self.name = name
        self.obj: dict[str, Any] | None = None

    @property
    def path(self) -> str:
        return f"/api/v1/namespaces/{self.namespace}/configmaps/{self.name}"

    def load(self) -> dict[PriceKey, Quote]:
        """The kept prices (created empty if missing, so events have something to refer to)."""
        self.obj = self.api.get(self.path)
        if self.obj is None:
            body = {
                "metadata": {
                    "name": self.name,
                    "namespace": self.namespace,
                    "labels": {"app.kubernetes.io/managed-by": "cheapspot"},
                },
                "data": {},
            }
            self.api.create(f"/api/v1/namespaces/{self.namespace}/configmaps", body)
            self.obj = self.api.get(self.path)
        data: dict[str, str] = dict((self.obj or {}).get("data") or {})
        bad = undecodable(data)
        if bad:
            log.warning("ignoring unreadable prices in %s/%s: %s", self.namespace, self.name, bad)
        return decode(data)

    def save(self, quotes: Mapping[PriceKey, Quote]) -> None:
        self.obj = self.api.merge_patch(self.path, {"data": encode(quotes)})

    def warn(self, reason: str, message: str, now: datetime) -> None:
        """A warning event on the ConfigMap (``kubectl describe configmap`` shows it)."""
        obj = self.obj or {"metadata": {"name": self.name, "namespace": self.namespace}}
        events.post(
            self.api,
            events.reference("v1", "ConfigMap", obj),
            type_="Warning",
            reason=reason,
            message=message,
            now=now,
        )


class PriceRefresher:
    """The background thread: nodes' instance types, due refreshes, the ConfigMap, metrics."""

    def __init__(
        self,
        api: KubeApi,
        book: PriceBook,
        settings: PricingSettings,
        *,
        profile: PlacementProfile,
        table: PriceTable,
        keeper: ConfigMapKeeper | None,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.api = api
        self.book = book
        self.settings = settings
        self.profile = profile
        self.table = table
        self.keeper = keeper
        self.clock = clock
        self.stop = threading.Event()
        self._exported: set[tuple[str, str, str, str]] = set()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="price-refresher", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self.stop.set()

    def _run(self) -> None:
        while not self.stop.is_set():
            try:
                self.tick()
            except Exception:  # the API server away for a moment: try again next tick
                log.exception(
                    "price refresh failed; trying again in %ss", self.settings.check_seconds
                )
            self.stop.wait(self.settings.check_seconds)

    def tick(self) -> None:
        now = self.clock()
        nodes = [node_view(raw) for raw in self.api.list("/api/v1/nodes")]
        failures, changed = self.book.refresh({n.instance_type for n in nodes}, now)
        for failure in failures:
            log.warning(
                "price source unavailable, using the last known good or the table: %s", failure
            )
            if self.keeper is not None:
                self.keeper.warn("PriceSourceUnavailable", failure, now)
        if changed and self.keeper is not None:
            try:
                self.keeper.save(self.book.last_good)
            except ApiError as exc:
                log.warning("cannot keep the last known good prices: %s", exc)
        self._export(nodes, now)

    def _export(self, nodes: Sequence[Any], now: datetime) -> None:
        quotes = self.book.snapshot()
        exported: set[tuple[str, str, str, str]] = set()
        for n in nodes:
            capacity = self.profile.capacity_of(n.labels) or CapacityType.ON_DEMAND
            quote = resolve(PriceKey(n.instance_type, capacity, n.zone), quotes, {}, self.table)
            labels = (n.name, n.instance_type, capacity.value, n.zone)
            metrics.NODE_PRICE.labels(*labels).set(quote.usd_per_hour)
            metrics.NODE_PRICE_ESTIMATED.labels(*labels).set(1 if quote.estimated else 0)
            old = age(quote, now)
            if old is not None:
                metrics.NODE_PRICE_AGE.labels(*labels).set(max(0.0, old.total_seconds()))
            exported.add(labels)
        for gone in self._exported - exported:
            for gauge in (metrics.NODE_PRICE, metrics.NODE_PRICE_ESTIMATED, metrics.NODE_PRICE_AGE):
                with contextlib.suppress(KeyError):
                    gauge.remove(*gone)
        self._exported = exported


def start_price_book(
    api: KubeApi, settings: PricingSettings, profile: PlacementProfile, table: PriceTable
) -> tuple[PriceBook, PriceRefresher]:
    """The book with its kept prices loaded, and its refresher started."""
    namespace = settings.namespace or os.environ.get("POD_NAMESPACE", "")
    keeper = ConfigMapKeeper(api, namespace, settings.config_map) if namespace else None
    kept: dict[PriceKey, Quote] = {}
    if keeper is not None:
        try:
            kept = keeper.load()
        except ApiError as exc:
            log.warning("cannot read the last known good prices: %s", exc)
    else:
        log.info("no pricing.namespace or POD_NAMESPACE: last known good prices kept in memory")
    book = PriceBook(sources_for(settings), retry_s=settings.retry_seconds, last_good=kept)
    refresher = PriceRefresher(api, book, settings, profile=profile, table=table, keeper=keeper)
    refresher.start()
    return book, refresher

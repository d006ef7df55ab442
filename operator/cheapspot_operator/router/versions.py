"""Adapter versions as the router sees them, as pure functions: each replica's report, the
version wanted of each adapter name, and which replicas may take a request for a name.

A version of an adapter is its URI and the digest of its published manifest (the replica
computes it when it fetches the adapter). Each replica reports, on ``GET /cheapspot/adapters``
of its admin port, the versions it has loaded and the desired list it was last given, with
the pool generation that list came with. The router polls every replica
(:data:`POLL_SECONDS`) and routes by the reports no older than
:data:`REPORT_MAX_AGE_SECONDS`:

* the *wanted* version of a name is the one in the desired list of the newest generation
  reported (:func:`wanted`): the pool spec as the operator last pushed it. A replica whose
  loaded version is another one (an old replica not changed yet, one announcing a change)
  gets no request for that name; while no replica holds the wanted version yet, requests
  for it wait, as when every replica is busy, rather than be answered by another version;
* a stream cut mid-way is resumed only on a replica holding the very version it started on
  (:class:`Pin`), never across versions: when none holds it any more, the stream ends with
  an error event;
* a name nobody reports (the base model, an unknown name) and replicas whose admin port is
  not known (``--replica`` URLs) are routed as before, by load alone.

A replica swaps a version only :data:`~cheapspot.contract.ADAPTER_SWAP_SETTLE_SECONDS` after
it announced the change, longer than :data:`REPORT_MAX_AGE_SECONDS`: a router whose report of
it is fresh enough to route by has seen the announcement before the swap.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

POLL_SECONDS = 0.5
"""How often the router asks each replica for its adapter versions."""
REPORT_MAX_AGE_SECONDS = 2.0
"""A report older than this is not routed by: the replica counts as holding no version
(kept below the replicas' swap settle, so a change is never missed)."""


@dataclass(frozen=True)
class Version:
    uri: str
    digest: str
    """``sha256:<hex>`` of the manifest; ``""`` where the replica could not read it."""

    def matches(self, wanted: Version) -> bool:
        """This loaded version is ``wanted`` (whose unknown digest matches any)."""
        return self.uri == wanted.uri and (not wanted.digest or self.digest == wanted.digest)


@dataclass(frozen=True)
class VersionReport:
    """One answer of a replica's ``GET /cheapspot/adapters``."""

    at: float
    """When the router got it (monotonic seconds)."""
    generation: int = 0
    loaded: Mapping[str, Version] = field(default_factory=dict)
    desired: Mapping[str, Version] = field(default_factory=dict)


@dataclass(frozen=True)
class Pin:
    """The version a resumed stream must continue on: the one its first replica held of
    its model when it started (None: none reported, as for the base model)."""

    version: Version | None


def _versions(items: Any) -> dict[str, Version]:
    out: dict[str, Version] = {}
    for item in items if isinstance(items, list) else []:
        if isinstance(item, Mapping) and item.get("name") and item.get("uri"):
            out[str(item["name"])] = Version(str(item["uri"]), str(item.get("digest") or ""))
    return out


def parse_report(doc: Any, at: float) -> VersionReport | None:
    """A replica's answer, None if it is not one (an old replica answering names only)."""
    if not isinstance(doc, Mapping) or not isinstance(doc.get("desired"), Mapping):
        return None
    desired = doc["desired"]
    generation = desired.get("generation")
    return VersionReport(
        at=at,
        generation=generation if isinstance(generation, int) else 0,
        loaded=_versions(doc.get("adapters")),
        desired=_versions(desired.get("adapters")),
    )


def fresh(reports: Mapping[str, VersionReport], now: float) -> dict[str, VersionReport]:
    return {n: r for n, r in reports.items() if now - r.at <= REPORT_MAX_AGE_SECONDS}


def wanted(reports: Iterable[VersionReport]) -> dict[str, Version]:
    """The wanted version of each adapter name: the desired lists of the newest generation
    reported. A name those lists disagree on (republished between two replicas' reads) has
    none: it is routed by load alone, as before versions were known."""
    reports = list(reports)
    if not reports:
        return {}
    newest = max(r.generation for r in reports)
    lists = [r.desired for r in reports if r.generation == newest]
    names = {n for d in lists for n in d}
    out: dict[str, Version] = {}
    for name in names:
        seen = Counter(d[name] for d in lists if name in d)
        if len(seen) == 1 and sum(seen.values()) == len(lists):
            out[name] = next(iter(seen))
    return out


def version_of(report: VersionReport | None, model: str) -> Version | None:
    return None if report is None else report.loaded.get(model)


def keeps(report: VersionReport | None, model: str, version: Version | None) -> bool:
    """The replica holds ``version`` of ``model`` and has not announced a change of it: a
    report that shows it still loaded, but another version desired, may be a few moments
    from the swap."""
    if version_of(report, model) != version:
        return False
    if report is None or version is None:
        return True
    desired = report.desired.get(model)
    return desired is not None and version.matches(desired)


def allowed(
    replicas: Iterable[str],
    reports: Mapping[str, VersionReport],
    model: str,
    now: float,
    pin: Pin | None = None,
) -> set[str] | None:
    """Which of ``replicas`` may take a request for ``model``; None: any of them.

    A resumed stream (``pin``): those keeping its version (:func:`keeps`), by a fresh
    report. Anything
    else: those whose fresh report holds the wanted version of ``model``; any replica where
    no version of ``model`` is wanted."""
    current = fresh(reports, now)
    if pin is not None:
        return {n for n in replicas if keeps(current.get(n), model, pin.version)}
    want = wanted(current.values()).get(model)
    if want is None:
        return None
    return {
        n for n, r in current.items() if (v := r.loaded.get(model)) is not None and v.matches(want)
    }

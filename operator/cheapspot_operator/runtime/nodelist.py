"""One node LIST shared by every reconcile.

Each job's and each pool's reconcile needs every node (capacity type, taints, readiness,
allocatable). Listing them per reconcile costs one cluster-wide LIST per job every interval:
with 200 jobs at a 2 s interval, 100 LISTs of every node a second. :class:`SharedNodeList`
keeps the last LIST for ``ttl`` seconds for everyone, and forgets it the moment the node
watch reports a change that matters (ready, schedulable, taints; a node added or deleted),
before the loops are woken: a reconcile woken by a reclaim notice always reads the notice.

Under kopf (:meth:`SharedNodeList.watch`), the node watch the operator already has feeds the
list instead (:class:`watchcache.WatchCache`): every event, heartbeats included, replaces the
node it carries before any loop is woken, and a LIST is made only to prime it and every
``resync`` seconds after. A reconcile then reads the nodes without a request.
"""

from __future__ import annotations

import builtins
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Protocol

from cheapspot_operator.cluster.views import BOUND_LIVE_PODS, NodeView, node_usage, node_view
from cheapspot_operator.runtime.watchcache import Primed, WatchCache

NODES_PATH = "/api/v1/nodes"
PODS_PATH = "/api/v1/pods"


class ListsNodes(Protocol):
    def list(
        self, path: str, label_selector: str | None = None, field_selector: str | None = None
    ) -> list[dict[str, Any]]: ...

    def list_versioned(
        self, path: str, label_selector: str | None = None, field_selector: str | None = None
    ) -> tuple[builtins.list[dict[str, Any]], int | None]: ...


@dataclass(frozen=True)
class _Listed:
    items: list[dict[str, Any]]
    generation: int
    at: float


class SharedNodeList:
    """Every node, listed at most once per ``ttl`` seconds (0: on every call); and what the
    pods bound to each node request, listed at most once per ``usage_ttl`` seconds."""

    def __init__(
        self,
        api: ListsNodes,
        ttl: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
        usage_ttl: float = 2.0,
        resync: float = 300.0,
    ) -> None:
        self.api = api
        self.ttl = ttl
        self.usage_ttl = usage_ttl
        self.clock = clock
        self._usage_lock = threading.Lock()
        self._usage: tuple[float, dict[str, dict[str, float]]] | None = None
        self.lists = 0
        """LIST requests made so far."""
        self._lock = threading.Lock()
        self._generation = 0
        self._listed: _Listed | None = None
        self.resync = resync
        self._cache: WatchCache | None = None
        self._primed = Primed(resync, clock)
        self._views: dict[str, tuple[str, NodeView]] = {}
        self._changes = 0
        """Bumped whenever a node's view changes (not for heartbeats)."""
        self._whole: tuple[int, Mapping[str, NodeView]] | None = None
        """:meth:`views` without usage, and the ``_changes`` it was computed at."""

    def watch(self) -> None:
        """From now on the node watch feeds the list through :meth:`observe`; :meth:`get`
        LISTs only to prime it and every ``resync`` seconds."""
        self._cache = WatchCache()

    def observe(self, event_type: str | None, node: dict[str, Any]) -> None:
        """A node watch event (kopf's type and object)."""
        cache = self._cache
        if cache is not None:
            before = cache.get("", str((node.get("metadata") or {}).get("name") or ""))
            cache.observe(event_type, node)
            # Counted after the cache holds the change: a mapping computed from the cache
            # before it is tagged with the older count, so it is never trusted again.
            if event_type == "DELETED" or before is None or node_view(before) != node_view(node):
                self._changes += 1
        self.invalidate()

    def invalidate(self) -> None:
        """A node changed: the next :meth:`get` lists again. Never blocks (the node watch
        calls it from the event loop), even while a LIST is under way: a LIST that started
        before the change is not reused."""
        self._generation += 1

    def get(self) -> Sequence[Mapping[str, Any]]:
        cache = self._cache
        if cache is not None:

            def prime() -> None:
                items, at = self.api.list_versioned(NODES_PATH)
                self.lists += 1
                cache.merge_list("", items, at)

            if self._primed.prime("", prime):
                self._changes += 1
            return cache.values()
        with self._lock:
            listed = self._listed
            if (
                listed is not None
                and listed.generation == self._generation
                and self.clock() - listed.at < self.ttl
            ):
                return listed.items
            generation, at = self._generation, self.clock()
            items = self.api.list(NODES_PATH)
            self.lists += 1
            self._listed = _Listed(items, generation, at)
            return items

    def views(
        self, usage: Mapping[str, Mapping[str, float]] | None = None
    ) -> Mapping[str, NodeView]:
        """The planner's view of every node, with what other pods request on it where
        ``usage`` says. A node's view is computed once per version of it, not per reconcile;
        without ``usage``, the whole mapping is computed again only after a node changed in a
        way a view shows (heartbeats do not): every reconcile of every job reads it."""
        whole = self._whole
        if not usage and self._cache is not None:
            self.get()  # primes (and counts it as a change) before the count is read
            changes = self._changes
            if whole is not None and whole[0] == changes:
                return whole[1]
            out = MappingProxyType(self._compute_views(None))
            self._whole = (changes, out)
            return out
        return self._compute_views(usage)

    def _compute_views(
        self, usage: Mapping[str, Mapping[str, float]] | None
    ) -> dict[str, NodeView]:
        out: dict[str, NodeView] = {}
        memo = self._views
        fresh: dict[str, tuple[str, NodeView]] = {}
        for raw in self.get():
            meta = raw.get("metadata") or {}
            name = str(meta.get("name") or "")
            used = usage.get(name) if usage else None
            if used:
                out[name] = node_view(raw, dict(used))
                continue
            stamp = str(meta.get("resourceVersion") or "")
            held = memo.get(name)
            view = held[1] if held is not None and stamp and held[0] == stamp else node_view(raw)
            fresh[name] = (stamp, view)
            out[name] = view
        self._views = fresh
        return out

    def usage(self) -> dict[str, dict[str, float]]:
        """Extended resources requested by the live pods bound to each node, all namespaces
        (what a fallback's return to spot needs): one pod LIST shared by jobs and pools."""
        with self._usage_lock:
            cached = self._usage
            if cached is not None and self.clock() - cached[0] < self.usage_ttl:
                return cached[1]
            at = self.clock()
            usage = node_usage(self.api.list(PODS_PATH, field_selector=BOUND_LIVE_PODS))
            self._usage = (at, usage)
            return usage

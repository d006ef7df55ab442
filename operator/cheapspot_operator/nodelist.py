"""One node LIST shared by every reconcile.

Each job's and each pool's reconcile needs every node (capacity type, taints, readiness,
allocatable). Listing them per reconcile costs one cluster-wide LIST per job every interval:
with 200 jobs at a 2 s interval, 100 LISTs of every node a second. :class:`SharedNodeList`
keeps the last LIST for ``ttl`` seconds for everyone, and forgets it the moment the node
watch reports a change that matters (ready, schedulable, taints; a node added or deleted),
before the loops are woken: a reconcile woken by a reclaim notice always reads the notice.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from cheapspot_operator.observed import BOUND_LIVE_PODS, node_usage

NODES_PATH = "/api/v1/nodes"
PODS_PATH = "/api/v1/pods"


class ListsNodes(Protocol):
    def list(
        self, path: str, label_selector: str | None = None, field_selector: str | None = None
    ) -> list[dict[str, Any]]: ...


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

    def invalidate(self) -> None:
        """A node changed: the next :meth:`get` lists again. Never blocks (the node watch
        calls it from the event loop), even while a LIST is under way: a LIST that started
        before the change is not reused."""
        self._generation += 1

    def get(self) -> list[dict[str, Any]]:
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

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

NODES_PATH = "/api/v1/nodes"


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
    """Every node, listed at most once per ``ttl`` seconds (0: on every call)."""

    def __init__(
        self, api: ListsNodes, ttl: float = 1.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.api = api
        self.ttl = ttl
        self.clock = clock
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

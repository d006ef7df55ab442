"""Objects as the watch last reported them: what a reconcile reads instead of a GET and a LIST.

kopf already watches every CheapTrainJob, every pod and every node for the operator's event
handlers. :class:`WatchCache` keeps what those events carry, so a reconcile at rest costs the
API server nothing: the job comes from the job watch, its pods from the pod watch, the nodes
from the node watch (:mod:`nodelist`). The rules that keep it honest:

* **Newest wins.** Every object carries a ``resourceVersion``; an event or a LIST older than
  what the cache holds is ignored, and a deletion leaves a tombstone so a late event cannot
  bring the object back (a pod re-created under the same name has a newer version and is
  taken). Versions are compared as integers, which is what the API server's etcd gives;
  a version that is not an integer is simply taken.
* **Our own writes are seen at once.** The object a create or a patch returns goes into the
  cache, so the next reconcile does not plan the same step again from an old picture.
  Anything that still slips through is caught by the API server: status writes carry the
  job's resourceVersion (a stale picture gets a 409 and replans) and pod names are
  deterministic (a second create gets a 409).
* **Primed by one LIST per namespace, then refreshed rarely.** kopf starts its watches
  independently, so the first reconcile of a namespace may come before the pod watch has
  reported that namespace's pods: it LISTs them once (a label-selected LIST) and merges.
  The same LIST every ``resync`` seconds repairs what a watch restart could have missed.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

Key = tuple[str, str]
"""(namespace, name); namespace "" for cluster-scoped objects."""

TOMBSTONES = 10_000
"""Deleted objects remembered (their last version), oldest forgotten first."""


def version(obj: Mapping[str, Any]) -> int | None:
    """The object's resourceVersion as an integer, or None when it has none or it is not one."""
    raw = (obj.get("metadata") or {}).get("resourceVersion")
    try:
        return int(raw) if raw is not None else None
    except (TypeError, ValueError):
        return None


def key_of(obj: Mapping[str, Any]) -> Key:
    meta = obj.get("metadata") or {}
    return (str(meta.get("namespace") or ""), str(meta.get("name") or ""))


class WatchCache:
    """Objects of one resource by (namespace, name), grouped by one label (a job's pods by
    its job label), fed by watch events and by the operator's own writes. Thread-safe: the
    event loop feeds it, reconcile threads read it."""

    def __init__(self, group_label: str | None = None) -> None:
        self.group_label = group_label
        self._lock = threading.Lock()
        self._objects: dict[Key, Mapping[str, Any]] = {}
        self._groups: dict[Key, set[str]] = {}
        """(namespace, label value) -> names."""
        self._gone: dict[Key, int] = {}
        """Tombstones: the version at which an object was deleted."""

    # -- feeding ----------------------------------------------------------------------------

    def observe(self, event_type: str | None, obj: Mapping[str, Any]) -> bool:
        """A watch event (kopf's ``event["type"]``: None for the initial listing, ADDED,
        MODIFIED, DELETED) and the object it carries; whether it told the cache anything new
        (not so for the event of a write of ours, whose result is already here)."""
        key = key_of(obj)
        if not key[1]:
            return False
        with self._lock:
            if event_type == "DELETED":
                self._delete(key, version(obj))
                return True
            held = self._objects.get(key)
            if held is not None and version(held) is not None and version(held) == version(obj):
                return False
            if not self._older(key, version(obj)):
                self._put(key, obj)
                return True
            return False

    def wrote(self, obj: Mapping[str, Any] | None) -> None:
        """The object an API write of ours returned (a create, a patch)."""
        if obj:
            self.observe(None, obj)

    def merge_list(
        self,
        namespace: str,
        items: Iterable[Mapping[str, Any]],
        list_version: int | None,
        listed: Callable[[Mapping[str, Any]], bool] = lambda _: True,
    ) -> None:
        """The result of a LIST of ``namespace`` (all of it, or what ``listed`` says the LIST
        selects). Objects in the cache that the LIST does not hold are dropped when the LIST
        is newer than them: they were deleted before it; newer ones stay (created since)."""
        items = list(items)
        names = {key_of(o)[1] for o in items}
        with self._lock:
            for obj in items:
                key = key_of(obj)
                if key[1] and not self._older(key, version(obj)):
                    self._put(key, obj)
            for key, obj in list(self._objects.items()):
                if key[0] != namespace or key[1] in names or not listed(obj):
                    continue
                held = version(obj)
                if list_version is None or held is None or held <= list_version:
                    self._delete(key, list_version)

    # -- reading ----------------------------------------------------------------------------

    def get(self, namespace: str, name: str) -> Mapping[str, Any] | None:
        with self._lock:
            return self._objects.get((namespace, name))

    def group(self, namespace: str, value: str) -> list[Mapping[str, Any]]:
        """The objects in ``namespace`` whose group label is ``value``."""
        with self._lock:
            names = self._groups.get((namespace, value), ())
            return [self._objects[(namespace, n)] for n in sorted(names)]

    def values(self) -> list[Mapping[str, Any]]:
        with self._lock:
            return list(self._objects.values())

    # -- inside the lock ----------------------------------------------------------------------

    def _older(self, key: Key, new: int | None) -> bool:
        if new is None:
            return False
        held = self._objects.get(key)
        if held is not None:
            have = version(held)
            return have is not None and new < have
        gone = self._gone.get(key)
        return gone is not None and new <= gone

    def _group_key(self, key: Key, obj: Mapping[str, Any]) -> Key | None:
        if self.group_label is None:
            return None
        value = ((obj.get("metadata") or {}).get("labels") or {}).get(self.group_label)
        return (key[0], str(value)) if value is not None else None

    def _put(self, key: Key, obj: Mapping[str, Any]) -> None:
        old = self._objects.get(key)
        if old is not None:
            self._ungroup(key, old)
        self._objects[key] = obj
        self._gone.pop(key, None)
        group = self._group_key(key, obj)
        if group is not None:
            self._groups.setdefault(group, set()).add(key[1])

    def _delete(self, key: Key, at: int | None) -> None:
        old = self._objects.pop(key, None)
        if old is not None:
            self._ungroup(key, old)
        stamp = at if at is not None else (version(old) if old is not None else None)
        if stamp is not None:
            self._gone.pop(key, None)
            self._gone[key] = stamp
            while len(self._gone) > TOMBSTONES:
                self._gone.pop(next(iter(self._gone)))

    def _ungroup(self, key: Key, obj: Mapping[str, Any]) -> None:
        group = self._group_key(key, obj)
        if group is None:
            return
        names = self._groups.get(group)
        if names is not None:
            names.discard(key[1])
            if not names:
                del self._groups[group]


class Primed:
    """When each namespace (or "" for all) was last LISTed into a cache: the first read
    LISTs, and again every ``resync`` seconds."""

    def __init__(self, resync: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.resync = resync
        self.clock = clock
        self._at: dict[str, float] = {}
        self._lock = threading.Lock()
        self.lists = 0
        """LISTs made so far."""

    def prime(self, namespace: str, do_list: Callable[[], None]) -> bool:
        """Run ``do_list`` if ``namespace`` is due (at most one LIST at a time); whether it ran."""
        with self._lock:
            at = self._at.get(namespace)
            if at is not None and self.clock() - at < self.resync:
                return False
            do_list()
            self.lists += 1
            self._at[namespace] = self.clock()
            return True

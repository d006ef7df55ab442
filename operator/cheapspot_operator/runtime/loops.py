"""One reconcile loop per object, for every kind of object the operator reconciles.

No kopf timer or daemon: those put a finalizer on every object so they can be stopped before
deletion, and our reconciliation needs no clean-up (pods go through ownerReferences, output
stays in object storage), while a finalizer would make ``kubectl delete`` hang whenever the
operator is down. So the kind's event handler starts one asyncio task per object
(:meth:`Loops.ensure`) that reconciles every ``reconcileIntervalSeconds`` (level-based, like a
timer) and at once when poked; pod and node events poke the objects they concern, which is
how a reclaim notice becomes a replacement pod within a second. The task ends when the
object is deleted, or when its reconciler says nothing is left to do for it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

from cheapspot_operator.cluster.views import node_view
from cheapspot_operator.runtime import metrics
from cheapspot_operator.runtime.config import OperatorConfig

log = logging.getLogger("cheapspot.operator")

POD_RESYNC_SECONDS = 300.0
"""How often the watched pods of a namespace are LISTed again (see :mod:`watchcache`)."""
POD_SETTLE_SECONDS = 0.5
"""A pod event wakes its job this long after it (:meth:`Loops.poke_soon`)."""


class Reconciles(Protocol):
    def reconcile(self, namespace: str, name: str) -> Any: ...

    def finished(self, namespace: str, name: str) -> bool:
        """Nothing is left to do for the object: its loop may end."""
        ...


NodeState = tuple[bool, bool, frozenset[str]]
"""What of a node decides whether its change wakes anyone: ready, unschedulable, taint keys."""

Key = tuple[str, str]


def node_state(node: Mapping[str, Any]) -> NodeState:
    view = node_view(node)
    return (view.ready, view.unschedulable, view.taint_keys)


@dataclass
class Loops:
    """One reconcile task per object, the event that wakes it early, and which objects have
    pods on which node (so a node's change wakes only those it concerns).

    A loop woken by an event (its pod, its node, an edit) runs on ``urgent``; a loop whose
    interval merely ran out runs on ``executor``. The timer ticks of many idle objects then
    never queue ahead of the reaction to a reclaim notice."""

    reconciler: Reconciles
    interval: float
    executor: ThreadPoolExecutor
    urgent: ThreadPoolExecutor
    tasks: dict[Key, asyncio.Task[None]] = field(default_factory=dict)
    pokes: dict[Key, asyncio.Event] = field(default_factory=dict)
    nodes: dict[str, NodeState] = field(default_factory=dict)
    settled: dict[Key, str] = field(default_factory=dict)
    """Finished objects by the resourceVersion last seen: the same version needs no new look."""
    placed: dict[Key, str] = field(default_factory=dict)
    """Each watched pod's node."""
    on_node: dict[str, dict[Key, Key]] = field(default_factory=dict)
    """node -> {pod: the object (job or pool) it belongs to}."""
    soon: dict[Key, asyncio.TimerHandle] = field(default_factory=dict)
    """Pokes due in a moment (:meth:`poke_soon`)."""
    poked_at: dict[Key, float] = field(default_factory=dict)
    """When each object's pending wake-up came first (monotonic): its pass's queued time."""

    def ensure(self, key: Key) -> None:
        task = self.tasks.get(key)
        if task is None or task.done():
            self.pokes[key] = asyncio.Event()
            self.tasks[key] = asyncio.create_task(self._loop(key), name=f"reconcile {key}")
        self.poke(key)

    def poke(self, key: Key) -> None:
        event = self.pokes.get(key)
        if event is not None:
            if not event.is_set():
                self.poked_at[key] = time.monotonic()
            event.set()

    def poke_soon(self, key: Key, delay: float = POD_SETTLE_SECONDS) -> None:
        """Poke ``key`` in ``delay`` seconds, once however many times this is called
        meanwhile: the events of one pod's start (created, bound, running) or end make one
        pass, not three (each a status write)."""
        if key in self.soon:
            return
        loop = asyncio.get_running_loop()
        self.soon[key] = loop.call_later(delay, self._poke_now, key)

    def _poke_now(self, key: Key) -> None:
        self.soon.pop(key, None)
        self.poke(key)

    def place(self, event_type: str | None, pod: Mapping[str, Any], owner: Key) -> None:
        """A pod watch event: remember the node the pod is bound to (none once deleted)."""
        meta = pod.get("metadata") or {}
        key = (str(meta.get("namespace") or ""), str(meta.get("name") or ""))
        node = str((pod.get("spec") or {}).get("nodeName") or "")
        if event_type == "DELETED":
            node = ""
        before = self.placed.get(key)
        if before == node:
            return
        if before is not None:
            self.placed.pop(key, None)
            held = self.on_node.get(before)
            if held is not None:
                held.pop(key, None)
                if not held:
                    del self.on_node[before]
        if node:
            self.placed[key] = node
            self.on_node.setdefault(node, {})[key] = owner

    def node_changed(self, event_type: str | None, name: str, node: Mapping[str, Any]) -> None:
        """A node watch event. Heartbeats wake nobody; a change that matters (a notice,
        NotReady, cordoned, deleted) wakes the objects with pods on the node, and only them.
        Room that appears (a new node, one ready again) wakes nobody: the scheduler places
        pending pods, and every loop's next timer tick sees the node. Waking every loop on
        every such change made a thousand flapping nodes a storm of reconciles."""
        if event_type == "DELETED":
            self.nodes.pop(name, None)
            self._poke_owners(name)
            return
        state = node_state(node)
        if self.nodes.get(name) == state:
            return
        self.nodes[name] = state
        self._poke_owners(name)

    def _poke_owners(self, node: str) -> None:
        for owner in set((self.on_node.get(node) or {}).values()):
            self.poke(owner)

    def stop(self, key: Key) -> None:
        self.settled.pop(key, None)
        task = self.tasks.pop(key, None)
        self.pokes.pop(key, None)
        self.poked_at.pop(key, None)
        handle = self.soon.pop(key, None)
        if handle is not None:
            handle.cancel()
        if task is not None:
            task.cancel()

    async def stop_all(self) -> None:
        for key in list(self.tasks):
            self.stop(key)
        await asyncio.sleep(0)

    def shutdown(self) -> None:
        for executor in (self.executor, self.urgent):
            executor.shutdown(wait=False, cancel_futures=True)

    async def _loop(self, key: Key) -> None:
        loop = asyncio.get_running_loop()
        poke = self.pokes[key]
        woken = True
        due = self.poked_at.pop(key, time.monotonic())
        while True:
            poke.clear()
            executor = self.urgent if woken else self.executor
            trigger = "event" if woken else "timer"
            try:
                await loop.run_in_executor(executor, self._reconcile, key, due, trigger)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("reconciling %s/%s failed; retrying", *key)
            else:
                if self.reconciler.finished(*key):
                    # Succeeded, Failed or gone: nothing costs anything any more. A later
                    # event about the object (an edit, a stray pod) starts a new loop.
                    self.tasks.pop(key, None)
                    self.pokes.pop(key, None)
                    self.poked_at.pop(key, None)
                    return
            try:
                await asyncio.wait_for(poke.wait(), timeout=self.interval)
                woken = True
                due = self.poked_at.pop(key, time.monotonic())
            except TimeoutError:
                woken = False
                due = time.monotonic()

    def _reconcile(self, key: Key, due: float, trigger: str) -> None:
        """One pass, in a worker thread; its time queued counted from ``due``."""
        metrics.RECONCILE_QUEUED_SECONDS.labels(trigger=trigger).observe(time.monotonic() - due)
        self.reconciler.reconcile(*key)


def loops_for(reconciler: Reconciles, config: OperatorConfig, name: str) -> Loops:
    """The loops of one kind of object: a few threads for the timer ticks (planning is CPU
    work under one interpreter lock: more would only contend), more for woken loops (their
    work is mostly waiting on the API server: creates, deletes, status writes)."""
    return Loops(
        reconciler=reconciler,
        interval=config.reconcile_interval_seconds,
        executor=ThreadPoolExecutor(max_workers=2, thread_name_prefix=name),
        urgent=ThreadPoolExecutor(max_workers=4, thread_name_prefix=f"{name}-woken"),
    )

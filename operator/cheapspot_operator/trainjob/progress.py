"""What the workers of a job report through the object store: their progress records (read
in the background, cached) and the claim on the job's output prefix."""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from cheapspot.contract import Layout, Progress, Role
from cheapspot.store import RetryPolicy, Store
from cheapspot_operator.trainjob.observed import ANCHOR_INDEX, GENERATOR_BASE

log = logging.getLogger("cheapspot.operator")

ProgressReader = Callable[[str, int, int], Mapping[int, Progress]]
"""(output uri, shard count, generation shard count) -> progress records by slot index (the
anchor's at ``ANCHOR_INDEX``, generation shard i's at ``GENERATOR_BASE + i``)."""

OutputClaims = Callable[[str, str, str, str, bool], str]
"""(output uri, namespace, name, uid, resume) -> "" when the job owns the prefix, else why not."""


class StoreProgressReader:
    """Progress records read through :mod:`cheapspot.store`, with few retries: a slow store
    must not hold up reacting to a reclaim (the next tick tries again). One store client per
    output prefix, kept: building a boto3 client costs more than the reads themselves."""

    MAX_STORES = 4096

    def __init__(self, timeout_attempts: int = 2) -> None:
        self.attempts = timeout_attempts
        self.stores: dict[str, Any] = {}
        self.lock = threading.Lock()

    def store(self, output_uri: str) -> Any:
        with self.lock:
            store = self.stores.get(output_uri)
            if store is None:
                if len(self.stores) >= self.MAX_STORES:
                    self.stores.pop(next(iter(self.stores)))
                store = Store(output_uri, retry=RetryPolicy(attempts=self.attempts, base_delay=0.2))
                self.stores[output_uri] = store
            return store

    def forget(self, output_uri: str) -> None:
        with self.lock:
            self.stores.pop(output_uri, None)

    def __call__(self, output_uri: str, shards: int, generators: int = 0) -> Mapping[int, Progress]:
        store = self.store(output_uri)
        layout = Layout(output_uri)
        out: dict[int, Progress] = {}
        slots = [(ANCHOR_INDEX, Role.ANCHOR, 0)] + [(i, Role.TRAIN, i) for i in range(shards)]
        slots += [(GENERATOR_BASE + i, Role.GENERATE, i) for i in range(generators)]
        for index, role, shard in slots:
            raw = store.get_bytes_or_none(layout.progress(role, shard))
            if raw:
                try:
                    out[index] = Progress.from_json(raw)
                except (ValueError, ValidationError):
                    log.warning("unreadable progress record %s", layout.progress(role, shard))
        return out


def store_output_claims(reader: StoreProgressReader) -> OutputClaims:
    """Claims an output prefix for a job by writing ``OWNER.json`` if absent (a conditional
    write where the store has one), so two jobs (or a job deleted and re-applied: a new UID)
    never mix their checkpoints and an old ``final/`` never passes for a new result."""

    def claim(output_uri: str, namespace: str, name: str, uid: str, resume: bool) -> str:
        store = reader.store(output_uri)
        layout = Layout(output_uri)
        record = json.dumps({"namespace": namespace, "name": name, "uid": uid}).encode()
        raw = store.get_bytes_or_none(layout.owner)
        if raw is None:
            if not resume and store.has_manifest(layout.final):
                return (
                    f"output prefix {output_uri} already holds a finished adapter "
                    "(final/); set spec.output.ifExists: Resume to take it as this job's "
                    "result, or use another prefix"
                )
            if store.put_bytes(layout.owner, record, if_absent=True):
                return ""
            raw = store.get_bytes_or_none(layout.owner) or b"{}"
        try:
            owner = json.loads(raw)
        except ValueError:
            owner = {}
        if owner.get("uid") == uid:
            return ""
        if resume:
            store.put_bytes(layout.owner, record)
            return ""
        who = f"{owner.get('namespace', '?')}/{owner.get('name', '?')} (uid {owner.get('uid')})"
        return (
            f"output prefix {output_uri} belongs to job {who}; set spec.output.ifExists: "
            "Resume to continue from what it holds, or use another prefix"
        )

    return claim


@dataclass
class ProgressCache:
    """Progress records per job, read in the background: at most every ``ttl`` seconds, and
    a reconciliation waits for the first read of a job at most ``first_wait`` seconds. So a
    slow or dead object store never delays the reaction to a reclaim (progress only drives
    round-boundary moves and the status)."""

    reader: ProgressReader
    ttl: float
    first_wait: float = 1.0
    entries: dict[str, tuple[float, Mapping[int, Progress]]] = field(default_factory=dict)
    refreshing: dict[str, Future[None]] = field(default_factory=dict)
    pool: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(max_workers=2, thread_name_prefix="progress")
    )
    lock: threading.Lock = field(default_factory=threading.Lock)

    def get(
        self, uid: str, output_uri: str, shards: int, generators: int = 0
    ) -> Mapping[int, Progress] | None:
        """The job's records, or None while none has been read yet."""
        with self.lock:
            cached = self.entries.get(uid)
            stale = cached is None or time.monotonic() - cached[0] >= self.ttl
            running = self.refreshing.get(uid)
            if stale and running is None:
                running = self.pool.submit(self._refresh, uid, output_uri, shards, generators)
                self.refreshing[uid] = running
        if cached is None and running is not None:
            with contextlib.suppress(TimeoutError):
                running.result(timeout=self.first_wait)
            with self.lock:
                cached = self.entries.get(uid)
        return cached[1] if cached else None

    def forget(self, uid: str) -> None:
        with self.lock:
            self.entries.pop(uid, None)

    def _refresh(self, uid: str, output_uri: str, shards: int, generators: int) -> None:
        try:
            records = self.reader(output_uri, shards, generators)
        except Exception as exc:  # the store being down must not stop pod handling
            log.warning("cannot read progress from %s: %s", output_uri, exc)
            records = None
        with self.lock:
            self.refreshing.pop(uid, None)
            if records is not None:
                self.entries[uid] = (time.monotonic(), records)

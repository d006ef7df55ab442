"""What the workers of a job report through the object store: their progress records (read
in the background when :mod:`freshness` says there may be something new, cached) and the
claim on the job's output prefix. Every request the operator's store clients send is counted
(``cheapspot_object_store_requests_total``)."""

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
from cheapspot_operator.runtime import metrics
from cheapspot_operator.trainjob.freshness import (
    DEFAULT_REST_SECONDS,
    MIN_GAP_SECONDS,
    PodsFingerprint,
    ProgressRead,
    read_due,
)
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
                store.on_request(count_store_request)
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


_FAILED = object()
"""The pods fingerprint of a read that failed: any reconcile after the minimum gap retries."""


def count_store_request(operation: str) -> None:
    metrics.STORE_REQUESTS.labels(operation=operation).inc()


@dataclass
class ProgressCache:
    """Progress records per job, read in the background when :func:`freshness.read_due` says
    so (the job's pods changed, its checkpoint interval passed), and a reconciliation waits
    for the first read of a job at most ``first_wait`` seconds. So a slow or dead object store
    never delays the reaction to a reclaim (progress only drives round-boundary moves and the
    status), and a job at rest costs the store one read per checkpoint interval."""

    reader: ProgressReader
    min_gap: float = MIN_GAP_SECONDS
    first_wait: float = 1.0
    clock: Callable[[], float] = time.monotonic
    entries: dict[str, Mapping[int, Progress]] = field(default_factory=dict)
    reads: dict[str, ProgressRead] = field(default_factory=dict)
    refreshing: dict[str, Future[None]] = field(default_factory=dict)
    pool: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(max_workers=2, thread_name_prefix="progress")
    )
    lock: threading.Lock = field(default_factory=threading.Lock)

    def get(
        self,
        uid: str,
        output_uri: str,
        shards: int,
        generators: int = 0,
        *,
        pods: PodsFingerprint = (),
        interval: float = DEFAULT_REST_SECONDS,
    ) -> Mapping[int, Progress] | None:
        """The job's records, or None while none has been read yet. ``pods``: what the job's
        pods look like now (:func:`freshness.pods_fingerprint`); ``interval``: seconds between
        reads while they do not change (:func:`freshness.read_interval`)."""
        with self.lock:
            cached = self.entries.get(uid)
            running = self.refreshing.get(uid)
            now = self.clock()
            if running is None and read_due(self.reads.get(uid), now, pods, interval, self.min_gap):
                self.reads[uid] = ProgressRead(now, pods)
                running = self.pool.submit(self._refresh, uid, output_uri, shards, generators)
                self.refreshing[uid] = running
        if cached is None and running is not None:
            with contextlib.suppress(TimeoutError):
                running.result(timeout=self.first_wait)
            with self.lock:
                cached = self.entries.get(uid)
        return cached

    def forget(self, uid: str) -> None:
        with self.lock:
            self.entries.pop(uid, None)
            self.reads.pop(uid, None)

    def _refresh(self, uid: str, output_uri: str, shards: int, generators: int) -> None:
        metrics.PROGRESS_READS.inc()
        try:
            records = self.reader(output_uri, shards, generators)
        except Exception as exc:  # the store being down must not stop pod handling
            log.warning("cannot read progress from %s: %s", output_uri, exc)
            records = None
        with self.lock:
            self.refreshing.pop(uid, None)
            if records is not None:
                self.entries[uid] = records
            elif uid in self.reads:
                self.reads[uid] = ProgressRead(self.reads[uid].at, _FAILED)

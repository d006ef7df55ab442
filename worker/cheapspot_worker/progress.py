"""Progress: structured JSON log lines (stderr) and the contract.Progress record.

The operator reads the record at ``Layout.progress(role, shard)`` to learn what a job does,
so worker pods need no Kubernetes access. Writes are throttled: at most one every
``min_interval`` seconds, except phase changes and checkpoints, which go out at once.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time
from datetime import UTC, datetime
from typing import Any

from cheapspot.contract import Layout, Phase, Progress, Role
from cheapspot.store import Store, StoreError

log = logging.getLogger("cheapspot_worker")

_RESERVED = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, msg, and every ``extra=`` field."""

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "msg": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _RESERVED and not key.startswith("_"):
                doc[key] = value
        if record.exc_info:
            doc["traceback"] = self.formatException(record.exc_info)
        return json.dumps(doc, default=str)


def configure_logging(level: int = logging.INFO) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # Libraries chat at INFO (weight loading bars, HTTP pools); keep the stream for us.
    for noisy in ("botocore", "boto3", "urllib3", "s3transfer", "transformers", "accelerate"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # Python warnings (deprecations in the ML stack) become log lines, not free text.
    logging.captureWarnings(True)
    logging.getLogger("py.warnings").setLevel(logging.ERROR)
    # Loading bars would interleave with the JSON lines.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")


def event(name: str, level: int = logging.INFO, **fields: Any) -> None:
    """Log a structured event: ``{"msg": name, "event": name, **fields}``."""
    log.log(level, name, extra={"event": name, **fields})


class Reporter:
    """Keeps this role's Progress record current in the store.

    Thread-safe: a training shard's checkpoint-upload thread reports the checkpoint it
    published while the training thread reports steps. Writes go out one at a time, and a
    record older than one already written is dropped, so the store never goes back.
    """

    def __init__(
        self,
        store: Store,
        layout: Layout,
        role: Role,
        shard_index: int = 0,
        min_interval: float = 5.0,
    ) -> None:
        self.store = store
        self.key = layout.progress(role, shard_index)
        self.min_interval = min_interval
        self._last_put = 0.0
        self._lock = threading.Lock()  # the record and the decision to write it
        self._put_lock = threading.Lock()  # one write at a time, in order
        self._version = 0
        self._written = 0
        self.previous = self._read_previous()
        self.record = Progress(role=role, shard_index=shard_index, phase=Phase.STARTING)
        if self.previous is not None:
            # Counters survive restarts; the resume itself is counted when a checkpoint loads.
            self.record = self.record.model_copy(
                update={
                    "resumes": self.previous.resumes,
                    "steps_lost": self.previous.steps_lost,
                    "step": self.previous.step,
                }
            )

    def _read_previous(self) -> Progress | None:
        doc = self.store.get_json(self.key)
        if doc is None:
            return None
        try:
            return Progress.model_validate(doc)
        except ValueError:
            return None

    def update(self, *, force: bool = False, **fields: Any) -> None:
        with self._lock:
            phase_changed = "phase" in fields and fields["phase"] != self.record.phase
            self.record = self.record.model_copy(update={**fields, "updated_at": datetime.now(UTC)})
            self._version += 1
            due = force or phase_changed or time.monotonic() - self._last_put >= self.min_interval
            if due:
                self._last_put = time.monotonic()
        if due:
            self.flush()

    def flush(self) -> None:
        with self._lock:
            version, data = self._version, self.record.to_json()
        with self._put_lock:
            if version < self._written:
                return  # a newer record went out meanwhile
            self.store.put_bytes(self.key, data)
            self._written = version
            self._last_put = time.monotonic()

    def try_flush(self) -> None:
        """Best effort, for the way out after a failure (the store may be what failed)."""
        saved = self.store.retry
        try:
            from cheapspot.store import RetryPolicy

            self.store.retry = RetryPolicy(attempts=1)
            self.flush()
        except (StoreError, OSError):
            pass
        finally:
            self.store.retry = saved

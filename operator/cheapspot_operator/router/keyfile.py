"""The pool's API keys file as the router reads it: parsed by
:mod:`cheapspot_operator.router.keys`, read again when it changes."""

from __future__ import annotations

import logging
import os
import time

from cheapspot_operator.router import keys

log = logging.getLogger("cheapspot.router")

API_KEYS_ENV = "CHEAPSPOT_API_KEYS_FILE"
KEYS_CHECK_SECONDS = 2.0
"""How often the keys file is looked at for changes (a Secret edit reaches a mounted file
within the kubelet's sync period, about a minute; the router follows within this)."""


class KeyFile:
    """The pool's API keys from a file, read again when it changes (its inode, size or
    modification time: kubelet swaps a mounted Secret's files atomically). A change that does
    not parse keeps the keys before it, and says why in the log."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.seen = self._stamp()
        self.ring = keys.parse_keys(self._read(), path)
        self.checked = time.monotonic()

    def _stamp(self) -> tuple[int, int, int]:
        st = os.stat(self.path)
        return (st.st_ino, st.st_size, st.st_mtime_ns)

    def _read(self) -> str:
        with open(self.path, encoding="utf-8") as f:
            return f.read()

    def current(self) -> keys.KeyRing:
        now = time.monotonic()
        if now - self.checked < KEYS_CHECK_SECONDS:
            return self.ring
        self.checked = now
        try:
            stamp = self._stamp()
            if stamp != self.seen:
                self.ring = keys.parse_keys(self._read(), self.path)
                self.seen = stamp
                log.info("API keys reloaded from %s: %d keys", self.path, len(self.ring))
        except (OSError, ValueError) as exc:
            log.error("API keys not reloaded, the %d before stay: %s", len(self.ring), exc)
        return self.ring

"""Waiting for the cluster to reach a state: one polling helper for tests, demo and benchmarks."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_for(
    what: str, check: Callable[[], T | None], timeout_s: float = 60.0, poll_s: float = 0.2
) -> T:
    """Poll ``check`` until it returns something truthy and return that; else TimeoutError
    naming ``what``."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout_s:.0f}s waiting for {what}")
        time.sleep(poll_s)

"""How a worker role ends other than by finishing: each maps to a contract.ExitCode."""

from __future__ import annotations

import signal
import time
from types import FrameType


class PermanentError(Exception):
    """A user error no retry can fix (bad dataset, unknown target module, unreadable model).

    The message is shown to the user as is, so it says what is wrong and what to change.
    """


FAILED_EXIT = 1
"""Exit code of a failure that is neither the user's (permanent) nor outside the worker
(transient): the operator retries it a few times in a row, then holds it."""


class EngineFailed(Exception):  # noqa: N818 (named for what happened)
    """The engine (vLLM) died before serving: exits :data:`FAILED_EXIT` with its output."""


class Interrupted(Exception):  # noqa: N818 (a signal, not an error)
    """SIGTERM arrived and what could be saved has been published."""


class Stop:
    """SIGTERM as a flag with the time it arrived (the handler does nothing else)."""

    def __init__(self) -> None:
        self.at: float | None = None

    @property
    def requested(self) -> bool:
        return self.at is not None

    def elapsed(self) -> float:
        return 0.0 if self.at is None else time.monotonic() - self.at

    def install(self) -> None:
        def handler(signum: int, frame: FrameType | None) -> None:
            if self.at is None:
                self.at = time.monotonic()

        signal.signal(signal.SIGTERM, handler)

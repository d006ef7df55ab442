"""How a worker role ends other than by finishing: each maps to a contract.ExitCode."""

from __future__ import annotations


class PermanentError(Exception):
    """A user error no retry can fix (bad dataset, unknown target module, unreadable model).

    The message is shown to the user as is, so it says what is wrong and what to change.
    """


class Interrupted(Exception):  # noqa: N818 (a signal, not an error)
    """SIGTERM arrived and what could be saved has been published."""

"""Fallback timing, shared by every planner: how long a spot pod has waited for capacity.

Measured from the ``PodScheduled=False, reason=Unschedulable`` condition's
``lastTransitionTime`` and the injected clock, never from sleeps, so an operator restart does
not reset the wait.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from cheapspot_operator.cluster.views import PodView


def spot_wait(pod: PodView, now: datetime) -> timedelta | None:
    """How long ``pod`` has been unschedulable, or None while it is not."""
    return (now - pod.unschedulable_since) if pod.unschedulable_since else None


def waited_too_long(pod: PodView, fallback_after_seconds: int, now: datetime) -> timedelta | None:
    """The wait when it has reached ``fallback_after_seconds`` (time to fall back), else None."""
    waited = spot_wait(pod, now)
    if waited is not None and waited >= timedelta(seconds=fallback_after_seconds):
        return waited
    return None

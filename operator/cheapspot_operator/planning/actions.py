"""Actions every planner can return; each kind adds its own status and create actions."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DeletePod:
    name: str
    grace_seconds: int | None = None
    """None: the pod's own grace period (the worker checkpoints); 0: its node is gone."""
    reason: str = ""


@dataclass(frozen=True)
class EmitEvent:
    type: str
    """Normal or Warning."""
    reason: str
    message: str
    cause: str = ""
    """Machine-readable detail (the preemption signal, the fallback reason) for metrics."""

"""Preemption signals and failure classification, shared by every planner.

A pod's state is sorted into one :class:`Outcome`; the order of the checks in :func:`classify`
is the policy: a clean exit and a worker's permanent error are believed first, then signals
that capacity is going away (node gone, NotReady, the profile's interruption taint,
``DisruptionTarget``, eviction, SIGTERM), and anything else is a failure that spends the
restart budget.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

from cheapspot.contract import ExitCode, Progress
from cheapspot_operator.observed import NodeView, PodView
from cheapspot_operator.placement import PlacementProfile
from cheapspot_operator.spec import CapacityType


class ClusterView(Protocol):
    """The part of an observation these functions read (every kind's ``Observed`` has it)."""

    @property
    def nodes(self) -> Mapping[str, NodeView]: ...

    @property
    def profile(self) -> PlacementProfile: ...


class Outcome(enum.StrEnum):
    HEALTHY = "Healthy"
    """Pending or running, nothing wrong."""
    DONE = "Done"
    """The worker exited 0."""
    PREEMPTED = "Preempted"
    """Capacity was taken away: replace at once, no restart budget spent."""
    PERMANENT = "Permanent"
    """A user error the worker reported: the job fails, no retry."""
    FAILED = "Failed"
    """Anything else: retried while the restart budget lasts."""


@dataclass(frozen=True)
class Verdict:
    outcome: Outcome
    reason: str
    message: str = ""


def node_signal(node_name: str, obs: ClusterView) -> str:
    """Why the node ``node_name`` is going away, or "" when it is fine."""
    if not node_name:
        return ""
    node = obs.nodes.get(node_name)
    if node is None:
        return "NodeGone"
    if not node.ready:
        return "NodeNotReady"
    if obs.profile.is_interrupted(node.taint_keys):
        return "InterruptionNotice"
    return ""


def classify(pod: PodView, obs: ClusterView, progress: Progress | None = None) -> Verdict:
    """Sort a pod's state into one of the :class:`Outcome` classes. Order matters."""
    if pod.phase == "Succeeded" or (pod.terminated and pod.exit_code == ExitCode.DONE):
        return Verdict(Outcome.DONE, "Completed")
    if pod.phase == "Failed" and pod.exit_code == ExitCode.PERMANENT:
        message = pod.termination_message or (progress.message if progress else "")
        return Verdict(Outcome.PERMANENT, "PermanentError", message or "permanent worker error")
    signal = node_signal(pod.node_name, obs)
    if signal:
        return Verdict(Outcome.PREEMPTED, signal, f"node {pod.node_name}")
    if pod.disruption_target:
        return Verdict(Outcome.PREEMPTED, "DisruptionTarget", pod.disruption_reason)
    if pod.reason == "Evicted":
        return Verdict(Outcome.PREEMPTED, "Evicted", pod.termination_message)
    if pod.phase == "Failed":
        if pod.exit_code == ExitCode.INTERRUPTED:
            return Verdict(Outcome.PREEMPTED, "Interrupted", "worker stopped by SIGTERM")
        code = "unknown" if pod.exit_code is None else str(pod.exit_code)
        return Verdict(
            Outcome.FAILED, "WorkerFailed", f"exit code {code}: {pod.termination_message}"
        )
    if pod.deleting:
        return Verdict(Outcome.PREEMPTED, "PodDeleted", "pod deleted outside the operator")
    return Verdict(Outcome.HEALTHY, pod.phase)


def spot_available(obs: ClusterView) -> bool:
    """A schedulable, ready spot node without a reclaim notice exists."""
    return any(
        obs.profile.capacity_of(n.labels) is CapacityType.SPOT
        and n.ready
        and not n.unschedulable
        and not obs.profile.is_interrupted(n.taint_keys)
        for n in obs.nodes.values()
    )


def doomed_nodes(obs: ClusterView) -> tuple[str, ...]:
    return tuple(
        sorted(
            n.name
            for n in obs.nodes.values()
            if not n.ready or obs.profile.is_interrupted(n.taint_keys)
        )
    )

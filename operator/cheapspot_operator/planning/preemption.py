"""Preemption signals and failure classification, shared by every planner.

A pod's state is sorted into one :class:`Outcome`; the order of the checks in :func:`classify`
is the policy:

1. what the container itself said: exit 0 is done, the worker's permanent error is permanent;
2. a kubelet eviction: the pod outgrowing its own limits (scratch volume, memory; the kubelet's
   message says it "exceeds" something) is a failure with the kubelet's message, an eviction
   under node pressure the pod did not cause is a preemption;
3. any other exit code of a terminated container: 143 (SIGTERM, the worker checkpointed) is a
   preemption, 75 is transient, OOMKilled and crashes are failures, and a SIGKILL (137) is a
   preemption only when capacity was going away (the notice ran out), else a failure. A crash
   is a crash even if the node gets a notice afterwards;
4. a pod still alive: signals that capacity is going away (node gone, NotReady, the profile's
   interruption taint, ``DisruptionTarget``, deletion by someone else) are preemptions.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

from cheapspot.contract import ExitCode, Progress
from cheapspot_operator.api.common import CapacityType
from cheapspot_operator.cluster.placement import PlacementProfile
from cheapspot_operator.cluster.views import NodeView, PodView


class ClusterView(Protocol):
    """The part of an observation these functions read (every kind's ``Observed`` has it)."""

    @property
    def nodes(self) -> Mapping[str, NodeView]: ...

    @property
    def profile(self) -> PlacementProfile: ...


START_FAILURES: Mapping[str, str] = {
    "ErrImagePull": "ImagePullBackOff",
    "ImagePullBackOff": "ImagePullBackOff",
    "InvalidImageName": "InvalidImageName",
    "ErrImageNeverPull": "ErrImageNeverPull",
    "CreateContainerConfigError": "CreateContainerConfigError",
    "CreateContainerError": "CreateContainerError",
    "RunContainerError": "RunContainerError",
    "CreateRefused": "CreateRefused",
}
"""Container waiting reasons (and the API refusing the pod) that mean a pod will not start
without someone fixing something, each to the reason reported (pulls alternate between two)."""

MANY = 1 << 30
"""Room on spot for pods that need no GPU: any usable spot node takes them."""


class Outcome(enum.StrEnum):
    HEALTHY = "Healthy"
    """Pending or running, nothing wrong."""
    DONE = "Done"
    """The worker exited 0."""
    PREEMPTED = "Preempted"
    """Capacity was taken away: replace at once, no restart budget spent."""
    PERMANENT = "Permanent"
    """A user error the worker reported: the job fails, no retry."""
    TRANSIENT = "Transient"
    """Something outside the worker failed (exit 75): retry after a backoff, for a while,
    without spending the restart budget."""
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


def caused_by_pod(eviction_message: str) -> bool:
    """Whether a kubelet eviction was the pod's own doing (it outgrew a limit or used more
    than it asked for), from the kubelet's message: "Usage of EmptyDir volume ... exceeds the
    limit", "Pod ephemeral local storage usage exceeds the total limit", "Container worker was
    using 30Gi, which exceeds its request of 0"."""
    return "exceed" in eviction_message.lower()


ADMISSION_REJECTIONS = frozenset(
    {
        "UnexpectedAdmissionError",
        "NodeAffinity",
        "InvalidNodeInfo",
        "UnexpectedPredicateFailureType",
    }
)


def rejected_by_node(pod: PodView) -> bool:
    """The kubelet refused the pod at admission, before any container ran: its node lacked
    what the scheduler counted on (``OutOfnvidia.com/gpu`` when a GPU went missing or the
    device plugin reported fewer, ``UnexpectedAdmissionError`` when allocating a device
    failed). Nothing of the worker's ran, so it is no failure of the job's."""
    return (
        pod.phase == "Failed"
        and pod.exit_code is None
        and (pod.reason.startswith("OutOf") or pod.reason in ADMISSION_REJECTIONS)
    )


def classify(pod: PodView, obs: ClusterView, progress: Progress | None = None) -> Verdict:
    """Sort a pod's state into one of the :class:`Outcome` classes. Order matters (see the
    module docstring): the container's own exit is judged before anything around it."""
    if pod.phase == "Succeeded" or (pod.terminated and pod.exit_code == ExitCode.DONE):
        return Verdict(Outcome.DONE, "Completed")
    if pod.phase == "Failed" and pod.exit_code == ExitCode.PERMANENT:
        message = pod.termination_message or (progress.message if progress else "")
        return Verdict(Outcome.PERMANENT, "PermanentError", message or "permanent worker error")
    if pod.reason == "Evicted":
        if caused_by_pod(pod.termination_message):
            return Verdict(Outcome.FAILED, "Evicted", f"evicted: {pod.termination_message}")
        return Verdict(Outcome.PREEMPTED, "Evicted", pod.termination_message)
    if rejected_by_node(pod):
        # Capacity that was not there after all: replaced at once, off that node.
        return Verdict(
            Outcome.PREEMPTED,
            "RejectedByNode",
            f"node {pod.node_name or '?'} rejected the pod: {pod.reason} "
            f"{pod.termination_message}".strip(),
        )
    signal = node_signal(pod.node_name, obs)
    if pod.phase == "Failed" and pod.exit_code is not None:
        return _judge_exit(pod, signal)
    if signal:
        return Verdict(Outcome.PREEMPTED, signal, f"node {pod.node_name}")
    if pod.disruption_target:
        return Verdict(Outcome.PREEMPTED, "DisruptionTarget", pod.disruption_reason)
    if pod.phase == "Failed":
        return Verdict(
            Outcome.FAILED, "WorkerFailed", f"exit code unknown: {pod.termination_message}"
        )
    if pod.deleting:
        return Verdict(Outcome.PREEMPTED, "PodDeleted", "pod deleted outside the operator")
    return Verdict(Outcome.HEALTHY, pod.phase)


def _judge_exit(pod: PodView, signal: str) -> Verdict:
    """A terminated container, by its own exit code; ``signal``: the node's state."""
    code = pod.exit_code
    if code == ExitCode.INTERRUPTED:
        return Verdict(Outcome.PREEMPTED, "Interrupted", "worker stopped by SIGTERM")
    if code == ExitCode.TRANSIENT:
        return Verdict(
            Outcome.TRANSIENT,
            "TransientFailure",
            f"exit code {code}: {pod.termination_message or 'transient failure'}",
        )
    if pod.exit_reason == "OOMKilled":
        return Verdict(
            Outcome.FAILED,
            "OOMKilled",
            f"exit code {code}: OOMKilled (out of memory): raise spec.resources.memory",
        )
    if code == 128 + 9 and (signal or pod.disruption_target):
        # Killed after the grace period on a node going away: the notice ran out.
        cause = signal or "DisruptionTarget"
        return Verdict(Outcome.PREEMPTED, cause, f"killed on node {pod.node_name or '?'}")
    return Verdict(Outcome.FAILED, "WorkerFailed", f"exit code {code}: {pod.termination_message}")


def spot_available(obs: ClusterView) -> bool:
    """A schedulable, ready spot node without a reclaim notice exists."""
    return any(
        obs.profile.capacity_of(n.labels) is CapacityType.SPOT
        and n.ready
        and not n.unschedulable
        and not obs.profile.is_interrupted(n.taint_keys)
        for n in obs.nodes.values()
    )


def spot_room(obs: ClusterView, resource: str, per_pod: int, avoid: tuple[str, ...] = ()) -> int:
    """How many pods needing ``per_pod`` of ``resource`` (GPUs) fit on spot nodes now: ready,
    schedulable, no reclaim notice, not in ``avoid``, counting what bound pods already request.
    A node that offers none of ``resource`` does not match."""
    usable = [
        n
        for n in obs.nodes.values()
        if obs.profile.capacity_of(n.labels) is CapacityType.SPOT
        and n.ready
        and not n.unschedulable
        and not obs.profile.is_interrupted(n.taint_keys)
        and n.name not in avoid
    ]
    if per_pod <= 0:
        return MANY if usable else 0
    return sum(max(0, int(n.free(resource) // per_pod)) for n in usable)


def doomed_nodes(obs: ClusterView) -> tuple[str, ...]:
    return tuple(
        sorted(
            n.name
            for n in obs.nodes.values()
            if not n.ready or obs.profile.is_interrupted(n.taint_keys)
        )
    )

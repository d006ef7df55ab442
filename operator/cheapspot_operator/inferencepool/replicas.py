"""A pool's replica pods: their names, the selector and endpoint that find them, and the
states a replica pod goes through. Pure.

Make-before-break everywhere. A replica pod goes through these states
(:class:`ReplicaState`, :func:`replica_state`)::

    Starting -> Serving -> Retiring -> Draining -> (deleted)
       |           |          |___________^
       |           |______________________^      a reclaim notice drains at once
       |___________________________________> (deleted)   never served: deleted at once
"""

from __future__ import annotations

import enum

from cheapspot.contract import LABEL_POOL, LABEL_POOL_ROLE
from cheapspot_operator.inferencepool.observed import REPLICA_ROLE, ReplicaPod

ROUTER_SERVICE_PORT = 80


class ReplicaState(enum.StrEnum):
    STARTING = "Starting"
    """The slot's current pod, not Ready yet: the router does not send to it."""
    SERVING = "Serving"
    """The slot's current pod, Ready: the router sends to it."""
    RETIRING = "Retiring"
    """An older pod of its slot (or of a slot scaled away), still Ready and serving until its
    successor is Ready. Not marked yet."""
    DRAINING = "Draining"
    """Marked with the draining annotation: the router sends it nothing new; deleted when idle
    or near its deadline."""
    GONE = "Gone"
    """Terminated or being deleted. Terminal."""

    def is_terminal(self) -> bool:
        return self is ReplicaState.GONE


def replica_state(rp: ReplicaPod, current: bool) -> ReplicaState:
    """The one place a replica pod's state is read off the observation."""
    if not rp.live:
        return ReplicaState.GONE
    if rp.draining_until is not None:
        return ReplicaState.DRAINING
    if current:
        return ReplicaState.SERVING if rp.ready else ReplicaState.STARTING
    return ReplicaState.RETIRING


def replica_pod_name(pool_name: str, index: int, attempt: int) -> str:
    return f"{pool_name}-replica-{index}-{attempt}"


def replica_selector(pool_name: str) -> str:
    return f"{LABEL_POOL}={pool_name},{LABEL_POOL_ROLE}={REPLICA_ROLE}"


def endpoint_url(namespace: str, pool_name: str) -> str:
    """The pool's OpenAI base URL inside the cluster: its router Service."""
    return f"http://{pool_name}.{namespace}.svc/v1"

"""Retiring the replica pods that are not their slot's current pod: why each is drained,
marking it, and deleting it once idle or near its deadline. Pure.

* a reclaim notice (the profile's interruption taint, ``DisruptionTarget``): the old pod is
  marked draining with the notice as its deadline (the router sends it nothing new from that
  moment);
* a draining pod is deleted once it reports nothing in flight (and has been draining for
  :data:`DRAIN_SETTLE`), or when its deadline is :data:`DEADLINE_MARGIN` away;
* a retiring pod that is not being reclaimed keeps serving until its slot's new pod is Ready
  (scaled away: drained at once); one not Ready when its drain is due is deleted at once;
* a pod on a node that is gone or NotReady is deleted at once.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from cheapspot_operator.api.inferencepool import DrainingReplica, ReplicaSlot
from cheapspot_operator.inferencepool.actions import MarkDraining, Pass
from cheapspot_operator.inferencepool.observed import PoolObserved, ReplicaPod
from cheapspot_operator.inferencepool.replicas import ReplicaState, replica_state
from cheapspot_operator.planning.actions import DeletePod

DRAIN_SETTLE = timedelta(seconds=2)
"""A draining replica is kept at least this long, so requests sent just before the router saw
the mark reach it (and show in its report) before an idle report is believed."""
DEADLINE_MARGIN = timedelta(seconds=3)
"""A draining replica is deleted this long before its deadline at the latest, leaving vLLM's
SIGTERM drain a moment before the node goes."""


def retire(work: Pass) -> None:
    """Drain and delete every replica pod that is not its slot's current pod."""
    st, obs, now, spec = work.status, work.obs, work.now, work.spec
    slots = {s.index: s for s in st.slots}
    current_names = {rp.name for rp in work.current.values() if rp is not None}
    draining: list[DrainingReplica] = []
    for rp in obs.replicas:
        if rp.name in current_names:
            if rp.draining_until is not None and rp.live:
                draining.append(_drain_entry(work, rp, rp.draining_until, "Replaced"))
            continue
        if not rp.live:
            if rp.pod.deleting and _node_lost(rp, obs):
                work.actions.append(DeletePod(rp.name, 0, "NodeGone"))
            elif not rp.pod.deleting:
                work.actions.append(DeletePod(rp.name, reason="Cleanup"))
            continue
        if _node_lost(rp, obs):
            work.actions.append(DeletePod(rp.name, 0, "NodeGone"))
            continue
        slot = slots.get(rp.index)
        state = replica_state(rp, current=False)
        if state is ReplicaState.RETIRING:
            reason = _drain_reason(work, rp, slot)
            if not reason:
                continue  # serves until its successor is Ready
            if not rp.ready:
                # Never served (or no longer can): nothing to drain.
                work.actions.append(DeletePod(rp.name, reason=reason))
                continue
            notice = reason == "Reclaimed"
            length = obs.profile.notice_seconds if notice else spec.engine.shutdown_timeout_seconds
            deadline = now + timedelta(seconds=length)
            work.actions.append(MarkDraining(rp.name, deadline))
            work.event(
                "Normal",
                "Draining",
                f"replica {rp.index} ({rp.name}): {reason}, drain by "
                f"{deadline.strftime('%H:%M:%SZ')}",
                reason,
            )
            work.since[rp.name] = now
            draining.append(_drain_entry(work, rp, deadline, reason))
            continue
        # Draining: delete when idle (after the settle time) or near the deadline.
        assert rp.draining_until is not None
        entry = _drain_entry(work, rp, rp.draining_until, "")
        report = obs.reports.get(rp.name)
        settled = now - work.since.get(rp.name, now) >= DRAIN_SETTLE
        idle = report is not None and report.in_flight == 0 and settled
        # Not serving at all (vLLM gone, the probe failing): nothing can be in flight there.
        dead = not rp.ready and (report is None or not report.ready)
        if idle or dead or now >= rp.draining_until - DEADLINE_MARGIN:
            work.actions.append(DeletePod(rp.name, reason="Drained"))
            continue
        draining.append(entry)
    st.draining = sorted(draining, key=lambda d: (d.index, d.pod))


def _drain_entry(work: Pass, rp: ReplicaPod, deadline: datetime, reason: str) -> DrainingReplica:
    old = next((d for d in work.obs.pool.status.draining if d.pod == rp.name), None)
    since = work.since.setdefault(rp.name, old.since if old and old.since else work.now)
    return DrainingReplica(
        pod=rp.name,
        index=rp.index,
        deadline=deadline,
        since=since,
        reason=reason or (old.reason if old else ""),
    )


def _node_lost(rp: ReplicaPod, obs: PoolObserved) -> bool:
    name = rp.pod.node_name
    if not name:
        return False
    node = obs.nodes.get(name)
    return node is None or not node.ready


def _drain_reason(work: Pass, rp: ReplicaPod, slot: ReplicaSlot | None) -> str:
    """Why a retiring pod must be drained now, or "" while it should keep serving."""
    obs = work.obs
    node = obs.nodes.get(rp.pod.node_name)
    if (node is not None and obs.profile.is_interrupted(node.taint_keys)) or (
        rp.pod.disruption_target
    ):
        return "Reclaimed"
    if slot is None:
        return "ScaledDown"
    if slot.held and not rp.ready:
        return "Replaced"
    # A held slot, or one whose new pod is still starting (or failing), keeps its older pod
    # serving: it is drained only for a successor that is Ready.
    successor = work.current.get(rp.index)
    if successor is not None and successor.ready and successor.draining_until is None:
        return "Replaced"
    if rp.attempt < slot.attempt and not rp.ready:
        return "Replaced"
    return ""

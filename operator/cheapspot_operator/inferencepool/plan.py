"""The CheapInferencePool planner: observed state and a clock in, actions out. No I/O.

``plan(spec, observed, now)`` looks at one pool (its status, its replica pods and their nodes,
what each replica reports about itself, the router Deployment) and returns what to do: a new
status first, then replicas to create, mark draining or delete, adapter lists to push and
events to post. As for training jobs, the status (slot attempts) is written before the pods it
describes, and pods have deterministic names (``<pool>-replica-<i>-<attempt>``), so an operator
killed at any point creates no duplicate on restart.

Slots: the pool has ``spec.replicas`` replica slots. Slots ``0..anchor.replicas-1`` are
anchors: on-demand, never drained for a reclaim, never scaled away. The others start on spot.
A slot's *current* pod is the one with the slot's attempt; every other replica pod (older
attempts, pods of slots scaled away) is *retiring*.

Make-before-break everywhere. A replica pod goes through these states
(:class:`ReplicaState`, :func:`replica_state`)::

    Starting -> Serving -> Retiring -> Draining -> (deleted)
       |           |          |___________^
       |           |______________________^      a reclaim notice drains at once
       |___________________________________> (deleted)   never served: deleted at once

* a reclaim notice (the profile's interruption taint, ``DisruptionTarget``): the slot gets a
  new attempt at once (its replacement is created in the same pass, never on a doomed node)
  and the old pod is marked draining with the notice as its deadline (the router sends it
  nothing new from that moment);
* a draining pod is deleted once it reports nothing in flight (and has been draining for
  :data:`DRAIN_SETTLE`, so requests the router sent just before it saw the mark arrive), or
  when its deadline is :data:`DEADLINE_MARGIN` away; deletion is SIGTERM, on which vLLM
  finishes what it has within ``engine.shutdownTimeoutSeconds``;
* a replica lost without notice (node gone or NotReady, pod gone or evicted) is replaced at
  once; the router resumes the streams it cut;
* a retiring pod that is not being reclaimed (moved back to spot, or its slot scaled away)
  keeps serving until its slot's new pod is Ready (scaled away: drained at once);
* fallback: a spot replica unschedulable for ``spot.fallbackAfterSeconds`` moves its slot to
  on-demand (condition ``SpotUnavailable``); once a spot node has a free GPU, one fallback slot
  at a time returns to spot, its on-demand pod serving until the spot one is Ready;
* scale: ``spec.replicas`` adds slots on spot; removing takes on-demand fallback slots first,
  then spot ones (those not ready first), never an anchor;
* adapters in the spec are pushed to every serving replica whose report differs
  (:class:`SyncAdapters`: the act layer's ``PUT /cheapspot/adapters``), no restart;
* a replica that exits with the worker's permanent error holds its slot (no crash loop) with
  condition ``Degraded`` and an event carrying the replica's message; a transient exit (75:
  the object store unreachable, an adapter not published yet) waits
  ``failurePolicy.transientBackoffSeconds`` (doubling per failure in a row, up to 10 times)
  and starts a new pod without counting as a failure, for ``transientRetrySeconds`` from the
  first one in a row; other failures are retried :data:`MAX_FAILURES` times in a row, then
  held the same way. A held slot is retried when the spec changes (a new generation). A held
  or failing slot never drains its older pod while that one still serves: the predecessor
  is drained only for a successor that is Ready;
* a return to spot whose spot pod fails (not a reclaim) goes back to on-demand: a new
  on-demand pod, the old one serving until it is Ready, and no return is tried again for
  ``spot.fallbackAfterSeconds``;
* a replica that cannot start (image pull failing, a missing secret or config map, its
  creation refused) gets an event ``PodNotStarting`` naming the cause; after
  ``failurePolicy.startTimeoutSeconds`` its slot is held (condition ``Degraded``) and the pod
  deleted, so it holds no node. Until then a Pending pod bound to a node is costed like a
  running one (it holds that node's GPUs);
* the router: its Deployment is created, or patched when its replica count or its pod
  template (hash annotation, :func:`router_outdated`) differs from what is built now;
* budget (``spec.budget``): cost is each running replica's share of its node at the node's
  price (the anchors' included); at the limit, with the next 5 minutes projected, Suspend
  scales the pool to its anchors and Fail to nothing (condition ``WithinBudget``), until the
  limit is raised.
"""

from __future__ import annotations

import enum
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta

from cheapspot.contract import LABEL_POOL, LABEL_POOL_ROLE
from cheapspot_operator.api.common import BudgetAction, CapacityType
from cheapspot_operator.api.inferencepool import (
    DrainingReplica,
    InferencePoolSpec,
    InferencePoolStatus,
    ReplicaSlot,
)
from cheapspot_operator.inferencepool.actions import (
    EnsureRouter,
    MarkDraining,
    PoolAction,
    SyncAdapters,
)
from cheapspot_operator.inferencepool.observed import REPLICA_ROLE, PoolObserved, ReplicaPod
from cheapspot_operator.planning import budget, costing, slots
from cheapspot_operator.planning.actions import CreatePod, DeletePod, EmitEvent, UpdateStatus
from cheapspot_operator.planning.conditions import ConditionWriter
from cheapspot_operator.planning.preemption import (
    START_FAILURES,
    Outcome,
    Verdict,
    classify,
    doomed_nodes,
    spot_room,
)

DRAIN_SETTLE = timedelta(seconds=2)
"""A draining replica is kept at least this long, so requests sent just before the router saw
the mark reach it (and show in its report) before an idle report is believed."""
DEADLINE_MARGIN = timedelta(seconds=3)
"""A draining replica is deleted this long before its deadline at the latest, leaving vLLM's
SIGTERM drain a moment before the node goes."""
MAX_FAILURES = 3
"""Failed replica pods in a row (not reclaims) before the slot is held."""
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


# --- helpers --------------------------------------------------------------------------------


def replica_pod_name(pool_name: str, index: int, attempt: int) -> str:
    return f"{pool_name}-replica-{index}-{attempt}"


def replica_selector(pool_name: str) -> str:
    return f"{LABEL_POOL}={pool_name},{LABEL_POOL_ROLE}={REPLICA_ROLE}"


def endpoint_url(namespace: str, pool_name: str) -> str:
    """The pool's OpenAI base URL inside the cluster: its router Service."""
    return f"http://{pool_name}.{namespace}.svc/v1"


def _next_attempt(slot: ReplicaSlot, capacity: CapacityType, reason: str) -> ReplicaSlot:
    return slots.next_attempt(slot, capacity, reason, ready=False)


@dataclass
class _Plan:
    spec: InferencePoolSpec
    obs: PoolObserved
    now: datetime
    status: InferencePoolStatus
    actions: list[PoolAction]
    avoid: tuple[str, ...]
    current: dict[int, ReplicaPod | None]
    since: dict[str, datetime]
    """Pod name -> when its drain began (kept in status.draining)."""
    replicas: int = 0
    """The replicas wanted now: ``spec.replicas``, fewer when the budget is exceeded."""
    over_budget: bool = False

    def event(self, type_: str, reason: str, message: str, cause: str = "") -> None:
        self.actions.append(EmitEvent(type_, reason, message, cause))

    def create(self, slot: ReplicaSlot) -> ReplicaSlot:
        name = replica_pod_name(self.obs.pool.name, slot.index, slot.attempt)
        self.actions.append(CreatePod(slot.index, slot.attempt, slot.capacity_type, self.avoid))
        return slot.model_copy(update={"pod": name})


# --- the planner ----------------------------------------------------------------------------


def plan(spec: InferencePoolSpec, obs: PoolObserved, now: datetime) -> list[PoolAction]:
    """What to do for one pool now. The first action, if any, is :class:`UpdateStatus`."""
    prev = obs.pool.status
    st = prev.model_copy(deep=True)
    work = _Plan(
        spec=spec,
        obs=obs,
        now=now,
        status=st,
        actions=[],
        avoid=doomed_nodes(obs),
        current={},
        since={d.pod: d.since for d in prev.draining if d.since is not None},
    )
    st.observed_generation = obs.pool.generation
    st.selector = replica_selector(obs.pool.name)
    st.endpoint = endpoint_url(obs.pool.namespace, obs.pool.name)

    work.replicas = _budget(work)
    _scale(work)
    by_slot: dict[int, list[ReplicaPod]] = {}
    for rp in obs.replicas:
        by_slot.setdefault(rp.index, []).append(rp)
    slots = []
    for known in st.slots:
        pods = by_slot.get(known.index, [])
        slot = _reconcile_slot(work, known, pods)
        work.current[slot.index] = next((p for p in pods if p.attempt == slot.attempt), None)
        slots.append(slot)
    st.slots = slots
    _return_to_spot(work)
    _retire(work)
    _sync_adapters(work)
    if router_outdated(spec, obs):
        work.actions.append(EnsureRouter(spec.router.replicas))

    _summarise(work)
    _accrue_cost(st, prev, obs, now)
    others = [a for a in work.actions if not isinstance(a, UpdateStatus)]
    if st == prev and not others:
        return []
    return [UpdateStatus(st), *others]


def router_outdated(spec: InferencePoolSpec, obs: PoolObserved) -> bool:
    """The router Deployment is missing, has another replica count, or was built from
    another pod template (a new router image or setting: patched in, a rolling update)."""
    router = obs.router
    if router is None or router.replicas != spec.router.replicas:
        return True
    return bool(obs.router_template_hash) and router.template_hash != obs.router_template_hash


def _scale(work: _Plan) -> None:
    """Make the slots match the replicas wanted: anchors first, spot slots for the rest."""
    st, spec, gen = work.status, work.spec, work.obs.pool.generation
    anchors = min(spec.anchor.replicas, work.replicas)
    have = {s.index: s for s in st.slots}
    slots: list[ReplicaSlot] = []
    for i in range(anchors):
        slot = have.pop(i, None) or ReplicaSlot(index=i)
        slots.append(
            slot.model_copy(update={"anchor": True, "capacity_type": CapacityType.ON_DEMAND})
        )
    others = sorted(have.values(), key=lambda s: s.index)
    others = [s.model_copy(update={"anchor": False}) for s in others]
    want = work.replicas - anchors
    if len(others) > want:
        # On-demand fallback slots go first, then spot; those not serving before those that do.
        order = sorted(
            others,
            key=lambda s: (s.capacity_type is CapacityType.SPOT, s.ready, -s.index),
        )
        removed = order[: len(others) - want]
        keep = {s.index for s in order[len(others) - want :]}
        others = [s for s in others if s.index in keep]
        work.event(
            "Normal",
            "ScaledDown",
            f"replicas {len(slots) + len(others) + len(removed)} -> {work.replicas}: draining "
            + ", ".join(str(s.index) for s in sorted(removed, key=lambda s: s.index)),
        )
    used = {s.index for s in slots} | {s.index for s in others}
    # Serving pods without a slot (a status write was lost) get theirs back first; indices of
    # pods still draining stay taken, so a new slot never reuses their pod names.
    orphans = sorted(
        {
            rp.index
            for rp in work.obs.replicas
            if rp.live and rp.draining_until is None and rp.index >= anchors
        }
        - used
    )
    for index in orphans[: max(0, want - len(others))]:
        others.append(ReplicaSlot(index=index, pod_phase="Unknown"))
        used.add(index)
    used |= {rp.index for rp in work.obs.replicas if rp.live}
    index = anchors
    while len(others) < want:
        while index in used:
            index += 1
        others.append(ReplicaSlot(index=index))
        used.add(index)
    slots += sorted(others, key=lambda s: s.index)
    # A held slot gets another chance when the spec changes (the user fixed something).
    st.slots = [
        _next_attempt(s, s.capacity_type, s.fallback_reason).model_copy(
            update={"held": "", "failures": 0}
        )
        if s.held and s.held_generation != gen
        else s
        for s in slots
    ]


def _reconcile_slot(work: _Plan, slot: ReplicaSlot, pods: list[ReplicaPod]) -> ReplicaSlot:
    st, obs, now = work.status, work.obs, work.now
    slot, current = slots.adopt_newest(slot, pods, pod_phase="")
    what = f"replica {slot.index}" + (" (anchor)" if slot.anchor else "")
    if slot.held:
        return slot
    if current is None:
        if not slot.pod_phase:
            if slot.retry_after is not None and now < slot.retry_after:
                return slot  # backing off after a transient failure
            refused = obs.create_refused.get(slot.index, "")
            slot = _track_start(work, slot, "CreateRefused" if refused else "", refused)
            if slot.held:
                return slot
            return work.create(slot)
        verdict = Verdict(Outcome.PREEMPTED, "PodGone", f"pod {slot.pod} disappeared")
    elif current.draining_until is not None:
        # Marked by someone (an operator that died before writing the next attempt): its
        # replacement is due.
        verdict = Verdict(Outcome.PREEMPTED, "Draining", f"pod {current.name} is draining")
    else:
        verdict = classify(current.pod, obs)
        slot = slot.model_copy(
            update={
                "pod": current.name,
                "node": current.pod.node_name,
                "pod_phase": current.pod.phase,
                "ready": current.ready,
            }
        )

    if verdict.outcome is Outcome.HEALTHY:
        assert current is not None
        if current.ready:
            slot = slot.model_copy(update=_STREAKS_CLEARED)
        stuck = current.pod.phase == "Pending" and current.pod.waiting_reason in START_FAILURES
        slot = _track_start(
            work,
            slot,
            current.pod.waiting_reason if stuck else "",
            f"pod {current.name}: {current.pod.waiting_message}" if stuck else "",
        )
        if slot.held:
            # Deleted, so a pod that will never start holds no node (and costs nothing).
            work.actions.append(DeletePod(current.name, reason=slot.blocked_reason))
            return slot
        return _maybe_fall_back(work, slot, current)
    slot = _track_start(work, slot, "", "")
    if verdict.outcome is not Outcome.PREEMPTED:
        back = _spot_return_failed(work, slot, verdict)
        if back is not None:
            return back
    if verdict.outcome is Outcome.PERMANENT:
        message = f"{what}: {verdict.message}"
        work.event("Warning", "ReplicaFailed", message, "PermanentError")
        return slot.model_copy(
            update={"held": message, "held_generation": obs.pool.generation, "ready": False}
        )
    if verdict.outcome is Outcome.PREEMPTED:
        st.preemptions += 1
        slot, announced = slots.preempted(slot, what, verdict)
        work.actions.append(announced)
        return work.create(_next_attempt(slot, slot.capacity_type, slot.fallback_reason))
    if verdict.outcome is Outcome.TRANSIENT:
        policy = work.spec.failure_policy
        since = slot.transient_since or now
        if now - since < timedelta(seconds=policy.transient_retry_seconds):
            return _back_off(work, slot, what, verdict, since)
        verdict = Verdict(
            Outcome.FAILED,
            verdict.reason,
            f"{verdict.message} (transient failures for more than "
            f"failurePolicy.transientRetrySeconds={policy.transient_retry_seconds})",
        )
    # Failed (or exited): retried a few times in a row, then held.
    failures = slot.failures + 1
    slot = slot.model_copy(update={"failures": failures, "ready": False})
    if failures >= MAX_FAILURES:
        message = f"{what}: {verdict.message or verdict.reason} ({failures} failures in a row)"
        work.event("Warning", "ReplicaCrashLoop", message, "CrashLoop")
        return slot.model_copy(update={"held": message, "held_generation": obs.pool.generation})
    detail = verdict.message or verdict.reason
    work.event("Warning", "ReplicaFailed", f"{what}: {detail}; restarting", "Failed")
    return work.create(_next_attempt(slot, slot.capacity_type, slot.fallback_reason))


_STREAKS_CLEARED: dict[str, object] = {
    "failures": 0,
    "transient_failures": 0,
    "transient_since": None,
    "retry_after": None,
}
"""What a slot forgets once its pod is Ready: it got past whatever failed before."""


def _back_off(
    work: _Plan, slot: ReplicaSlot, what: str, verdict: Verdict, since: datetime
) -> ReplicaSlot:
    """A transient failure within the retry window: a new attempt after a backoff (doubling
    per failure in a row, at most 10 times the base), not counted as a failure."""
    policy = work.spec.failure_policy
    count = slot.transient_failures + 1
    base = policy.transient_backoff_seconds
    delay = min(base * 2 ** min(count - 1, 10), base * 10)
    work.event(
        "Warning",
        "TransientFailure",
        f"{what}: {verdict.message}; retrying in {delay}s (transient failure {count} in a row; "
        f"not counted as a failure for failurePolicy.transientRetrySeconds="
        f"{policy.transient_retry_seconds})",
        verdict.reason,
    )
    slot = _next_attempt(slot, slot.capacity_type, slot.fallback_reason)
    return slot.model_copy(
        update={
            "ready": False,
            "transient_failures": count,
            "transient_since": since,
            "retry_after": work.now + timedelta(seconds=delay),
        }
    )


def _spot_return_failed(work: _Plan, slot: ReplicaSlot, verdict: Verdict) -> ReplicaSlot | None:
    """A spot pod of a return to spot that failed while the slot's on-demand pod still serves:
    back to on-demand (a new pod there, the serving one kept until it is Ready), and no return
    for ``spot.fallbackAfterSeconds``. None when the slot is no such return."""
    if slot.anchor or slot.capacity_type is not CapacityType.SPOT:
        return None
    serving = [
        rp
        for rp in work.obs.replicas
        if rp.index == slot.index
        and rp.attempt < slot.attempt
        and rp.live
        and rp.ready
        and rp.draining_until is None
        and rp.pod.capacity == CapacityType.ON_DEMAND.value
    ]
    if not serving:
        return None
    wait = work.spec.spot.fallback_after_seconds
    work.event(
        "Warning",
        "SpotReturnFailed",
        f"replica {slot.index}: its spot pod {slot.pod} failed "
        f"({verdict.message or verdict.reason}); staying on on-demand ({serving[-1].name} "
        f"serves until its successor is Ready), next return in {wait}s or later",
        verdict.reason,
    )
    moved = _next_attempt(slot, CapacityType.ON_DEMAND, slots.SPOT_UNAVAILABLE)
    moved = moved.model_copy(
        update={"ready": False, "spot_return_after": work.now + timedelta(seconds=wait)}
    )
    return work.create(moved)


def _track_start(work: _Plan, slot: ReplicaSlot, reason: str, message: str) -> ReplicaSlot:
    """Record (or clear) why the slot's pod cannot start; hold the slot past the start
    timeout (as a job fails past it), with an event when the cause first shows."""
    if not reason:
        if slot.blocked_since is None and not slot.blocked_reason:
            return slot
        return slot.model_copy(update={"blocked_reason": "", "blocked_since": None})
    now, policy = work.now, work.spec.failure_policy
    what = f"replica {slot.index}" + (" (anchor)" if slot.anchor else "")
    reason = START_FAILURES.get(reason, reason)
    since = slot.blocked_since or now
    # A refused create is announced by the act layer, in the API server's words, as it
    # happens (controller.report_refusals); the rest here, once per cause.
    if reason not in (slot.blocked_reason, "CreateRefused"):
        work.event("Warning", "PodNotStarting", f"{what}: {reason}: {message}", reason)
    slot = slot.model_copy(update={"blocked_reason": reason, "blocked_since": since})
    timeout = policy.start_timeout_seconds
    if now - since < timedelta(seconds=timeout):
        return slot
    held = (
        f"{what}: its pod could not start for {timeout}s (failurePolicy.startTimeoutSeconds): "
        f"{reason}: {message}"
    )
    work.event("Warning", "ReplicaFailed", held, reason)
    return slot.model_copy(
        update={"held": held, "held_generation": work.obs.pool.generation, "ready": False}
    )


def _maybe_fall_back(work: _Plan, slot: ReplicaSlot, current: ReplicaPod) -> ReplicaSlot:
    if slot.anchor or slot.capacity_type is not CapacityType.SPOT:
        return slot
    what = f"replica {slot.index}"
    fell_back = slots.spot_wait_over(
        what, current.pod, work.spec.spot.fallback_after_seconds, work.now
    )
    if fell_back is None:
        return slot
    work.actions.append(fell_back)
    return work.create(_next_attempt(slot, CapacityType.ON_DEMAND, slots.SPOT_UNAVAILABLE))


def _return_to_spot(work: _Plan) -> None:
    """One fallback slot at a time goes back to spot once a spot node has a free GPU."""
    st = work.status
    moving = [
        s
        for s in st.slots
        if not s.anchor
        and s.capacity_type is CapacityType.SPOT
        and not s.ready
        and any(
            rp.index == s.index and rp.attempt < s.attempt and rp.live for rp in work.obs.replicas
        )
    ]
    fallback = [
        s
        for s in st.slots
        if not s.anchor
        and not s.held
        and s.capacity_type is CapacityType.ON_DEMAND
        and (s.spot_return_after is None or work.now >= s.spot_return_after)
    ]
    r = work.spec.resources
    if moving or not fallback or spot_room(work.obs, r.gpu_resource, r.gpu, work.avoid) < 1:
        return
    slot = fallback[0]
    work.event("Normal", "ReturnedToSpot", f"replica {slot.index}: spot capacity is back")
    moved = work.create(_next_attempt(slot, CapacityType.SPOT, ""))
    st.slots = [moved if s.index == slot.index else s for s in st.slots]
    work.current[slot.index] = None


def _retire(work: _Plan) -> None:
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


def _drain_entry(work: _Plan, rp: ReplicaPod, deadline: datetime, reason: str) -> DrainingReplica:
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


def _drain_reason(work: _Plan, rp: ReplicaPod, slot: ReplicaSlot | None) -> str:
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


def _sync_adapters(work: _Plan) -> None:
    desired = tuple(work.spec.adapters)
    names = frozenset(a.name for a in desired)
    for rp in work.obs.replicas:
        if not rp.live or not rp.ready or rp.draining_until is not None:
            continue
        report = work.obs.reports.get(rp.name)
        if report is not None and report.ready and report.adapters != names:
            work.actions.append(SyncAdapters(rp.name, desired))


# --- status summary -------------------------------------------------------------------------


def _summarise(work: _Plan) -> None:
    st, obs, now, gen = work.status, work.obs, work.now, work.obs.pool.generation
    active = [s for s in st.slots if not s.held]
    st.replicas = len(active)
    serving = {
        rp.index
        for rp in obs.replicas
        if rp.live and rp.ready and rp.draining_until is None and not _doomed(rp, work)
    }
    st.ready_replicas = sum(1 for s in active if s.index in serving)
    st.spot_replicas = sum(1 for s in active if s.capacity_type is CapacityType.SPOT)
    st.on_demand_replicas = len(active) - st.spot_replicas
    st.replicas_display = f"{st.ready_replicas}/{work.replicas}"
    st.placement_display = f"{st.spot_replicas}/{st.on_demand_replicas}"
    st.draining_replicas = len(st.draining)

    out = ConditionWriter(st.conditions, now, gen)
    put = out.put
    router_ready = obs.router is not None and obs.router.ready_replicas > 0
    if work.replicas == 0 and work.over_budget:
        put("Ready", "False", "BudgetExceeded", "every replica stopped: spec.budget reached")
    elif work.replicas == 0:
        put("Ready", "False", "ScaledToZero", "spec.replicas is 0")
    elif st.ready_replicas == 0:
        put("Ready", "False", "NoReplicaReady", f"0/{work.replicas} replicas ready")
    elif not router_ready:
        put("Ready", "False", "RouterNotReady", "no router pod is ready")
    else:
        put(
            "Ready",
            "True",
            "Serving",
            f"{st.ready_replicas}/{work.replicas} replicas ready",
        )
    fallback = [s for s in active if not s.anchor and s.capacity_type is CapacityType.ON_DEMAND]
    if fallback:
        put(
            "SpotUnavailable",
            "True",
            "FellBackToOnDemand",
            "on on-demand: " + ", ".join(str(s.index) for s in fallback),
        )
    else:
        put("SpotUnavailable", "False", "OnSpot")
    problems = [s.held for s in st.slots if s.held]
    problems += sorted(f"{name}: {r.message}" for name, r in obs.reports.items() if r.message)
    previous = next((x for x in st.conditions if x.type == "Degraded"), None)
    if problems:
        message = "; ".join(problems)[:2000]
        reason = "ReplicaFailed" if any(s.held for s in st.slots) else "AdapterError"
        changed = previous is None or previous.status != "True" or previous.message != message
        if changed and reason == "AdapterError":
            work.event("Warning", reason, message, reason)
        put("Degraded", "True", reason, message)
    else:
        put("Degraded", "False", "AsExpected")
    st.conditions = out.conditions


def _doomed(rp: ReplicaPod, work: _Plan) -> bool:
    return rp.pod.node_name in work.avoid


def _running(obs: PoolObserved) -> Iterator[costing.Usage]:
    """What each running replica pod costs per hour where it runs."""
    return costing.running_usage((rp.pod for rp in obs.replicas), obs)


def _budget(work: _Plan) -> int:
    """Budget status, condition and events; the replicas the budget allows."""
    spec, st, obs = work.spec, work.status, work.obs
    got = budget.review(
        st, spec.budget, _running(obs), now=work.now, generation=obs.pool.generation
    )
    if got is None:
        return spec.replicas
    if got.event is not None:
        work.actions.append(got.event)
    if not got.exceeded:
        return spec.replicas
    work.over_budget = True
    if spec.budget is not None and spec.budget.on_exceed is BudgetAction.FAIL:
        return 0
    return min(spec.anchor.replicas, spec.replicas)


def _accrue_cost(
    st: InferencePoolStatus, prev: InferencePoolStatus, obs: PoolObserved, now: datetime
) -> None:
    """Running replica pods at their share of their node's price (live, last known good or
    the table), and the same seconds at on-demand."""
    every = timedelta(seconds=obs.status_refresh_seconds)
    costing.accrue(st, prev, _running(obs), now, every)

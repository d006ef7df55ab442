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

Make-before-break everywhere. A replica pod goes through the states of
:class:`~cheapspot_operator.inferencepool.replicas.ReplicaState` (Starting, Serving, Retiring,
Draining, deleted):

* a reclaim notice (the profile's interruption taint, ``DisruptionTarget``): the slot gets a
  new attempt at once (its replacement is created in the same pass, never on a doomed node)
  and the old pod is marked draining with the notice as its deadline (the router sends it
  nothing new from that moment);
* a draining pod is deleted once it reports nothing in flight (and has been draining for
  :data:`~cheapspot_operator.inferencepool.draining.DRAIN_SETTLE`, so requests the router sent just before it saw the mark arrive), or
  when its deadline is :data:`~cheapspot_operator.inferencepool.draining.DEADLINE_MARGIN` away; deletion is SIGTERM, on which vLLM
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
* adapters in the spec are pushed to every serving replica whose report differs by name or
  URI (:class:`SyncAdapters`: the act layer's ``PUT /cheapspot/adapters``, with the pool's
  generation), no restart; the replica swaps a changed version after announcing it, and the
  routers send a name only to replicas holding its wanted version (docs/serving-data-path.md);
* a replica that exits with the worker's permanent error holds its slot (no crash loop) with
  condition ``Degraded`` and an event carrying the replica's message; a transient exit (75:
  the object store unreachable, an adapter not published yet) waits
  ``failurePolicy.transientBackoffSeconds`` (doubling per failure in a row, up to 10 times)
  and starts a new pod without counting as a failure, for ``transientRetrySeconds`` from the
  first one in a row; other failures are retried :data:`~cheapspot_operator.inferencepool.reconcile.MAX_FAILURES` times in a row, then
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

This module is the pass: budget, scale, the router, adapters and cost. One slot's pod life is
:mod:`cheapspot_operator.inferencepool.reconcile`, retiring old pods
:mod:`cheapspot_operator.inferencepool.draining`, the status summary
:mod:`cheapspot_operator.inferencepool.summary`.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime, timedelta

from cheapspot_operator.api.common import BudgetAction, CapacityType
from cheapspot_operator.api.inferencepool import (
    InferencePoolSpec,
    InferencePoolStatus,
    ReplicaSlot,
)
from cheapspot_operator.inferencepool.actions import (
    EnsureRouter,
    Pass,
    PoolAction,
    SyncAdapters,
)
from cheapspot_operator.inferencepool.draining import retire
from cheapspot_operator.inferencepool.observed import PoolObserved, ReplicaPod
from cheapspot_operator.inferencepool.reconcile import next_attempt, reconcile_slot, return_to_spot
from cheapspot_operator.inferencepool.replicas import endpoint_url, replica_selector
from cheapspot_operator.inferencepool.summary import summarise
from cheapspot_operator.planning import budget, costing
from cheapspot_operator.planning.actions import UpdateStatus
from cheapspot_operator.planning.preemption import doomed_nodes


def plan(spec: InferencePoolSpec, obs: PoolObserved, now: datetime) -> list[PoolAction]:
    """What to do for one pool now. The first action, if any, is :class:`UpdateStatus`."""
    prev = obs.pool.status
    st = prev.model_copy(deep=True)
    work = Pass(
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
        slot = reconcile_slot(work, known, pods)
        work.current[slot.index] = next((p for p in pods if p.attempt == slot.attempt), None)
        slots.append(slot)
    st.slots = slots
    return_to_spot(work)
    retire(work)
    _sync_adapters(work)
    if router_outdated(spec, obs):
        work.actions.append(EnsureRouter(spec.router.replicas))

    summarise(work)
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


def _scale(work: Pass) -> None:
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
        next_attempt(s, s.capacity_type, s.fallback_reason).model_copy(
            update={"held": "", "failures": 0}
        )
        if s.held and s.held_generation != gen
        else s
        for s in slots
    ]


def _sync_adapters(work: Pass) -> None:
    desired = tuple(work.spec.adapters)
    uris = {a.name: a.uri for a in desired}
    for rp in work.obs.replicas:
        if not rp.live or not rp.ready or rp.draining_until is not None:
            continue
        report = work.obs.reports.get(rp.name)
        if report is not None and report.ready and dict(report.adapters) != uris:
            work.actions.append(SyncAdapters(rp.name, desired, work.obs.pool.generation))


def _running(obs: PoolObserved) -> Iterator[costing.Usage]:
    """What each running replica pod costs per hour where it runs."""
    return costing.running_usage((rp.pod for rp in obs.replicas), obs)


def _budget(work: Pass) -> int:
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

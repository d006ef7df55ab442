"""What a CheapTrainJob's status shows, assembled from its slots and progress records. Pure.

After the slots are reconciled, the status gets what people and ``kubectl get`` read: each
shard's round, step and loss, the spot/on-demand split, the job's progress and last checkpoint,
the distillation's phase, and the ``Succeeded``, ``Progressing``, ``Suspended`` and ``OnSpot``
conditions.
"""

from __future__ import annotations

from datetime import datetime

from cheapspot.contract import Layout, Phase, Role
from cheapspot_operator.api.common import CapacityType
from cheapspot_operator.api.phases import JobPhase
from cheapspot_operator.api.trainjob import (
    CheckpointStatus,
    ProgressStatus,
    TrainJobSpec,
    TrainJobStatus,
)
from cheapspot_operator.planning.conditions import ConditionWriter
from cheapspot_operator.trainjob.distillation import distillation_status
from cheapspot_operator.trainjob.observed import ANCHOR_INDEX, Observed, is_generator, slot_name
from cheapspot_operator.trainjob.shards import active_slots, generating


def summarise(st: TrainJobStatus, spec: TrainJobSpec, obs: Observed, now: datetime) -> None:
    shards = []
    for slot in st.shards:
        p = obs.progress.get(slot.index)
        update = {"round": p.round, "step": p.step, "loss": p.loss} if p else {}
        shards.append(slot.model_copy(update=update))
    st.shards = shards
    gens = []
    for slot in st.generators:
        p = obs.progress.get(slot.index)
        gens.append(slot.model_copy(update={"step": p.step}) if p else slot)
    st.generators = gens
    st.spot_shards = sum(1 for s in shards if s.capacity_type is CapacityType.SPOT and not s.done)
    st.on_demand_shards = sum(
        1 for s in shards if s.capacity_type is CapacityType.ON_DEMAND and not s.done
    )
    st.shards_display = f"{st.spot_shards}/{st.on_demand_shards}"
    _summarise_progress(st, spec, obs)
    _conditions(st, now, obs.job.generation)


def _summarise_progress(st: TrainJobStatus, spec: TrainJobSpec, obs: Observed) -> None:
    # Records not read yet (a slow store): keep what the status shows rather than drop to 0.
    if obs.progress_known or not st.progress.rounds:
        st.progress = _progress(spec, obs)
    if JobPhase(st.phase) is JobPhase.SUCCEEDED:
        st.progress = st.progress.model_copy(update={"percent": 100})
    pr = st.progress
    st.progress_display = f"{pr.percent}% r{min(pr.round + 1, pr.rounds)}/{pr.rounds}"
    generated = [obs.progress.get(g.index) for g in st.generators]
    st.distillation = distillation_status(
        spec,
        JobPhase(st.phase),
        generating=generating(st),
        generated=sum(p.step for p in generated if p is not None),
        # The total is known once every generation shard has reported its slice.
        records=sum(p.total_steps for p in generated if p is not None)
        if all(p is not None for p in generated)
        else 0,
        previous=st.distillation,
    )
    best = max(
        (
            (p.last_checkpoint_step, i)
            for i, p in obs.progress.items()
            if i != ANCHOR_INDEX and p.last_checkpoint_step is not None
        ),
        default=None,
    )
    if best is not None:
        step, index = best
        st.last_checkpoint = CheckpointStatus(
            shard=index, step=step, uri=Layout(spec.output.uri).shard_checkpoint(index, step)
        )


def _progress(spec: TrainJobSpec, obs: Observed) -> ProgressStatus:
    rounds = -(-spec.training.steps // spec.rounds.local_steps)
    shard_progress = [
        p for i, p in obs.progress.items() if i != ANCHOR_INDEX and p.role is Role.TRAIN
    ]
    steps = [p.step for p in shard_progress] + [0] * (spec.shards - len(shard_progress))
    step = min(steps) if steps else 0
    losses = [p.loss for p in shard_progress if p.loss is not None]
    anchor = obs.progress.get(ANCHOR_INDEX)
    round_ = min((p.round for p in shard_progress), default=0)
    if anchor is not None:
        round_ = max(round_, anchor.round)
    percent = min(100, int(100 * step / spec.training.steps))
    if anchor is not None and anchor.phase is Phase.DONE:
        percent = 100
    return ProgressStatus(
        round=round_,
        rounds=rounds,
        step=step,
        total_steps=spec.training.steps,
        loss=round(sum(losses) / len(losses), 4) if losses else None,
        percent=percent,
    )


def _conditions(st: TrainJobStatus, now: datetime, gen: int) -> None:
    phase = JobPhase(st.phase)
    out = ConditionWriter(st.conditions, now, gen)
    put = out.put
    if phase is JobPhase.SUCCEEDED:
        put("Succeeded", "True", "Completed", st.message)
        put("Progressing", "False", "Completed")
    elif phase is JobPhase.FAILED:
        put("Succeeded", "False", st.reason or "Failed", st.message)
        put("Progressing", "False", "Failed")
    elif phase is JobPhase.SUSPENDED:
        put("Succeeded", "Unknown", "Suspended")
        put("Progressing", "False", "Suspended", st.message or "spec.suspend is true")
    else:
        put("Succeeded", "Unknown", "InProgress")
        _progressing(st, now, out)
    if phase is JobPhase.SUSPENDED:
        put("Suspended", "True", st.reason or "SuspendRequested")
    else:
        put("Suspended", "False", "NotSuspended")
    on_demand = [s for s in st.shards if s.capacity_type is CapacityType.ON_DEMAND and not s.done]
    if on_demand:
        reasons = sorted({s.fallback_reason or "FellBackToOnDemand" for s in on_demand})
        put(
            "OnSpot",
            "False",
            reasons[0],
            "on on-demand: " + ", ".join(str(s.index) for s in on_demand),
        )
    else:
        put("OnSpot", "True", "AllShardsOnSpot")
    st.conditions = out.conditions


def _progressing(st: TrainJobStatus, now: datetime, out: ConditionWriter) -> None:
    """``Progressing`` of a job that runs: what keeps its slots from running, if anything."""
    put = out.put
    waiting = [s for s in active_slots(st) if s.pod_phase != "Running" and not s.done]
    blocked = [s for s in active_slots(st) if s.blocked_reason and not s.done]
    backing_off = [s for s in active_slots(st) if s.retry_after is not None and now < s.retry_after]
    if blocked:
        put(
            "Progressing",
            "False",
            blocked[0].blocked_reason,
            "; ".join(
                f"{slot_name(s.index)} cannot start since "
                f"{_stamp(s.blocked_since)}: {s.blocked_reason}: {s.blocked_message}"
                for s in blocked
            ),
        )
    elif backing_off:
        put(
            "Progressing",
            "True",
            "BackingOff",
            "; ".join(
                f"{slot_name(s.index)}: transient failure {s.transient_failures} in a row "
                f"({s.transient_message}); next pod after {_stamp(s.retry_after)}"
                for s in backing_off
            ),
        )
    elif waiting:
        names = ", ".join(
            "anchor"
            if s.index == ANCHOR_INDEX
            else (slot_name(s.index) if is_generator(s.index) else str(s.index))
            for s in waiting
        )
        put("Progressing", "True", "WaitingForPods", f"not running yet: {names}")
    else:
        put("Progressing", "True", "AllPodsRunning")


def _stamp(t: datetime | None) -> str:
    return t.strftime("%Y-%m-%dT%H:%M:%SZ") if t is not None else "?"

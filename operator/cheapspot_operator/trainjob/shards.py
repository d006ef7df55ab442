"""A CheapTrainJob's slots: which exist, which run now, their pods' names, and the capacity
each one's next pod asks for. Pure.

The status holds one :class:`ShardStatus` per slot: the anchor (``status.anchor``), the
training shards (``status.shards``) and, in sequences-mode distillation, the generation shards
(``status.generators``); :mod:`cheapspot_operator.trainjob.observed` numbers them.
"""

from __future__ import annotations

from datetime import timedelta

from cheapspot.contract import Phase, Progress
from cheapspot_operator.api.common import CapacityType
from cheapspot_operator.api.trainjob import ShardStatus, TrainJobSpec, TrainJobStatus
from cheapspot_operator.trainjob.observed import ANCHOR_INDEX, GENERATOR_BASE, is_generator

PREEMPTION_WINDOW = timedelta(hours=1)
"""``spot.maxPreemptionsPerHour`` counts the preemptions in this window."""


def pod_name(job_name: str, index: int, attempt: int) -> str:
    if index == ANCHOR_INDEX:
        role = "anchor"
    elif is_generator(index):
        role = f"gen-{index - GENERATOR_BASE}"
    else:
        role = f"shard-{index}"
    return f"{job_name}-{role}-{attempt}"


def generates(spec: TrainJobSpec) -> bool:
    """Sequences-mode distillation: generation shards run before training."""
    return spec.distillation is not None and spec.distillation.sequences


def generating(st: TrainJobStatus) -> bool:
    """True while a generation shard has not finished: training waits for all of them."""
    return any(not g.done for g in st.generators)


def ensure_slots(st: TrainJobStatus, spec: TrainJobSpec) -> None:
    """One slot status for each slot the spec asks for, those already known kept."""
    if st.anchor is None:
        st.anchor = ShardStatus(index=ANCHOR_INDEX, capacity_type=CapacityType.ON_DEMAND)
    have = {s.index: s for s in st.shards}
    st.shards = [have.get(i) or ShardStatus(index=i) for i in range(spec.shards)]
    if generates(spec):
        gens = {s.index: s for s in st.generators}
        st.generators = [
            gens.get(i) or ShardStatus(index=i)
            for i in range(GENERATOR_BASE, GENERATOR_BASE + spec.shards)
        ]


def active_slots(st: TrainJobStatus) -> list[ShardStatus]:
    """The slots whose pods should run now: the generation shards until they are all done,
    then the anchor and the training shards."""
    assert st.anchor is not None
    if generating(st):
        return list(st.generators)
    return [st.anchor, *st.shards]


def all_slots(st: TrainJobStatus) -> list[ShardStatus]:
    assert st.anchor is not None
    return [*st.generators, st.anchor, *st.shards]


def store_slot(st: TrainJobStatus, slot: ShardStatus) -> None:
    """Put ``slot`` in its place in the status."""
    if slot.index == ANCHOR_INDEX:
        st.anchor = slot
    elif is_generator(slot.index):
        st.generators[slot.index - GENERATOR_BASE] = slot
    else:
        st.shards[slot.index] = slot


def at_round_boundary(progress: Progress | None) -> bool:
    return progress is not None and progress.phase in (Phase.WAITING, Phase.DONE)


def generator_can_move(progress: Progress | None, records_per_chunk: int) -> bool:
    """A generation shard's pod may move (back to spot) without losing work: it is
    generating, and more than the chunk in progress is left, which the leaving pod finishes
    and publishes on its SIGTERM; its replacement regenerates only the chunks not published.
    With no more than that chunk left a move would gain nothing and cost a teacher load."""
    return (
        progress is not None
        and progress.phase is Phase.GENERATING
        and progress.total_steps - progress.step > records_per_chunk
    )


def over_preemption_cap(st: TrainJobStatus, spec: TrainJobSpec) -> bool:
    cap = spec.spot.max_preemptions
    return cap > 0 and st.preemptions > cap


def rate_exceeded(st: TrainJobStatus, limit: int) -> bool:
    return limit > 0 and len(st.recent_preemptions) > limit


def desired_capacity(
    slot: ShardStatus, st: TrainJobStatus, spec: TrainJobSpec
) -> tuple[CapacityType, str]:
    """Where the slot's next pod goes and why (the fallback reason; "" for plain spot)."""
    if slot.index == ANCHOR_INDEX:
        return CapacityType.ON_DEMAND, ""
    if over_preemption_cap(st, spec):
        return CapacityType.ON_DEMAND, "PreemptionLimit"
    if rate_exceeded(st, spec.spot.max_preemptions_per_hour):
        return CapacityType.ON_DEMAND, "PreemptionRate"
    return slot.capacity_type, slot.fallback_reason

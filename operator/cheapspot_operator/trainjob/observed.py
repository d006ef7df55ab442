"""What the train planner sees: typed views of a CheapTrainJob and its slots' pods. Pure.

A job's slots are numbered: the anchor is :data:`ANCHOR_INDEX`, training shard i is i, and
generation shard i (sequences-mode distillation) is ``GENERATOR_BASE + i``. Its pods carry
their slot in their labels (role and shard); the progress records come by the same index.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from cheapspot.contract import Progress
from cheapspot_operator.api.trainjob import TrainJobStatus
from cheapspot_operator.cluster.placement import PlacementProfile
from cheapspot_operator.cluster.views import (
    LABEL_ROLE,
    NodeView,
    ObjectView,
    PodView,
    slot_pod_view,
)
from cheapspot_operator.pricing.quotes import PriceKey, Quote
from cheapspot_operator.pricing.table import PriceTable

LABEL_JOB = "cheapspot.dev/job"
LABEL_SHARD = "cheapspot.dev/shard"
ANCHOR_INDEX = -1
"""The anchor's slot index (shards are 0..N-1)."""
GENERATOR_BASE = 1000
"""Generation shard i's slot index is ``GENERATOR_BASE + i`` (sequences-mode distillation;
training shards are fewer than this)."""


def is_generator(index: int) -> bool:
    return index >= GENERATOR_BASE


def slot_name(index: int) -> str:
    """How events and messages name a slot: ``anchor``, ``shard 3``, ``generator 0``."""
    if index == ANCHOR_INDEX:
        return "anchor"
    if is_generator(index):
        return f"generator {index - GENERATOR_BASE}"
    return f"shard {index}"


def slot_index(labels: Mapping[str, str]) -> int:
    """A job pod's slot, from its role and shard labels."""
    role = labels[LABEL_ROLE]
    index = ANCHOR_INDEX if role == "anchor" else int(labels.get(LABEL_SHARD, 0))
    if role == "generate":
        index += GENERATOR_BASE
    return index


def pod_view(pod: Mapping[str, Any]) -> PodView | None:
    """The planner's view of one of the job's pods; None for pods that are not ours."""
    return slot_pod_view(pod, slot_index)


@dataclass(frozen=True)
class Observed:
    """Everything one reconciliation of one job looks at."""

    job: ObjectView[TrainJobStatus]
    pods: tuple[PodView, ...]
    nodes: Mapping[str, NodeView]
    progress: Mapping[int, Progress]
    """Progress records by slot index (:data:`ANCHOR_INDEX` for the anchor)."""
    profile: PlacementProfile
    prices: PriceTable
    progress_known: bool = True
    """False while the records have not been read yet (the store is slow or down): the
    status keeps the progress it shows instead of dropping to zero."""
    create_refused: Mapping[int, str] = field(default_factory=dict)
    """Slots whose current pod the API server refused to create (quota, admission, a missing
    service account), with its message; filled by the act layer from its last attempt."""
    quotes: Mapping[PriceKey, Quote] = field(default_factory=dict)
    """Live and last known good prices (the price refresher's); the table fills gaps."""
    status_refresh_seconds: float = 15.0
    """What only grows with time (cost, running seconds) rewrites the status at most this
    often (the operator's ``statusRefreshSeconds``); budgets count unwritten cost all the
    same."""

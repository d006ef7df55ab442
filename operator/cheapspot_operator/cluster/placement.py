"""Placement profiles: how each cloud marks spot nodes and announces reclaims. Pure data.

A profile says which node labels select spot and on-demand capacity, which taints spot nodes
carry that shard pods must tolerate, which taints announce a reclaim (never tolerated: a
replacement must not land on a node that is going away), and how long the notice is (the
pods' ``terminationGracePeriodSeconds``). Every profile also watches the generic signals: the
pod condition ``DisruptionTarget``, evictions, and nodes going NotReady or away.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from cheapspot_operator.api.common import CapacityType

SelectorTerm = tuple[tuple[str, str, tuple[str, ...]], ...]
"""One node selector term: (key, operator, values) requirements, all of which must hold."""


@dataclass(frozen=True)
class PlacementProfile:
    name: str
    spot_terms: tuple[SelectorTerm, ...]
    """Node selector terms (ORed) that pick spot nodes."""
    on_demand_terms: tuple[SelectorTerm, ...]
    """Node selector terms (ORed) that pick on-demand nodes."""
    interruption_taints: tuple[str, ...]
    """Taint keys that announce a reclaim of the node they are on."""
    notice_seconds: int
    """Time between the notice and the node going away: the pods' grace period."""
    spot_tolerations: tuple[Mapping[str, Any], ...] = ()
    """Tolerations for taints that spot nodes carry on this cloud (never the interruption taints)."""
    extra_tolerations: tuple[Mapping[str, Any], ...] = field(default=())
    """Tolerations every pod gets (site configuration, e.g. dedicated GPU node taints)."""

    def capacity_of(self, labels: Mapping[str, str]) -> CapacityType | None:
        """The capacity type of a node with these labels, or None when neither matches."""
        if any(_term_matches(t, labels) for t in self.spot_terms):
            return CapacityType.SPOT
        if any(_term_matches(t, labels) for t in self.on_demand_terms):
            return CapacityType.ON_DEMAND
        return None

    def terms_for(self, capacity: CapacityType) -> tuple[SelectorTerm, ...]:
        return self.spot_terms if capacity is CapacityType.SPOT else self.on_demand_terms

    def is_interrupted(self, taint_keys: frozenset[str] | set[str]) -> bool:
        # Called for every node by every plan: most nodes have no taint at all.
        return bool(taint_keys) and any(k in taint_keys for k in self.interruption_taints)

    def with_overrides(
        self,
        notice_seconds: int | None = None,
        extra_tolerations: tuple[Mapping[str, Any], ...] | None = None,
    ) -> PlacementProfile:
        return replace(
            self,
            notice_seconds=self.notice_seconds if notice_seconds is None else notice_seconds,
            extra_tolerations=self.extra_tolerations
            if extra_tolerations is None
            else extra_tolerations,
        )


def _term_matches(term: SelectorTerm, labels: Mapping[str, str]) -> bool:
    for key, op, values in term:
        present = key in labels
        if op == "In" and not (present and labels[key] in values):
            return False
        if op == "NotIn" and present and labels[key] in values:
            return False
        if op == "Exists" and not present:
            return False
        if op == "DoesNotExist" and present:
            return False
    return True


def _label_is(key: str, *values: str) -> SelectorTerm:
    return ((key, "In", values),)


PROFILES: dict[str, PlacementProfile] = {
    "local": PlacementProfile(
        name="local",
        spot_terms=(_label_is("cheapspot.dev/capacity-type", "spot"),),
        on_demand_terms=(_label_is("cheapspot.dev/capacity-type", "on-demand"),),
        interruption_taints=("cheapspot.dev/interruption",),
        notice_seconds=10,
        spot_tolerations=(
            {"key": "cheapspot.dev/capacity-type", "operator": "Equal", "value": "spot"},
        ),
    ),
    "eks-karpenter": PlacementProfile(
        name="eks-karpenter",
        spot_terms=(_label_is("karpenter.sh/capacity-type", "spot"),),
        on_demand_terms=(_label_is("karpenter.sh/capacity-type", "on-demand"),),
        # `disrupted` since Karpenter v1; `disruption` before it.
        interruption_taints=("karpenter.sh/disrupted", "karpenter.sh/disruption"),
        notice_seconds=120,
    ),
    "eks-managed": PlacementProfile(
        name="eks-managed",
        spot_terms=(_label_is("eks.amazonaws.com/capacityType", "SPOT"),),
        on_demand_terms=(_label_is("eks.amazonaws.com/capacityType", "ON_DEMAND"),),
        interruption_taints=(
            "aws-node-termination-handler/spot-itn",
            "aws-node-termination-handler/rebalance-recommendation",
            "aws-node-termination-handler/asg-lifecycle-termination",
            "aws-node-termination-handler/scheduled-maintenance",
        ),
        notice_seconds=120,
    ),
    "ack": PlacementProfile(
        name="ack",
        spot_terms=(
            (
                ("node.alibabacloud.com/spot-strategy", "Exists", ()),
                ("node.alibabacloud.com/spot-strategy", "NotIn", ("NoSpot",)),
            ),
        ),
        on_demand_terms=(
            _label_is("node.alibabacloud.com/spot-strategy", "NoSpot"),
            (("node.alibabacloud.com/spot-strategy", "DoesNotExist", ()),),
        ),
        # ACK has no standard notice taint: the node goes NotReady or is deleted.
        interruption_taints=(),
        notice_seconds=300,
    ),
    "gke": PlacementProfile(
        name="gke",
        spot_terms=(_label_is("cloud.google.com/gke-spot", "true"),),
        on_demand_terms=((("cloud.google.com/gke-spot", "DoesNotExist", ()),),),
        interruption_taints=("cloud.google.com/impending-node-termination",),
        notice_seconds=30,
        spot_tolerations=(
            {"key": "cloud.google.com/gke-spot", "operator": "Equal", "value": "true"},
        ),
    ),
}


def get_profile(name: str) -> PlacementProfile:
    try:
        return PROFILES[name]
    except KeyError:
        raise ValueError(
            f"unknown placement profile {name!r}; known: {', '.join(sorted(PROFILES))}"
        ) from None

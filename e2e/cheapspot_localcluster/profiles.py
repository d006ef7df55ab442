"""How each cloud marks spot nodes and announces a reclaim (architecture.md, placement profiles).

The simulated nodes carry exactly the labels a real cluster of that kind would carry, and a
simulated reclaim sends the same signal, so the operator is tested against what it will see.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class CapacityType(StrEnum):
    SPOT = "spot"
    ON_DEMAND = "on-demand"


@dataclass(frozen=True)
class Taint:
    key: str
    effect: str = "NoSchedule"
    value: str | None = None

    def manifest(self) -> dict[str, str]:
        out = {"key": self.key, "effect": self.effect}
        if self.value is not None:
            out["value"] = self.value
        return out


@dataclass(frozen=True)
class Profile:
    """One row of the placement-profile table."""

    name: str
    capacity_label: str
    # The label value per capacity type; None means "the label is absent" (GKE on-demand).
    spot_value: str
    on_demand_value: str | None
    # Taints a cloud puts on a node it is about to reclaim; empty: the node just goes away.
    interruption_taints: tuple[Taint, ...]
    notice_seconds: float

    def capacity_labels(self, capacity: CapacityType) -> dict[str, str]:
        value = self.spot_value if capacity is CapacityType.SPOT else self.on_demand_value
        return {} if value is None else {self.capacity_label: value}


PROFILES: dict[str, Profile] = {
    p.name: p
    for p in (
        Profile(
            name="local",
            capacity_label="cheapspot.dev/capacity-type",
            spot_value="spot",
            on_demand_value="on-demand",
            interruption_taints=(Taint("cheapspot.dev/interruption"),),
            notice_seconds=10,
        ),
        Profile(
            name="eks-karpenter",
            capacity_label="karpenter.sh/capacity-type",
            spot_value="spot",
            on_demand_value="on-demand",
            interruption_taints=(Taint("karpenter.sh/disrupted"),),
            notice_seconds=120,
        ),
        Profile(
            name="eks-managed",
            capacity_label="eks.amazonaws.com/capacityType",
            spot_value="SPOT",
            on_demand_value="ON_DEMAND",
            interruption_taints=(Taint("aws-node-termination-handler/spot-itn", value="true"),),
            notice_seconds=120,
        ),
        Profile(
            name="ack",
            capacity_label="node.alibabacloud.com/spot-strategy",
            spot_value="SpotAsPriceGo",
            on_demand_value="NoSpot",
            interruption_taints=(),
            notice_seconds=300,
        ),
        Profile(
            name="gke",
            capacity_label="cloud.google.com/gke-spot",
            spot_value="true",
            on_demand_value=None,
            interruption_taints=(Taint("cloud.google.com/impending-node-termination"),),
            notice_seconds=30,
        ),
    )
}


def capacity_type_of(labels: dict[str, str], profile: Profile) -> CapacityType:
    """Read a node's capacity type back from its labels, the way the operator will."""
    value = labels.get(profile.capacity_label)
    if profile.name == "ack":
        return CapacityType.ON_DEMAND if value in (None, "NoSpot") else CapacityType.SPOT
    return CapacityType.SPOT if value == profile.spot_value else CapacityType.ON_DEMAND

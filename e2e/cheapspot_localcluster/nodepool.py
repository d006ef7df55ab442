"""The declarative node-pool file and the Node manifests built from it (pure: no I/O but reading).

A pool file names a placement profile and lists pools; each pool puts ``countPerZone`` nodes of
one instance type and capacity type into each of its zones::

    profile: local            # local | eks-karpenter | eks-managed | ack | gke
    region: local
    pools:
      - name: spot-gpu
        capacityType: spot
        instanceType: g5.xlarge
        zones: [zone-a, zone-b]
        countPerZone: 2
        capacity: {cpu: "4", memory: 16Gi, nvidia.com/gpu: 1, pods: 110}

A mistake is an error that names the field (``pools[0].capacityType: ...``); unknown fields are
mistakes too, so a misspelt key never silently falls back to a default.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from cheapspot_localcluster.profiles import PROFILES, CapacityType, Profile, Taint

# kwok manages (heartbeats, runs pods on) exactly the nodes carrying this label. Removing it is
# how a reclaim "switches the machine off": kwok lets go, the node's lease stops being renewed.
KWOK_MANAGED_LABEL = "cheapspot.dev/kwok-managed"
POOL_LABEL = "cheapspot.dev/pool"
GPU_RESOURCE = "nvidia.com/gpu"

_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
# Kubernetes quantity: a number with an optional binary/decimal suffix or exponent.
_QUANTITY = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)([KMGTPE]i|[numkMGTPE]|[eE][+-]?\d+)?$")
_RESOURCE_NAME = re.compile(r"^([a-z0-9.-]+/)?[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$")


class TaintSpec(BaseModel):
    """A taint every node of the pool carries from the start (e.g. ``nvidia.com/gpu``)."""

    model_config = ConfigDict(extra="forbid")

    key: str = Field(description="Taint key.")
    value: str | None = Field(default=None, description="Taint value (optional).")
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] = Field(
        default="NoSchedule", description="Taint effect."
    )


class PoolSpec(BaseModel):
    """One group of identical nodes."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    name: str = Field(description="Pool name: a DNS label, prefix of its nodes' names.")
    capacity_type: CapacityType = Field(
        alias="capacityType", description="spot or on-demand: decides the profile's labels."
    )
    instance_type: str = Field(
        alias="instanceType", description="Value of node.kubernetes.io/instance-type."
    )
    zones: list[str] = Field(min_length=1, description="Zones (topology.kubernetes.io/zone).")
    count_per_zone: Annotated[int, Field(ge=0, le=100)] = Field(
        default=1, alias="countPerZone", description="Nodes per zone."
    )
    capacity: dict[str, str | int] = Field(
        description="Node capacity (cpu, memory, nvidia.com/gpu, pods, ...), as Kubernetes quantities."
    )
    labels: dict[str, str] = Field(default_factory=dict, description="Extra node labels.")
    taints: list[TaintSpec] = Field(default_factory=list, description="Taints from the start.")

    @field_validator("name")
    @classmethod
    def _dns_label(cls, v: str) -> str:
        if not _DNS_LABEL.match(v) or len(v) > 40:
            raise ValueError("must be a lowercase DNS label (a-z, 0-9, '-'), at most 40 characters")
        return v

    @field_validator("zones")
    @classmethod
    def _zones(cls, v: list[str]) -> list[str]:
        for zone in v:
            if not _DNS_LABEL.match(zone):
                raise ValueError(f"zone {zone!r} must be a lowercase DNS label")
        if len(set(v)) != len(v):
            raise ValueError("zones must not repeat")
        return v

    @field_validator("capacity")
    @classmethod
    def _capacity(cls, v: dict[str, str | int]) -> dict[str, str | int]:
        for key in ("cpu", "memory"):
            if key not in v:
                raise ValueError(f"must give {key!r}")
        for name, qty in v.items():
            if not _RESOURCE_NAME.match(name):
                raise ValueError(f"{name!r} is not a resource name")
            if not _QUANTITY.match(str(qty)):
                raise ValueError(
                    f"{name}: {qty!r} is not a Kubernetes quantity (e.g. 4, 500m, 16Gi)"
                )
        return v


class PoolFile(BaseModel):
    """The whole node-pool file."""

    model_config = ConfigDict(extra="forbid")

    profile: Literal["local", "eks-karpenter", "eks-managed", "ack", "gke"] = Field(
        default="local", description="Placement profile whose labels and signals the nodes use."
    )
    region: str = Field(default="local", description="Value of topology.kubernetes.io/region.")
    pools: list[PoolSpec] = Field(min_length=1, description="The node pools.")

    @model_validator(mode="after")
    def _unique_pool_names(self) -> PoolFile:
        names = [p.name for p in self.pools]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"pool names must be unique; repeated: {', '.join(dupes)}")
        return self

    @property
    def placement(self) -> Profile:
        return PROFILES[self.profile]


class PoolFileError(ValueError):
    """A node-pool file that cannot be used; the message names the file and the field."""


def _field_path(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


def parse_pool_file(data: Any, source: str = "<node-pool file>") -> PoolFile:
    """Validate already-parsed YAML; raise :class:`PoolFileError` naming each bad field."""
    try:
        return PoolFile.model_validate(data)
    except ValidationError as exc:
        problems = [f"  {_field_path(e['loc'])}: {e['msg']}" for e in exc.errors()]
        raise PoolFileError(f"{source}: invalid node-pool file\n" + "\n".join(problems)) from None


def load_pool_file(path: Path | None = None) -> PoolFile:
    """Read and validate a pool file; ``None`` reads the default shipped with this package."""
    if path is None:
        text = resources.files(__package__).joinpath("pools", "default.yaml").read_text()
        source = "default node pools"
    else:
        try:
            text = path.read_text()
        except OSError as exc:
            raise PoolFileError(f"{path}: cannot read node-pool file: {exc}") from None
        source = str(path)
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise PoolFileError(f"{source}: not valid YAML: {exc}") from None
    return parse_pool_file(data, source)


@dataclass(frozen=True)
class SimNode:
    """One simulated node, fully decided: what its Node object will say."""

    name: str
    pool: str
    zone: str
    capacity_type: CapacityType
    instance_type: str
    capacity: dict[str, str]
    labels: dict[str, str]
    taints: tuple[Taint, ...] = field(default=())

    @property
    def gpus(self) -> int:
        return int(self.capacity.get(GPU_RESOURCE, "0"))


def expand(pools: PoolFile) -> list[SimNode]:
    """Every node the file describes, in a stable order (pool, zone, index)."""
    profile = pools.placement
    nodes: list[SimNode] = []
    for pool in pools.pools:
        for zone in pool.zones:
            for index in range(pool.count_per_zone):
                name = f"{pool.name}-{zone}-{index}"
                labels = {
                    **pool.labels,
                    "kubernetes.io/hostname": name,
                    "kubernetes.io/os": "linux",
                    "kubernetes.io/arch": "amd64",
                    "node.kubernetes.io/instance-type": pool.instance_type,
                    "topology.kubernetes.io/zone": zone,
                    "topology.kubernetes.io/region": pools.region,
                    POOL_LABEL: pool.name,
                    KWOK_MANAGED_LABEL: "true",
                    **profile.capacity_labels(pool.capacity_type),
                }
                nodes.append(
                    SimNode(
                        name=name,
                        pool=pool.name,
                        zone=zone,
                        capacity_type=pool.capacity_type,
                        instance_type=pool.instance_type,
                        capacity={k: str(v) for k, v in pool.capacity.items()},
                        labels=labels,
                        taints=tuple(Taint(t.key, t.effect, t.value) for t in pool.taints),
                    )
                )
    return nodes


def build_node(node: SimNode) -> dict[str, Any]:
    """The Node object for ``node``; kwok fills in conditions, addresses and heartbeats."""
    capacity = dict(node.capacity)
    capacity.setdefault("pods", "110")
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": node.name,
            "labels": dict(node.labels),
            # kwok's own marker for a simulated node, for tools that look for it.
            "annotations": {"kwok.x-k8s.io/node": "fake"},
        },
        "spec": {"taints": [t.manifest() for t in node.taints]} if node.taints else {},
        "status": {"capacity": capacity, "allocatable": dict(capacity)},
    }

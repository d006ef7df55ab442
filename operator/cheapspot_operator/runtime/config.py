"""The operator's own configuration: a YAML file (the Helm chart's ConfigMap), validated.

Found through ``--config PATH`` or the ``CHEAPSPOT_OPERATOR_CONFIG`` environment variable;
without either, the defaults below apply (the ``local`` profile).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field

from cheapspot_operator.cluster.placement import PlacementProfile, get_profile
from cheapspot_operator.pricing.table import PriceTable, default_prices

CONFIG_ENV = "CHEAPSPOT_OPERATOR_CONFIG"


class WorkerSettings(BaseModel):
    """How worker pods are run: image, command, environment. Never credentials themselves."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    image: Annotated[str, Field(description="The worker image.")] = (
        "ghcr.io/cheapspot/cheapspot-worker:0.1.0"
    )
    image_pull_policy: Annotated[str, Field(alias="imagePullPolicy")] = "IfNotPresent"
    command: Annotated[
        list[str], Field(description="The worker's command; the task comes in CHEAPSPOT_TASK.")
    ] = ["cheapspot", "worker"]
    env: Annotated[
        dict[str, str],
        Field(description="Plain environment for workers (object-store endpoint, region)."),
    ] = {}
    env_from_secret: Annotated[
        str | None,
        Field(
            alias="envFromSecret",
            description="A Secret whose keys become worker environment (static object-store "
            "keys where IRSA / Pod Identity / RRSA are not available).",
        ),
    ] = None
    service_account: Annotated[
        str | None,
        Field(alias="serviceAccount", description="Worker pods' service account (IRSA, RRSA)."),
    ] = None
    priority_class: Annotated[str | None, Field(alias="priorityClass")] = None
    run_as_user: Annotated[int, Field(alias="runAsUser", ge=1)] = 10001


class ServingSettings(BaseModel):
    """How inference pools' pods are run. Replicas otherwise take ``worker``'s environment,
    secret, service account and user; only the image differs (vLLM pins its own torch and
    transformers, so serving has an image of its own)."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    image: Annotated[str, Field(description="The serving replica image (vLLM).")] = (
        "ghcr.io/cheapspot/cheapspot-serve:0.1.0"
    )
    command: Annotated[
        list[str],
        Field(description="The replica's command; the task (role serve) comes in CHEAPSPOT_TASK."),
    ] = ["cheapspot", "worker"]
    router_image: Annotated[
        str, Field(alias="routerImage", description="The router image (the operator's).")
    ] = "ghcr.io/cheapspot/cheapspot-operator:0.1.0"
    router_command: Annotated[list[str], Field(alias="routerCommand")] = ["cheapspot", "router"]
    network_policies: Annotated[
        bool,
        Field(
            alias="networkPolicies",
            description="Give each pool a NetworkPolicy: its replicas' ports take connections "
            "only from the pool's routers and the operator. Enforced only where the "
            "cluster's network plugin enforces NetworkPolicies.",
        ),
    ] = True
    operator_namespace: Annotated[
        str,
        Field(
            alias="operatorNamespace",
            description="The operator's namespace, which the NetworkPolicy admits; default "
            "$POD_NAMESPACE (the chart sets it). Neither: operator pods in any namespace.",
        ),
    ] = ""
    operator_pod_labels: Annotated[
        dict[str, str],
        Field(
            alias="operatorPodLabels",
            description="Labels of the operator's pods, which the NetworkPolicy admits.",
        ),
    ] = {"app.kubernetes.io/name": "cheapspot"}

    def operator_namespace_or_env(self) -> str:
        return self.operator_namespace or os.environ.get("POD_NAMESPACE", "")


class PricingSettings(BaseModel):
    """Where node prices come from (:mod:`cheapspot_operator.runtime.pricebook`)."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    provider: Annotated[
        Literal["table", "aws", "alibaba"],
        Field(
            description="table: the static table only; aws: EC2 spot price history and the "
            "Pricing API; alibaba: ECS DescribeSpotPriceHistory. The table stays the last "
            "fallback either way."
        ),
    ] = "table"
    region: Annotated[
        str, Field(description="The cloud region; aws: default $AWS_REGION / $AWS_DEFAULT_REGION.")
    ] = ""
    spot_refresh_seconds: Annotated[
        float, Field(alias="spotRefreshSeconds", gt=0, description="Spot prices: how often.")
    ] = 3600.0
    on_demand_refresh_seconds: Annotated[
        float,
        Field(alias="onDemandRefreshSeconds", gt=0, description="On-demand prices: how often."),
    ] = 86400.0
    retry_seconds: Annotated[
        float,
        Field(alias="retrySeconds", gt=0, description="After a failed refresh, ask again after."),
    ] = 300.0
    check_seconds: Annotated[
        float,
        Field(
            alias="checkSeconds",
            gt=0,
            description="How often the nodes' instance types and node price metrics are updated.",
        ),
    ] = 60.0
    config_map: Annotated[
        str,
        Field(alias="configMap", description="ConfigMap keeping the last known good prices."),
    ] = "cheapspot-prices"
    namespace: Annotated[
        str,
        Field(
            description="The ConfigMap's namespace; default $POD_NAMESPACE (the chart sets it). "
            "Neither: the last known good prices live in memory only."
        ),
    ] = ""
    usd_per: Annotated[
        dict[str, float],
        Field(
            alias="usdPer",
            description="alibaba: USD per unit of a currency the API reports, e.g. {CNY: 0.14}; "
            "prices are converted only with a rate given here.",
        ),
    ] = {}


class OperatorConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    profile: Annotated[
        str, Field(description="Placement profile: local, eks-karpenter, eks-managed, ack, gke.")
    ] = "local"
    notice_seconds: Annotated[
        int | None,
        Field(alias="noticeSeconds", ge=1, description="Override the profile's notice length."),
    ] = None
    extra_tolerations: Annotated[
        list[dict[str, Any]],
        Field(alias="extraTolerations", description="Tolerations every worker pod gets."),
    ] = []
    not_ready_toleration_seconds: Annotated[
        int,
        Field(
            alias="notReadyTolerationSeconds",
            ge=0,
            description="How long pods stay bound to a NotReady/unreachable node (default 300 "
            "in Kubernetes; short, so a lost node frees its shard in seconds).",
        ),
    ] = 5
    worker: WorkerSettings = WorkerSettings()
    serving: ServingSettings = ServingSettings()
    prices: Annotated[
        dict[str, dict[str, float]],
        Field(description="Price overrides: instance type -> {spot, on-demand} $/h."),
    ] = {}
    pricing: PricingSettings = PricingSettings()
    reconcile_interval_seconds: Annotated[
        float,
        Field(
            alias="reconcileIntervalSeconds",
            gt=0,
            description="Reconcile each job at least this often; pod and node events wake it sooner.",
        ),
    ] = 2.0
    status_refresh_seconds: Annotated[
        float,
        Field(
            alias="statusRefreshSeconds",
            gt=0,
            description="Rewrite a running job's or pool's status at most this often when "
            "only the figures that grow with time changed (status.cost, the shards' "
            "runningSeconds); budgets count the unwritten cost all the same. Each write is "
            "one request: 120 s keeps 100 jobs at rest under one request a second.",
        ),
    ] = 120.0
    file_uris: Annotated[
        bool,
        Field(
            alias="fileUris",
            description="Allow file:// URIs in jobs: only where every worker pod and the "
            "operator see one filesystem (the local cluster, whose pods are processes, or a "
            "shared volume mounted everywhere). Off: a job with a file:// model, dataset or "
            "output fails at once saying so (its shards would wait forever for each other, "
            "and the operator would read its own filesystem).",
        ),
    ] = False
    allowed_uri_prefixes: Annotated[
        dict[str, list[str]],
        Field(
            alias="allowedUriPrefixes",
            description="Namespace -> the URI prefixes its jobs and pools may name (models, "
            "datasets, outputs, adapters); `*` holds those of every namespace not listed, and "
            "`{namespace}` in a prefix stands for the object's namespace "
            "(`*: [s3://bucket/{namespace}/]`). A job or pool naming another URI is refused, "
            "naming the field. Empty: no limit (one tenant; worker pods can read whatever "
            "the worker role can).",
        ),
    ] = {}
    namespaces: Annotated[
        list[str], Field(description="Namespaces to watch; empty means all.")
    ] = []
    metrics_port: Annotated[
        int, Field(alias="metricsPort", ge=0, le=65535, description="Prometheus; 0: off.")
    ] = 9090
    health_port: Annotated[
        int | None,
        Field(alias="healthPort", ge=1, le=65535, description="kopf's /healthz for probes."),
    ] = None
    peering_priority: Annotated[
        int | None,
        Field(
            alias="peeringPriority",
            description="Set to run several replicas with kopf peering; unset: standalone "
            "(one replica, the chart's default).",
        ),
    ] = None

    def placement_profile(self) -> PlacementProfile:
        return get_profile(self.profile).with_overrides(
            notice_seconds=self.notice_seconds,
            extra_tolerations=tuple(self.extra_tolerations),
        )

    def price_table(self) -> PriceTable:
        return default_prices().merged(self.prices)


def load_config(path: str | Path | None = None) -> OperatorConfig:
    path = path or os.environ.get(CONFIG_ENV)
    if not path:
        return OperatorConfig()
    raw = yaml.safe_load(Path(path).read_text()) or {}
    return OperatorConfig.model_validate(raw)

"""Prometheus metrics. Names carry units, counters end in ``_total``, labels stay few."""

from __future__ import annotations

from typing import TYPE_CHECKING

from prometheus_client import Counter, Gauge, Histogram

if TYPE_CHECKING:
    from cheapspot_operator.api.common import BudgetStatus, CostStatus

PREEMPTIONS = Counter(
    "cheapspot_preemptions_total",
    "Shard or anchor pods lost to a reclaim, by signal.",
    ["signal"],
)
FALLBACKS = Counter(
    "cheapspot_fallbacks_total",
    "Shards moved to on-demand capacity, by reason.",
    ["reason"],
)
RETURNS_TO_SPOT = Counter("cheapspot_returns_to_spot_total", "Shards moved back to spot.")
RESTARTS = Counter("cheapspot_restarts_total", "Worker failures that spent a restart budget.")
JOBS_FINISHED = Counter("cheapspot_jobs_finished_total", "Jobs that ended, by phase.", ["phase"])
COST = Counter(
    "cheapspot_cost_dollars_total",
    "What the jobs' pods cost, by capacity type priced (actual, on-demand equivalent).",
    ["basis"],
)
PODS_CREATED = Counter("cheapspot_pods_created_total", "Worker pods created, by role.", ["role"])
RECONCILE_SECONDS = Histogram(
    "cheapspot_reconcile_duration_seconds",
    "Time one job's reconciliation takes (observe, plan, act).",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
)
_STAGE_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
)
RECONCILE_QUEUED_SECONDS = Histogram(
    "cheapspot_reconcile_queued_seconds",
    "Time from what woke a reconciliation (an event about the object, or its timer) to the "
    "reconciliation starting: waiting for the object's previous pass and for a thread. By "
    "trigger (event, timer).",
    ["trigger"],
    buckets=_STAGE_BUCKETS,
)
RECONCILE_STAGE_SECONDS = Histogram(
    "cheapspot_reconcile_stage_seconds",
    "Time one reconciliation spends in a stage: planning (reading the watched state, "
    "planning; every pass) and writing (applying the actions: status, pods, events, the API "
    "server's latency included; only passes with actions).",
    ["stage"],
    buckets=_STAGE_BUCKETS,
)
STORE_REQUESTS = Counter(
    "cheapspot_object_store_requests_total",
    "Requests the operator sent to the object store (progress records, output claims), by "
    "S3 operation.",
    ["operation"],
)
KUBE_REQUESTS = Counter(
    "cheapspot_kube_requests_total",
    "Requests the operator's reconcilers sent to the API server (kopf's watches aside), by "
    "verb (LIST for a collection GET) and resource, as apiserver_request_total names them.",
    ["verb", "resource"],
)


def count_kube_request(verb: str, resource: str) -> None:
    KUBE_REQUESTS.labels(verb=verb, resource=resource).inc()


PROGRESS_READS = Counter(
    "cheapspot_progress_reads_total",
    "Reads of one job's progress records (one GET per slot: anchor, shards, generators).",
)
RECONCILE_ERRORS = Counter("cheapspot_reconcile_errors_total", "Reconciliations that raised.")
JOBS = Gauge("cheapspot_jobs", "CheapTrainJobs known to this operator, by phase.", ["phase"])
JOB_COST = Gauge(
    "cheapspot_job_cost_dollars",
    "What one job has cost so far, by capacity type (spot, on-demand) and the on-demand "
    "equivalent of the same pod seconds (capacity_type=on-demand-equivalent).",
    ["namespace", "job", "capacity_type"],
)
BUDGET_REMAINING = Gauge(
    "cheapspot_budget_remaining_dollars",
    "What a job's spec.budget still allows.",
    ["namespace", "job"],
)
POOL_COST = Gauge(
    "cheapspot_pool_cost_dollars",
    "What one inference pool has cost so far, by capacity type (spot, on-demand) and the "
    "on-demand equivalent of the same pod seconds (capacity_type=on-demand-equivalent).",
    ["namespace", "pool", "capacity_type"],
)
POOL_BUDGET_REMAINING = Gauge(
    "cheapspot_pool_budget_remaining_dollars",
    "What a pool's spec.budget still allows.",
    ["namespace", "pool"],
)
COST_ESTIMATED = Gauge(
    "cheapspot_job_cost_estimated",
    "1 when some of the job's cost used an estimated price (last known good or the table).",
    ["namespace", "job"],
)
_NODE_LABELS = ["node", "instance_type", "capacity_type", "zone"]
NODE_PRICE = Gauge(
    "cheapspot_node_price_dollars_per_hour",
    "What a node costs per hour as the operator prices it (live, last known good or table).",
    _NODE_LABELS,
)
NODE_PRICE_ESTIMATED = Gauge(
    "cheapspot_node_price_estimated",
    "1 when the node's price is not a current observation (last known good or the table).",
    _NODE_LABELS,
)
NODE_PRICE_AGE = Gauge(
    "cheapspot_node_price_age_seconds",
    "Seconds since the node's price was observed (absent for table prices).",
    _NODE_LABELS,
)
REPLICA_DRAINS = Counter(
    "cheapspot_replica_drains_total",
    "Serving replicas marked draining (reclaim notice, move back to spot, scale down).",
)
ADAPTER_SYNCS = Counter(
    "cheapspot_adapter_syncs_total",
    "Adapter lists pushed to running replicas, by result.",
    ["result"],
)
POOL_REPLICAS = Gauge(
    "cheapspot_pool_replicas",
    "Serving replicas of all pools, by the capacity type they are meant to run on.",
    ["capacity"],
)


def set_cost(
    cost_gauge: Gauge,
    budget_gauge: Gauge,
    labels: tuple[str, str],
    cost: CostStatus,
    budget: BudgetStatus | None,
) -> None:
    """A job's or pool's cost by capacity type (and its on-demand equivalent) and what its
    budget has left; ``labels`` is (namespace, name)."""
    for capacity, dollars in (
        ("spot", cost.spot_dollars),
        ("on-demand", cost.on_demand_spent_dollars),
        ("on-demand-equivalent", cost.on_demand_dollars),
    ):
        cost_gauge.labels(*labels, capacity).set(dollars)
    if budget is not None:
        budget_gauge.labels(*labels).set(budget.remaining_usd)

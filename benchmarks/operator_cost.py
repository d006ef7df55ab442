"""The operator's own cost per reclaim, for ``operator_scale.py``: its CPU from its process
accounting, its API requests from the API server's counters, its object-store requests and
its reconcile stages from its own metrics, the API server's and etcd's latency from theirs,
and each component's CPU over a window, set against the issue's targets in one table.

A :class:`Snapshot` is taken at the start and end of a window (the rest, the burst); the
figures are the differences.
"""

from __future__ import annotations

import os
import re
import subprocess
import urllib.request
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families
from rich.console import Console
from rich.table import Table

TICKS = os.sysconf("SC_CLK_TCK")
REST_CHECKPOINT_SECONDS = 300.0
"""The jobs' checkpoint interval (the default ``everySeconds``): the read cadence at rest."""

Labels = frozenset[tuple[str, str]]
Samples = dict[tuple[str, Labels], float]

OPERATOR_WRITES = {
    ("POST", "pods"),
    ("DELETE", "pods"),
    ("PATCH", "cheaptrainjobs/status"),
    ("POST", "events"),
}
"""What the operator writes for a replacement: the status (the attempt), the new pod, the old
pod's deletion, events. The API server's counters for them hold other clients' too (the pod
GC deletes pods of removed nodes, the scheduler and controller-manager post events): shown
beside the operator's own count."""
WRITE_VERBS = {"POST", "PUT", "PATCH", "DELETE"}
KWOK_HEARTBEATS = {"leases", "nodes/status"}


def cpu_seconds(pid: int) -> float:
    """user + system CPU of a process, all its threads, from ``/proc/<pid>/stat``."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    # After the command: state is field 3, utime 14 and stime 15 (1-based).
    return (int(fields[11]) + int(fields[12])) / TICKS


def scrape_text(text: str) -> Samples:
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, frozenset(sample.labels.items()))] = float(sample.value)
    return out


def scrape_url(url: str) -> Samples:
    with urllib.request.urlopen(url, timeout=30) as response:
        return scrape_text(response.read().decode())


def apiserver_metrics(kubectl: Path, kubeconfig: Path) -> str:
    """The API server's ``/metrics`` text, through kubectl (the admin credentials)."""
    return subprocess.run(
        [str(kubectl), "--kubeconfig", str(kubeconfig), "get", "--raw", "/metrics"],
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout


def scrape_apiserver(kubectl: Path, kubeconfig: Path) -> Samples:
    """The API server's own metrics, only the families used here (the rest is large)."""
    text = apiserver_metrics(kubectl, kubeconfig)
    wanted = re.compile(
        r"^(# (HELP|TYPE) )?(apiserver_request_total|apiserver_request_duration_seconds_(sum|count)"
        r"|etcd_request_duration_seconds_(sum|count))\b"
    )
    kept = "\n".join(line for line in text.splitlines() if wanted.match(line)) + "\n"
    return scrape_text(kept)


@dataclass
class Snapshot:
    at: float
    cpu: dict[str, float]
    """Component (operator, kube-apiserver, etcd, kwok, ...) -> CPU seconds so far."""
    operator: Samples
    apiserver: Samples = field(default_factory=dict)


def take(
    at: float, pids: Mapping[str, int], metrics_url: str, kubectl: Path, kubeconfig: Path
) -> Snapshot:
    return Snapshot(
        at=at,
        cpu={name: cpu_seconds(pid) for name, pid in pids.items()},
        operator=scrape_url(metrics_url),
        apiserver=scrape_apiserver(kubectl, kubeconfig),
    )


def delta(after: Samples, before: Samples) -> Samples:
    return {k: v - before.get(k, 0.0) for k, v in after.items()}


def total(samples: Samples, name: str, **labels: str) -> float:
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= ls)


def quantile(samples: Samples, histogram: str, q: float, **labels: str) -> float | None:
    """The upper bound of the bucket holding quantile ``q`` (inf past the last), None when
    nothing was observed."""
    want = set(labels.items())
    buckets: dict[float, float] = {}
    for (n, ls), v in samples.items():
        if n == f"{histogram}_bucket" and want <= ls:
            le = float(dict(ls)["le"])
            buckets[le] = buckets.get(le, 0.0) + v
    count = buckets.get(float("inf"), 0.0)
    if count <= 0:
        return None
    for le in sorted(buckets):
        if buckets[le] >= q * count:
            return le
    return float("inf")


def api_requests(samples: Samples) -> Counter[tuple[str, str]]:
    """``apiserver_request_total`` by (verb, resource[/subresource])."""
    out: Counter[tuple[str, str]] = Counter()
    for (name, ls), v in samples.items():
        if name != "apiserver_request_total":
            continue
        labels = dict(ls)
        resource = labels.get("resource", "")
        if labels.get("subresource"):
            resource += "/" + labels["subresource"]
        out[(labels.get("verb", ""), resource)] += round(v)
    return out


def api_latency(samples: Samples, verb: str, resource: str) -> tuple[float, float]:
    """(seconds, requests) the API server spent on ``verb`` ``resource`` in the window."""
    kind, _, sub = resource.partition("/")
    labels = {"verb": verb, "resource": kind, "subresource": sub}
    seconds = count = 0.0
    for (name, ls), v in samples.items():
        d = dict(ls)
        if all(d.get(k, "") == want for k, want in labels.items()):
            if name == "apiserver_request_duration_seconds_sum":
                seconds += v
            elif name == "apiserver_request_duration_seconds_count":
                count += v
    return seconds, count


@dataclass
class Window:
    """What happened between two snapshots."""

    seconds: float
    cpu: dict[str, float]
    operator: Samples
    apiserver: Samples

    @classmethod
    def between(cls, before: Snapshot, after: Snapshot) -> Window:
        return cls(
            seconds=after.at - before.at,
            cpu={k: after.cpu[k] - before.cpu.get(k, 0.0) for k in after.cpu},
            operator=delta(after.operator, before.operator),
            apiserver=delta(after.apiserver, before.apiserver),
        )

    def requests(self) -> Counter[tuple[str, str]]:
        return api_requests(self.apiserver)

    def own_requests(self) -> Counter[tuple[str, str]]:
        """The operator's own count (``cheapspot_kube_requests_total``) by (verb, resource)."""
        out: Counter[tuple[str, str]] = Counter()
        for (name, ls), v in self.operator.items():
            if name == "cheapspot_kube_requests_total":
                labels = dict(ls)
                out[(labels["verb"], labels["resource"])] += round(v)
        return out


def _ms(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return "> 30 s" if seconds == float("inf") else f"≤ {seconds * 1000:.0f} ms"


def report(rest: Window, burst: Window, replacements: int, jobs: int, console: Console) -> None:
    """The figures against their targets, then the detail tables."""
    per = max(1, replacements)
    # The burst's cost above what the same time at rest costs.
    rest_cpu = rest.cpu.get("operator", 0.0) / rest.seconds
    cpu_ms = 1000 * (burst.cpu.get("operator", 0.0) - rest_cpu * burst.seconds) / per
    scale = burst.seconds / rest.seconds
    rest_req, burst_req = rest.requests(), burst.requests()
    server = {
        key: (burst_req[key] - rest_req[key] * scale) / per for key in sorted(OPERATOR_WRITES)
    }
    rest_own, burst_own = rest.own_requests(), burst.own_requests()
    writes = {
        key: (burst_own[key] - rest_own[key] * scale) / per
        for key in sorted(set(burst_own) | set(rest_own))
        if key[0] in WRITE_VERBS
    }
    write_total = sum(writes.values())
    queued = quantile(burst.operator, "cheapspot_reconcile_queued_seconds", 0.99, trigger="event")
    planning = quantile(burst.operator, "cheapspot_reconcile_stage_seconds", 0.99, stage="planning")
    writing = quantile(burst.operator, "cheapspot_reconcile_stage_seconds", 0.99, stage="writing")
    inside = None if queued is None or planning is None else queued + planning
    checkpoints = rest.seconds / REST_CHECKPOINT_SECONDS
    reads_rest = total(rest.operator, "cheapspot_progress_reads_total") / jobs / checkpoints
    gets_rest = total(rest.operator, "cheapspot_object_store_requests_total") / jobs / checkpoints
    store_burst = total(burst.operator, "cheapspot_object_store_requests_total")
    table = Table(title=f"The operator's cost per replacement ({replacements} replacements)")
    for column in ("figure", "measured", "target", "met"):
        table.add_column(column)

    def row(figure: str, measured: str, target: str, met: bool | None) -> None:
        table.add_row(figure, measured, target, "-" if met is None else ("yes" if met else "NO"))

    row("operator CPU per replacement", f"{cpu_ms:.1f} ms", "≤ 10 ms", cpu_ms <= 10)
    row(
        "API writes per replacement (the operator's)",
        f"{write_total:.2f}",
        "≤ 5",
        write_total <= 5,
    )
    row(
        "inside the operator p99 (queued + planning)",
        _ms(inside),
        "< 1 s",
        None if inside is None else inside < 1.0,
    )
    row("  queued p99 (event-woken passes)", _ms(queued), "", None)
    row("  planning p99", _ms(planning), "", None)
    row("  writing p99 (API server latency included)", _ms(writing), "", None)
    row(
        "progress reads at rest per job per checkpoint interval",
        f"{reads_rest:.2f} ({gets_rest:.1f} requests)",
        "≤ 1",
        reads_rest <= 1.0,
    )
    row(
        "object-store requests per job per minute, rest / burst",
        f"{60 * gets_rest / REST_CHECKPOINT_SECONDS:.2f} / "
        f"{60 * store_burst / jobs / burst.seconds:.2f}",
        "",
        None,
    )
    console.print(table)

    detail = Table(
        title="API writes per replacement, by verb and resource: the operator's own count, the "
        "API server's (every client: the scheduler's and controller-manager's events, the pod "
        "GC's deletes)"
    )
    for column in ("verb", "resource", "operator", "API server", "API server mean latency"):
        detail.add_column(column)
    for key in sorted(set(writes) | set(server)):
        seconds, count = api_latency(burst.apiserver, *key)
        mean = f"{1000 * seconds / count:.0f} ms" if count else "-"
        own = f"{writes[key]:.2f}" if key in writes else "-"
        all_ = f"{server[key]:.2f}" if key in server else "-"
        detail.add_row(*key, own, all_, mean)
    console.print(detail)

    etcd_s = total(burst.apiserver, "etcd_request_duration_seconds_sum")
    etcd_n = total(burst.apiserver, "etcd_request_duration_seconds_count")
    cores = os.cpu_count() or 1
    shares = Table(
        title=f"CPU over the {burst.seconds:.0f} s from the burst on ({cores} cores): "
        "who the replacements waited for"
    )
    for column in ("process", "CPU seconds", "share of the machine"):
        shares.add_column(column)
    for name, used in sorted(burst.cpu.items(), key=lambda kv: -kv[1]):
        shares.add_row(name, f"{used:.1f}", f"{100 * used / (cores * burst.seconds):.0f}%")
    console.print(shares)
    if etcd_n:
        console.print(
            f"etcd requests from the API server in the window: {etcd_n:.0f}, mean "
            f"{1000 * etcd_s / etcd_n:.1f} ms"
        )

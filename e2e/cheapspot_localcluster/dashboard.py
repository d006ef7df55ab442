"""What the chart's Grafana dashboard shows, drawn from a real run's operator metrics.

``cheapspot demo --dashboard PNG`` runs the operator with its Prometheus endpoint on, scrapes
it every few seconds while the demo trains and serves (:class:`MetricsRecorder`, the way
Prometheus would), and draws the dashboard's panels from those samples (:func:`render`,
matplotlib): the README's picture of the dashboard comes from this, not from a mock-up.
The panels use the same metrics and the same arithmetic as
``helm/cheapspot/dashboards/cheapspot-cost.json``.
"""

from __future__ import annotations

import json
import socket
import threading
import time
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

Labels = tuple[tuple[str, str], ...]
Series = dict[tuple[str, Labels], float]

WANTED = (
    "cheapspot_job_cost_dollars",
    "cheapspot_pool_cost_dollars",
    "cheapspot_budget_remaining_dollars",
    "cheapspot_pool_budget_remaining_dollars",
    "cheapspot_node_price_dollars_per_hour",
    "cheapspot_node_price_estimated",
    "cheapspot_preemptions_total",
    "cheapspot_fallbacks_total",
    "cheapspot_pool_replicas",
)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def parse(text: str) -> Series:
    """The samples of :data:`WANTED` metrics in a Prometheus text exposition."""
    out: Series = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name in WANTED:
                out[(s.name, tuple(sorted(s.labels.items())))] = float(s.value)
    return out


@dataclass
class MetricsRecorder:
    """Scrapes ``url`` every ``interval_s`` in a thread; ``samples`` is (seconds since the
    start, series). A scrape that fails (the operator restarting) is skipped."""

    url: str
    interval_s: float = 2.0
    samples: list[tuple[float, Series]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> MetricsRecorder:
        started = time.monotonic()

        def loop() -> None:
            while not self._stop.is_set():
                try:
                    with urllib.request.urlopen(self.url, timeout=5) as resp:
                        text = resp.read().decode(errors="replace")
                    self.samples.append((time.monotonic() - started, parse(text)))
                except OSError:
                    pass
                self._stop.wait(self.interval_s)

        self._thread = threading.Thread(target=loop, name="metrics-recorder", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> list[tuple[float, Series]]:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        return self.samples


def series_lines(
    samples: Sequence[tuple[float, Series]],
    name: str,
    key: Callable[[Mapping[str, str]], str | None],
    *,
    mean: bool = False,
) -> dict[str, tuple[list[float], list[float]]]:
    """Per ``key(labels)`` (None: skipped), the sum (or the mean: a price shared by several
    nodes) of ``name``'s samples over time."""
    lines: dict[str, tuple[list[float], list[float]]] = {}
    for t, series in samples:
        sums: dict[str, list[float]] = {}
        for (metric, labels), value in series.items():
            if metric != name:
                continue
            k = key(dict(labels))
            if k is not None:
                sums.setdefault(k, []).append(value)
        for k, values in sums.items():
            xs, ys = lines.setdefault(k, ([], []))
            xs.append(t)
            ys.append(sum(values) / len(values) if mean else sum(values))
    return lines


def _by(label: str) -> Callable[[Mapping[str, str]], str | None]:
    return lambda labels: labels.get(label, "")


def _spent_by_capacity(labels: Mapping[str, str]) -> str | None:
    capacity = labels.get("capacity_type", "")
    return "on-demand equivalent" if capacity == "on-demand-equivalent" else capacity


def savings(samples: Sequence[tuple[float, Series]], name: str) -> tuple[list[float], list[float]]:
    """1 - spent / on-demand equivalent over time, in percent (the dashboard's stat)."""
    xs: list[float] = []
    ys: list[float] = []
    for t, series in samples:
        spent = equivalent = 0.0
        for (metric, labels), value in series.items():
            if metric != name:
                continue
            if dict(labels).get("capacity_type") == "on-demand-equivalent":
                equivalent += value
            else:
                spent += value
        if equivalent > 0:
            xs.append(t)
            ys.append(100 * (1 - spent / equivalent))
    return xs, ys


def render(samples: Sequence[tuple[float, Series]], path: Path, title: str = "") -> Path:
    """The dashboard's panels as one PNG at ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels: list[tuple[str, str, dict[str, tuple[list[float], list[float]]]]] = [
        (
            "Training: spent by capacity type",
            "USD",
            series_lines(samples, "cheapspot_job_cost_dollars", _spent_by_capacity),
        ),
        (
            "Savings against on-demand",
            "%",
            {
                "training": savings(samples, "cheapspot_job_cost_dollars"),
                "serving": savings(samples, "cheapspot_pool_cost_dollars"),
            },
        ),
        (
            "Budget remaining",
            "USD",
            series_lines(samples, "cheapspot_budget_remaining_dollars", _by("job"))
            | series_lines(samples, "cheapspot_pool_budget_remaining_dollars", _by("pool")),
        ),
        (
            "Node price by instance and capacity type",
            "USD/h",
            series_lines(
                samples,
                "cheapspot_node_price_dollars_per_hour",
                lambda labels: f"{labels.get('capacity_type')} {labels.get('instance_type')}",
                mean=True,
            ),
        ),
        (
            "Preemptions and fallbacks",
            "count",
            series_lines(
                samples, "cheapspot_preemptions_total", lambda lb: f"preempted: {lb['signal']}"
            )
            | series_lines(
                samples, "cheapspot_fallbacks_total", lambda lb: f"fell back: {lb['reason']}"
            ),
        ),
        (
            "Serving: spent by capacity type",
            "USD",
            series_lines(samples, "cheapspot_pool_cost_dollars", _spent_by_capacity),
        ),
    ]
    fig, axes = plt.subplots(3, 2, figsize=(13, 11), constrained_layout=True)
    for ax, (panel_title, unit, lines) in zip(axes.flat, panels, strict=True):
        ax.set_title(panel_title, loc="left", fontsize=11)
        ax.set_ylabel(unit)
        ax.set_xlabel("seconds into the run")
        ax.grid(alpha=0.3)
        drawn = False
        for label, (xs, ys) in sorted(lines.items()):
            if xs:
                ax.step(xs, ys, where="post", label=label)
                drawn = True
        if drawn:
            ax.legend(fontsize=8, loc="upper left")
        else:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
    if title:
        fig.suptitle(title, fontsize=13)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def save(samples: Sequence[tuple[float, Series]], path: Path) -> Path:
    """The samples as JSON, so the panels can be drawn again without another run."""
    rows = [
        [t, [[name, [list(kv) for kv in labels], value] for (name, labels), value in s.items()]]
        for t, s in samples
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rows))
    return path


def load(path: Path) -> list[tuple[float, Series]]:
    out: list[tuple[float, Series]] = []
    for t, entries in json.loads(path.read_text()):
        series: Series = {}
        for name, labels, value in entries:
            series[(name, tuple((str(k), str(v)) for k, v in labels))] = float(value)
        out.append((float(t), series))
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m cheapspot_localcluster.dashboard SAMPLES.json OUT.png``: draw again."""
    import argparse

    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("samples", type=Path)
    p.add_argument("png", type=Path)
    p.add_argument("--title", default="")
    args = p.parse_args(argv)
    print(render(load(args.samples), args.png, args.title))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

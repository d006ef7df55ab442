"""The ``anchor`` role: turns shard results into global adapters, and the last into the output.

Per round r:

1. wait until ``quorum`` shards (default all) have published ``Layout.shard_result(r, i)``;
2. average the results in shard-index order;
3. outer step (DiLoCo): pseudo-gradient ``delta = g_r - avg``, Nesterov momentum
   ``m = mu * m + delta``, ``g_{r+1} = g_r - lr * (delta + mu * m)``; with one shard the
   outer step is the identity (``g_{r+1}`` is the shard's result, bit for bit), so a
   one-shard job is plain training;
4. publish ``g_{r+1}`` with its momentum in the same manifest.

The anchor publishes ``g_0`` too (seeded LoRA initialisation), from the model's config
alone on the meta device: it never loads base weights, so it fits on a small CPU node.
After the last round it publishes ``Layout.final``: a stock PEFT directory
(``adapter_config.json``, ``adapter_model.safetensors``) and ``training_summary.json``.

Its whole state is what it has published, so a restarted anchor finds the newest global
adapter and carries on; nothing published is ever recomputed.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch

from cheapspot.contract import Layout, Phase, Progress, Role, Task
from cheapspot.store import Store
from cheapspot_worker.distill import describe
from cheapspot_worker.errors import Interrupted, Stop
from cheapspot_worker.loading import (
    adapter_bytes,
    adapter_from_bytes,
    base_name,
    initial_adapter,
    meta_lora_model,
)
from cheapspot_worker.progress import Reporter, event
from cheapspot_worker.training import ADAPTER_FILE, fetch_adapter, wait_for

MOMENTUM_FILE = "outer_momentum.safetensors"
SUMMARY_FILE = "training_summary.json"

Adapter = dict[str, torch.Tensor]


def outer_step(
    global_: Adapter,
    average: Adapter,
    momentum: Adapter | None,
    *,
    lr: float,
    mu: float,
) -> tuple[Adapter, Adapter]:
    """Nesterov SGD on the pseudo-gradient ``global_ - average``; returns (next, momentum)."""
    new_global: Adapter = {}
    new_momentum: Adapter = {}
    for name, g in global_.items():
        delta = g - average[name]
        m = delta.clone() if momentum is None else mu * momentum[name] + delta
        new_momentum[name] = m
        new_global[name] = g - lr * (delta + mu * m)
    return new_global, new_momentum


def average(results: Iterable[Adapter]) -> Adapter:
    """Mean in the given (shard-index) order: the same inputs always give the same bits.

    Streams: one running sum, so the anchor holds two adapters, not one per shard.
    """
    total: Adapter | None = None
    count = 0
    for result in results:
        if total is None:
            total = {name: t.clone() for name, t in result.items()}
        else:
            for name, t in total.items():
                t.add_(result[name])
        count += 1
    if total is None:
        raise ValueError("no results to average")
    return {name: t / count for name, t in total.items()}


class Anchor:
    def __init__(self, task: Task, store: Store, stop: Stop) -> None:
        self.task = task
        self.store = store
        self.stop = stop
        self.layout: Layout = task.layout
        self.reporter = Reporter(store, self.layout, Role.ANCHOR)
        self.quorum = min(task.rounds.quorum or task.shard_count, task.shard_count)

    def run(self) -> None:
        task = self.task
        rounds = task.round_count
        if self.reporter.previous is not None:
            self.reporter.update(resumes=self.reporter.record.resumes + 1)
        self.reporter.update(phase=Phase.LOADING, total_steps=task.training.steps, force=True)
        if self.store.has_manifest(self.layout.final):
            self.reporter.update(phase=Phase.DONE, round=rounds, force=True)
            return
        peft_model = meta_lora_model(task)
        r = self.newest_global(rounds)
        if r is None:
            g0 = initial_adapter(peft_model, task.training.seed)
            self.store.publish(
                self.layout.global_adapter(0), {ADAPTER_FILE: adapter_bytes(g0)}, {"round": 0}
            )
            event("global_published", round=0)
            r = 0
        while r < rounds:
            self.finish_round(r)
            r += 1
        self.publish_final(peft_model, rounds)
        self.reporter.update(
            phase=Phase.DONE, round=rounds, step=task.training.steps, message="", force=True
        )
        event("anchor_done", rounds=rounds)

    def newest_global(self, rounds: int) -> int | None:
        names = self.store.list_children(self.layout.root + "rounds/")
        for r in sorted((int(n) for n in names if n.isdigit() and int(n) <= rounds), reverse=True):
            if self.store.has_manifest(self.layout.global_adapter(r)):
                return r
        return None

    def published_results(self, r: int) -> list[int]:
        return [
            i
            for i in range(self.task.shard_count)
            if self.store.has_manifest(self.layout.shard_result(r, i))
        ]

    def finish_round(self, r: int) -> None:
        task = self.task
        self.reporter.update(
            phase=Phase.WAITING,
            round=r,
            step=r * task.rounds.local_steps,
            message=f"waiting for {self.quorum} shard results of round {r}",
            force=True,
        )
        wait_for(
            f"{self.quorum} shard results of round {r}",
            lambda: len(self.published_results(r)) >= self.quorum,
            self.stop,
            task.rounds.poll_seconds,
        )
        shards = self.published_results(r)
        g_prefix = self.layout.global_adapter(r)
        g, _ = fetch_adapter(self.store, g_prefix)
        manifest = self.store.read_manifest(g_prefix)
        momentum = None
        if manifest is not None and MOMENTUM_FILE in manifest.files:
            momentum = adapter_from_bytes(self.store.fetch_bytes(g_prefix, MOMENTUM_FILE, manifest))
        metas: list[dict[str, Any]] = []

        def results() -> Iterator[Adapter]:
            for i in shards:
                state, meta = fetch_adapter(self.store, self.layout.shard_result(r, i))
                metas.append(meta)
                yield state

        files: dict[str, Path | bytes] = {}
        if task.shard_count == 1:
            new_global = next(results())  # the identity: the shard's result, bit for bit
        else:
            avg = average(results())
            new_global, new_momentum = outer_step(
                g,
                avg,
                momentum,
                lr=task.rounds.outer_learning_rate,
                mu=task.rounds.outer_momentum,
            )
            files[MOMENTUM_FILE] = adapter_bytes(new_momentum)
        files[ADAPTER_FILE] = adapter_bytes(new_global)
        mean_losses = _mean_curves([m.get("losses", []) for m in metas])
        mean_kl = _mean_curves([m.get("kl", []) for m in metas])
        if self.stop.requested:
            raise Interrupted(f"SIGTERM before publishing round {r + 1}")
        self.store.publish(
            self.layout.global_adapter(r + 1),
            files,
            {
                "round": r + 1,
                "shards": shards,
                "losses": mean_losses,
                **({"kl": mean_kl} if mean_kl else {}),
                "tokens": sum(int(m.get("tokens", 0)) for m in metas),
                "first_step": r * task.rounds.local_steps,
            },
        )
        event("global_published", round=r + 1, shards=shards)

    def _generated_records(self) -> int:
        """Records the generation shards published (sequences mode), from their done markers."""
        total = 0
        for i in range(self.task.shard_count):
            done = self.layout.generated_done(i)
            manifest = self.store.read_manifest(done)
            if manifest is not None:
                total += int(manifest.meta.get("records", 0))
        return total

    def publish_final(self, peft_model: Any, rounds: int) -> None:
        task = self.task
        g_prefix = self.layout.global_adapter(rounds)
        state, _ = fetch_adapter(self.store, g_prefix)
        curve: list[dict[str, Any]] = []
        tokens = 0
        for r in range(1, rounds + 1):
            manifest = self.store.read_manifest(self.layout.global_adapter(r))
            meta = dict(manifest.meta) if manifest is not None else {}
            tokens += int(meta.get("tokens", 0))
            first = int(meta.get("first_step", (r - 1) * task.rounds.local_steps))
            kl = meta.get("kl", [])
            for k, loss in enumerate(meta.get("losses", [])):
                point = {"step": first + k + 1, "round": r - 1, "loss": loss}
                if k < len(kl):
                    point["kl"] = kl[k]
                curve.append(point)
        resumes, steps_lost = self.reporter.record.resumes, self.reporter.record.steps_lost
        for i in range(task.shard_count):
            doc = self.store.get_json(self.layout.progress(Role.TRAIN, i))
            if doc is not None:
                rec = Progress.model_validate(doc)
                resumes += rec.resumes
                steps_lost += rec.steps_lost
        summary = {
            "base_model": task.model.uri,
            "dataset": task.dataset.uri,
            "shards": task.shard_count,
            "rounds": rounds,
            "steps": task.training.steps,
            "tokens": tokens,
            "loss_curve": curve,
            "final_loss": curve[-1]["loss"] if curve else None,
            "preemptions_survived": resumes,
            "steps_lost": steps_lost,
        }
        final_meta: dict[str, Any] = {"rounds": rounds}
        if task.distillation is not None and task.distillation.sequences:
            how = {
                **describe(task.distillation),
                "generated_dataset": self.store.uri("generated/"),
                "generated_records": self._generated_records(),
            }
            summary["distillation"] = how
            final_meta["distillation"] = how
        elif task.distillation is not None:
            how = describe(task.distillation)
            summary["distillation"] = {
                **how,
                "kl_first": curve[0].get("kl") if curve else None,
                "kl_final": curve[-1].get("kl") if curve else None,
            }
            final_meta["distillation"] = how
        with tempfile.TemporaryDirectory() as tmp:
            config = peft_model.peft_config["default"]
            config.save_pretrained(tmp)
            doc = json.loads((Path(tmp) / "adapter_config.json").read_text())
        # Deterministic bytes: PEFT keeps resolved target modules in a set.
        if isinstance(doc.get("target_modules"), list):
            doc["target_modules"] = sorted(doc["target_modules"])
        doc["base_model_name_or_path"] = base_name(task.model.uri)
        adapter_config = json.dumps(doc, indent=2, sort_keys=True).encode()
        self.store.publish(
            self.layout.final,
            {
                "adapter_config.json": adapter_config,
                "adapter_model.safetensors": adapter_bytes(state),
                SUMMARY_FILE: json.dumps(summary, indent=1).encode(),
            },
            final_meta,
        )
        event("final_published", uri=self.layout.final, preemptions_survived=resumes)


def _mean_curves(curves: list[list[float]]) -> list[float]:
    """Step-wise mean over shards, as long as the shortest curve."""
    steps = min((len(x) for x in curves), default=0)
    return [sum(x[k] for x in curves) / len(curves) for k in range(steps)]


def run_anchor(task: Task, store: Store, stop: Stop) -> None:
    anchor = Anchor(task, store, stop)
    try:
        anchor.run()
    except Exception:
        anchor.reporter.try_flush()
        raise

"""A shard's checkpoints: everything needed to resume bit for bit.

A checkpoint at ``Layout.shard_checkpoint(i, step)`` holds

* ``adapter.safetensors``: the LoRA weights after ``step`` optimizer steps,
* ``trainer_state.pt``: optimizer (AdamW moments, persisting across rounds), LR schedule
  and every RNG state (python, torch CPU, each CUDA device),
* the manifest's ``meta``: step, round, tokens and the losses of the round so far.

The data position is the step itself (see :mod:`cheapspot_worker.data`). Checkpoints are
published like everything else (objects, then the manifest), so a partial one is
invisible; a corrupt one fails verification and the previous one is used, with a warning.
Only the last ``keep`` are kept.
"""

from __future__ import annotations

import io
import logging
import random
from dataclasses import dataclass, field
from typing import Any

import torch

from cheapspot.contract import Layout
from cheapspot.store import CorruptObjectError, NotFoundError, Store
from cheapspot_worker.loading import adapter_bytes, adapter_from_bytes
from cheapspot_worker.progress import event

ADAPTER = "adapter.safetensors"
TRAINER_STATE = "trainer_state.pt"


@dataclass
class Checkpoint:
    step: int
    adapter: dict[str, torch.Tensor]
    trainer_state: dict[str, Any]
    meta: dict[str, Any] = field(default_factory=dict)


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(_as_tuple(state["python"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuple(x: Any) -> Any:
    return tuple(_as_tuple(v) for v in x) if isinstance(x, list | tuple) else x


class Checkpoints:
    def __init__(self, store: Store, layout: Layout, shard_index: int, keep: int) -> None:
        self.store = store
        self.layout = layout
        self.shard_index = shard_index
        self.keep = keep

    def steps(self) -> list[int]:
        """Steps with a checkpoint prefix (published or not), newest first."""
        names = self.store.list_children(self.layout.shard_checkpoints(self.shard_index))
        return sorted((int(n) for n in names if n.isdigit()), reverse=True)

    def save(self, ckpt: Checkpoint) -> bool:
        buf = io.BytesIO()
        torch.save(ckpt.trainer_state, buf)
        published = self.store.publish(
            self.layout.shard_checkpoint(self.shard_index, ckpt.step),
            {ADAPTER: adapter_bytes(ckpt.adapter), TRAINER_STATE: buf.getvalue()},
            meta={**ckpt.meta, "step": ckpt.step},
        )
        self.prune()
        return published

    def load(self, step: int) -> Checkpoint:
        prefix = self.layout.shard_checkpoint(self.shard_index, step)
        manifest = self.store.read_manifest(prefix)
        if manifest is None:
            raise NotFoundError(f"{prefix} has no manifest (partial checkpoint)")
        adapter = adapter_from_bytes(self.store.fetch_bytes(prefix, ADAPTER, manifest))
        raw = self.store.fetch_bytes(prefix, TRAINER_STATE, manifest)
        try:
            state = torch.load(io.BytesIO(raw), weights_only=True, map_location="cpu")
        except Exception as exc:
            raise CorruptObjectError(f"{prefix}{TRAINER_STATE} cannot be loaded: {exc}") from exc
        return Checkpoint(step=step, adapter=adapter, trainer_state=state, meta=dict(manifest.meta))

    def latest_good(self) -> Checkpoint | None:
        """The newest checkpoint that verifies; older ones are tried after a warning."""
        for step in self.steps():
            try:
                return self.load(step)
            except (CorruptObjectError, NotFoundError) as exc:
                event(
                    "checkpoint_skipped",
                    logging.WARNING,
                    shard=self.shard_index,
                    step=step,
                    reason=str(exc),
                )
        return None

    def prune(self) -> None:
        """Keep the newest ``keep`` published checkpoints; drop older ones and stale partials."""
        steps = self.steps()
        good = [
            s
            for s in steps
            if self.store.has_manifest(self.layout.shard_checkpoint(self.shard_index, s))
        ]
        if len(good) < self.keep:
            return
        cutoff = good[self.keep - 1]
        for s in steps:
            if s < cutoff:
                self.store.delete_prefix(self.layout.shard_checkpoint(self.shard_index, s))

"""The shard trainer in-process at the edges: SIGTERM where a round ends, a loss that is not a
number. Real tiny model, real file:// store; the only thing staged is when the signal lands."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from cheapspot.contract import Progress, Role, Task
from cheapspot.store import Store
from cheapspot_worker import training
from cheapspot_worker.anchor import ADAPTER_FILE
from cheapspot_worker.checkpoints import Checkpoints
from cheapspot_worker.errors import Interrupted, PermanentError
from cheapspot_worker.loading import adapter_bytes, initial_adapter, meta_lora_model
from cheapspot_worker.testing import make_task


@pytest.fixture
def task(tmp_path: Path, tiny_models: Callable[[str], Path], learnable_dataset: Path) -> Task:
    t = make_task(
        f"file://{tmp_path}/out/",
        f"file://{tiny_models('llama')}",
        f"file://{learnable_dataset}",
        training={"steps": 8},
        rounds={"localSteps": 4, "pollSeconds": 0.05},
        checkpoint={"everySteps": 0, "everySeconds": 0},
    )
    # What the anchor does first: publish g_0.
    store = Store(t.output_uri)
    g0 = initial_adapter(meta_lora_model(t), t.training.seed)
    store.publish(t.layout.global_adapter(0), {ADAPTER_FILE: adapter_bytes(g0)}, {"round": 0})
    return t


def test_sigterm_while_the_round_end_checkpoint_uploads_still_publishes_it(
    task: Task, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = Store(task.output_uri)
    stop = training.Stop()
    real_save = Checkpoints.save

    def slow_save(self: Checkpoints, ckpt: Any) -> None:
        time.sleep(1.0)  # a big adapter on a slow link
        real_save(self, ckpt)

    monkeypatch.setattr(Checkpoints, "save", slow_save)
    real_has = store.has_manifest

    def has_manifest(prefix: str) -> bool:
        if prefix == task.layout.global_adapter(1):
            stop.at = time.monotonic()  # the notice lands while waiting for g_1
        return real_has(prefix)

    monkeypatch.setattr(store, "has_manifest", has_manifest)
    trainer = training.ShardTrainer(task, store, stop)
    with pytest.raises(Interrupted):
        trainer.run()
    # The process would end now: whatever is not published yet is lost.
    assert real_has(task.layout.shard_result(0, 0))
    assert real_has(task.layout.shard_checkpoint(0, 4)), "round-end checkpoint dropped"


def test_a_non_finite_loss_fails_the_shard_naming_shard_and_step(
    task: Task, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_set = training.set_adapter_state

    def poisoned(model: Any, state: dict[str, torch.Tensor]) -> None:
        real_set(model, {k: torch.full_like(v, float("nan")) for k, v in state.items()})

    monkeypatch.setattr(training, "set_adapter_state", poisoned)
    store = Store(task.output_uri)
    one_round = task.model_copy(update={"training": task.training.model_copy(update={"steps": 4})})
    trainer = training.ShardTrainer(one_round, store, training.Stop())
    with pytest.raises(PermanentError) as failure:
        trainer.run()
    message = str(failure.value)
    assert "shard 0" in message and "step 1" in message and "nan" in message
    assert not store.has_manifest(task.layout.shard_result(0, 0))
    assert trainer.checkpoints.latest_good() is None


def test_the_progress_record_names_a_checkpoint_once_published_not_one_later(
    task: Task, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The operator reads the last checkpoint from the progress record: the upload thread
    writes it after the manifest, so it does not lag a whole checkpoint interval behind."""
    store = Store(task.output_uri)
    one_round = task.model_copy(
        update={
            "training": task.training.model_copy(update={"steps": 6}),
            "rounds": task.rounds.model_copy(update={"local_steps": 6}),
            "checkpoint": task.checkpoint.model_copy(update={"every_steps": 2}),
        }
    )
    trainer = training.ShardTrainer(one_round, store, training.Stop())
    real_step = trainer.train_step
    seen: list[int | None] = []

    def train_step(step: int, log: training.RoundLog) -> bool:
        if step == 3:  # the checkpoint at step 2 was taken one step ago
            pending = trainer._pending
            assert pending is not None, "the checkpoint of step 2 was not taken"
            pending.join(30)
            doc = store.get_json(one_round.layout.progress(Role.TRAIN, 0))
            seen.append(None if doc is None else Progress.model_validate(doc).last_checkpoint_step)
        return real_step(step, log)

    monkeypatch.setattr(trainer, "train_step", train_step)
    trainer.run()
    assert store.has_manifest(one_round.layout.shard_checkpoint(0, 2))
    assert seen == [2]

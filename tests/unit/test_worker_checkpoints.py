"""Checkpoints: a corrupt or partial latest one is skipped for the previous good one."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cheapspot.contract import Layout
from cheapspot.store import Store
from cheapspot_worker.checkpoints import (
    ADAPTER,
    Checkpoint,
    Checkpoints,
    rng_state,
    set_rng_state,
)


def _ckpt(step: int) -> Checkpoint:
    return Checkpoint(
        step=step,
        adapter={"x.lora_A.weight": torch.full((2, 2), float(step))},
        trainer_state={"rng": rng_state(), "optimizer": {"state": {}, "param_groups": []}},
        meta={"round": 0},
    )


@pytest.fixture
def checkpoints(tmp_path: Path) -> Checkpoints:
    return Checkpoints(Store(f"file://{tmp_path}/"), Layout(f"file://{tmp_path}/"), 0, keep=3)


def test_keeps_the_last_n(checkpoints: Checkpoints) -> None:
    for step in (5, 10, 15, 20, 25):
        checkpoints.save(_ckpt(step))
    assert checkpoints.steps() == [25, 20, 15]
    latest = checkpoints.latest_good()
    assert latest is not None and latest.step == 25
    assert torch.equal(latest.adapter["x.lora_A.weight"], torch.full((2, 2), 25.0))


def test_corrupt_latest_falls_back_with_a_warning(
    checkpoints: Checkpoints, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from cheapspot_worker.progress import configure_logging

    configure_logging()
    for step in (5, 10):
        checkpoints.save(_ckpt(step))
    adapter = tmp_path / "shards/0000/checkpoints/00000010" / ADAPTER
    adapter.write_bytes(adapter.read_bytes()[:-3] + b"bad")
    latest = checkpoints.latest_good()
    assert latest is not None and latest.step == 5
    assert '"event": "checkpoint_skipped"' in capsys.readouterr().err


def test_partial_latest_is_ignored(checkpoints: Checkpoints, tmp_path: Path) -> None:
    checkpoints.save(_ckpt(5))
    partial = tmp_path / "shards/0000/checkpoints/00000010"
    partial.mkdir(parents=True)
    (partial / ADAPTER).write_bytes(b"upload cut short")
    latest = checkpoints.latest_good()
    assert latest is not None and latest.step == 5


def test_rng_state_round_trips() -> None:
    state = rng_state()
    a = torch.rand(3)
    set_rng_state(state)
    assert torch.equal(torch.rand(3), a)

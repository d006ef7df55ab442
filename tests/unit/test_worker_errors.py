"""Bad input ends with the permanent-error code and a message a user can act on;
a store that is down ends with the transient code."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from cheapspot.contract import ExitCode, Phase, Progress, Quantization, Role, Task
from cheapspot_worker.main import main
from cheapspot_worker.testing import make_task


@pytest.fixture(autouse=True)
def _restore_sigterm() -> Iterator[None]:
    previous = signal.getsignal(signal.SIGTERM)
    yield
    signal.signal(signal.SIGTERM, previous)


@pytest.fixture
def task_for(
    tmp_path: Path, tiny_models: Callable[[str], Path], learnable_dataset: Path
) -> Callable[..., Task]:
    def make(model: str | None = None, dataset: str | None = None, **sections: Any) -> Task:
        return make_task(
            f"file://{tmp_path}/out/",
            model or f"file://{tiny_models('llama')}",
            dataset or f"file://{learnable_dataset}",
            **sections,
        )

    return make


def _run(task: Task, tmp_path: Path) -> tuple[int, str]:
    """Exit code and the message the operator reads from the progress record."""
    path = tmp_path / "task.json"
    path.write_text(task.model_dump_json(by_alias=True))
    rc = main(["--task", str(path)])
    record = tmp_path / "out" / "progress" / "shard-0000.json"
    message = ""
    if record.exists():
        progress = Progress.from_json(record.read_bytes())
        assert progress.phase is Phase.FAILED
        message = progress.message
    return rc, message


def _dataset(tmp_path: Path, text: str) -> str:
    path = tmp_path / "data.jsonl"
    path.write_text(text)
    return f"file://{path}"


def test_missing_dataset(task_for: Callable[..., Task], tmp_path: Path) -> None:
    rc, message = _run(task_for(dataset=f"file://{tmp_path}/absent.jsonl"), tmp_path)
    assert rc == ExitCode.PERMANENT
    assert "absent.jsonl not found" in message


def test_empty_dataset(task_for: Callable[..., Task], tmp_path: Path) -> None:
    rc, message = _run(task_for(dataset=_dataset(tmp_path, "\n\n")), tmp_path)
    assert rc == ExitCode.PERMANENT
    assert "is empty" in message


def test_malformed_line_names_its_number(task_for: Callable[..., Task], tmp_path: Path) -> None:
    text = '{"text": "one"}\n{"text": "two"}\n{"text": "three"\n'
    rc, message = _run(task_for(dataset=_dataset(tmp_path, text)), tmp_path)
    assert rc == ExitCode.PERMANENT
    assert "line 3: not valid JSON" in message


def test_unknown_target_module_lists_the_real_ones(
    task_for: Callable[..., Task], tmp_path: Path
) -> None:
    rc, message = _run(task_for(lora={"targetModules": ["q_proj", "qkv_fused"]}), tmp_path)
    assert rc == ExitCode.PERMANENT
    assert "lora.targetModules" in message
    assert "q_proj" in message and "down_proj" in message


def test_moe_experts_with_dropout_say_what_to_change(
    task_for: Callable[..., Task], tmp_path: Path, tiny_models: Callable[[str], Path]
) -> None:
    rc, message = _run(task_for(model=f"file://{tiny_models('deepseek_v3')}"), tmp_path)
    assert rc == ExitCode.PERMANENT
    assert "set lora.dropout to 0" in message


def test_unreadable_model(task_for: Callable[..., Task], tmp_path: Path) -> None:
    empty = tmp_path / "not-a-model"
    empty.mkdir()
    rc, message = _run(task_for(model=f"file://{empty}"), tmp_path)
    assert rc == ExitCode.PERMANENT
    assert "no config.json" in message

    broken = tmp_path / "broken-model"
    broken.mkdir()
    (broken / "config.json").write_text('{"model_type": "llama", "hidden_size": 32}')
    (broken / "model.safetensors").write_bytes(b"not safetensors")
    rc, message = _run(task_for(model=f"file://{broken}"), tmp_path)
    assert rc == ExitCode.PERMANENT
    assert "broken-model" in message


def test_invalid_task_and_unimplemented_role(tmp_path: Path) -> None:
    bad = tmp_path / "task.json"
    bad.write_text(json.dumps({"role": "train"}))
    assert main(["--task", str(bad)]) == ExitCode.PERMANENT
    serve = make_task(f"file://{tmp_path}/o/", "file:///m", "file:///d.jsonl", role=Role.SERVE)
    bad.write_text(serve.model_dump_json(by_alias=True))
    assert main(["--task", str(bad)]) == ExitCode.PERMANENT


def test_store_down_is_transient(
    task_for: Callable[..., Task], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for key, value in {
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        "AWS_ACCESS_KEY_ID": "x",
        "AWS_SECRET_ACCESS_KEY": "y",
        "AWS_DEFAULT_REGION": "us-east-1",
        "CHEAPSPOT_STORE_RETRIES": "3",
        "CHEAPSPOT_STORE_RETRY_BASE_SECONDS": "0.01",
    }.items():
        monkeypatch.setenv(key, value)
    task = task_for().model_copy(update={"output_uri": "s3://bucket/job/"})
    path = tmp_path / "task.json"
    path.write_text(task.model_dump_json(by_alias=True))
    assert main(["--task", str(path)]) == ExitCode.TRANSIENT


def test_the_real_command_exits_permanent_with_the_message(
    task_for: Callable[..., Task], tmp_path: Path
) -> None:
    task = task_for(dataset=_dataset(tmp_path, '{"text": "ok"}\nnot json\n'))
    env = {**os.environ, "CHEAPSPOT_TASK": task.to_env()}
    proc = subprocess.run(
        [sys.executable, "-m", "cheapspot_worker"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == ExitCode.PERMANENT
    errors = [json.loads(line) for line in proc.stderr.splitlines() if line.startswith("{")]
    failed = [e for e in errors if e.get("event") == "failed"]
    assert failed and "line 2: not valid JSON" in failed[0]["error"]


def test_an_unexpected_error_is_a_plain_failure_not_a_transient_one(
    task_for: Callable[..., Task], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import cheapspot_worker.main as worker_main

    def broken(task: Task) -> None:
        raise RuntimeError("a bug")

    monkeypatch.setattr(worker_main, "run", broken)
    path = tmp_path / "task.json"
    path.write_text(task_for().model_dump_json(by_alias=True))
    code = main(["--task", str(path)])
    assert code not in (ExitCode.TRANSIENT, ExitCode.PERMANENT, ExitCode.DONE)
    assert code == 1


@pytest.mark.parametrize("cuda", [False, True])
def test_quantization_that_cannot_work_fails_before_the_model_is_fetched(
    task_for: Callable[..., Task], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cuda: bool
) -> None:
    import sys

    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # an image without it
    task = task_for(model=f"file://{tmp_path}/model-not-there-yet")
    task = task.model_copy(
        update={"model": task.model.model_copy(update={"quantization": Quantization.NF4})}
    )
    rc, message = _run(task, tmp_path)
    assert rc == ExitCode.PERMANENT
    # On CUDA and on the CPU alike: bitsandbytes runs NF4 on both, and this image lacks it.
    assert "model.quantization nf4 needs the bitsandbytes package" in message, message

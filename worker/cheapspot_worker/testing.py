"""Running worker processes from tests and benchmarks: tasks, launching, signalling, logs.

Two ways to start a worker, both real processes that can be SIGKILLed or SIGTERMed:

* ``exec``: ``python -m cheapspot_worker --task FILE``, exactly as a pod runs it;
* ``fork``: forked from a server process that has already imported torch, transformers
  and peft (``multiprocessing`` forkserver), then the same ``main()``. Starting the ML
  stack costs ~15 s of CPU per process; tests that kill and restart workers many times
  use this so they take seconds, not minutes.

It is also a pytest plugin (fixtures ``tiny_models`` and ``learnable_dataset``).
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import multiprocessing.context
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import pytest

from cheapspot.contract import Role, Task

Mode = Literal["exec", "fork"]

PRELOAD = [
    "torch",
    "transformers",
    "peft",
    "accelerate",
    "bitsandbytes",
    "safetensors.torch",
    "cheapspot.store",
    "cheapspot_worker.main",
    "cheapspot_worker.training",
    "cheapspot_worker.anchor",
    "cheapspot_worker.distill",
    "transformers.models.llama.modeling_llama",
    "transformers.models.qwen2.modeling_qwen2",
    "transformers.models.deepseek_v3.modeling_deepseek_v3",
]


def make_task(
    output_uri: str,
    model_uri: str,
    dataset_uri: str,
    *,
    role: Role | str = Role.TRAIN,
    shard_index: int = 0,
    shard_count: int = 1,
    **sections: Mapping[str, Any],
) -> Task:
    """A small task: a few steps, small batches, fast polling. ``sections`` override
    ``training``, ``rounds``, ``checkpoint``, ``lora`` (alias or field names)."""
    doc: dict[str, Any] = {
        "role": str(role),
        "job": {"namespace": "test", "name": "job"},
        "shard_index": shard_index,
        "shard_count": shard_count,
        "model": {"uri": model_uri},
        "dataset": {"uri": dataset_uri},
        "output_uri": output_uri,
        "lora": {"r": 4, "alpha": 8, "dropout": 0.05},
        "training": {
            "steps": 24,
            "batchSize": 4,
            "gradientAccumulation": 2,
            "learningRate": 5e-3,
            "warmupSteps": 2,
            "maxSeqLength": 48,
            "seed": 7,
        },
        "rounds": {"localSteps": 8, "pollSeconds": 0.05},
        "checkpoint": {"everySteps": 5, "everySeconds": 0, "keep": 3, "sigtermBudgetSeconds": 20},
    }
    for name, values in sections.items():
        doc[name] = {**doc.get(name, {}), **values}
    return Task.model_validate(doc)


def job_tasks(template: Task) -> dict[str, Task]:
    """The anchor and every shard of ``template``'s job, by name (anchor, shard0, ...)."""
    tasks = {"anchor": template.model_copy(update={"role": Role.ANCHOR, "shard_index": 0})}
    for i in range(template.shard_count):
        tasks[f"shard{i}"] = template.model_copy(update={"role": Role.TRAIN, "shard_index": i})
    return tasks


def _child(task_file: str, log_file: str, env: dict[str, str]) -> None:
    fd = os.open(log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.environ.update(env)
    from cheapspot_worker.main import main

    rc = main(["--task", task_file])
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(int(rc))


_context: multiprocessing.context.ForkServerContext | None = None


def _forkserver() -> multiprocessing.context.ForkServerContext:
    global _context  # noqa: PLW0603 (one forkserver per test process)
    if _context is None:
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(PRELOAD)
        _context = ctx
    return _context


class WorkerProcess:
    """One worker process and its log (JSON lines)."""

    def __init__(self, name: str, log_file: Path, handle: Any, mode: Mode) -> None:
        self.name = name
        self.log_file = log_file
        self._handle = handle
        self._mode = mode

    @property
    def pid(self) -> int:
        pid: int = self._handle.pid
        return pid

    def returncode(self) -> int | None:
        """Exit status (negative: killed by that signal), None while running."""
        if self._mode == "exec":
            rc: int | None = self._handle.poll()
            return rc
        code: int | None = self._handle.exitcode
        return code

    def wait(self, timeout: float = 120.0) -> int:
        deadline = time.monotonic() + timeout
        while (rc := self.returncode()) is None:
            if time.monotonic() > deadline:
                self.kill()
                raise TimeoutError(f"{self.name} did not exit within {timeout:.0f}s")
            time.sleep(0.02)
        if self._mode == "fork":
            self._handle.join()
        return rc

    def send(self, sig: int) -> None:
        if self.returncode() is None:
            os.kill(self.pid, sig)

    def kill(self) -> None:
        self.send(signal.SIGKILL)

    def events(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        if not self.log_file.exists():
            return out
        for line in self.log_file.read_text(errors="replace").splitlines():
            if line.startswith("{"):
                with contextlib.suppress(ValueError):
                    out.append(json.loads(line))
        return out

    def last_step(self) -> int:
        steps = [e["step"] for e in self.events() if e.get("event") == "step"]
        return max(steps, default=0)

    def wait_for(
        self, predicate: Callable[[dict[str, Any]], bool], timeout: float = 120.0
    ) -> dict[str, Any] | None:
        """The first logged event matching ``predicate``; None if the process exits first."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for e in self.events():
                if predicate(e):
                    return e
            if self.returncode() is not None:
                for e in self.events():
                    if predicate(e):
                        return e
                return None
            time.sleep(0.01)
        raise TimeoutError(f"{self.name}: no matching event within {timeout:.0f}s")


class Launcher:
    """Starts workers for tasks, writing task files and logs below ``workdir``."""

    def __init__(
        self, workdir: Path, mode: Mode = "fork", env: Mapping[str, str] | None = None
    ) -> None:
        self.workdir = workdir
        self.mode = mode
        self.env = dict(env or {})
        self._count = 0
        workdir.mkdir(parents=True, exist_ok=True)

    def start(self, name: str, task: Task) -> WorkerProcess:
        self._count += 1
        task_file = self.workdir / f"{name}-{self._count}.task.json"
        task_file.write_text(task.model_dump_json(by_alias=True))
        log_file = self.workdir / f"{name}-{self._count}.log"
        env = {"CHEAPSPOT_CPU_THREADS": "1", **self.env}
        if self.mode == "exec":
            with log_file.open("wb") as log:
                handle: Any = subprocess.Popen(
                    [sys.executable, "-m", "cheapspot_worker", "--task", str(task_file)],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env={**os.environ, **env},
                )
        else:
            handle = _forkserver().Process(
                target=_child, args=(str(task_file), str(log_file), env), name=name
            )
            handle.start()
        return WorkerProcess(name, log_file, handle, self.mode)

    def run_all(self, tasks: Mapping[str, Task], timeout: float = 300.0) -> dict[str, int]:
        """Start every task, wait for all; exit codes by name."""
        procs = {name: self.start(name, task) for name, task in tasks.items()}
        return {name: p.wait(timeout) for name, p in procs.items()}


@dataclass(frozen=True)
class Interruption:
    """Send ``sig`` to ``target`` once ``watch`` has logged step ``at_step`` (the anchor
    counts published global adapters instead of steps), then start ``target`` again."""

    target: str
    sig: int
    watch: str
    at_step: int


@dataclass
class Happened:
    target: str
    sig: int
    returncode: int
    last_step_seen: int
    """The target's last logged step just before the signal was sent."""
    log: list[dict[str, Any]]


def _progress_of(event: dict[str, Any]) -> int:
    if event.get("event") == "step":
        return int(event["step"])
    if event.get("event") == "global_published":
        return int(event["round"])
    return -1


def _reached(at: int) -> Callable[[dict[str, Any]], bool]:
    return lambda event: _progress_of(event) >= at


def run_interrupted(
    launcher: Launcher,
    tasks: Mapping[str, Task],
    plan: list[Interruption],
    timeout: float = 300.0,
) -> tuple[list[Happened], dict[str, int]]:
    """Run a job while interrupting its processes as planned; a planned interruption whose
    moment never comes (the process finished first) is skipped. Returns what happened and
    the final exit codes by name."""
    procs = {name: launcher.start(name, task) for name, task in tasks.items()}
    happened = []
    try:
        for it in plan:
            watched = procs[it.watch]
            seen = watched.wait_for(_reached(it.at_step), timeout)
            target = procs[it.target]
            if seen is None or target.returncode() is not None:
                continue
            last = target.last_step()
            target.send(it.sig)
            rc = target.wait(timeout)
            happened.append(Happened(it.target, it.sig, rc, last, target.events()))
            procs[it.target] = launcher.start(it.target, tasks[it.target])
        codes = {name: p.wait(timeout) for name, p in procs.items()}
    finally:
        for p in procs.values():
            p.kill()
    return happened, codes


# -- pytest fixtures (this module is registered as a plugin by the root conftest) ------------


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """``tiny_models(arch)``: a tiny random-weight model directory of ``arch``, built once."""
    from cheapspot_worker.tiny import build_model

    root = tmp_path_factory.mktemp("tiny-models")
    built: dict[str, Path] = {}

    def get(arch: str) -> Path:
        if arch not in built:
            built[arch] = build_model(root / arch, arch)  # type: ignore[arg-type]
        return built[arch]

    return get


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny trained llama teacher for ``tiny_models("llama")``: same family and tokenizer,
    larger (see :func:`cheapspot_worker.tiny.build_teacher`)."""
    from cheapspot_worker.tiny import build_teacher

    return build_teacher(tmp_path_factory.mktemp("tiny-teacher") / "llama")


@pytest.fixture(scope="session")
def learnable_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """64 short learnable records in ``text`` format."""
    from cheapspot_worker.tiny import learnable_records, write_jsonl

    return write_jsonl(tmp_path_factory.mktemp("data") / "train.jsonl", learnable_records(64))

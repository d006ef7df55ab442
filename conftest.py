"""Test tiers, by folder: tests/unit -> unit, tests/integration -> integration, e2e/ -> e2e,
tests/gpu -> gpu.

`pytest` alone runs every tier this machine can run; gpu tests skip without CUDA.
A test may also carry a marker explicitly.
"""

from __future__ import annotations

from pathlib import Path

import pytest

# Session fixtures: `s3_endpoint`, `local_cluster` (both lazy: unit tests never wait for them);
# `tiny_models`, `learnable_dataset` (built on first use).
pytest_plugins = ["cheapspot_localcluster.testing", "cheapspot_worker.testing"]

_TIER_BY_FOLDER = {"unit": "unit", "integration": "integration", "e2e": "e2e", "gpu": "gpu"}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if any(item.get_closest_marker(m) for m in ("unit", "integration", "e2e", "gpu")):
            continue
        parts = Path(str(item.fspath)).parts
        tier = next((_TIER_BY_FOLDER[p] for p in reversed(parts) if p in _TIER_BY_FOLDER), "unit")
        item.add_marker(getattr(pytest.mark, tier))


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("gpu"):
        try:
            import torch
        except ImportError:
            pytest.skip("gpu tier: torch is not installed")
        if not torch.cuda.is_available():
            pytest.skip("gpu tier: no CUDA device on this machine")

"""Loaded by the vLLM processes a serving replica starts (the launcher puts this directory on
their ``PYTHONPATH``): a correction to vLLM's CPU LoRA kernels.

vLLM marks a token that uses no adapter with the LoRA slot index ``-1``. Its CUDA kernels
skip such tokens; the plain-torch kernels used on CPU (``vllm.lora.ops.torch_ops``) index
the stacked adapter weights with it, and ``weights[-1]`` is the *last* slot. So once that
slot holds an adapter, every base-model request batched with adapter requests (and every
base-model decode step) gets that adapter's delta: base answers change with what else is
in the batch. Zeroing the LoRA shrink output of those tokens makes the expand step add
nothing for them, which is what the CUDA kernels do.

The patch is applied as the module is first imported (an import hook), so vLLM's engine
and worker processes, which import it themselves, get it too. It does nothing unless
``CHEAPSPOT_VLLM_CPU_LORA_FIX`` is set, and touches nothing else.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import os
import sys
from collections.abc import Sequence
from types import ModuleType
from typing import Any

TARGET = "vllm.lora.ops.torch_ops.lora_ops"


def _patch(module: ModuleType) -> None:
    original = module.bgmv_shrink

    def bgmv_shrink(
        inputs: Any,
        lora_a_weights: Any,
        output_tensor: Any,
        lora_indices_tensor: Any,
        scaling: float = 1.0,
    ) -> None:
        original(inputs, lora_a_weights, output_tensor, lora_indices_tensor, scaling)
        none = lora_indices_tensor < 0
        if bool(none.any()):
            output_tensor[: none.shape[0]][none] = 0

    setattr(module, "bgmv_shrink", bgmv_shrink)  # noqa: B010


class _Hook(importlib.abc.MetaPathFinder):
    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname != TARGET:
            return None
        sys.meta_path.remove(self)
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None:
            return spec
        loader: Any = spec.loader
        run = loader.exec_module

        def exec_module(module: ModuleType) -> None:
            run(module)
            _patch(module)

        loader.exec_module = exec_module
        return spec


if os.environ.get("CHEAPSPOT_VLLM_CPU_LORA_FIX"):
    sys.meta_path.insert(0, _Hook())

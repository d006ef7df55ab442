"""Serving-side checks of PEFT LoRA adapters, without torch.

A replica must refuse, with a message that says what is wrong, an adapter that vLLM would
reject with a stack trace or, worse, load into the wrong model: one that is not a LoRA
adapter, one of a higher rank than the pool allows, or one trained for a different base
model. The last is checked on the weights themselves: every LoRA matrix's shape must fit
the module it adapts in the base model's ``config.json`` (a Qwen2 adapter of width 1536
does not fit a base of width 2048), which holds however the model was copied or renamed.

The safetensors header (a length-prefixed JSON table of names, dtypes and shapes) is read
directly: it is all a shape check needs, and the serving environment need not import torch
for it.
"""

from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"

_LORA_KEY = re.compile(
    r"^(?:base_model\.model\.)?(?:model\.)?(?:language_model\.)?layers\.(\d+)\."
    r"(?:self_attn|mlp)\.(\w+)\.lora_([AB])(?:\.\w+)?\.weight$"
)


class AdapterError(ValueError):
    """The adapter cannot be served by this pool; the message says why."""


@dataclass(frozen=True)
class AdapterInfo:
    rank: int
    modules: tuple[str, ...]
    base_model: str


def read_safetensors_header(path: Path) -> dict[str, Any]:
    """``{tensor name: {"dtype", "shape", "data_offsets"}}`` of a safetensors file."""
    with path.open("rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise AdapterError(f"{path.name} is not a safetensors file (too short)")
        (length,) = struct.unpack("<Q", raw)
        if length > 100_000_000:
            raise AdapterError(f"{path.name} is not a safetensors file (header of {length} bytes)")
        try:
            header: dict[str, Any] = json.loads(f.read(length))
        except ValueError as exc:
            raise AdapterError(f"{path.name} is not a safetensors file: {exc}") from exc
    header.pop("__metadata__", None)
    return header


def module_shapes(config: dict[str, Any]) -> dict[str, tuple[int, int]]:
    """``{module: (in_features, out_features)}`` of a decoder layer's linear modules, from a
    Llama / Qwen2 style ``config.json`` (what LoRA adapts in the models cheapspot serves)."""
    hidden = int(config["hidden_size"])
    heads = int(config["num_attention_heads"])
    kv_heads = int(config.get("num_key_value_heads") or heads)
    head_dim = int(config.get("head_dim") or hidden // heads)
    inter = int(config.get("intermediate_size") or 4 * hidden)
    return {
        "q_proj": (hidden, heads * head_dim),
        "k_proj": (hidden, kv_heads * head_dim),
        "v_proj": (hidden, kv_heads * head_dim),
        "o_proj": (heads * head_dim, hidden),
        "gate_proj": (hidden, inter),
        "up_proj": (hidden, inter),
        "down_proj": (inter, hidden),
    }


def check_adapter(
    directory: Path, base_config: dict[str, Any], *, max_rank: int, name: str
) -> AdapterInfo:
    """Raise :class:`AdapterError` unless ``directory`` holds a LoRA adapter this pool's base
    model and rank limit can serve."""
    config_path, weights_path = directory / ADAPTER_CONFIG, directory / ADAPTER_WEIGHTS
    if not config_path.is_file() or not weights_path.is_file():
        raise AdapterError(
            f"adapter {name!r} is not a PEFT adapter directory: it needs {ADAPTER_CONFIG} and "
            f"{ADAPTER_WEIGHTS}"
        )
    try:
        config = json.loads(config_path.read_text())
    except ValueError as exc:
        raise AdapterError(f"adapter {name!r}: {ADAPTER_CONFIG} is not JSON: {exc}") from exc
    if str(config.get("peft_type", "LORA")).upper() != "LORA":
        raise AdapterError(f"adapter {name!r} is a {config.get('peft_type')} adapter, not LoRA")
    rank = int(config.get("r") or 0)
    if rank > max_rank:
        raise AdapterError(
            f"adapter {name!r} has rank {rank}, above the pool's engine.maxLoraRank {max_rank}: "
            "raise maxLoraRank"
        )
    shapes = module_shapes(base_config)
    layers = int(base_config.get("num_hidden_layers") or 0)
    base = str(config.get("base_model_name_or_path") or "")
    seen: set[str] = set()
    for key, meta in read_safetensors_header(weights_path).items():
        m = _LORA_KEY.match(key)
        if m is None:
            continue
        layer, module, which = int(m.group(1)), m.group(2), m.group(3)
        shape = [int(x) for x in meta.get("shape", [])]
        if module not in shapes or len(shape) != 2:
            continue
        seen.add(module)
        in_f, out_f = shapes[module]
        expected = [shape[0], in_f] if which == "A" else [out_f, shape[1]]
        if layer >= layers or shape != expected:
            where = f"layer {layer} of {layers}" if layer >= layers else f"shape {shape}"
            raise AdapterError(
                f"adapter {name!r} was trained for a different base model"
                f"{f' ({base})' if base else ''}: its {module} LoRA {which} has {where}, this "
                f"pool's model needs {expected} (hidden_size {base_config.get('hidden_size')}, "
                f"{layers} layers)"
            )
    if not seen:
        raise AdapterError(
            f"adapter {name!r} has no LoRA weights for the attention or MLP projections "
            f"in {ADAPTER_WEIGHTS}"
        )
    return AdapterInfo(rank, tuple(sorted(seen)), base)

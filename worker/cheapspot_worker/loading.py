"""Loading base models, tokenizers and LoRA adapters.

Model sources (``contract.ModelSource.uri``):

* ``file:///dir``: a Hugging Face model directory on local disk,
* ``s3://bucket/prefix/``: the same, downloaded once into a local cache
  (``CHEAPSPOT_CACHE_DIR``, default ``~/.cache/cheapspot``) and verified: against the
  prefix's ``MANIFEST.json`` (sha256) when it has one, else against the listed sizes,
* ``hf://org/name``: the ordinary ``from_pretrained`` path (tests never use it).

Adapters travel as ``{peft key: tensor}`` dicts in safetensors format, the keys being the
ones stock PEFT writes into ``adapter_model.safetensors``.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cheapspot.contract import MANIFEST_NAME, LoraSettings, ModelSource, Quantization, Task
from cheapspot.store import Manifest, NotFoundError, PermissionStoreError, Store
from cheapspot_worker.errors import PermanentError
from cheapspot_worker.progress import event

if TYPE_CHECKING:
    import torch

CACHE_ENV = "CHEAPSPOT_CACHE_DIR"
COMPLETE_MARKER = ".cheapspot-complete"
"""Written last into a cached download: a directory without it is never used."""


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "cheapspot")


def resolve_model_dir(source: ModelSource) -> str:
    """A local directory (or, for hf://, a hub id) that ``from_pretrained`` can open."""
    uri = source.uri
    if uri.startswith("hf://"):
        return uri[len("hf://") :]
    if uri.startswith("file://"):
        path = Path(uri[len("file://") :])
        if not (path / "config.json").is_file():
            raise PermanentError(
                f"model {uri} is not a Hugging Face model directory: no config.json in {path}"
            )
        return str(path)
    return str(download_s3_model(uri))


@contextlib.contextmanager
def staged(dest: Path, prefix: str) -> Iterator[Path]:
    """A private directory to download ``dest``'s files into. When the block ends without an
    error it is marked complete and becomes ``dest`` in one rename, so processes sharing a
    cache (replicas on one node, a cache on a shared volume) never write into, or read, each
    other's half-downloaded files. It is removed whatever happens."""
    staging = dest.with_name(f".{dest.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
    staging.mkdir(parents=True)
    try:
        yield staging
        (staging / COMPLETE_MARKER).write_text(prefix)
        _settle(staging, dest)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _settle(staging: Path, dest: Path) -> None:
    """``staging`` becomes ``dest``, unless another process completed ``dest`` first (the same
    verified files: this copy is dropped). An incomplete ``dest`` (a run that crashed while
    writing into it) is moved aside and removed: it is a cache, never trusted."""
    for _ in range(3):
        try:
            staging.rename(dest)
            return
        except OSError:
            if (dest / COMPLETE_MARKER).is_file():
                return
            aside = dest.with_name(f".{dest.name}.{uuid.uuid4().hex[:8]}.stale")
            with contextlib.suppress(FileNotFoundError):
                dest.rename(aside)
            shutil.rmtree(aside, ignore_errors=True)
    raise OSError(f"cannot move the download {staging} to {dest}")


def download_s3_model(uri: str) -> Path:
    prefix = uri if uri.endswith("/") else uri + "/"
    dest = cache_dir() / "models" / hashlib.sha256(prefix.encode()).hexdigest()[:16]
    if (dest / COMPLETE_MARKER).is_file():
        return dest
    store = Store(prefix)
    try:
        with staged(dest, prefix) as staging:
            manifest = store.read_manifest("")
            if manifest is None:
                _download_listed(store, uri, staging)
            else:
                if "config.json" not in manifest.files:
                    raise PermanentError(f"model {uri} lists no config.json in its {MANIFEST_NAME}")
                store.fetch("", staging)
    except (NotFoundError, PermissionStoreError) as exc:
        raise PermanentError(f"model {uri} cannot be read: {exc}") from exc
    return dest


def _download_listed(store: Store, uri: str, into: Path) -> None:
    """A prefix without a manifest: every listed object, each checked against its listed size."""
    listing = [(k, s) for k, s in store.list_keys("") if not k.endswith("/")]
    if not any(k == "config.json" for k, _ in listing):
        raise PermanentError(
            f"model {uri} is not a Hugging Face model directory: no config.json there"
        )
    event("model_without_manifest", uri=uri, files=len(listing))
    for key, size in listing:
        target = into / key
        target.parent.mkdir(parents=True, exist_ok=True)
        store.download(key, target)
        if target.stat().st_size != size:
            raise PermanentError(f"model {uri}: {key} changed size while downloading")


def check_quantization(
    source: ModelSource, what: str = "model", *, cuda: bool | None = None
) -> Any:
    """A BitsAndBytesConfig for the source's quantization, or None.

    bitsandbytes runs NF4 and int8 on CUDA and on the CPU (computing in float32 or bfloat16,
    as :func:`compute_dtype` picks). The check refuses only what this worker cannot run: no
    bitsandbytes, or a bitsandbytes without kernels for the device (a tiny quantization is
    tried on it, in the compute dtype). ``what`` names the spec field the source came from,
    so the message says which to change. ``cuda`` defaults to whether torch sees a GPU.
    """
    if source.quantization is Quantization.NONE:
        return None
    import torch

    if cuda is None:
        cuda = torch.cuda.is_available()
    field = f"{what}.quantization {source.quantization.value}"
    try:
        import bitsandbytes  # type: ignore[import-not-found,unused-ignore]
    except ImportError as exc:
        raise PermanentError(
            f"{field} needs the bitsandbytes package, which this worker lacks: install the "
            "worker extra (pip install 'cheapspot[worker]'), as the worker image does, or set "
            f"{what}.quantization to none"
        ) from exc
    quiet_bitsandbytes()
    dtype = compute_dtype(cuda)
    device = "cuda" if cuda else "cpu"
    try:
        _try_quantization(source.quantization, device, dtype)
    except Exception as exc:
        version = getattr(bitsandbytes, "__version__", "?")
        raise PermanentError(
            f"{field} cannot run on this worker's {device} (bitsandbytes {version}, compute "
            f"dtype {str(dtype).removeprefix('torch.')}): {type(exc).__name__}: {exc}; set "
            f"{what}.quantization to none or schedule the job on nodes whose device "
            "bitsandbytes supports"
        ) from exc
    from transformers import BitsAndBytesConfig

    if source.quantization is Quantization.INT8:
        return BitsAndBytesConfig(load_in_8bit=True)  # type: ignore[no-untyped-call]
    return BitsAndBytesConfig(  # type: ignore[no-untyped-call]
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_compute_dtype=dtype,
        bnb_4bit_use_double_quant=True,
    )


def _try_quantization(quantization: Quantization, device: str, dtype: Any) -> None:
    """Quantize and dequantize one small block on ``device``: raises where bitsandbytes has
    no kernel for it."""
    import bitsandbytes.functional as bnb_f  # type: ignore[import-not-found,unused-ignore]
    import torch

    x = torch.linspace(-1.0, 1.0, 128, device=device).reshape(2, 64)
    if quantization is Quantization.INT8:
        q, scale, _ = bnb_f.int8_vectorwise_quant(x.to(torch.float16))
        back = bnb_f.int8_vectorwise_dequant(q, scale)
    else:
        packed, state = bnb_f.quantize_4bit(x.to(dtype), quant_type="nf4", compress_statistics=True)
        back = bnb_f.dequantize_4bit(packed, state)
    if not bool(torch.isfinite(back.float()).all()):
        raise RuntimeError("quantizing a test block gave non-finite values")


class _DropPerCallNotices(logging.Filter):
    """bitsandbytes logs a notice at every int8 matmul of a frozen layer (its inputs are cast
    to float16, by design); in a worker's log it would drown every other line."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("MatMul8bitLt: inputs will be cast")


def quiet_bitsandbytes() -> None:
    log = logging.getLogger("bitsandbytes.autograd._functions")
    if not any(isinstance(f, _DropPerCallNotices) for f in log.filters):
        log.addFilter(_DropPerCallNotices())


def load_tokenizer(model_dir: str, uri: str) -> Any:
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(model_dir)
    except Exception as exc:
        raise PermanentError(f"model {uri}: cannot load its tokenizer: {exc}") from exc
    return tok


def compute_dtype(cuda: bool) -> Any:
    """bf16 where the GPU supports it (Ampere and newer), fp16 on older GPUs, fp32 on CPU."""
    import torch

    if not cuda:
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def load_base_model(
    model_dir: str,
    source: ModelSource,
    *,
    cuda: bool,
    trainable: bool = True,
    gradient_checkpointing: bool = False,
    what: str = "model",
) -> Any:
    """The base model, quantized if ``source`` asks (on CUDA or on the CPU).

    ``trainable`` prepares a quantized model for adapter training (fp32 norms, input
    gradients); a frozen teacher (``trainable=False``) is loaded as is and put in eval mode.
    ``what`` names the spec field in error messages (``model``, ``distillation.teacher``).
    """
    import torch
    from transformers import AutoModelForCausalLM

    quant = check_quantization(source, what, cuda=cuda)
    dtype = compute_dtype(cuda)
    # fp16 weights train badly; older GPUs keep fp32 weights and autocast to fp16 instead.
    kwargs: dict[str, Any] = {"dtype": dtype if dtype != torch.float16 else torch.float32}
    if quant is not None:
        kwargs["quantization_config"] = quant
        kwargs["device_map"] = {"": 0 if cuda else "cpu"}
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
        model = AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)
    except Exception as exc:
        raise PermanentError(
            f"{what} {source.uri} cannot be loaded as a causal language model: "
            f"{type(exc).__name__}: {exc}"
        ) from exc
    if quant is not None and not cuda:
        keep_cpu_compute_dtype(model)
    if not trainable:
        model.eval()  # type: ignore[no-untyped-call]
        for p in model.parameters():
            p.requires_grad_(False)
        return model
    if quant is not None:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(  # type: ignore[no-untyped-call]
            model,
            use_gradient_checkpointing=gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    elif gradient_checkpointing:
        # Non-reentrant checkpointing replays dropout with the saved RNG state, so the
        # recomputed activations are the ones of the forward pass (resume stays exact).
        model.gradient_checkpointing_enable(  # type: ignore[no-untyped-call]
            gradient_checkpointing_kwargs={"use_reentrant": False}
        )
        model.enable_input_require_grads()  # type: ignore[no-untyped-call]
    return model


def keep_cpu_compute_dtype(model: Any) -> None:
    """NF4 layers on the CPU compute in the configured dtype in eval mode too.

    On CPUs with AVX512-BF16, bitsandbytes rewrites a frozen NF4 layer's weights in place at
    its first inference call (no gradients, eval mode: a distillation teacher) for a kernel
    that computes in bfloat16. The teacher's logits would then depend on the node's CPU
    model, which a resumed shard does not choose, and differ from the float32 the job
    computes in. With that turned off they do not depend on the CPU feature (and layers
    narrower than that kernel's 64-wide blocks keep working).
    """
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def lora_config(settings: LoraSettings) -> Any:
    from peft import LoraConfig

    return LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,  # type: ignore[arg-type]  # PEFT accepts floats
        lora_dropout=settings.dropout,
        target_modules=settings.target_modules,
        bias="none",
        task_type="CAUSAL_LM",
    )


def wrap_lora(model: Any, settings: LoraSettings, uri: str) -> Any:
    """The PEFT model; a target module the base model lacks -> PermanentError listing choices.

    PEFT itself only complains when *none* of the names match; a typo next to a valid name
    would silently train less than asked, so every name is checked here.
    """
    from peft import get_peft_model

    linear = sorted(
        {
            n.rsplit(".", 1)[-1]
            for n, m in model.named_modules()
            if type(m).__name__ in ("Linear", "Linear8bitLt", "Linear4bit")
        }
        - {"lm_head"}
    )
    targets = settings.target_modules
    if targets != "all-linear":
        names = [targets] if isinstance(targets, str) else list(targets)
        modules = [n for n, _ in model.named_modules()]
        unknown = [t for t in names if not any(m == t or m.endswith("." + t) for m in modules)]
        if unknown:
            raise PermanentError(
                f"lora.targetModules names {', '.join(map(repr, unknown))}, which the model "
                f"{uri} does not have; its linear layers are: {', '.join(linear)} "
                "(or use 'all-linear')"
            )
    try:
        return get_peft_model(model, lora_config(settings))
    except ValueError as exc:
        if "ParamWrapper" in str(exc) and "dropout" in str(exc):
            raise PermanentError(
                f"the model {uri} has fused mixture-of-experts weights, which LoRA adapts "
                f"without dropout: set lora.dropout to 0 (it is {settings.dropout})"
            ) from exc
        raise PermanentError(
            f"lora.targetModules {targets!r} cannot be applied to the model {uri}: {exc}; "
            f"its linear layers are: {', '.join(linear)} (or use 'all-linear')"
        ) from exc


def base_name(uri: str) -> str:
    return uri[len("hf://") :] if uri.startswith("hf://") else uri


def meta_lora_model(task: Task) -> Any:
    """The LoRA-wrapped model with every tensor on the meta device: shapes and names only.

    The anchor uses it to create the initial adapter and the adapter config without loading
    (or even downloading) the base weights: only config.json is read.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    source = task.model
    if source.uri.startswith("s3://"):
        directory = _download_config_only(source.uri)
    else:
        directory = resolve_model_dir(source)
    try:
        config = AutoConfig.from_pretrained(directory)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)  # type: ignore[no-untyped-call]
    except PermanentError:
        raise
    except Exception as exc:
        raise PermanentError(
            f"model {source.uri}: cannot read its config: {type(exc).__name__}: {exc}"
        ) from exc
    return wrap_lora(model, task.lora, source.uri)


def _download_config_only(uri: str) -> str:
    prefix = uri if uri.endswith("/") else uri + "/"
    dest = cache_dir() / "configs" / hashlib.sha256(prefix.encode()).hexdigest()[:16]
    store = Store(prefix)
    try:
        manifest = store.read_manifest("")
        if manifest is not None:
            if "config.json" not in manifest.files:
                raise PermanentError(f"model {uri} lists no config.json in its {MANIFEST_NAME}")
            store.fetch("", dest, names=["config.json"])
        else:
            dest.mkdir(parents=True, exist_ok=True)
            (dest / "config.json").write_bytes(store.get_bytes("config.json"))
    except (NotFoundError, PermissionStoreError) as exc:
        raise PermanentError(
            f"model {uri} is not a readable Hugging Face model directory: {exc}"
        ) from exc
    return str(dest)


def initial_adapter(peft_model: Any, seed: int) -> dict[str, torch.Tensor]:
    """g_0: LoRA A as PEFT initialises it (Kaiming uniform), B zero, from ``seed`` alone."""
    import torch
    from peft import get_peft_model_state_dict

    generator = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for name, meta in sorted(get_peft_model_state_dict(peft_model).items()):
        tensor = torch.empty(meta.shape, dtype=torch.float32)
        if ".lora_A." in name:
            torch.nn.init.kaiming_uniform_(tensor, a=math.sqrt(5), generator=generator)
        elif ".lora_B." in name:
            tensor.zero_()
        else:
            raise PermanentError(f"unexpected trainable adapter tensor {name}")
        out[name] = tensor
    return out


def adapter_state(peft_model: Any) -> dict[str, torch.Tensor]:
    """The model's adapter weights (fp32, on CPU) under stock PEFT's key names."""
    import torch
    from peft import get_peft_model_state_dict

    return {
        k: v.detach().to("cpu", torch.float32).contiguous()
        for k, v in sorted(get_peft_model_state_dict(peft_model).items())
    }


def set_adapter_state(peft_model: Any, state: dict[str, torch.Tensor]) -> None:
    from peft import set_peft_model_state_dict

    expected = set(adapter_state_names(peft_model))
    if set(state) != expected:
        missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
        raise PermanentError(
            f"adapter does not fit this model/LoRA settings (missing {missing[:3]}, "
            f"unexpected {extra[:3]})"
        )
    result: Any = set_peft_model_state_dict(peft_model, state)
    unexpected = list(getattr(result, "unexpected_keys", []) or [])
    if unexpected:
        raise PermanentError(f"adapter keys not used by the model: {unexpected[:3]}")


def adapter_state_names(peft_model: Any) -> list[str]:
    from peft import get_peft_model_state_dict

    return sorted(get_peft_model_state_dict(peft_model))


def adapter_bytes(state: dict[str, torch.Tensor]) -> bytes:
    from safetensors.torch import save

    data: bytes = save(dict(sorted(state.items())), metadata={"format": "pt"})
    return data


def adapter_from_bytes(data: bytes) -> dict[str, torch.Tensor]:
    from safetensors.torch import load

    out: dict[str, torch.Tensor] = load(data)
    return out


def manifest_meta(manifest: Manifest) -> dict[str, Any]:
    return dict(manifest.meta)

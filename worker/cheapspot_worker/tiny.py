"""Tiny random-weight models and toy datasets, built locally: nothing is ever downloaded.

The models have the same architectures as the real ones cheapspot fine-tunes
(``LlamaForCausalLM``, ``Qwen2ForCausalLM`` as in the DeepSeek-R1 distills,
``DeepseekV3ForCausalLM`` with mixture-of-experts layers), only a few thousand
parameters wide, and are saved as ordinary Hugging Face directories (config,
safetensors weights, a fast tokenizer with a chat template), so they go through the
real loading code. Tests, benchmarks and the demo use them.

Command line: ``python -m cheapspot_worker.tiny model DIR [--arch llama]``,
``python -m cheapspot_worker.tiny teacher DIR`` (a trained teacher for distillation) and
``python -m cheapspot_worker.tiny data FILE [--format text] [--records 64]``.
"""

from __future__ import annotations

import argparse
import json
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

Arch = Literal["llama", "qwen2", "deepseek_v3"]
ARCHITECTURES: tuple[Arch, ...] = ("llama", "qwen2", "deepseek_v3")

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>"]

_WORDS = [
    "red",
    "green",
    "blue",
    "cat",
    "dog",
    "bird",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "ten",
    "add",
    "plus",
    "is",
    "the",
    "answer",
    "what",
    "colour",
    "of",
    "sky",
    "grass",
    "sea",
    "small",
    "big",
    "up",
    "down",
    "left",
    "right",
    "yes",
    "no",
    "hello",
    "world",
    "spot",
    "node",
    "train",
    "round",
    "shard",
    "anchor",
    "adapter",
]


def _corpus() -> list[str]:
    rng = random.Random(0)
    lines = [" ".join(_WORDS)]
    for _ in range(400):
        lines.append(" ".join(rng.choice(_WORDS) for _ in range(12)))
    lines += [f"{a} plus {b} is {a + b}" for a in range(10) for b in range(10)]
    return lines


def build_tokenizer(vocab_size: int = 384) -> Any:
    """A byte-level BPE tokenizer trained on a fixed toy corpus, as PreTrainedTokenizerFast."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    return PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        chat_template=CHAT_TEMPLATE,
    )


SERVABLE_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256)
"""Attention head sizes vLLM's CPU backend runs (it derives the head size of Llama and
Qwen2 as hidden_size / num_attention_heads): the tiny models keep to them so the serving
tests and the training tests use the same models."""


def attention_heads(hidden: int) -> tuple[int, int]:
    """(query heads, key/value heads) for a tiny model of width ``hidden``: four heads
    (grouped-query, two KV heads) where that leaves a servable head size, else fewer."""
    for heads in (4, 2, 1):
        if hidden % heads == 0 and hidden // heads in SERVABLE_HEAD_SIZES:
            return heads, max(1, heads // 2)
    raise ValueError(
        f"hidden size {hidden} gives no attention head size vLLM serves on CPU "
        f"({', '.join(map(str, SERVABLE_HEAD_SIZES))} with 1, 2 or 4 heads)"
    )


def tiny_config(arch: Arch, vocab_size: int, hidden: int = 32, layers: int = 2) -> Any:
    heads, kv_heads = attention_heads(hidden) if arch != "deepseek_v3" else (4, 2)
    common: dict[str, Any] = {
        "vocab_size": vocab_size,
        "hidden_size": hidden,
        "intermediate_size": hidden * 2,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "max_position_embeddings": 256,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 0,
        "tie_word_embeddings": False,
        # At width 32 the usual 0.02 caps every logit below ~0.6: the output layer (which
        # LoRA does not touch) could never express a confident prediction. Wider init keeps
        # the tiny model learnable through its adapters, as a real one is.
        "initializer_range": 0.3,
    }
    if arch == "llama":
        from transformers import LlamaConfig

        return LlamaConfig(**common)
    if arch == "qwen2":
        from transformers import Qwen2Config

        return Qwen2Config(**common)
    if arch == "deepseek_v3":
        from transformers import DeepseekV3Config

        # Multi-head latent attention and routed + shared experts, as in DeepSeek-V3;
        # the first layer dense, the rest MoE.
        return DeepseekV3Config(
            **{**common, "num_key_value_heads": 4},
            moe_intermediate_size=hidden,
            n_shared_experts=1,
            n_routed_experts=4,
            num_experts_per_tok=2,
            n_group=1,
            topk_group=1,
            first_k_dense_replace=1,
            kv_lora_rank=16,
            q_lora_rank=16,
            qk_rope_head_dim=8,
            qk_nope_head_dim=8,
            v_head_dim=8,
            num_mtp_layers=0,
        )
    raise ValueError(f"unknown architecture {arch!r}; choose one of {', '.join(ARCHITECTURES)}")


def build_model(
    directory: Path,
    arch: Arch = "llama",
    *,
    hidden: int = 32,
    layers: int = 2,
    seed: int = 0,
    vocab_size: int = 384,
) -> Path:
    """Save a tiny random-weight model of ``arch`` and its tokenizer as an HF directory.

    Models built with the same ``vocab_size`` share a tokenizer (it is trained
    deterministically on a fixed corpus), so a wider, deeper one is a teacher for a smaller
    one of the same family; another ``vocab_size`` gives a different tokenizer.
    """
    import torch
    from transformers import AutoModelForCausalLM

    tokenizer = build_tokenizer(vocab_size)
    config = tiny_config(arch, len(tokenizer), hidden=hidden, layers=layers)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)  # type: ignore[no-untyped-call]
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def build_teacher(
    directory: Path, arch: Arch = "llama", *, steps: int = 150, seed: int = 1
) -> Path:
    """A tiny teacher for :func:`build_model`'s student: the same family and tokenizer, twice
    as wide and one layer deeper, and fully trained for ``steps`` steps on the learnable
    records, so that, like a real teacher, it knows the domain the student is distilled on
    (a random teacher would only be noise to imitate). Deterministic; about 20 s on one core.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    build_model(directory, arch, hidden=64, layers=3, seed=seed)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    model = AutoModelForCausalLM.from_pretrained(directory)
    texts = [r["text"] + tokenizer.eos_token for r in learnable_records(256, seed=seed + 4)]
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        picked = torch.randint(0, len(texts), (8,), generator=generator).tolist()
        batch = tokenizer([texts[i] for i in picked], return_tensors="pt", padding=True)
        labels = batch.input_ids.masked_fill(batch.attention_mask == 0, -100)
        model(**batch, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(directory)
    return directory


def build_adapter(
    directory: Path,
    model_dir: Path,
    *,
    r: int = 4,
    seed: int = 1,
    target_modules: str | list[str] = "all-linear",
) -> Path:
    """Save a stock PEFT LoRA adapter for the model in ``model_dir`` with random, non-zero
    weights (both A and B, scaled so the adapter visibly changes the model's answers):
    serving tests need adapters that differ from the base and from each other without
    training them first."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    config = LoraConfig(
        r=r, lora_alpha=2 * r, target_modules=target_modules, init_lora_weights=False
    )
    torch.manual_seed(seed)
    model = get_peft_model(base, config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.normal_(0.0, 0.5)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(directory))
    return directory


DataFormat = Literal["text", "prompt-completion", "chat"]


def learnable_records(n: int, fmt: DataFormat = "text", seed: int = 0) -> list[dict[str, Any]]:
    """Records a tiny model can learn quickly: a few fixed sentences and sums."""
    rng = random.Random(seed)
    facts = [
        ("what colour is the sky", "blue"),
        ("what colour is the grass", "green"),
        ("what colour is the sea", "blue"),
        ("say hello", "hello world"),
    ]
    out: list[dict[str, Any]] = []
    for _ in range(n):
        if rng.random() < 0.5:
            prompt, answer = rng.choice(facts)
        else:
            a, b = rng.randrange(5), rng.randrange(5)
            prompt, answer = f"{a} plus {b} is", f"{a + b}"
        if fmt == "text":
            out.append({"text": f"{prompt} {answer}"})
        elif fmt == "prompt-completion":
            out.append({"prompt": prompt, "completion": f" {answer}"})
        else:
            out.append(
                {
                    "messages": [
                        {"role": "user", "content": prompt},
                        {"role": "assistant", "content": answer},
                    ]
                }
            )
    return out


def write_jsonl(path: Path, records: Sequence[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cheapspot_worker.tiny", description=__doc__)
    sub = parser.add_subparsers(dest="what", required=True)
    m = sub.add_parser("model", help="write a tiny random-weight model directory")
    m.add_argument("directory", type=Path)
    m.add_argument("--arch", choices=ARCHITECTURES, default="llama")
    m.add_argument("--hidden", type=int, default=32)
    m.add_argument("--layers", type=int, default=2)
    m.add_argument("--seed", type=int, default=0)
    t = sub.add_parser("teacher", help="write a tiny trained teacher for the tiny model")
    t.add_argument("directory", type=Path)
    t.add_argument("--arch", choices=ARCHITECTURES, default="llama")
    d = sub.add_parser("data", help="write a small learnable JSONL dataset")
    d.add_argument("file", type=Path)
    d.add_argument("--format", choices=("text", "prompt-completion", "chat"), default="text")
    d.add_argument("--records", type=int, default=64)
    args = parser.parse_args(argv)
    if args.what == "model":
        print(
            build_model(
                args.directory, args.arch, hidden=args.hidden, layers=args.layers, seed=args.seed
            )
        )
    elif args.what == "teacher":
        print(build_teacher(args.directory, args.arch))
    else:
        print(write_jsonl(args.file, learnable_records(args.records, args.format)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

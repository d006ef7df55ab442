"""Serving throughput on the GPU through vLLM (offline batched generation), the engine the
serving replicas run. Runs in the CUDA serving environment (``make serve-venv-cuda`` builds
``.venv-serve-cuda`` with the ``vllm`` package; vLLM pins its own torch), on a model
directory built beforehand by the project's environment:

    .venv/bin/python -m cheapspot_worker.tiny model /tmp/m --arch qwen2
    .venv-serve-cuda/bin/python benchmarks/gpu_serving.py --model /tmp/m --out serving.json

Generated tokens per second for 256 prompts of 64 new tokens each (``ignore_eos``, so every
request generates all of them), after one warm-up batch. Part of ``benchmarks/gpu_check.sh``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--prompts", type=int, default=256)
    parser.add_argument("--new-tokens", type=int, default=64)
    args = parser.parse_args()
    import torch
    from vllm import LLM, SamplingParams  # type: ignore[import-not-found]

    llm = LLM(model=str(args.model), max_model_len=256, gpu_memory_utilization=0.5, seed=0)
    params = SamplingParams(max_tokens=args.new_tokens, ignore_eos=True, temperature=0.8)
    prompts = [f"what colour is the sky {i} plus {i % 5} is" for i in range(args.prompts)]
    llm.generate(prompts[:16], params, use_tqdm=False)
    started = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    seconds = time.perf_counter() - started
    generated = sum(len(o.outputs[0].token_ids) for o in outputs)
    result = {
        "gpu": torch.cuda.get_device_name(0),
        "prompts": args.prompts,
        "generated_tokens": generated,
        "seconds": round(seconds, 3),
        "tokens_per_second": round(generated / seconds, 1),
    }
    args.out.write_text(json.dumps(result, indent=1))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

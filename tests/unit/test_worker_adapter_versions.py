"""A replica's adapter versions: the digest that names one, where its files go, and what a
new desired list loads, unloads and swaps."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from cheapspot.contract import AdapterSource
from cheapspot.store import Store
from cheapspot_worker.adapter_versions import (
    AdapterSync,
    AdapterVersion,
    SyncPlan,
    fetch_adapter,
    manifest_digest,
    sync_plan,
)

BASE = {"hidden_size": 8, "num_attention_heads": 2, "num_hidden_layers": 1}


def _adapter(directory: Path, fill: float) -> dict[str, Path]:
    directory.mkdir(parents=True)
    (directory / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2}))
    prefix = "base_model.model.model.layers.0.self_attn.q_proj"
    save_file(
        {
            f"{prefix}.lora_A.weight": np.full((2, 8), fill, dtype=np.float32),
            f"{prefix}.lora_B.weight": np.full((8, 2), fill, dtype=np.float32),
        },
        str(directory / "adapter_model.safetensors"),
    )
    return {p.name: p for p in directory.iterdir()}


def test_the_same_uri_published_again_is_a_new_version_in_a_directory_of_its_own(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """vLLM keys its prefix cache on an adapter's name and path: a new version at an old
    path would reuse the old weights' cached prompts. Each version gets its own."""
    monkeypatch.setenv("CHEAPSPOT_CACHE_DIR", str(tmp_path / "cache"))
    root = Store(f"file://{tmp_path}/store/")
    uri = root.uri("qa/")
    store = Store(uri)
    assert store.publish("", _adapter(tmp_path / "v1", 1.0))
    source = AdapterSource(name="qa", uri=uri)
    path1, v1 = fetch_adapter(source, BASE, 8)
    assert v1 == AdapterVersion(uri, manifest_digest(store.read_manifest("")))  # type: ignore[arg-type]
    assert fetch_adapter(source, BASE, 8) == (path1, v1)  # cached, the same version
    root.delete_prefix("qa/")
    assert store.publish("", _adapter(tmp_path / "v2", 2.0))
    path2, v2 = fetch_adapter(source, BASE, 8)
    assert v2.uri == v1.uri and v2.digest != v1.digest and v2.digest.startswith("sha256:")
    assert path2 != path1
    for path, version in ((path1, "v1"), (path2, "v2")):
        weights = (path / "adapter_model.safetensors").read_bytes()
        assert weights == (tmp_path / version / "adapter_model.safetensors").read_bytes()


V1 = AdapterVersion("s3://b/qa/v1/", "sha256:aa")
V1_AGAIN = AdapterVersion("s3://b/qa/v1/", "sha256:bb")
V2 = AdapterVersion("s3://b/qa/v2/", "sha256:cc")
SUMS = AdapterVersion("s3://b/sums/", "sha256:dd")


@pytest.mark.parametrize(
    ("loaded", "desired", "plan"),
    [
        ({"qa": V1}, {"qa": V1}, SyncPlan()),
        # a new URI under the same name: swapped (names alone would see nothing to do)
        ({"qa": V1, "sums": SUMS}, {"qa": V2, "sums": SUMS}, SyncPlan(replace=("qa",))),
        # the same URI published again: a new digest, swapped too
        ({"qa": V1}, {"qa": V1_AGAIN}, SyncPlan(replace=("qa",))),
        # a digest the replica could not read matches any digest of its URI
        ({"qa": V1}, {"qa": AdapterVersion(V1.uri, "")}, SyncPlan()),
        ({"qa": V1}, {"sums": SUMS}, SyncPlan(unload=("qa",), load=("sums",))),
        ({}, {"qa": V1, "sums": SUMS}, SyncPlan(load=("qa", "sums"))),
    ],
)
def test_sync_plan_compares_name_uri_and_digest(
    loaded: dict[str, AdapterVersion], desired: dict[str, AdapterVersion], plan: SyncPlan
) -> None:
    assert sync_plan(loaded, desired) == plan
    assert plan.empty == (plan == SyncPlan())


def test_a_new_version_is_announced_before_it_is_swapped_and_never_loaded_in_place(
    tmp_path: Path,
) -> None:
    """The desired list (what routers poll) shows the new version for the settle before vLLM
    changes; the swap is an unload and a load from the new version's own path."""
    paths = {V1.uri: tmp_path / "v1", V2.uri: tmp_path / "v2", SUMS.uri: tmp_path / "sums"}
    versions = {V1.uri: V1, V2.uri: V2, SUMS.uri: SUMS}
    calls: list[tuple[str, dict[str, str], dict[str, AdapterVersion], float]] = []

    async def post(path: str, doc: dict[str, str]) -> str:
        calls.append((path, doc, dict(sync.desired), asyncio.get_running_loop().time()))
        return ""

    def fetch(source: AdapterSource) -> tuple[Path, AdapterVersion]:
        return paths[source.uri], versions[source.uri]

    sync = AdapterSync(post, fetch, settle_seconds=0.3)
    sync.started({"qa": V1, "sums": SUMS})

    async def change() -> tuple[dict[str, str], float]:
        began = asyncio.get_running_loop().time()
        errors = await sync.apply(
            [AdapterSource(name="qa", uri=V2.uri), AdapterSource(name="sums", uri=SUMS.uri)], 3
        )
        return errors, began

    errors, began = asyncio.run(change())
    assert errors == {}
    assert [(c[0], c[1]) for c in calls] == [
        ("/v1/unload_lora_adapter", {"lora_name": "qa"}),
        ("/v1/load_lora_adapter", {"lora_name": "qa", "lora_path": str(paths[V2.uri])}),
    ]
    assert all(c[2]["qa"] == V2 for c in calls)  # announced before vLLM was touched
    assert calls[0][3] - began >= 0.3  # after the settle
    assert sync.loaded == {"qa": V2, "sums": SUMS} and sync.generation == 3
    doc = sync.to_json()
    assert doc["adapters"][0] == {"name": "qa", "uri": V2.uri, "digest": V2.digest}
    assert doc["desired"]["generation"] == 3

"""How a replica's start failures end: which exit class the pool's operator sees."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cheapspot.contract import AdapterSource, JobRef, ModelSource, ServeTask
from cheapspot.store import TransientStoreError
from cheapspot_worker.errors import PermanentError
from cheapspot_worker.serving import AdapterNotPublished, Launcher, fetch_adapter


def test_an_adapter_not_published_yet_is_transient_not_permanent(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CHEAPSPOT_CACHE_DIR", str(tmp_path / "cache"))
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "llama"}))
    later = AdapterSource(name="qa", uri=f"file://{tmp_path}/ckpt/qa/final/")
    with pytest.raises(AdapterNotPublished, match="nothing is published"):
        fetch_adapter(later, {}, 16)
    task = ServeTask(
        pool=JobRef(namespace="default", name="qa-serve"),
        model=ModelSource(uri=f"file://{model}"),
        adapters=[later],
    )
    with pytest.raises(TransientStoreError, match="nothing is published") as got:
        Launcher(task).prepare()
    assert not isinstance(got.value, PermanentError)

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


def test_vllm_exiting_before_it_is_up_is_a_failure_not_permanent(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A GPU that fails to initialise exits like settings vLLM refuses: retried a few times
    (exit 1), not held at once (65)."""
    from cheapspot.contract import ExitCode
    from cheapspot_worker import serving
    from cheapspot_worker.errors import FAILED_EXIT, EngineFailed
    from cheapspot_worker.main import serve_main

    monkeypatch.setenv("CHEAPSPOT_TERMINATION_MESSAGE_PATH", str(tmp_path / "termination"))
    task = ServeTask(
        pool=JobRef(namespace="default", name="qa-serve"),
        model=ModelSource(uri=f"file://{tmp_path}/model"),
    )
    path = tmp_path / "task.json"
    path.write_text(task.model_dump_json(by_alias=True))
    monkeypatch.setattr(serving, "has_vllm", lambda: True)

    def crash(_task: ServeTask) -> None:
        raise EngineFailed("vLLM exited (1) before it was ready; its last output:\nCUDA error")

    monkeypatch.setattr(serving, "run_serve", crash)
    rc = serve_main(path, [])
    assert rc == FAILED_EXIT
    assert rc not in (ExitCode.PERMANENT, ExitCode.TRANSIENT)
    assert "before it was ready" in (tmp_path / "termination").read_text()

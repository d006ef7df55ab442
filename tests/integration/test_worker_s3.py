"""Workers against a real S3 endpoint over HTTP: model, data and outputs on s3://.

The final adapter must be the same bits whatever the store; a store that goes down makes
the workers retry, then exit with the transient code, and leaves everything already
published intact, so a rerun finishes the job exactly.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from cheapspot.contract import MANIFEST_NAME, ExitCode, Task
from cheapspot.store import Store
from cheapspot_localcluster.s3 import S3Endpoint, start_s3
from cheapspot_worker.testing import Launcher, job_tasks, make_task

FINAL = "final/adapter_model.safetensors"


def _upload_inputs(
    env: dict[str, str], root: str, model_dir: Path, dataset: Path, monkeypatch: pytest.MonkeyPatch
) -> tuple[str, str]:
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    store = Store(root)
    files: dict[str, Path | bytes] = {p.name: p for p in sorted(model_dir.iterdir()) if p.is_file()}
    store.publish("model/", files)
    store.put_bytes("data/train.jsonl", dataset.read_bytes())
    return root + "model/", root + "data/train.jsonl"


def _reference(tmp_path: Path, model_dir: Path, dataset: Path) -> bytes:
    tasks = job_tasks(
        make_task(f"file://{tmp_path}/reference/", f"file://{model_dir}", f"file://{dataset}")
    )
    assert set(Launcher(tmp_path / "ref-logs").run_all(tasks).values()) == {0}
    return (tmp_path / "reference" / FINAL).read_bytes()


def _tasks(root: str, model_uri: str, data_uri: str) -> dict[str, Task]:
    return job_tasks(make_task(root + "out/", model_uri, data_uri))


def test_a_job_on_s3_gives_the_same_adapter_as_on_file(
    s3_endpoint: S3Endpoint,
    tmp_path: Path,
    tiny_models: Callable[[str], Path],
    learnable_dataset: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    model_dir = tiny_models("llama")
    expected = _reference(tmp_path, model_dir, learnable_dataset)
    root = s3_endpoint.uri(f"jobs/{uuid.uuid4().hex[:8]}/")
    env = {**s3_endpoint.env(), "CHEAPSPOT_CACHE_DIR": str(tmp_path / "cache")}
    model_uri, data_uri = _upload_inputs(env, root, model_dir, learnable_dataset, monkeypatch)
    tasks = _tasks(root, model_uri, data_uri)
    codes = Launcher(tmp_path / "logs", env=env).run_all(tasks)
    assert set(codes.values()) == {0}, codes
    out = Store(root + "out/")
    out.fetch("final/", tmp_path / "final")
    assert (tmp_path / "final" / "adapter_model.safetensors").read_bytes() == expected


def test_store_down_is_retried_then_transient_and_damages_nothing(
    tmp_path: Path,
    tiny_models: Callable[[str], Path],
    learnable_dataset: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    model_dir = tiny_models("llama")
    expected = _reference(tmp_path, model_dir, learnable_dataset)
    endpoint = start_s3(port=0, bucket=f"down-{uuid.uuid4().hex[:8]}")
    port = endpoint.port
    env = {
        **endpoint.env(),
        "CHEAPSPOT_CACHE_DIR": str(tmp_path / "cache"),
        "CHEAPSPOT_STORE_RETRIES": "3",
        "CHEAPSPOT_STORE_RETRY_BASE_SECONDS": "0.05",
    }
    root = endpoint.uri("job/")
    try:
        model_uri, data_uri = _upload_inputs(env, root, model_dir, learnable_dataset, monkeypatch)
        tasks = _tasks(root, model_uri, data_uri)
        launcher = Launcher(tmp_path / "logs", env=env)
        procs = {name: launcher.start(name, task) for name, task in tasks.items()}
        assert procs["shard0"].wait_for(lambda e: e.get("event") == "step" and e["step"] >= 10)
    finally:
        endpoint.stop()
    codes = {name: p.wait() for name, p in procs.items()}
    assert codes == {"anchor": ExitCode.TRANSIENT, "shard0": ExitCode.TRANSIENT}
    retried = [e for p in procs.values() for e in p.events() if "retrying" in e.get("msg", "")]
    assert retried, "no retries were logged"

    endpoint = start_s3(port=port, bucket=endpoint.bucket)  # same data: moto keeps it in memory
    try:
        out = Store(root + "out/")
        published = [
            k[: -len(MANIFEST_NAME)] for k, _ in out.list_keys("") if k.endswith(MANIFEST_NAME)
        ]
        assert published, "nothing was published before the store went down"
        for i, prefix in enumerate(published):
            out.fetch(prefix, tmp_path / "verify" / str(i))  # raises if anything is damaged
        codes = launcher.run_all(tasks)
        assert set(codes.values()) == {0}, codes
        out.fetch("final/", tmp_path / "final")
        assert (tmp_path / "final" / "adapter_model.safetensors").read_bytes() == expected
    finally:
        endpoint.stop()

"""The worker's download cache for models from object storage: processes sharing it (replicas
on one node, a cache on a shared volume) never write into or read each other's
half-downloaded files, and an incomplete directory is never trusted."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from cheapspot.store import Store
from cheapspot_worker.errors import PermanentError
from cheapspot_worker.loading import COMPLETE_MARKER, cache_dir, download_s3_model

FILES = {"config.json": b'{"model_type": "qwen2"}', "model.safetensors": b"w" * 4096}


@pytest.fixture
def model_uri(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A model directory (no manifest: the listed-sizes path) and an empty cache."""
    src = tmp_path / "bucket" / "models" / "tiny"
    src.mkdir(parents=True)
    for name, data in FILES.items():
        (src / name).write_bytes(data)
    monkeypatch.setenv("CHEAPSPOT_CACHE_DIR", str(tmp_path / "cache"))
    return f"file://{src}/"


def _leftovers() -> list[str]:
    models = cache_dir() / "models"
    return (
        sorted(p.name for p in models.iterdir() if p.name.startswith("."))
        if models.exists()
        else []
    )


def _assert_complete(dest: Path) -> None:
    assert (dest / COMPLETE_MARKER).is_file()
    assert {n: (dest / n).read_bytes() for n in FILES} == FILES


def test_two_processes_downloading_at_once_each_write_their_own_files(
    model_uri: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    both_mid_download = threading.Barrier(2, timeout=10)
    targets: dict[str, set[Path]] = {}
    original = Store.download

    def download(self: Store, key: str, path: Path) -> None:
        original(self, key, path)
        targets.setdefault(threading.current_thread().name, set()).add(path)
        if key == "config.json":
            both_mid_download.wait()  # neither has finished: both are writing now

    monkeypatch.setattr(Store, "download", download)
    results: dict[str, Path] = {}
    threads = [
        threading.Thread(
            target=lambda n=n: results.update({n: download_s3_model(model_uri)}), name=n
        )
        for n in ("replica-a", "replica-b")
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert set(results) == {"replica-a", "replica-b"}
    assert results["replica-a"] == results["replica-b"]
    _assert_complete(results["replica-a"])
    # Each wrote into a directory of its own, never into the one the other reads from.
    assert not targets["replica-a"] & targets["replica-b"]
    assert all(results["replica-a"] not in p.parents for ps in targets.values() for p in ps)
    assert _leftovers() == []


def test_an_incomplete_directory_left_by_a_crash_is_replaced(model_uri: str) -> None:
    first = download_s3_model(model_uri)
    (first / COMPLETE_MARKER).unlink()  # as if the process died before finishing
    (first / "model.safetensors").write_bytes(b"half")
    again = download_s3_model(model_uri)
    assert again == first
    _assert_complete(again)
    assert _leftovers() == []


def test_a_copy_completed_first_by_another_process_is_kept(
    model_uri: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    original = Store.download
    theirs: list[Path] = []

    def download(self: Store, key: str, path: Path) -> None:
        original(self, key, path)
        if not theirs:  # meanwhile another process finishes the same model
            dest = path.parent.parent / path.parent.name.split(".")[1]
            dest.mkdir()
            for name, data in FILES.items():
                (dest / name).write_bytes(data)
            (dest / COMPLETE_MARKER).write_text("theirs")
            theirs.append(dest)

    monkeypatch.setattr(Store, "download", download)
    got = download_s3_model(model_uri)
    assert got == theirs[0]
    assert (got / COMPLETE_MARKER).read_text() == "theirs"
    assert _leftovers() == []


def test_a_failed_download_leaves_nothing_behind(model_uri: str) -> None:
    src = Path(model_uri.removeprefix("file://"))
    (src / "config.json").unlink()
    with pytest.raises(PermanentError, match=r"no config\.json"):
        download_s3_model(model_uri)
    models = cache_dir() / "models"
    assert not models.exists() or list(models.iterdir()) == []

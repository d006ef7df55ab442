"""The object store on file://: publish/verify, conditional manifests, retries."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from cheapspot.contract import MANIFEST_NAME
from cheapspot.store import (
    CorruptObjectError,
    FileEntry,
    Manifest,
    NotFoundError,
    RetryPolicy,
    Store,
    TransientStoreError,
    split_store_uri,
)


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store(f"file://{tmp_path}/job/")


def test_publish_then_fetch_verifies_every_object(store: Store, tmp_path: Path) -> None:
    big = tmp_path / "weights.bin"
    big.write_bytes(b"w" * 100_000)
    assert store.publish("a/", {"x.json": b"{}", "weights.bin": big}, meta={"step": 3})
    manifest = store.fetch("a/", tmp_path / "out")
    assert (tmp_path / "out" / "weights.bin").read_bytes() == big.read_bytes()
    assert manifest.meta == {"step": 3}
    assert manifest.files["weights.bin"].size == 100_000


def test_prefix_without_manifest_is_not_trusted(store: Store, tmp_path: Path) -> None:
    store.put_bytes("partial/adapter.safetensors", b"half written")
    assert store.read_manifest("partial/") is None
    with pytest.raises(NotFoundError, match="not published"):
        store.fetch("partial/", tmp_path / "out")


def test_corrupted_object_is_detected(store: Store, tmp_path: Path) -> None:
    store.publish("a/", {"x.bin": b"original bytes"})
    (tmp_path / "job" / "a" / "x.bin").write_bytes(b"tampered bytes")
    with pytest.raises(CorruptObjectError, match=r"x\.bin does not match its manifest"):
        store.fetch("a/", tmp_path / "out")
    manifest = store.read_manifest("a/")
    assert manifest is not None
    with pytest.raises(CorruptObjectError):
        store.fetch_bytes("a/", "x.bin", manifest)


def test_missing_listed_object_is_corrupt(store: Store, tmp_path: Path) -> None:
    store.publish("a/", {"x.bin": b"data"})
    (tmp_path / "job" / "a" / "x.bin").unlink()
    with pytest.raises(CorruptObjectError, match="missing"):
        store.fetch("a/", tmp_path / "out")


def test_unreadable_manifest_is_corrupt(store: Store) -> None:
    store.put_bytes("a/" + MANIFEST_NAME, b"{not json")
    with pytest.raises(CorruptObjectError):
        store.read_manifest("a/")


def test_second_publish_does_not_replace_the_first(store: Store) -> None:
    assert store.publish("a/", {"x.bin": b"first"})
    assert not store.publish("a/", {"x.bin": b"second"})
    assert store.fetch_bytes("a/", "x.bin", store.read_manifest("a/")) == b"first"  # type: ignore[arg-type]


def test_conditional_manifest_write_keeps_the_existing_one(store: Store) -> None:
    # A zombie that passed the "already published?" check still cannot replace the manifest.
    assert store.put_bytes("a/" + MANIFEST_NAME, b"newer", if_absent=True)
    assert not store.put_bytes("a/" + MANIFEST_NAME, b"stale", if_absent=True)
    assert store.get_bytes("a/" + MANIFEST_NAME) == b"newer"


def test_list_children_and_delete_prefix(store: Store) -> None:
    for step in (5, 10, 15):
        store.publish(f"ckpt/{step:08d}/", {"a": b"1", "b": b"2"})
    assert store.list_children("ckpt/") == ["00000005", "00000010", "00000015"]
    store.delete_prefix("ckpt/00000005/")
    assert store.list_children("ckpt/") == ["00000010", "00000015"]
    assert store.has_manifest("ckpt/00000010/")
    with pytest.raises(ValueError, match="not a prefix"):
        store.delete_prefix("ckpt/00000010")


def test_json_records_and_full_uris(store: Store) -> None:
    store.put_json(store.uri("progress/x.json"), {"step": 4})
    assert store.get_json("progress/x.json") == {"step": 4}
    assert store.get_json("progress/absent.json") is None
    with pytest.raises(ValueError, match="not under"):
        store.rel("file:///elsewhere/x")


def test_manifest_lists_sha256_and_size(store: Store, tmp_path: Path) -> None:
    store.publish("a/", {"x.bin": b"abc"})
    doc = json.loads((tmp_path / "job" / "a" / MANIFEST_NAME).read_text())
    assert doc["files"]["x.bin"] == {
        "sha256": "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad",
        "size": 3,
    }


def test_transient_errors_are_retried_then_raised(store: Store) -> None:
    sleeps: list[float] = []
    store = Store(
        store.root_uri, retry=RetryPolicy(attempts=4, base_delay=0.1), sleep=sleeps.append
    )
    calls = []

    def failing() -> bytes:
        calls.append(1)
        raise OSError(5, "Input/output error")

    with pytest.raises(TransientStoreError, match="after 4 attempts"):
        store._call("GET x", failing)
    assert len(calls) == 4
    assert len(sleeps) == 3
    assert sleeps[1] > sleeps[0] * 1.0  # exponential (with jitter in [0.5, 1])

    outcomes = [OSError(5, "blip"), b"ok"]

    def flaky() -> bytes:
        result = outcomes.pop(0)
        if isinstance(result, Exception):
            raise result
        return result

    assert store._call("GET y", flaky) == b"ok"


def test_split_store_uri_for_single_objects(tmp_path: Path) -> None:
    store, name = split_store_uri(f"file://{tmp_path}/data/train.jsonl")
    assert name == "train.jsonl"
    assert store.root_uri == f"file://{tmp_path}/data/"
    store.put_bytes(name, b"{}\n")
    assert (tmp_path / "data" / "train.jsonl").read_bytes() == b"{}\n"


def test_a_store_rooted_at_a_published_prefix_reads_its_manifest(tmp_path: Path) -> None:
    # A model uploaded with publish() and later opened with the model's own prefix as root.
    Store(f"file://{tmp_path}/models/").publish("tiny/", {"config.json": b"{}"})
    rooted = Store(f"file://{tmp_path}/models/tiny/")
    manifest = rooted.read_manifest("")
    assert manifest is not None and "config.json" in manifest.files
    assert rooted.has_manifest("")
    rooted.fetch("", tmp_path / "out")
    assert (tmp_path / "out" / "config.json").read_bytes() == b"{}"


BAD_NAMES = [
    "../other/adapter_model.safetensors",
    "/etc/cron.d/x",
    "a/../../x",
    "./x",
    "a//b",
    "",
    MANIFEST_NAME,
]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_a_manifest_naming_a_path_outside_its_prefix_is_refused_on_read(
    store: Store, tmp_path: Path, name: str
) -> None:
    """Names are checked when publishing, and again when reading: a manifest that some other
    writer put in the bucket must not make a replica write over another adapter's files."""
    victim = tmp_path / "cache" / "other" / "adapter_model.safetensors"
    victim.parent.mkdir(parents=True)
    victim.write_bytes(b"the other adapter")
    store.put_bytes("a/x.bin", b"evil")
    entry = FileEntry(hashlib.sha256(b"evil").hexdigest(), 4, None)
    store.put_bytes("a/" + MANIFEST_NAME, Manifest({name: entry}).to_json())
    with pytest.raises(CorruptObjectError, match="bad object name"):
        store.read_manifest("a/")
    with pytest.raises(CorruptObjectError, match="bad object name"):
        store.fetch("a/", tmp_path / "cache" / "a")
    assert victim.read_bytes() == b"the other adapter"
    with pytest.raises(ValueError, match="bad object name"):
        store.publish("b/", {name: b"evil"})

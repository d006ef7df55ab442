"""The object store on s3:// against the loopback S3 endpoint (moto over HTTP)."""

from __future__ import annotations

import socket
import uuid
from pathlib import Path

import pytest

from cheapspot.contract import MANIFEST_NAME
from cheapspot.store import (
    CorruptObjectError,
    NotFoundError,
    PermissionStoreError,
    RetryPolicy,
    Store,
    TransientStoreError,
)
from cheapspot_localcluster.s3 import S3Endpoint


@pytest.fixture
def s3_env(s3_endpoint: S3Endpoint, monkeypatch: pytest.MonkeyPatch) -> S3Endpoint:
    for key, value in s3_endpoint.env().items():
        monkeypatch.setenv(key, value)
    return s3_endpoint


@pytest.fixture
def store(s3_env: S3Endpoint) -> Store:
    return Store(s3_env.uri(f"test-{uuid.uuid4().hex[:8]}/"))


def test_publish_fetch_and_corruption(store: Store, s3_env: S3Endpoint, tmp_path: Path) -> None:
    assert store.publish("a/", {"x.bin": b"payload"}, meta={"round": 1})
    assert store.fetch("a/", tmp_path / "out").meta == {"round": 1}
    assert (tmp_path / "out" / "x.bin").read_bytes() == b"payload"
    key = store.root_uri.split("/", 3)[3] + "a/x.bin"
    s3_env.client().put_object(Bucket=s3_env.bucket, Key=key, Body=b"tampere")
    with pytest.raises(CorruptObjectError):
        store.fetch("a/", tmp_path / "again")


def test_conditional_write_on_s3(store: Store) -> None:
    assert store.put_bytes("a/" + MANIFEST_NAME, b"first", if_absent=True)
    assert not store.put_bytes("a/" + MANIFEST_NAME, b"zombie", if_absent=True)
    assert store.get_bytes("a/" + MANIFEST_NAME) == b"first"


def test_multipart_upload_round_trips(
    store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from boto3.s3.transfer import TransferConfig

    # 5 MiB is S3's smallest part; an 11 MiB file goes up in three parts once it is over
    # the single conditional PUT's limit (5 GiB in life, 6 MiB here).
    part = 5 * 1024 * 1024
    monkeypatch.setattr("cheapspot.store.SINGLE_PUT_LIMIT", part + 1024 * 1024)
    store._backend.transfer = TransferConfig(multipart_threshold=part, multipart_chunksize=part)  # type: ignore[attr-defined]
    big = tmp_path / "big.bin"
    big.write_bytes(bytes(range(256)) * (11 * 4096))
    store.publish("m/", {"big.bin": big})
    store.fetch("m/", tmp_path / "out")
    assert (tmp_path / "out" / "big.bin").read_bytes() == big.read_bytes()


def test_listing_deleting_and_missing(store: Store) -> None:
    for step in (1, 2, 3):
        store.publish(f"c/{step:08d}/", {"a": b"x"})
    assert store.list_children("c/") == ["00000001", "00000002", "00000003"]
    store.delete_prefix("c/00000001/")
    assert store.list_children("c/") == ["00000002", "00000003"]
    with pytest.raises(NotFoundError):
        store.get_bytes("c/absent")
    assert store.get_json("c/absent.json") is None


def test_missing_bucket_is_a_permission_error(s3_env: S3Endpoint) -> None:
    store = Store("s3://no-such-bucket-cheapspot/x/", retry=RetryPolicy(attempts=1))
    with pytest.raises(PermissionStoreError, match="does not exist"):
        store.get_bytes("k")


def test_store_down_is_retried_then_transient(monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here once closed
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "y")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    sleeps: list[float] = []
    store = Store(
        "s3://bucket/job/", retry=RetryPolicy(attempts=3, base_delay=0.01), sleep=sleeps.append
    )
    with pytest.raises(TransientStoreError, match="after 3 attempts"):
        store.publish("a/", {"x": b"1"})
    assert len(sleeps) == 2


def test_virtual_hosted_addressing_for_oss(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CHEAPSPOT_S3_ADDRESSING_STYLE", "virtual")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "https://oss-cn-hangzhou.aliyuncs.com")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "y")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "cn-hangzhou")
    store = Store("s3://my-bucket/jobs/")
    client = store._backend.client  # type: ignore[attr-defined]
    url = client.generate_presigned_url(
        "get_object", Params={"Bucket": "my-bucket", "Key": "jobs/x"}
    )
    assert url.startswith("https://my-bucket.oss-cn-hangzhou.aliyuncs.com/jobs/x")


def test_a_store_rooted_at_a_published_prefix_reads_its_manifest(
    s3_env: S3Endpoint, tmp_path: Path
) -> None:
    # How models are read: uploaded with publish(), opened with the model's prefix as root.
    base = s3_env.uri(f"models-{uuid.uuid4().hex[:8]}/")
    Store(base).publish("tiny/", {"config.json": b"{}"})
    rooted = Store(base + "tiny/")
    manifest = rooted.read_manifest("")
    assert manifest is not None and "config.json" in manifest.files
    rooted.fetch("", tmp_path / "out")
    assert (tmp_path / "out" / "config.json").read_bytes() == b"{}"


def test_every_request_to_the_store_is_counted_by_operation(store: Store) -> None:
    counted: list[str] = []

    def count(operation: str) -> None:
        counted.append(operation)

    store.on_request(count)
    Store(store.root_uri).on_request(count)  # the same shared client: counted once
    store.put_bytes("progress/shard-0000.json", b"{}")
    assert store.get_bytes_or_none("progress/shard-0000.json") == b"{}"
    assert store.get_bytes_or_none("progress/shard-0001.json") is None
    assert counted == ["PutObject", "GetObject", "GetObject"]

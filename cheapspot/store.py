"""The object store, shared by the operator and the worker: ``s3://`` and ``file://``.

One interface (:class:`Store`) over two backends. What it promises:

* **Objects first, manifest last.** :meth:`Store.publish` uploads every file of a
  prefix, then writes ``MANIFEST.json`` listing each name with its sha256 and size.
  Readers (:meth:`Store.read_manifest`, :meth:`Store.fetch`) trust only prefixes that
  have a manifest and verify every sum, so a partial upload is invisible and a
  corrupted object raises :class:`CorruptObjectError` (callers fall back to an older
  prefix).
* **Write-once objects: a zombie cannot change what a manifest lists.** Every object of a
  published prefix and its manifest are created with ``If-None-Match: *`` where the store
  supports it (S3, OSS, and ``file://`` through an atomic link), never overwritten. When a
  name is already taken by other bytes (a zombie writer of the same slot, or a crashed
  attempt's partial upload), this writer's object goes to a key of its own below the
  prefix (``.w-<random>/<name>``) and the manifest names that key; the same bytes already
  there are simply reused (a retried publish). So a pod on a partitioned node that keeps
  writing after its replacement published can neither replace the manifest nor any object
  it lists. Stores that ignore or reject the header fall back to check-then-write, where
  that guarantee is lost (a warning says so).
* **Retries.** Connection errors, 5xx answers and throttling are retried with
  exponential backoff; when the store stays down, :class:`TransientStoreError` is
  raised and nothing already published has been touched.
* **Credentials only from boto3's standard chain** (environment, IRSA / EKS Pod
  Identity, ACK RRSA, instance profile). The endpoint comes from the standard
  ``AWS_ENDPOINT_URL`` / ``AWS_ENDPOINT_URL_S3`` variables; Alibaba OSS needs
  virtual-hosted addressing: ``CHEAPSPOT_S3_ADDRESSING_STYLE=virtual``.

Retries are tuned by ``CHEAPSPOT_STORE_RETRIES`` (attempts, default 6) and
``CHEAPSPOT_STORE_RETRY_BASE_SECONDS`` (first back-off, default 0.5; doubles up to 8 s).

This module imports boto3 lazily and never imports torch.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import random
import secrets
import shutil
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from cheapspot.contract import MANIFEST_NAME

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

log = logging.getLogger(__name__)

T = TypeVar("T")

ADDRESSING_ENV = "CHEAPSPOT_S3_ADDRESSING_STYLE"
RETRIES_ENV = "CHEAPSPOT_STORE_RETRIES"
RETRY_BASE_ENV = "CHEAPSPOT_STORE_RETRY_BASE_SECONDS"
MULTIPART_THRESHOLD = 64 * 1024 * 1024
"""Objects above this size go up and down in parts (boto3 TransferConfig)."""
MANIFEST_VERSION = 1
_CHUNK = 1024 * 1024


class StoreError(Exception):
    """Base class for object-store failures."""


class TransientStoreError(StoreError):
    """The store could not be reached (or kept failing) after all retries. Retry later."""


class CorruptObjectError(StoreError):
    """A published prefix does not match its manifest (missing object, wrong size or sum)."""


class NotFoundError(StoreError):
    """The object does not exist."""


class PermissionStoreError(StoreError):
    """The store refused access (credentials, bucket policy, missing bucket)."""


FENCE_PREFIX = ".w-"
"""Objects that found their name taken go below ``<prefix>.w-<random>/`` (see above)."""
SINGLE_PUT_LIMIT = 5 * 1024**3
"""S3's largest single PUT: bigger objects cannot be created conditionally."""


@dataclass(frozen=True)
class FileEntry:
    sha256: str
    size: int
    key: str | None = None
    """Where the object is, relative to the prefix, when it is not at its name (fenced)."""


@dataclass(frozen=True)
class Manifest:
    """What a published prefix holds: ``name -> (sha256, size)`` plus free-form metadata."""

    files: Mapping[str, FileEntry]
    meta: Mapping[str, Any] = field(default_factory=dict)

    def to_json(self) -> bytes:
        doc = {
            "version": MANIFEST_VERSION,
            "files": {
                n: {"sha256": e.sha256, "size": e.size, **({"key": e.key} if e.key else {})}
                for n, e in sorted(self.files.items())
            },
            "meta": dict(self.meta),
        }
        return json.dumps(doc, indent=1, sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: bytes) -> Manifest:
        try:
            doc = json.loads(data)
            files = {
                check_object_name(str(n)): FileEntry(
                    sha256=str(e["sha256"]),
                    size=int(e["size"]),
                    key=_listed_key(str(n), e.get("key")),
                )
                for n, e in doc["files"].items()
            }
            return cls(files=files, meta=dict(doc.get("meta", {})))
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise CorruptObjectError(f"unreadable manifest: {exc}") from exc


def check_object_name(name: str) -> str:
    """``name`` if it may stand in a manifest: a relative path below its prefix. Refused at
    publish and again at read, so a manifest written by anything else (a bug, another tool,
    someone with write access to the bucket) cannot make a reader write outside the folder
    it fetches into (``../other-adapter/...``, ``/etc/...``) or over the manifest itself."""
    parts = name.split("/")
    if (
        not name
        or name.startswith(("/", FENCE_PREFIX))
        or any(part in ("", ".", "..") for part in parts)
        or "\x00" in name
    ):
        raise ValueError(f"bad object name {name!r}: not a relative path below the prefix")
    if name == MANIFEST_NAME:
        raise ValueError(f"bad object name {name!r}: {MANIFEST_NAME} is written by publish itself")
    return name


def _listed_key(name: str, key: Any) -> str | None:
    """A manifest's fenced key, refused unless it is ``.w-<token>/<name>`` (no escaping)."""
    if key is None:
        return None
    token, _, rest = str(key).partition("/")
    if not token.startswith(FENCE_PREFIX) or rest != name or ".." in token:
        raise ValueError(f"bad key {key!r} for {name!r}")
    return str(key)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 6
    base_delay: float = 0.5
    max_delay: float = 8.0

    @classmethod
    def from_env(cls) -> RetryPolicy:
        return cls(
            attempts=max(1, int(os.environ.get(RETRIES_ENV, "6"))),
            base_delay=float(os.environ.get(RETRY_BASE_ENV, "0.5")),
        )

    def delays(self) -> Iterator[float]:
        delay = self.base_delay
        for _ in range(self.attempts - 1):
            # Full jitter keeps many shards from hammering a recovering store in step.
            yield delay * (0.5 + random.random() / 2)
            delay = min(self.max_delay, delay * 2)


class _Backend:
    """Raw object access below a root; keys are '/'-separated paths relative to it."""

    def put_bytes(self, key: str, data: bytes, *, if_absent: bool = False) -> bool:
        """Write ``data``; with ``if_absent`` return False (and write nothing) if the key exists."""
        raise NotImplementedError

    def get_bytes(self, key: str) -> bytes:
        raise NotImplementedError

    def upload_file(self, key: str, path: Path) -> None:
        raise NotImplementedError

    def create_file(self, key: str, path: Path) -> bool:
        """Upload ``path`` unless ``key`` exists: False (and nothing written) if it does."""
        raise NotImplementedError

    def download_file(self, key: str, path: Path) -> None:
        raise NotImplementedError

    def list_keys(self, prefix: str) -> list[tuple[str, int]]:
        """Every key below ``prefix`` (recursively) with its size."""
        raise NotImplementedError

    def list_children(self, prefix: str) -> list[str]:
        """Names of the immediate 'directories' below ``prefix`` (which ends with '/')."""
        raise NotImplementedError

    def delete_keys(self, keys: list[str]) -> None:
        raise NotImplementedError

    def is_transient(self, exc: BaseException) -> bool:
        raise NotImplementedError

    def classify(self, exc: BaseException) -> BaseException:
        """Map a backend exception that is not transient to a StoreError (or itself)."""
        return exc

    def on_request(self, count: Callable[[str], None]) -> None:
        """A filesystem sends no requests."""


class _FileBackend(_Backend):
    def __init__(self, root: Path) -> None:
        self.root = root

    def _path(self, key: str) -> Path:
        return self.root / key

    def put_bytes(self, key: str, data: bytes, *, if_absent: bool = False) -> bool:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            if if_absent:
                # link() fails if the target exists: an atomic "create if absent".
                try:
                    os.link(tmp, path)
                except FileExistsError:
                    return False
            else:
                os.replace(tmp, path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        return True

    def get_bytes(self, key: str) -> bytes:
        return self._path(key).read_bytes()

    def upload_file(self, key: str, path: Path) -> None:
        self._copy_in(key, path, replace=True)

    def create_file(self, key: str, path: Path) -> bool:
        return self._copy_in(key, path, replace=False)

    def _copy_in(self, key: str, path: Path, *, replace: bool) -> bool:
        """Copy ``path`` to a temporary file beside the key, then move it into place:
        replacing what is there, or (``replace=False``) only if nothing is (False if so)."""
        dest = self._path(key)
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=".tmp-")
        os.close(fd)
        try:
            shutil.copyfile(path, tmp)
            if replace:
                os.replace(tmp, dest)
            else:
                try:
                    os.link(tmp, dest)  # fails if the key exists: an atomic create
                except FileExistsError:
                    return False
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        return True

    def download_file(self, key: str, path: Path) -> None:
        shutil.copyfile(self._path(key), path)

    def list_keys(self, prefix: str) -> list[tuple[str, int]]:
        base = self._path(prefix)
        if not base.is_dir():
            return []
        out = []
        for p in sorted(base.rglob("*")):
            if p.is_file() and not p.name.startswith(".tmp-"):
                out.append((p.relative_to(self.root).as_posix(), p.stat().st_size))
        return out

    def list_children(self, prefix: str) -> list[str]:
        base = self._path(prefix)
        if not base.is_dir():
            return []
        return sorted(p.name for p in base.iterdir() if p.is_dir())

    def delete_keys(self, keys: list[str]) -> None:
        for key in keys:
            with contextlib.suppress(FileNotFoundError):
                self._path(key).unlink()
        # Remove directories left empty, deepest first.
        for key in keys:
            parent = self._path(key).parent
            while parent != self.root and parent.is_dir():
                try:
                    parent.rmdir()
                except OSError:
                    break
                parent = parent.parent

    def is_transient(self, exc: BaseException) -> bool:
        # A missing file is an answer, not a failure; other I/O errors (NFS hiccups,
        # a volume being remounted) may pass.
        return isinstance(exc, OSError) and not isinstance(
            exc, FileNotFoundError | IsADirectoryError | NotADirectoryError | PermissionError
        )

    def classify(self, exc: BaseException) -> BaseException:
        if isinstance(exc, FileNotFoundError | NotADirectoryError):
            return NotFoundError(str(exc))
        if isinstance(exc, PermissionError):
            return PermissionStoreError(str(exc))
        return exc


_THROTTLING_CODES = {
    "Throttling",
    "ThrottlingException",
    "ThrottledException",
    "RequestThrottledException",
    "TooManyRequestsException",
    "SlowDown",
    "RequestLimitExceeded",
    "RequestTimeout",
    "RequestTimeoutException",
    "InternalError",
    "ServiceUnavailable",
}


_CLIENTS: dict[tuple[str, ...], Any] = {}
_CLIENTS_LOCK = threading.Lock()


def _shared_client(style: str, make: Callable[[], Any]) -> Any:
    """One boto3 S3 client per process for the same addressing style and AWS environment
    (endpoint, region, credentials): a client holds its own copy of the service model, about
    12 MB, and an operator with a Store per job's prefix held hundreds of them. boto3 clients
    are safe to share between threads."""
    key = (style, *sorted(f"{k}={v}" for k, v in os.environ.items() if k.startswith("AWS_")))
    with _CLIENTS_LOCK:
        client = _CLIENTS.get(key)
        if client is None:
            client = _CLIENTS[key] = make()
        return client


class _S3Backend(_Backend):
    def __init__(self, bucket: str, root: str, addressing_style: str | None = None) -> None:
        import boto3
        from boto3.s3.transfer import TransferConfig
        from botocore.config import Config

        style = addressing_style or os.environ.get(ADDRESSING_ENV) or "auto"
        if style not in ("auto", "virtual", "path"):
            raise ValueError(f"{ADDRESSING_ENV} must be auto, virtual or path, not {style!r}")
        config = Config(
            s3={"addressing_style": style},  # type: ignore[arg-type]
            # Our own retry loop (with the classification below) replaces botocore's, so a
            # dead store costs one predictable back-off schedule, not a product of two.
            retries={"total_max_attempts": 1, "mode": "standard"},
            connect_timeout=10,
            read_timeout=60,
        )
        # Endpoint, region and credentials come from boto3's standard chain only.
        self.client: S3Client = _shared_client(
            style, lambda: boto3.session.Session().client("s3", config=config)
        )
        self.transfer = TransferConfig(
            multipart_threshold=MULTIPART_THRESHOLD, multipart_chunksize=MULTIPART_THRESHOLD
        )
        self.bucket = bucket
        self.root = root  # '' or 'some/prefix/'
        self._conditional_supported = True

    def _key(self, key: str) -> str:
        return self.root + key

    def on_request(self, count: Callable[[str], None]) -> None:
        # ``before-send`` fires once per HTTP request (each part of a multipart upload, each
        # try), named by its operation. The client is shared: one registration per counter.
        def counted(event_name: str, **_: Any) -> None:
            count(event_name.rsplit(".", 1)[-1])

        self.client.meta.events.register(
            "before-send.s3", counted, unique_id=f"cheapspot-count-{id(count)}"
        )

    def put_bytes(self, key: str, data: bytes, *, if_absent: bool = False) -> bool:
        if if_absent:
            return self._create(key, data)
        self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data)
        return True

    def create_file(self, key: str, path: Path) -> bool:
        if path.stat().st_size > SINGLE_PUT_LIMIT:
            # Too big for one conditional PUT: check, then a multipart upload.
            if self._exists(key):
                return False
            self.upload_file(key, path)
            return True
        with path.open("rb") as body:
            return self._create(key, body)

    def _create(self, key: str, body: Any) -> bool:
        """PUT ``body`` with If-None-Match: *; False if the key exists."""
        from botocore.exceptions import ClientError

        if self._conditional_supported:
            try:
                self.client.put_object(
                    Bucket=self.bucket, Key=self._key(key), Body=body, IfNoneMatch="*"
                )
                return True
            except ClientError as exc:
                code = _error_code(exc)
                status = _http_status(exc)
                if code in ("PreconditionFailed", "ConditionalRequestConflict") or status in (
                    409,
                    412,
                ):
                    return False
                if code in ("NotImplemented", "InvalidArgument") or status == 501:
                    log.warning(
                        "store ignores conditional writes (%s): objects are checked, then "
                        "written, and a zombie writer may replace one a manifest lists",
                        code,
                    )
                    self._conditional_supported = False
                    if hasattr(body, "seek"):
                        body.seek(0)
                else:
                    raise
        if self._exists(key):
            return False
        self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=body)
        return True

    def _exists(self, key: str) -> bool:
        from botocore.exceptions import ClientError

        try:
            self.client.head_object(Bucket=self.bucket, Key=self._key(key))
            return True
        except ClientError as exc:
            if _http_status(exc) == 404:
                return False
            raise

    def get_bytes(self, key: str) -> bytes:
        body = self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"]
        return body.read()

    def upload_file(self, key: str, path: Path) -> None:
        self.client.upload_file(str(path), self.bucket, self._key(key), Config=self.transfer)

    def download_file(self, key: str, path: Path) -> None:
        self.client.download_file(self.bucket, self._key(key), str(path), Config=self.transfer)

    def list_keys(self, prefix: str) -> list[tuple[str, int]]:
        out = []
        paginator = self.client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self.bucket, Prefix=self._key(prefix)):
            for obj in page.get("Contents", []):
                out.append((obj["Key"][len(self.root) :], int(obj["Size"])))
        return sorted(out)

    def list_children(self, prefix: str) -> list[str]:
        out = []
        full = self._key(prefix)
        paginator = self.client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self.bucket, Prefix=full, Delimiter="/"):
            for cp in page.get("CommonPrefixes", []):
                out.append(cp["Prefix"][len(full) :].rstrip("/"))
        return sorted(out)

    def delete_keys(self, keys: list[str]) -> None:
        for i in range(0, len(keys), 1000):
            batch = [{"Key": self._key(k)} for k in keys[i : i + 1000]]
            self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": batch})  # type: ignore[typeddict-item]

    def is_transient(self, exc: BaseException) -> bool:
        from boto3.exceptions import S3UploadFailedError
        from botocore.exceptions import (
            ClientError,
            ConnectionError,
            HTTPClientError,
            ReadTimeoutError,
        )

        if isinstance(exc, ConnectionError | HTTPClientError | ReadTimeoutError):
            return True
        if isinstance(exc, ClientError):
            status = _http_status(exc)
            return status >= 500 or status == 429 or _error_code(exc) in _THROTTLING_CODES
        if isinstance(exc, S3UploadFailedError):
            # boto3 flattens the cause into the message.
            text = str(exc)
            return any(
                s in text for s in ("Could not connect", "SlowDown", "50", "Throttl", "timeout")
            )
        return False

    def classify(self, exc: BaseException) -> BaseException:
        from botocore.exceptions import ClientError, NoCredentialsError

        if isinstance(exc, NoCredentialsError):
            return PermissionStoreError(
                "no credentials for s3:// found in the standard chain (environment, IRSA / "
                "Pod Identity, RRSA, instance profile)"
            )
        if isinstance(exc, ClientError):
            code = _error_code(exc)
            if code in ("NoSuchKey", "404", "NotFound") or _http_status(exc) == 404:
                if code == "NoSuchBucket":
                    return PermissionStoreError(f"bucket {self.bucket!r} does not exist")
                return NotFoundError(str(exc))
            if code == "NoSuchBucket":
                return PermissionStoreError(f"bucket {self.bucket!r} does not exist")
            if _http_status(exc) == 403:
                return PermissionStoreError(f"access denied to s3://{self.bucket}/{self.root}")
        return exc


def _error_code(exc: Any) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def _http_status(exc: Any) -> int:
    return int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)


def _split_uri(uri: str) -> tuple[str, str, str]:
    """``s3://bucket/a/b`` -> ('s3', 'bucket', 'a/b'); ``file:///x/y`` -> ('file', '', '/x/y')."""
    parsed = urllib.parse.urlparse(uri)
    if parsed.scheme == "s3":
        return "s3", parsed.netloc, parsed.path.lstrip("/")
    if parsed.scheme == "file":
        return "file", "", urllib.parse.unquote(parsed.netloc + parsed.path)
    raise ValueError(f"unsupported store URI {uri!r}: use s3://bucket/prefix/ or file:///dir/")


class Store:
    """An object store rooted at a URI; every key and prefix is relative to that root.

    ``Store("s3://bucket/jobs/ns/name/")`` or ``Store("file:///var/data/job/")``.
    Prefixes passed to the methods end with ``/``; a full URI under the root is also
    accepted wherever a key or prefix is (see :meth:`rel`).
    """

    def __init__(
        self,
        root_uri: str,
        *,
        retry: RetryPolicy | None = None,
        addressing_style: str | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.root_uri = root_uri if root_uri.endswith("/") else root_uri + "/"
        scheme, bucket, path = _split_uri(self.root_uri)
        self._backend: _Backend
        if scheme == "s3":
            if not bucket:
                raise ValueError(f"store URI {root_uri!r} names no bucket")
            root = path if path.endswith("/") or not path else path + "/"
            self._backend = _S3Backend(bucket, root, addressing_style)
        else:
            self._backend = _FileBackend(Path(path))
        self.retry = retry or RetryPolicy.from_env()
        self._sleep = sleep

    # -- plumbing ---------------------------------------------------------------

    def rel(self, key_or_uri: str) -> str:
        """A key relative to the root, whether given relative or as a full URI under it."""
        if "://" not in key_or_uri:
            return key_or_uri
        if not key_or_uri.startswith(self.root_uri):
            raise ValueError(f"{key_or_uri!r} is not under this store's root {self.root_uri!r}")
        return key_or_uri[len(self.root_uri) :]

    def uri(self, key: str) -> str:
        return self.root_uri + self.rel(key)

    def _call(self, what: str, fn: Callable[[], T]) -> T:
        delays = self.retry.delays()
        while True:
            try:
                return fn()
            except StoreError:
                raise
            except Exception as exc:
                if not self._backend.is_transient(exc):
                    mapped = self._backend.classify(exc)
                    if mapped is exc:
                        raise
                    raise mapped from exc
                delay = next(delays, None)
                if delay is None:
                    raise TransientStoreError(
                        f"object store {self.root_uri} failed {what} after "
                        f"{self.retry.attempts} attempts: {exc}"
                    ) from exc
                log.warning("store %s failed (%s); retrying in %.1fs", what, exc, delay)
                self._sleep(delay)

    def on_request(self, count: Callable[[str], None]) -> None:
        """Call ``count(operation)`` (``GetObject``, ``PutObject``, ...) for every request
        sent to the object store by this store's client, which every store of the process
        with the same S3 settings shares: register a counter once per process, not per
        store (a second registration of the same ``count`` is ignored)."""
        self._backend.on_request(count)

    # -- raw objects --------------------------------------------------------------

    def put_bytes(self, key: str, data: bytes, *, if_absent: bool = False) -> bool:
        k = self.rel(key)
        return self._call(f"PUT {k}", lambda: self._backend.put_bytes(k, data, if_absent=if_absent))

    def get_bytes(self, key: str) -> bytes:
        """The object's bytes; raises :class:`NotFoundError` if absent."""
        k = self.rel(key)
        return self._call(f"GET {k}", lambda: self._backend.get_bytes(k))

    def get_bytes_or_none(self, key: str) -> bytes | None:
        try:
            return self.get_bytes(key)
        except NotFoundError:
            return None

    def put_json(self, key: str, doc: Any) -> None:
        """Small JSON documents (progress records); last writer wins."""
        self.put_bytes(key, json.dumps(doc, sort_keys=True).encode())

    def get_json(self, key: str) -> Any | None:
        """The parsed document, or None if it does not exist or is not valid JSON."""
        data = self.get_bytes_or_none(key)
        if data is None:
            return None
        try:
            return json.loads(data)
        except ValueError:
            log.warning("ignoring unreadable JSON at %s", self.uri(key))
            return None

    def download(self, key: str, path: Path) -> None:
        """Copy one object to ``path`` as is (unverified: for prefixes without a manifest)."""
        k = self.rel(key)
        self._call(f"GET {k}", lambda: self._backend.download_file(k, path))

    def list_keys(self, prefix: str) -> list[tuple[str, int]]:
        p = self.rel(prefix)
        return self._call(f"LIST {p}", lambda: self._backend.list_keys(p))

    def list_children(self, prefix: str) -> list[str]:
        """Names of the immediate sub-prefixes of ``prefix``, sorted."""
        p = self.rel(prefix)
        if p and not p.endswith("/"):
            p += "/"
        return self._call(f"LIST {p}", lambda: self._backend.list_children(p))

    def delete_prefix(self, prefix: str) -> None:
        """Delete everything below ``prefix``: the manifest first, so a half-deleted prefix
        is never trusted. Only for pruning a writer's own old checkpoints."""
        p = self.rel(prefix)
        if not p.endswith("/") or p == "/":
            raise ValueError(f"refusing to delete {prefix!r}: not a prefix")
        keys = [k for k, _ in self.list_keys(p)]
        manifest = p + MANIFEST_NAME
        if manifest in keys:
            self._call(f"DELETE {manifest}", lambda: self._backend.delete_keys([manifest]))
            keys.remove(manifest)
        if keys:
            self._call(f"DELETE {p}*", lambda: self._backend.delete_keys(keys))

    # -- published prefixes ------------------------------------------------------

    def publish(
        self,
        prefix: str,
        files: Mapping[str, Path | bytes],
        meta: Mapping[str, Any] | None = None,
    ) -> bool:
        """Upload ``files`` (name -> local path or bytes) below ``prefix``, then its manifest.

        Returns False, having written nothing, if the prefix already has a manifest
        (someone published it first: the existing one stands). A zombie that gets past
        that check still cannot replace the manifest where conditional writes work.
        """
        p = self._dir(prefix)
        if self.has_manifest(p):
            return False
        entries: dict[str, FileEntry] = {}
        for name, src in sorted(files.items()):
            check_object_name(name)
            if isinstance(src, bytes):
                digest, size = hashlib.sha256(src).hexdigest(), len(src)
            else:
                digest, size = sha256_file(src), src.stat().st_size
            key = self._create_once(p, name, src, digest)
            entries[name] = FileEntry(digest, size, None if key == name else key)
        manifest = Manifest(entries, dict(meta or {}))
        return self.put_bytes(p + MANIFEST_NAME, manifest.to_json(), if_absent=True)

    def _create(self, key: str, src: Path | bytes) -> bool:
        if isinstance(src, bytes):
            return self.put_bytes(key, src, if_absent=True)
        return self._call(f"PUT {key}", lambda: self._backend.create_file(key, src))

    def _create_once(self, p: str, name: str, src: Path | bytes, digest: str) -> str:
        """Create ``src`` at ``p + name``, never overwriting; the key used, relative to ``p``.

        The name already holding these very bytes is reused (a retried publish); holding
        other bytes (a zombie, a crashed attempt's partial upload), a fenced key is used."""
        if self._create(p + name, src) or self._sha256_of(p + name) == digest:
            return name
        fenced = f"{FENCE_PREFIX}{secrets.token_hex(8)}/{name}"
        log.warning(
            "%s is taken by other bytes; writing this copy at %s", self.uri(p + name), fenced
        )
        if not self._create(p + fenced, src):
            raise StoreError(f"{self.uri(p + fenced)} exists: a fenced key was reused")
        return fenced

    def _sha256_of(self, key: str) -> str | None:
        with tempfile.TemporaryDirectory(prefix="cheapspot-sum-") as tmp:
            path = Path(tmp) / "object"
            try:
                self.download(key, path)
            except NotFoundError:
                return None
            return sha256_file(path)

    def _dir(self, prefix: str) -> str:
        """A prefix as a key directory: "" for the store's root itself, else ending in "/"."""
        p = self.rel(prefix)
        return p if not p or p.endswith("/") else p + "/"

    def _manifest_key(self, prefix: str) -> str:
        return self._dir(prefix) + MANIFEST_NAME

    def has_manifest(self, prefix: str) -> bool:
        return self.get_bytes_or_none(self._manifest_key(prefix)) is not None

    def read_manifest(self, prefix: str) -> Manifest | None:
        """The prefix's manifest, None if it has none (not published, or still uploading)."""
        data = self.get_bytes_or_none(self._manifest_key(prefix))
        return None if data is None else Manifest.from_json(data)

    def fetch(self, prefix: str, dest: Path, names: list[str] | None = None) -> Manifest:
        """Download a published prefix into directory ``dest`` and verify every sum.

        Raises :class:`NotFoundError` if the prefix has no manifest and
        :class:`CorruptObjectError` if an object is missing or does not match it.
        """
        p = self._dir(prefix)
        manifest = self.read_manifest(p)
        if manifest is None:
            raise NotFoundError(f"{self.uri(p)} has no {MANIFEST_NAME}: not published")
        dest.mkdir(parents=True, exist_ok=True)
        wanted = manifest.files if names is None else {n: manifest.files[n] for n in names}
        for name, entry in sorted(wanted.items()):
            target = dest / name
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(f".tmp-{target.name}")
            key = p + (entry.key or name)
            try:
                self._call(f"GET {key}", lambda k=key, t=tmp: self._backend.download_file(k, t))  # type: ignore[misc]
            except NotFoundError as exc:
                raise CorruptObjectError(
                    f"{self.uri(key)} is listed in the manifest but missing"
                ) from exc
            size = tmp.stat().st_size
            digest = sha256_file(tmp)
            if size != entry.size or digest != entry.sha256:
                tmp.unlink()
                raise CorruptObjectError(
                    f"{self.uri(key)} does not match its manifest "
                    f"(size {size} vs {entry.size}, sha256 {digest[:12]} vs {entry.sha256[:12]})"
                )
            os.replace(tmp, target)
        return manifest

    def fetch_bytes(self, prefix: str, name: str, manifest: Manifest) -> bytes:
        """One listed object of a published prefix, verified against ``manifest``."""
        p = self._dir(prefix)
        entry = manifest.files.get(name)
        if entry is None:
            raise CorruptObjectError(f"{self.uri(p)} lists no {name}")
        key = p + (entry.key or name)
        try:
            data = self.get_bytes(key)
        except NotFoundError as exc:
            raise CorruptObjectError(f"{self.uri(key)} is listed but missing") from exc
        if len(data) != entry.size or hashlib.sha256(data).hexdigest() != entry.sha256:
            raise CorruptObjectError(f"{self.uri(key)} does not match its manifest")
        return data


def split_store_uri(uri: str) -> tuple[Store, str]:
    """A store rooted at the parent of ``uri`` and the object's name: for single objects
    such as a dataset file (``s3://bucket/data/train.jsonl``)."""
    scheme, bucket, path = _split_uri(uri)
    parent, _, name = path.rpartition("/")
    if scheme == "s3":
        root = f"s3://{bucket}/{parent + '/' if parent else ''}"
    else:
        root = "file://" + (parent or "/") + "/"
    if not name:
        raise ValueError(f"{uri!r} names a prefix, not an object")
    return Store(root), name

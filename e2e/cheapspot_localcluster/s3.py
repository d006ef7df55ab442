"""An S3-compatible endpoint on loopback (moto's server) with one bucket.

Two ways to run it:

* :func:`start_s3` runs moto's threaded server inside this process. Tests use it (the
  ``s3_endpoint`` fixture): nothing to clean up but a thread, and port 0 picks a free port.
* :func:`s3_server_command` is the command line for a separate ``moto.server`` process; the
  local cluster's ``up`` starts it so the endpoint outlives the ``cheapspot up`` command.

Clients find the endpoint through boto3's standard chain only (``S3Endpoint.env()``), the
same way pods find real S3: no custom configuration path that production would not use.
"""

from __future__ import annotations

import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Any

DEFAULT_BUCKET = "cheapspot"
DEFAULT_REGION = "us-east-1"
# moto accepts any credentials; fixed ones keep `.env()` reproducible and obviously fake.
ACCESS_KEY_ID = "cheapspot-local"
SECRET_ACCESS_KEY = "cheapspot-local-secret"


@dataclass(frozen=True)
class S3Endpoint:
    """Where the loopback S3 server listens and how to reach it with boto3."""

    url: str
    bucket: str = DEFAULT_BUCKET
    region: str = DEFAULT_REGION
    access_key_id: str = ACCESS_KEY_ID
    secret_access_key: str = SECRET_ACCESS_KEY
    _server: Any = field(default=None, repr=False, compare=False)

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    def uri(self, prefix: str = "") -> str:
        """``s3://bucket/prefix`` for this endpoint's bucket."""
        return f"s3://{self.bucket}/{prefix.lstrip('/')}"

    def env(self) -> dict[str, str]:
        """Environment variables boto3's standard chain reads (endpoint, keys, region)."""
        return {
            "AWS_ENDPOINT_URL": self.url,
            "AWS_ENDPOINT_URL_S3": self.url,
            "AWS_ACCESS_KEY_ID": self.access_key_id,
            "AWS_SECRET_ACCESS_KEY": self.secret_access_key,
            "AWS_DEFAULT_REGION": self.region,
            "AWS_REGION": self.region,
        }

    def client(self) -> Any:
        """A boto3 S3 client for this endpoint (typed loosely: boto3 stubs are optional)."""
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.url,
            region_name=self.region,
            aws_access_key_id=self.access_key_id,
            aws_secret_access_key=self.secret_access_key,
        )

    def ensure_bucket(self) -> None:
        client = self.client()
        existing = {b["Name"] for b in client.list_buckets().get("Buckets", [])}
        if self.bucket not in existing:
            # us-east-1 is the one region where CreateBucket takes no LocationConstraint.
            if self.region == "us-east-1":
                client.create_bucket(Bucket=self.bucket)
            else:
                client.create_bucket(
                    Bucket=self.bucket,
                    CreateBucketConfiguration={"LocationConstraint": self.region},
                )

    def stop(self) -> None:
        """Stop an in-process server started by :func:`start_s3` (no-op otherwise)."""
        if self._server is not None:
            self._server.stop()


def start_s3(
    port: int = 0,
    bucket: str = DEFAULT_BUCKET,
    region: str = DEFAULT_REGION,
    host: str = "127.0.0.1",
) -> S3Endpoint:
    """Start moto's S3 server in a thread of this process and create ``bucket``.

    ``port=0`` picks a free port. Call ``.stop()`` on the result when done.
    """
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address=host, port=port, verbose=False)
    try:
        server.start()
    except OSError as exc:
        raise RuntimeError(f"S3 endpoint: cannot listen on {host}:{port}: {exc}") from exc
    bound_host, bound_port = server.get_host_and_port()
    endpoint = S3Endpoint(
        url=f"http://{bound_host}:{bound_port}", bucket=bucket, region=region, _server=server
    )
    endpoint.ensure_bucket()
    return endpoint


def s3_server_command(port: int, host: str = "127.0.0.1") -> list[str]:
    """The command line of a standalone moto server (used by ``cheapspot up``)."""
    return [sys.executable, "-m", "moto.server", "-H", host, "-p", str(port)]


def wait_for_s3(url: str, timeout_s: float = 30.0) -> None:
    """Block until the server at ``url`` answers HTTP, or raise TimeoutError."""
    deadline = time.monotonic() + timeout_s
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url + "/", timeout=2):
                return
        except urllib.error.HTTPError:
            return  # any HTTP answer means the server is up
        except OSError as exc:
            last = exc
            time.sleep(0.2)
    raise TimeoutError(f"S3 endpoint at {url} did not answer within {timeout_s:.0f}s: {last}")

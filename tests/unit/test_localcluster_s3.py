"""The loopback S3 endpoint works through boto3's standard chain."""

from __future__ import annotations

import boto3
import pytest

from cheapspot_localcluster.s3 import S3Endpoint


def test_endpoint_serves_bucket_through_standard_env(
    s3_endpoint: S3Endpoint, monkeypatch: pytest.MonkeyPatch
) -> None:
    for key, value in s3_endpoint.env().items():
        monkeypatch.setenv(key, value)
    client = boto3.client("s3")  # nothing passed: endpoint, keys and region come from env
    client.put_object(Bucket=s3_endpoint.bucket, Key="probe/hello.txt", Body=b"hi")
    body = client.get_object(Bucket=s3_endpoint.bucket, Key="probe/hello.txt")["Body"].read()
    assert body == b"hi"
    assert s3_endpoint.uri("probe/") == "s3://cheapspot/probe/"

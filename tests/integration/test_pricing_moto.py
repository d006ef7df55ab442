"""AWS spot prices through moto's EC2 server over HTTP (its prices are fake: plumbing only)."""

from __future__ import annotations

from datetime import UTC, datetime

import boto3

from cheapspot_localcluster.s3 import S3Endpoint
from cheapspot_operator.api.common import CapacityType
from cheapspot_operator.pricing.aws import AwsSpotPrices


def test_spot_prices_are_read_per_zone_from_the_ec2_api(s3_endpoint: S3Endpoint) -> None:
    ec2 = boto3.client(
        "ec2",
        endpoint_url=s3_endpoint.url,
        region_name="us-east-1",
        aws_access_key_id=s3_endpoint.access_key_id,
        aws_secret_access_key=s3_endpoint.secret_access_key,
    )
    quotes = AwsSpotPrices(ec2).quotes(["g5.xlarge"], datetime.now(UTC))
    assert quotes, "moto lists g5.xlarge offerings in us-east-1 zones"
    zones = {k.zone for k in quotes}
    assert all(z.startswith("us-east-1") for z in zones) and len(zones) >= 2
    for key, quote in quotes.items():
        assert (key.instance_type, key.capacity) == ("g5.xlarge", CapacityType.SPOT)
        assert quote.source == "aws-ec2-spot" and not quote.estimated
        assert quote.usd_per_hour > 0 and quote.observed_at is not None

"""Smoke test of the ``s3_server`` fixture (tests/cluster/s3.py): a real SeaweedFS S3 endpoint.

The S3 requests are signed with the fixture's own standard-library SigV4 signer
(neither boto3 nor botocore is a dependency of evalrun).
"""

from __future__ import annotations

import hashlib
import secrets
import urllib.error
import urllib.request

import pytest

pytestmark = pytest.mark.k8s


def test_s3_server_puts_and_gets_objects_with_its_credentials_only(s3_server):
    data = secrets.token_bytes(5 << 20)
    key = f"datasets/{secrets.token_hex(4)}/shard 00001 (ü).bin"

    s3_server.put(key, data)

    assert hashlib.sha256(s3_server.get(key)).digest() == hashlib.sha256(data).digest()
    status, headers, _ = s3_server.request("HEAD", key)
    assert status == 200 and int(headers["Content-Length"]) == len(data)
    status, _, listing = s3_server.request("GET", "", bucket=s3_server.bucket)
    assert status == 200 and b"shard 00001" in listing
    # The identity config is enforced: a wrong secret and anonymous requests are refused.
    status, _, body = s3_server.request("GET", key, secret_key="not-the-secret")
    assert status == 403, body
    with pytest.raises(urllib.error.HTTPError) as anon:
        urllib.request.urlopen(s3_server.url(key), timeout=10)
    assert anon.value.code == 403
    status, _, _ = s3_server.request("GET", "missing-" + secrets.token_hex(4))
    assert status == 404


def test_s3_server_env_names_the_endpoint_for_standard_clients(s3_server):
    env = s3_server.env()

    assert env["AWS_ENDPOINT_URL_S3"] == s3_server.endpoint.rstrip("/")
    assert env["AWS_ENDPOINT_URL_S3"].startswith("http://127.0.0.1:")
    assert env["AWS_ACCESS_KEY_ID"] == s3_server.access_key
    assert env["AWS_SECRET_ACCESS_KEY"] == s3_server.secret_key

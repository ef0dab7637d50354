"""Remote inputs against real servers on loopback: HTTPS with a test CA, and S3.

The HTTPS server is ``http.server`` + ``ssl`` in a thread, with a CA and a server
certificate made here with ``cryptography``. The S3 tests use the ``s3_server``
fixture (SeaweedFS, ``tests/cluster/s3.py``), which must be wired into this tier's
conftest; without it they fail with a message saying so, they never skip.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import os
import socket
import ssl
import threading
import time
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from runner._internal.cas import ContentStore
from runner._internal.input_tree import scan_tree
from runner._internal.retry import transient_policy
from runner.adapters.sources import SourceOptions, acquire
from runner.errors import (
    DigestMismatch,
    InfrastructureError,
    InputError,
    TransientInfrastructureError,
)

pytestmark = pytest.mark.docker


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def options(environ: dict[str, str] | None = None, attempts: int = 3, **kw):
    """Options with a recorded no-op sleep, so bounded retries run instantly."""
    slept: list[float] = []
    opts = SourceOptions(
        retry_policy=lambda: transient_policy(attempts=attempts, sleep=slept.append),
        environ=environ if environ is not None else {},
        connect_timeout_s=5,
        read_timeout_s=10,
        **kw,
    )
    return opts, slept


def nothing_cached(store: ContentStore) -> bool:
    return (
        not any(os.scandir(store.blobs_dir))
        and not any(os.scandir(store.tmp_dir))
        and not [e for e in os.scandir(store.trees_dir)]
    )


# ----------------------------------------------------------------------------- test PKI


@dataclass
class Pki:
    ca: Path
    cert: Path
    key: Path


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def make_pki(directory: Path) -> Pki:
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(_name("evalrun test CA"))
        .issuer_name(_name("evalrun test CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name("127.0.0.1"))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
            ),
            critical=False,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    pki = Pki(ca=directory / "ca.pem", cert=directory / "server.pem", key=directory / "server.key")
    pki.ca.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    pki.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    pki.key.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return pki


# ----------------------------------------------------------------------------- HTTPS server


@dataclass
class HttpsServer:
    base: str
    pki: Pki
    files: dict[str, bytes] = field(default_factory=dict)
    faults: dict[str, list[str]] = field(default_factory=dict)
    """Per path, actions for the next requests: "503" or "cut:N" (send N bytes, hang up)."""
    requests: list[tuple[str, str | None]] = field(default_factory=list)

    def serve(self, name: str, data: bytes) -> str:
        self.files["/" + name] = data
        return f"{self.base}/{name}"


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    state: HttpsServer

    def log_message(self, format, *args):  # keep pytest output clean
        pass

    def do_GET(self):
        state = self.state
        rng = self.headers.get("Range")
        state.requests.append((self.path, rng))
        faults = state.faults.get(self.path) or []
        fault = faults.pop(0) if faults else None
        if fault == "503":
            self.send_response(503)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        data = state.files.get(self.path)
        if data is None:
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        start = 0
        if rng and rng.startswith("bytes=") and rng.endswith("-"):
            start = int(rng[len("bytes=") : -1])
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if fault and fault.startswith("cut:"):
            self.wfile.write(body[: int(fault[4:])])
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        self.wfile.write(body)


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):
        # handshakes that clients refuse (the untrusted-CA test) are expected here
        pass


@pytest.fixture
def https_server(tmp_path):
    pki = make_pki(tmp_path)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(pki.cert, pki.key)
    httpd = _QuietServer(("127.0.0.1", 0), _Handler)
    # handshake in the handler thread, so a refused client never stalls the accept loop
    httpd.socket = ctx.wrap_socket(httpd.socket, server_side=True, do_handshake_on_connect=False)
    state = HttpsServer(base=f"https://127.0.0.1:{httpd.server_address[1]}", pki=pki)
    handler = type("Handler", (_Handler,), {"state": state})
    httpd.RequestHandlerClass = handler
    thread = threading.Thread(
        target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
    )
    thread.start()
    try:
        yield state
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=10)


@pytest.fixture
def store(tmp_path) -> ContentStore:
    return ContentStore(tmp_path / "cache")


def closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


# ----------------------------------------------------------------------------- HTTPS tests


def test_https_fetch_is_verified_cached_and_reported(https_server, store, tmp_path):
    data = os.urandom(1024 * 1024 + 17)
    url = https_server.serve("model.safetensors", data)
    opts, _ = options(ca_file=https_server.pki.ca)
    seen: list[tuple[int, int | None]] = []
    got = acquire(
        url,
        sha(data),
        field="model",
        spec_dir=tmp_path,
        store=store,
        progress=lambda d, t: seen.append((d, t)),
        options=opts,
    )
    assert got.kind == "file" and got.source == url and got.size == len(data)
    assert got.path == store.blob_path(sha(data)) and got.path.read_bytes() == data
    assert got.files[0].path == "model.safetensors"
    assert seen[-1] == (len(data), len(data))
    # cached by content: no second request, even with the server gone
    count = len(https_server.requests)
    again = acquire(url, sha(data), field="model", spec_dir=tmp_path, store=store, options=opts)
    assert again == got and len(https_server.requests) == count


@pytest.mark.parametrize("variable", ["SSL_CERT_FILE", "REQUESTS_CA_BUNDLE"])
def test_https_trusts_a_ca_bundle_from_the_environment(https_server, store, tmp_path, variable):
    url = https_server.serve("data.jsonl", b'{"x": 1}\n')
    opts, _ = options(environ={variable: str(https_server.pki.ca)})
    got = acquire(
        url,
        sha(b'{"x": 1}\n'),
        field="datasets[0] (d)",
        spec_dir=tmp_path,
        store=store,
        options=opts,
    )
    assert got.path.read_bytes() == b'{"x": 1}\n'


def test_https_wrong_sha256_is_exit_3_and_nothing_is_cached(https_server, store, tmp_path):
    url = https_server.serve("model.bin", b"tampered weights")
    opts, _ = options(ca_file=https_server.pki.ca)
    with pytest.raises(DigestMismatch) as err:
        acquire(
            url, sha(b"honest weights"), field="model", spec_dir=tmp_path, store=store, options=opts
        )
    assert err.value.exit_code == 3
    assert "model" in err.value.message and err.value.fields["path"] == url
    assert err.value.found == "sha256:" + sha(b"tampered weights")
    assert nothing_cached(store)


def test_https_untrusted_ca_is_refused_without_retries(https_server, store, tmp_path):
    url = https_server.serve("model.bin", b"weights")
    opts, slept = options(environ={})  # system store only: the test CA is unknown
    with pytest.raises(InfrastructureError) as err:
        acquire(url, sha(b"weights"), field="model", spec_dir=tmp_path, store=store, options=opts)
    assert not isinstance(err.value, TransientInfrastructureError)
    assert err.value.exit_code == 5 and url in err.value.message
    assert "TLS verification failed" in err.value.message and "CA" in err.value.hint
    assert slept == [] and https_server.requests == []
    assert nothing_cached(store)


def test_https_server_down_is_exit_5_after_bounded_retries(store, tmp_path):
    url = f"https://127.0.0.1:{closed_port()}/model.bin"
    opts, slept = options(attempts=4)
    start = time.monotonic()
    with pytest.raises(InfrastructureError) as err:
        acquire(url, "0" * 64, field="model", spec_dir=tmp_path, store=store, options=opts)
    assert err.value.exit_code == 5 and url in err.value.message
    assert "still failing after retries" in err.value.message
    assert len(slept) == 3  # 4 attempts, 3 waits
    assert time.monotonic() - start < 10
    assert nothing_cached(store)


def test_https_5xx_is_retried_then_succeeds(https_server, store, tmp_path):
    url = https_server.serve("flaky.bin", b"eventually")
    https_server.faults["/flaky.bin"] = ["503", "503"]
    opts, slept = options(ca_file=https_server.pki.ca, attempts=3)
    got = acquire(
        url, sha(b"eventually"), field="model", spec_dir=tmp_path, store=store, options=opts
    )
    assert got.path.read_bytes() == b"eventually"
    assert len(https_server.requests) == 3 and len(slept) == 2


def test_https_cut_transfer_resumes_with_range(https_server, store, tmp_path):
    data = os.urandom(2 * 1024 * 1024)
    url = https_server.serve("shard.bin", data)
    https_server.faults["/shard.bin"] = ["cut:700000"]
    opts, _ = options(ca_file=https_server.pki.ca)
    got = acquire(url, sha(data), field="model", spec_dir=tmp_path, store=store, options=opts)
    assert got.path.read_bytes() == data
    assert https_server.requests[0] == ("/shard.bin", None)
    path, rng = https_server.requests[1]
    assert path == "/shard.bin" and rng is not None and rng.startswith("bytes=")
    assert int(rng[len("bytes=") : -1]) > 0  # resumed, not restarted


def test_https_not_found_is_an_input_error(https_server, store, tmp_path):
    opts, slept = options(ca_file=https_server.pki.ca)
    with pytest.raises(InputError) as err:
        acquire(
            f"{https_server.base}/missing.bin",
            "0" * 64,
            field="model",
            spec_dir=tmp_path,
            store=store,
            options=opts,
        )
    assert err.value.exit_code == 2 and "404" in err.value.message and slept == []


# ----------------------------------------------------------------------------- S3


@pytest.fixture
def s3(request):
    """The S3 server from the tier's ``s3_server`` fixture; a clear failure if not wired."""
    try:
        return request.getfixturevalue("s3_server")
    except pytest.FixtureLookupError:
        missing = True
    if missing:
        pytest.fail(
            "fixture 's3_server' is missing: wire tests/cluster/s3.py (SeaweedFS) into "
            "tests/docker/conftest.py; it must yield .endpoint (http://127.0.0.1:PORT), "
            ".access_key, .secret_key and .bucket. The S3 input tests cannot run without it.",
            pytrace=False,
        )


def s3_env(s3) -> dict[str, str]:
    return {
        "AWS_ACCESS_KEY_ID": s3.access_key,
        "AWS_SECRET_ACCESS_KEY": s3.secret_key,
        "AWS_ENDPOINT_URL": s3.endpoint,
        "AWS_REGION": getattr(s3, "region", "us-east-1"),
    }


def upload(s3, content: dict[str, bytes]) -> None:
    """Put objects with the SDK under test's own client library (not through evalrun code)."""
    import io
    import urllib.parse

    from minio import Minio

    parts = urllib.parse.urlsplit(s3.endpoint)
    client = Minio(
        parts.netloc,
        access_key=s3.access_key,
        secret_key=s3.secret_key,
        secure=parts.scheme == "https",
        region=getattr(s3, "region", "us-east-1"),
    )
    if not client.bucket_exists(s3.bucket):
        client.make_bucket(s3.bucket)
    for key, data in content.items():
        client.put_object(s3.bucket, key, io.BytesIO(data), len(data))


def test_s3_object_fetch_with_env_credentials(s3, store, tmp_path):
    key = f"{uuid.uuid4().hex}/model.safetensors"
    data = os.urandom(1024 * 1024 + 5)
    upload(s3, {key: data})
    opts, _ = options(environ=s3_env(s3))
    seen: list[tuple[int, int | None]] = []
    got = acquire(
        f"s3://{s3.bucket}/{key}",
        sha(data),
        field="model",
        spec_dir=tmp_path,
        store=store,
        progress=lambda d, t: seen.append((d, t)),
        options=opts,
    )
    assert got.kind == "file" and got.path.read_bytes() == data
    assert got.endpoint == s3.endpoint and got.source == f"s3://{s3.bucket}/{key}"
    assert seen[-1] == (len(data), len(data))


def test_s3_prefix_is_a_directory_with_the_local_tree_digest(s3, store, tmp_path):
    prefix = f"{uuid.uuid4().hex}/ckpt/"
    content = {
        "model-00001.safetensors": os.urandom(300_000),
        "model-00002.safetensors": os.urandom(200_000),
        "config.json": b"{}",
        "tokenizer/vocab.txt": b"a\nb\n",
        "tokenizer/copy.json": b"{}",
    }
    upload(s3, {prefix + rel: data for rel, data in content.items()})
    local = tmp_path / "local"
    for rel, data in content.items():
        (local / rel).parent.mkdir(parents=True, exist_ok=True)
        (local / rel).write_bytes(data)
    digest = scan_tree(local, what="local").digest
    opts, _ = options(environ=s3_env(s3))
    got = acquire(
        f"s3://{s3.bucket}/{prefix}",
        digest,
        field="model",
        spec_dir=tmp_path,
        store=store,
        options=opts,
    )
    assert got.kind == "directory" and got.digest == digest
    assert [f.path for f in got.files] == sorted(content)
    assert scan_tree(got.path, what="cached").digest == digest
    assert (got.path / "tokenizer" / "copy.json").stat().st_ino == (
        store.blob_path(sha(b"{}")).stat().st_ino
    )
    # the same digest from a local directory finds the same tree
    assert (
        acquire(str(local), digest, field="model", spec_dir=tmp_path, store=store).path == got.path
    )


def test_s3_credentials_from_a_profile_file(s3, store, tmp_path):
    key = f"{uuid.uuid4().hex}/data.jsonl"
    upload(s3, {key: b'{"y": 2}\n'})
    creds = tmp_path / "credentials"
    creds.write_text(
        f"[default]\naws_access_key_id = WRONG\naws_secret_access_key = wrong\n"
        f"[lab]\naws_access_key_id = {s3.access_key}\n"
        f"aws_secret_access_key = {s3.secret_key}\n"
    )
    env = {
        "AWS_SHARED_CREDENTIALS_FILE": str(creds),
        "AWS_PROFILE": "lab",
        "AWS_ENDPOINT_URL_S3": s3.endpoint,
        "AWS_REGION": getattr(s3, "region", "us-east-1"),
    }
    opts, _ = options(environ=env)
    got = acquire(
        f"s3://{s3.bucket}/{key}",
        sha(b'{"y": 2}\n'),
        field="datasets[0] (d)",
        spec_dir=tmp_path,
        store=store,
        options=opts,
    )
    assert got.path.read_bytes() == b'{"y": 2}\n'


def test_s3_wrong_sha256_is_exit_3_and_nothing_is_cached(s3, store, tmp_path):
    key = f"{uuid.uuid4().hex}/model.bin"
    upload(s3, {key: b"not what was pinned"})
    opts, _ = options(environ=s3_env(s3))
    with pytest.raises(DigestMismatch) as err:
        acquire(
            f"s3://{s3.bucket}/{key}",
            sha(b"pinned"),
            field="model",
            spec_dir=tmp_path,
            store=store,
            options=opts,
        )
    assert err.value.exit_code == 3 and nothing_cached(store)


def test_s3_prefix_with_wrong_tree_digest_caches_nothing(s3, store, tmp_path):
    prefix = f"{uuid.uuid4().hex}/ds/"
    upload(s3, {prefix + "a.jsonl": b"1\n", prefix + "b.jsonl": b"2\n"})
    opts, _ = options(environ=s3_env(s3))
    with pytest.raises(DigestMismatch) as err:
        acquire(
            f"s3://{s3.bucket}/{prefix}",
            "sha256:" + "e" * 64,
            field="datasets[0] (ds)",
            spec_dir=tmp_path,
            store=store,
            options=opts,
        )
    assert err.value.exit_code == 3 and "datasets[0] (ds)" in err.value.message
    assert nothing_cached(store)


def test_s3_missing_object_is_an_input_error(s3, store, tmp_path):
    opts, slept = options(environ=s3_env(s3))
    with pytest.raises(InputError) as err:
        acquire(
            f"s3://{s3.bucket}/{uuid.uuid4().hex}/absent.bin",
            "0" * 64,
            field="model",
            spec_dir=tmp_path,
            store=store,
            options=opts,
        )
    assert err.value.exit_code == 2 and "not found" in err.value.message and slept == []


def test_s3_wrong_secret_is_an_input_error_naming_credentials(s3, store, tmp_path):
    key = f"{uuid.uuid4().hex}/m.bin"
    upload(s3, {key: b"x"})
    env = {**s3_env(s3), "AWS_SECRET_ACCESS_KEY": "definitely-wrong"}
    opts, _ = options(environ=env)
    with pytest.raises(InputError) as err:
        acquire(
            f"s3://{s3.bucket}/{key}",
            sha(b"x"),
            field="model",
            spec_dir=tmp_path,
            store=store,
            options=opts,
        )
    assert err.value.exit_code == 2 and "denied" in err.value.message
    assert "AWS_" in err.value.hint


def test_s3_unreachable_endpoint_is_exit_5_after_bounded_retries(store, tmp_path):
    endpoint = f"http://127.0.0.1:{closed_port()}"
    env = {"AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s", "AWS_REGION": "us-east-1"}
    opts, slept = options(environ=env, attempts=3, s3_endpoint=endpoint)
    with pytest.raises(InfrastructureError) as err:
        acquire(
            "s3://bucket/model.bin",
            "0" * 64,
            field="model",
            spec_dir=tmp_path,
            store=store,
            options=opts,
        )
    assert err.value.exit_code == 5 and "s3://bucket/model.bin" in err.value.message
    assert len(slept) == 2 and nothing_cached(store)

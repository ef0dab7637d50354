"""A real S3-compatible server for tests: SeaweedFS ``weed server -s3`` on loopback.

The ``weed`` binary is built from its Go module at the pinned ``SEAWEEDFS_VERSION``
(``tests/cluster/build.sh seaweedfs``; ``make cluster-up`` builds it too, and this
module builds it on first use if it is missing). Usage::

    from s3 import s3_server          # pytest fixture (session scope), re-exported by
                                      # tests/k8s/conftest.py
    def test_x(s3_server):
        s3_server.endpoint            # "http://127.0.0.1:PORT" (path-style addressing)
        s3_server.access_key, s3_server.secret_key, s3_server.region, s3_server.bucket
        s3_server.env()               # AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
                                      # AWS_ENDPOINT_URL(_S3), AWS_REGION/AWS_DEFAULT_REGION
        s3_server.put("k", b"...")    # SigV4-signed with the standard library
        s3_server.get("k")            # -> bytes; S3Error(status, body) otherwise
        s3_server.request("HEAD", "k") # -> (status, headers, body), any status

Outside pytest: ``with running_s3(tmp_dir) as server: ...``. The server runs in its
own session from a fresh temporary directory with ports chosen free on 127.0.0.1;
stopping it signals only the process this module started (by pid) and removes the
directory. If it cannot start, ``S3StartError`` carries the tail of its log, and the
fixture fails (never skips).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import hmac
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest

CLUSTER_DIR = Path(__file__).resolve().parent
BUILD_SCRIPT = CLUSTER_DIR / "build.sh"
READY_TIMEOUT_S = 90.0


class S3StartError(RuntimeError):
    """weed did not start or never became ready; the message ends with its log tail."""


class S3Error(RuntimeError):
    def __init__(self, method: str, key: str, status: int, body: bytes) -> None:
        super().__init__(f"S3 {method} {key!r}: HTTP {status}: {body[:500]!r}")
        self.status = status
        self.body = body


def _versions() -> dict[str, str]:
    out = {}
    for line in (CLUSTER_DIR / "versions.env").read_text().splitlines():
        if line.strip() and not line.startswith("#") and "=" in line:
            k, _, v = line.partition("=")
            out[k.strip()] = v.strip()
    return out


def weed_binary(build: bool = True) -> Path:
    """The pinned ``weed`` in the cluster build cache; built first if missing and ``build``."""
    cache = os.environ.get("EVALRUN_CLUSTER_CACHE") or str(
        Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "evalrun" / "cluster"
    )
    path = Path(cache) / f"seaweedfs-{_versions()['SEAWEEDFS_VERSION']}" / "bin" / "weed"
    if not path.is_file() and build:
        result = subprocess.run(
            ["bash", str(BUILD_SCRIPT), "seaweedfs"],
            capture_output=True,
            text=True,
            check=False,
            timeout=7200,
        )
        if result.returncode != 0:
            raise S3StartError(
                f"building weed failed (exit {result.returncode}):\n{result.stderr[-4000:]}"
            )
    if not path.is_file():
        raise S3StartError(f"weed not found at {path} (tests/cluster/build.sh seaweedfs builds it)")
    return path


def _free_ports(n: int) -> list[int]:
    """``n`` distinct ports free on 127.0.0.1 now, below 55535 (weed adds 10000 for gRPC
    when a gRPC port is not given; we give every one explicitly anyway)."""
    ports: list[int] = []
    socks = []
    try:
        while len(ports) < n:
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
            port = s.getsockname()[1]
            if port < 55535 and port not in ports:
                ports.append(port)
    finally:
        for s in socks:
            s.close()
    return ports


@dataclass(frozen=True)
class S3Server:
    endpoint: str
    access_key: str
    secret_key: str
    bucket: str
    region: str
    pid: int
    workdir: Path
    log_path: Path

    def env(self) -> dict[str, str]:
        """The standard AWS SDK/CLI environment for this server."""
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ENDPOINT_URL_S3": self.endpoint,
            "AWS_REGION": self.region,
            "AWS_DEFAULT_REGION": self.region,
        }

    def url(self, key: str = "", bucket: str | None = None) -> str:
        """Path-style URL of ``bucket``/``key`` (the fixture's bucket by default)."""
        path = "/" + urllib.parse.quote(bucket if bucket is not None else self.bucket, safe="")
        if key:
            path += "/" + urllib.parse.quote(key, safe="/~")
        return self.endpoint + path

    def request(
        self,
        method: str,
        key: str = "",
        body: bytes = b"",
        headers: Mapping[str, str] | None = None,
        bucket: str | None = None,
        secret_key: str | None = None,
    ) -> tuple[int, dict[str, str], bytes]:
        """One SigV4-signed request; returns (status, headers, body) whatever the status."""
        url = self.url(key, bucket)
        signed = sign_v4(
            method,
            url,
            dict(headers or {}),
            body,
            self.access_key,
            secret_key if secret_key is not None else self.secret_key,
            self.region,
        )
        req = urllib.request.Request(url, data=body or None, method=method, headers=signed)
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:
                return resp.status, dict(resp.headers), resp.read()
        except urllib.error.HTTPError as e:
            return e.code, dict(e.headers), e.read()

    def put(self, key: str, data: bytes, bucket: str | None = None) -> None:
        status, _, body = self.request("PUT", key, data, bucket=bucket)
        if status != 200:
            raise S3Error("PUT", key, status, body)

    def get(self, key: str, bucket: str | None = None) -> bytes:
        status, _, body = self.request("GET", key, bucket=bucket)
        if status != 200:
            raise S3Error("GET", key, status, body)
        return body


def sign_v4(
    method: str,
    url: str,
    headers: dict[str, str],
    body: bytes,
    access_key: str,
    secret_key: str,
    region: str,
    service: str = "s3",
    now: dt.datetime | None = None,
) -> dict[str, str]:
    """AWS Signature Version 4 (header form) with the standard library; returns all headers."""
    parts = urllib.parse.urlsplit(url)
    now = now or dt.datetime.now(dt.UTC)
    amz_date, day = now.strftime("%Y%m%dT%H%M%SZ"), now.strftime("%Y%m%d")
    payload = hashlib.sha256(body).hexdigest()
    out = {k.lower(): v for k, v in headers.items()}
    out |= {"host": parts.netloc, "x-amz-date": amz_date, "x-amz-content-sha256": payload}
    query = sorted(urllib.parse.parse_qsl(parts.query, keep_blank_values=True))
    canonical_query = "&".join(
        f"{urllib.parse.quote(k, safe='-_.~')}={urllib.parse.quote(v, safe='-_.~')}"
        for k, v in query
    )
    names = sorted(out)
    canonical_headers = "".join(f"{n}:{' '.join(out[n].split())}\n" for n in names)
    signed_headers = ";".join(names)
    canonical = "\n".join(
        [
            method,
            parts.path or "/",
            canonical_query,
            canonical_headers,
            signed_headers,
            payload,
        ]
    )
    scope = f"{day}/{region}/{service}/aws4_request"
    to_sign = "\n".join(
        ["AWS4-HMAC-SHA256", amz_date, scope, hashlib.sha256(canonical.encode()).hexdigest()]
    )
    key = ("AWS4" + secret_key).encode()
    for part in (day, region, service, "aws4_request"):
        key = hmac.new(key, part.encode(), hashlib.sha256).digest()
    signature = hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()
    out["authorization"] = (
        f"AWS4-HMAC-SHA256 Credential={access_key}/{scope}, "
        f"SignedHeaders={signed_headers}, Signature={signature}"
    )
    return out


def _log_tail(path: Path, lines: int = 60) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _stop(proc: subprocess.Popen[bytes], grpc_ports: Mapping[str, int]) -> None:
    """TERM (then KILL after 5s: a graceful stop spends ~25s retrying metadata flushes
    the test data does not need) the weed process this module started, by its pid; then
    remove the gRPC sockets weed puts in /tmp (fixed names, ``-<service>-grpc-<port>``)."""
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
    for service, port in grpc_ports.items():
        sock = Path(f"/tmp/seaweedfs-{service}-grpc-{port}.sock")
        if sock.is_socket():
            sock.unlink()


@contextlib.contextmanager
def running_s3(
    parent_dir: Path | None = None, bucket: str = "evalrun-test", region: str = "us-east-1"
) -> Iterator[S3Server]:
    """Start ``weed server -s3`` in a fresh temp dir, wait until ``bucket`` takes objects,
    yield the server, then stop it (by pid) and remove the dir."""
    weed = weed_binary()
    workdir = Path(tempfile.mkdtemp(prefix="evalrun-s3-", dir=parent_dir))
    proc: subprocess.Popen[bytes] | None = None
    grpc_ports: dict[str, int] = {}
    try:
        access_key = "EVALRUN" + secrets.token_hex(6).upper()
        secret_key = secrets.token_urlsafe(30)
        (workdir / "data").mkdir()
        (workdir / "s3.json").write_text(
            json.dumps(
                {
                    "identities": [
                        {
                            "name": "evalrun-test",
                            "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
                            "actions": ["Admin", "Read", "List", "Tagging", "Write"],
                        }
                    ]
                }
            )
        )
        (workdir / "s3.json").chmod(0o600)
        master, master_g, volume, volume_g, filer, filer_g, s3p, s3_g = _free_ports(8)
        grpc_ports = {"master": master_g, "volume": volume_g, "filer": filer_g, "s3": s3_g}
        argv = [
            str(weed),
            "server",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            f"-dir={workdir / 'data'}",
            f"-master.port={master}",
            f"-master.port.grpc={master_g}",
            "-master.telemetry=false",
            "-master.volumeSizeLimitMB=1024",
            "-volume.max=32",
            f"-volume.port={volume}",
            f"-volume.port.grpc={volume_g}",
            "-filer",
            f"-filer.port={filer}",
            f"-filer.port.grpc={filer_g}",
            f"-filer.localSocket={workdir / 'filer.sock'}",
            "-s3",
            f"-s3.port={s3p}",
            f"-s3.port.grpc={s3_g}",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            f"-s3.localSocket={workdir / 's3.sock'}",
            f"-s3.config={workdir / 's3.json'}",
        ]
        log_path = workdir / "weed.log"
        with log_path.open("wb") as log:
            proc = subprocess.Popen(
                argv,
                cwd=workdir,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        server = S3Server(
            endpoint=f"http://127.0.0.1:{s3p}",
            access_key=access_key,
            secret_key=secret_key,
            bucket=bucket,
            region=region,
            pid=proc.pid,
            workdir=workdir,
            log_path=log_path,
        )
        _wait_ready(server, proc)
        yield server
    finally:
        if proc is not None:
            _stop(proc, grpc_ports)
        shutil.rmtree(workdir, ignore_errors=True)


def _wait_ready(server: S3Server, proc: subprocess.Popen[bytes]) -> None:
    """The bucket exists and takes a write (volumes are allocated on first write)."""
    deadline = time.monotonic() + READY_TIMEOUT_S
    last = "no answer yet"
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise S3StartError(
                f"weed exited with {proc.returncode} while starting\n{_log_tail(server.log_path)}"
            )
        try:
            status, _, body = server.request("PUT")  # create the bucket
            if status in (200, 409):  # 409: BucketAlreadyOwnedByYou on a retry
                status, _, body = server.request("PUT", ".evalrun-ready", b"ready")
                if status == 200:
                    server.request("DELETE", ".evalrun-ready")
                    return
            last = f"HTTP {status}: {body[:300]!r}"
        except (urllib.error.URLError, ConnectionError, TimeoutError) as e:
            last = str(e)
        time.sleep(0.5)
    raise S3StartError(
        f"weed S3 at {server.endpoint} not ready after {READY_TIMEOUT_S:.0f}s "
        f"(last: {last})\n{_log_tail(server.log_path)}"
    )


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """A running SeaweedFS S3 endpoint with credentials and a bucket (session scope)."""
    try:
        ctx = running_s3(tmp_path_factory.mktemp("s3"))
        server = ctx.__enter__()
    except S3StartError as e:
        pytest.fail(f"SeaweedFS S3 server did not start:\n{e}", pytrace=False)
    try:
        yield server
    finally:
        ctx.__exit__(None, None, None)

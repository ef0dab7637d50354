"""A real private registry for tests: Debian ``docker-registry`` over TLS with auth.

The test makes a CA and a server certificate for 127.0.0.1 (``cryptography``), and
starts ``docker-registry serve`` on a free loopback port with either

- ``auth="basic"``: htpasswd (bcrypt, made with the C library's crypt), or
- ``auth="token"``: the distribution token protocol, the registry trusting a
  signing certificate; the token service is a small HTTPS server run here that
  checks the same user/password (Basic) and signs RS256 JWTs with an ``x5c`` header
  for exactly the scope asked.

Usage::

    with running_registry(tmp_dir, auth="basic") as reg:
        reg.addr                    # "127.0.0.1:PORT"
        reg.ca_pem                  # the CA certificate (PEM bytes)
        reg.docker_config(dir)      # writes dir/config.json (auths) + dir/certs.d/ADDR/ca.crt
        reg.trust_in_dockerd()      # /etc/docker/certs.d/ADDR/ca.crt, removed on exit

Stopping signals only the processes this module started (by pid) and removes what
it wrote. A registry that does not start raises with its log tail (never skips).
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import http.server
import ipaddress
import json
import secrets
import shutil
import socket
import ssl
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.x509.oid import NameOID

USER = "evaluser"
READY_TIMEOUT_S = 30.0
DOCKERD_CERTS_D = Path("/etc/docker/certs.d")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _pem_key(key: rsa.RSAPrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _cert(subject: str, key: rsa.RSAPrivateKey, issuer: x509.Certificate | None,
          issuer_key: rsa.RSAPrivateKey | None, *, ca: bool) -> x509.Certificate:
    now = dt.datetime.now(dt.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer.subject if issuer else name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if ca:
        builder = builder.add_extension(
            x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                          content_commitment=False, key_encipherment=False,
                          data_encipherment=False, key_agreement=False, encipher_only=False,
                          decipher_only=False), critical=True)
    else:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                                         x509.DNSName("localhost")]), critical=False)
    return builder.sign(issuer_key or key, hashes.SHA256())


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@dataclass
class PrivateRegistry:
    addr: str
    password: str
    ca_pem: bytes
    auth: str
    dir: Path
    username: str = USER
    token_requests: list[str] = field(default_factory=list)
    _dockerd_dir: Path | None = None

    def docker_config(self, dest: Path, *, credentials: bool = True, ca: bool = True,
                      password: str | None = None) -> Path:
        """A Docker client config dir: ``auths`` for this registry and its CA under certs.d."""
        dest.mkdir(parents=True, exist_ok=True)
        auths = {}
        if credentials:
            pair = f"{self.username}:{password or self.password}".encode()
            auths[self.addr] = {"auth": base64.b64encode(pair).decode()}
        (dest / "config.json").write_text(json.dumps({"auths": auths}))
        if ca:
            certs = dest / "certs.d" / self.addr
            certs.mkdir(parents=True, exist_ok=True)
            (certs / "ca.crt").write_bytes(self.ca_pem)
        return dest

    def trust_in_dockerd(self) -> None:
        """Let dockerd trust this registry's CA (it reads certs.d on every connection)."""
        d = DOCKERD_CERTS_D / self.addr
        d.mkdir(parents=True, exist_ok=True)
        (d / "ca.crt").write_bytes(self.ca_pem)
        self._dockerd_dir = d


class _TokenHandler(http.server.BaseHTTPRequestHandler):
    server: _TokenServer

    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        srv = self.server
        expected = "Basic " + base64.b64encode(f"{USER}:{srv.password}".encode()).decode()
        if self.headers.get("Authorization") != expected:
            self.send_response(401)
            self.end_headers()
            return
        query = urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query)
        access = []
        for scope in query.get("scope", []):
            kind, name, actions = scope.split(":")
            access.append({"type": kind, "name": name, "actions": actions.split(",")})
        srv.requests.append(",".join(query.get("scope", [])))
        now = int(time.time())
        header = {"typ": "JWT", "alg": "RS256",
                  "x5c": [base64.b64encode(srv.cert.public_bytes(serialization.Encoding.DER))
                          .decode()]}
        claims = {"iss": "evalrun-test", "sub": USER, "aud": "evalrun-registry",
                  "exp": now + 300, "nbf": now - 10, "iat": now, "jti": secrets.token_hex(8),
                  "access": access}
        signing_input = (_b64url(json.dumps(header).encode()) + "."
                         + _b64url(json.dumps(claims).encode()))
        signature = srv.key.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
        body = json.dumps({"token": signing_input + "." + _b64url(signature),
                           "expires_in": 300}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class _TokenServer(http.server.ThreadingHTTPServer):
    def __init__(self, port: int, key: rsa.RSAPrivateKey, cert: x509.Certificate,
                 password: str, requests: list[str]) -> None:
        super().__init__(("127.0.0.1", port), _TokenHandler)
        self.key, self.cert, self.password, self.requests = key, cert, password, requests


@contextlib.contextmanager
def running_registry(base: Path, *, auth: str = "basic") -> Iterator[PrivateRegistry]:
    """Start a TLS registry with ``auth`` ("basic" or "token") under ``base``; stop it on exit."""
    work = base / f"registry-{auth}-{secrets.token_hex(3)}"
    (work / "data").mkdir(parents=True)
    ca_key, server_key = _key(), _key()
    ca = _cert("evalrun test CA", ca_key, None, None, ca=True)
    server = _cert("127.0.0.1", server_key, ca, ca_key, ca=False)
    (work / "server.crt").write_bytes(_pem(server) + _pem(ca))
    (work / "server.key").write_bytes(_pem_key(server_key))
    password = secrets.token_urlsafe(12)
    port = _free_port()
    addr = f"127.0.0.1:{port}"
    token_server: _TokenServer | None = None
    reg = PrivateRegistry(addr=addr, password=password, ca_pem=_pem(ca), auth=auth, dir=work)
    if auth == "basic":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            import crypt as _crypt  # bcrypt, the only htpasswd hash the registry takes

            hashed = _crypt.crypt(password, _crypt.mksalt(_crypt.METHOD_BLOWFISH))
        (work / "htpasswd").write_text(f"{USER}:{hashed}\n")
        auth_yaml = f"  htpasswd:\n    realm: evalrun-test\n    path: {work / 'htpasswd'}\n"
    elif auth == "token":
        signing_key = _key()
        signing = _cert("evalrun token signer", signing_key, None, None, ca=True)
        (work / "token-root.crt").write_bytes(_pem(signing))
        token_port = _free_port()
        token_server = _TokenServer(token_port, signing_key, signing, password,
                                    reg.token_requests)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(work / "server.crt", work / "server.key")
        token_server.socket = context.wrap_socket(token_server.socket, server_side=True)
        threading.Thread(target=token_server.serve_forever, daemon=True).start()
        auth_yaml = (f"  token:\n    realm: https://127.0.0.1:{token_port}/token\n"
                     f"    service: evalrun-registry\n    issuer: evalrun-test\n"
                     f"    rootcertbundle: {work / 'token-root.crt'}\n")
    else:
        raise ValueError(auth)
    (work / "config.yml").write_text(
        "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n"
        f"    rootdirectory: {work / 'data'}\n  delete:\n    enabled: true\n"
        f"http:\n  addr: {addr}\n  tls:\n    certificate: {work / 'server.crt'}\n"
        f"    key: {work / 'server.key'}\nauth:\n{auth_yaml}"
    )
    log = (work / "registry.log").open("wb")
    proc = subprocess.Popen(["docker-registry", "serve", str(work / "config.yml")],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_ready(reg, proc)
        yield reg
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
        if token_server is not None:
            token_server.shutdown()
            token_server.server_close()
        if reg._dockerd_dir is not None:
            shutil.rmtree(reg._dockerd_dir, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)


def _wait_ready(reg: PrivateRegistry, proc: subprocess.Popen[bytes]) -> None:
    context = ssl.create_default_context(cadata=reg.ca_pem.decode())
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            break
        try:
            urllib.request.urlopen(f"https://{reg.addr}/v2/", context=context, timeout=2)
        except urllib.error.HTTPError as exc:
            if exc.code == 401:  # up, and asking for credentials as configured
                return
        except (urllib.error.URLError, OSError):
            time.sleep(0.2)
            continue
        else:
            raise RuntimeError(f"registry {reg.addr} answered without asking for credentials")
    tail = (reg.dir / "registry.log").read_text(errors="replace")[-3000:]
    raise RuntimeError(f"private registry did not start on {reg.addr}:\n{tail}")


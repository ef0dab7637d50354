"""How a registry is reached: TLS trust and credentials, read where Docker keeps them.

- **Credentials** come from the standard Docker client config
  (``$DOCKER_CONFIG/config.json``, default ``~/.docker/config.json``): a registry's
  ``credHelpers`` entry, else the global ``credsStore``, else its ``auths`` entry
  (``auth`` = base64 ``user:password``, or ``username``/``password``, or an
  ``identitytoken``). A credential helper is ``docker-credential-<name> get`` with
  the registry on stdin, as the Docker CLI runs it.
- **Trust**: a registry's extra CA certificates are the ``*.crt`` files under
  ``certs.d/<host:port>/`` in ``$DOCKER_CONFIG`` or ``/etc/docker`` (where the
  Docker daemon reads them), added to the system roots. A loopback registry is
  spoken to over plain HTTP unless such a directory exists for it; every other
  registry over HTTPS.
- **Challenges** (``WWW-Authenticate``): ``Basic`` is answered with the credentials;
  ``Bearer`` by fetching a token from the realm (with the credentials, if any) for
  the scope the registry named, cached per registry and scope until it expires.

Nothing here logs or stores a secret; errors name the registry, never the password.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import ssl
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from runner._internal.files import read_regular_file
from runner._internal.foreign import DockerObject
from runner._internal.strict_json import load_json_strict
from runner.errors import InputError, RegistryAccessDenied

_MAX_CONFIG_BYTES = 1 << 20
_MAX_TOKEN_BYTES = 1 << 20
HELPER_TIMEOUT_S = 30.0
TOKEN_TIMEOUT_S = 30.0
_LOOPBACK = ("127.0.0.1", "localhost", "::1", "[::1]")
_SYSTEM_CERTS_D = Path("/etc/docker/certs.d")
LOGIN_HINT = (
    "log in with `docker login {registry}` (evalrun reads the Docker config: "
    "$DOCKER_CONFIG/config.json, credential helpers included)"
)


@dataclass(frozen=True)
class Credentials:
    """A user name and secret for one registry; ``identity_token`` for OAuth refresh tokens."""

    username: str
    password: str
    identity_token: str | None = None

    def basic(self) -> str:
        pair = f"{self.username}:{self.password}".encode()
        return "Basic " + base64.b64encode(pair).decode("ascii")

    def __repr__(self) -> str:  # never a secret in a log line or traceback
        return f"Credentials(username={self.username!r}, password=***)"


# --------------------------------------------------------------------------- Docker config


def docker_config_dir() -> Path:
    """``$DOCKER_CONFIG``, else ``~/.docker``."""
    value = os.environ.get("DOCKER_CONFIG")
    return Path(value).expanduser() if value else Path.home() / ".docker"


def load_docker_config() -> DockerObject:
    """The Docker client config as a dict; ``{}`` when there is none. Bad JSON is an InputError."""
    path = docker_config_dir() / "config.json"
    if not path.exists():
        return {}
    try:
        data = load_json_strict(read_regular_file(path, max_bytes=_MAX_CONFIG_BYTES))
    except (ValueError, OSError) as exc:
        raise InputError(f"{path}: not a readable Docker config: {str(exc)[:160]}") from None
    if not isinstance(data, dict):
        raise InputError(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data


def _auth_keys(registry: str) -> list[str]:
    # the spellings `docker login` has written over the years
    return [
        registry,
        f"https://{registry}",
        f"http://{registry}",
        f"https://{registry}/v1/",
        f"https://{registry}/v2/",
    ]


def _from_auths(registry: str, auths: object) -> Credentials | None:
    if not isinstance(auths, dict):
        return None
    entry = next((auths[k] for k in _auth_keys(registry) if k in auths), None)
    if not isinstance(entry, dict):
        return None
    found_token = entry.get("identitytoken")
    token = found_token if isinstance(found_token, str) and found_token else None
    encoded = entry.get("auth")
    if isinstance(encoded, str) and encoded:
        try:
            user, sep, password = base64.b64decode(encoded, validate=True).decode().partition(":")
        except (ValueError, UnicodeDecodeError):
            raise InputError(
                f"{docker_config_dir() / 'config.json'}: auths.{registry}.auth is not "
                "base64 of user:password"
            ) from None
        if sep:
            return Credentials(user, password, token)
    named, secret = entry.get("username"), entry.get("password")
    if isinstance(named, str) and isinstance(secret, str):
        return Credentials(named, secret, token)
    if token:
        return Credentials("<token>", "", token)
    return None


def _from_helper(registry: str, helper: str) -> Credentials | None:
    if not re.fullmatch(r"[A-Za-z0-9._-]+", helper):
        raise InputError(f"Docker config: credential helper name {helper!r} is not a plain name")
    program = shutil.which(f"docker-credential-{helper}")
    if program is None:
        raise RegistryAccessDenied(
            f"the Docker config names credential helper {helper!r} for {registry}, "
            f"but docker-credential-{helper} is not on PATH",
            registry=registry,
        )
    try:
        proc = subprocess.run(
            [program, "get"],
            input=registry.encode(),
            capture_output=True,
            timeout=HELPER_TIMEOUT_S,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise RegistryAccessDenied(
            f"credential helper docker-credential-{helper} did not answer for {registry} "
            f"within {HELPER_TIMEOUT_S:.0f}s",
            registry=registry,
        ) from None
    if proc.returncode != 0:
        if b"credentials not found" in proc.stdout.lower() + proc.stderr.lower():
            return None
        raise RegistryAccessDenied(
            f"credential helper docker-credential-{helper} failed for {registry} "
            f"(exit {proc.returncode})",
            registry=registry,
            detail=proc.stderr[:300].decode("utf-8", "replace").strip() or None,
        )
    try:
        answer = load_json_strict(proc.stdout[:_MAX_CONFIG_BYTES])
        user, secret = answer["Username"], answer["Secret"]
    except (ValueError, KeyError, TypeError):
        raise RegistryAccessDenied(
            f"credential helper docker-credential-{helper} answered no {{Username, Secret}} object",
            registry=registry,
        ) from None
    if not isinstance(user, str) or not isinstance(secret, str):
        raise RegistryAccessDenied(
            f"credential helper docker-credential-{helper} answered non-string credentials",
            registry=registry,
        )
    if user == "<token>":  # the helper protocol's spelling of an identity token
        return Credentials(user, "", secret)
    return Credentials(user, secret)


def credentials_for(registry: str) -> Credentials | None:
    """The credentials the Docker config holds for ``registry`` (``host[:port]``), if any."""
    config = load_docker_config()
    helpers = config.get("credHelpers")
    helper = helpers.get(registry) if isinstance(helpers, dict) else None
    if not isinstance(helper, str):
        store = config.get("credsStore")
        helper = store if isinstance(store, str) and store else None
    if helper:
        found = _from_helper(registry, helper)
        if found is not None:
            return found
    return _from_auths(registry, config.get("auths"))


# --------------------------------------------------------------------------- TLS


def certs_dirs(registry: str) -> list[Path]:
    """The ``certs.d/<registry>`` directories that exist, user's first."""
    candidates = [docker_config_dir() / "certs.d" / registry, _SYSTEM_CERTS_D / registry]
    return [d for d in candidates if d.is_dir()]


def scheme(registry: str) -> str:
    """``http`` for a loopback registry without a certs.d entry, ``https`` otherwise."""
    host = registry.rsplit(":", 1)[0] if not registry.startswith("[") else registry
    if host in _LOOPBACK and not certs_dirs(registry):
        return "http"
    return "https"


@lru_cache(maxsize=64)
def _context(registry: str, cas: tuple[Path, ...]) -> ssl.SSLContext:
    context = ssl.create_default_context()
    for ca in cas:
        try:
            context.load_verify_locations(cafile=str(ca))
        except (OSError, ssl.SSLError) as exc:
            raise InputError(f"{ca}: not a PEM CA certificate for {registry}: {exc}") from None
    return context


def ssl_context(registry: str) -> ssl.SSLContext:
    """System roots plus the ``*.crt`` files of the registry's certs.d directories."""
    cas = tuple(sorted(p for d in certs_dirs(registry) for p in d.glob("*.crt")))
    return _context(registry, cas)


class _NoAuthAcrossHosts(urllib.request.HTTPRedirectHandler):
    """Follow redirects, but never carry the registry's Authorization to another host."""

    def redirect_request(
        self, req: Any, fp: Any, code: int, msg: str, headers: Any, newurl: str
    ) -> Any:
        new = super().redirect_request(req, fp, code, msg, headers, newurl)
        if new is not None and urllib.parse.urlsplit(newurl).netloc != req.host:
            new.remove_header("Authorization")
        return new


def opener(registry: str) -> urllib.request.OpenerDirector:
    """A urllib opener that trusts the registry's CA and keeps credentials on its host."""
    return urllib.request.build_opener(
        urllib.request.HTTPSHandler(context=ssl_context(registry)), _NoAuthAcrossHosts()
    )


# --------------------------------------------------------------------------- challenges

_PARAM = re.compile(r'([A-Za-z_]+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s,]+))')


def parse_challenge(header: str) -> tuple[str, dict[str, str]]:
    """``Bearer realm="…",service="…"`` → ``("bearer", {"realm": …, "service": …})``."""
    kind, _, rest = header.strip().partition(" ")
    params = {
        m.group(1).lower(): m.group(2) if m.group(2) is not None else m.group(3)
        for m in _PARAM.finditer(rest)
    }
    return kind.lower(), params


@dataclass
class _Token:
    header: str
    expires: float


class Authorizer:
    """Answers registry challenges; remembers what worked per registry and repository."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._tokens: dict[tuple[str, str], _Token] = {}
        self._known: dict[tuple[str, str], str] = {}

    def known(self, registry: str, repository: str | None) -> str | None:
        """An Authorization header that worked before for this repository (sent up front)."""
        key = (registry, repository or "")
        with self._lock:
            header = self._known.get(key)
            token = self._tokens.get(key)
        if token is not None and token.expires < time.monotonic():
            return None
        return header

    def answer(self, registry: str, repository: str | None, challenge: str) -> str:
        """The Authorization header that answers ``challenge``; RegistryAccessDenied if none."""
        kind, params = parse_challenge(challenge)
        creds = credentials_for(registry)
        if kind == "basic":
            if creds is None or (creds.identity_token and not creds.password):
                raise RegistryAccessDenied(
                    f"registry {registry} asks for credentials and the Docker config has none "
                    "for it",
                    registry=registry,
                    repository=repository,
                    status=401,
                    hint=LOGIN_HINT.format(registry=registry),
                )
            header = creds.basic()
            expires = float("inf")
        elif kind == "bearer" and params.get("realm"):
            header, expires = self._fetch_token(registry, repository, params, creds)
        else:
            raise RegistryAccessDenied(
                f"registry {registry} asks for an authentication scheme evalrun does not speak "
                f"({kind or 'none'})",
                registry=registry,
                repository=repository,
                status=401,
            )
        key = (registry, repository or "")
        with self._lock:
            self._known[key] = header
            self._tokens[key] = _Token(header, expires)
        return header

    def forget(self, registry: str, repository: str | None) -> None:
        key = (registry, repository or "")
        with self._lock:
            self._known.pop(key, None)
            self._tokens.pop(key, None)

    def _fetch_token(
        self,
        registry: str,
        repository: str | None,
        params: dict[str, str],
        creds: Credentials | None,
    ) -> tuple[str, float]:
        realm = params["realm"]
        if urllib.parse.urlsplit(realm).scheme not in ("https", "http"):
            raise RegistryAccessDenied(
                f"registry {registry} names a token realm that is not http(s)",
                registry=registry,
                url=realm,
            )
        query: dict[str, str] = {k: params[k] for k in ("service", "scope") if k in params}
        headers: dict[str, str] = {}
        data: bytes | None = None
        if creds is not None and creds.identity_token:
            data = urllib.parse.urlencode(
                {
                    "grant_type": "refresh_token",
                    "refresh_token": creds.identity_token,
                    "client_id": "evalrun",
                    **query,
                }
            ).encode()
            headers["Content-Type"] = "application/x-www-form-urlencoded"
            url = realm
        else:
            url = realm + ("&" if "?" in realm else "?") + urllib.parse.urlencode(query)
            if creds is not None:
                headers["Authorization"] = creds.basic()
        request = urllib.request.Request(url, data=data, headers=headers)  # noqa: S310
        try:
            # the token service is trusted as the registry is (Docker does the same)
            with opener(registry).open(request, timeout=TOKEN_TIMEOUT_S) as resp:
                body = resp.read(_MAX_TOKEN_BYTES + 1)
        except urllib.error.HTTPError as exc:
            exc.close()
            raise RegistryAccessDenied(
                f"the token service of {registry} refused "
                f"{'the credentials' if creds else 'an anonymous token'} ({exc.code})",
                registry=registry,
                repository=repository,
                status=exc.code,
                url=realm,
                hint=LOGIN_HINT.format(registry=registry),
            ) from None
        except (urllib.error.URLError, OSError) as exc:
            raise RegistryAccessDenied(
                f"the token service of {registry} is unreachable: {getattr(exc, 'reason', exc)}",
                registry=registry,
                url=realm,
            ) from None
        try:
            answer = json.loads(body[:_MAX_TOKEN_BYTES])
            token = answer.get("token") or answer.get("access_token")
        except (ValueError, AttributeError):
            token = None
        if not isinstance(token, str) or not token:
            raise RegistryAccessDenied(
                f"the token service of {registry} answered no token", registry=registry, url=realm
            )
        lifetime = answer.get("expires_in")
        seconds = float(lifetime) if isinstance(lifetime, int | float) and lifetime > 0 else 60.0
        # renewed a little early so a long upload does not start on a dying token
        return f"Bearer {token}", time.monotonic() + max(seconds - 10.0, 5.0)


AUTHORIZER = Authorizer()

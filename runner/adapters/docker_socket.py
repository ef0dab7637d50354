"""Create, start, look at and remove a container through the Engine API's Unix socket,
with the standard library only: how the Docker helper starts a sandbox ahead, and hands
it over, without ever loading the Docker SDK (:mod:`runner.adapters.docker_early`).

The SDK and what it brings (requests, urllib3, ~0.1-0.3 s of imports) and its first calls
(a ping, the engine's runtimes) stood between the helper's fork and the sandbox's start,
on the path of every rerun. This module sends the very request docker-py's
``containers.create`` sends for the sandbox policy's keywords (:func:`create_body`; its
unit test compares the two) and nothing else: a keyword it does not know, an engine that
is not on a Unix socket, or any answer but the expected one, and the helper goes the
SDK's way as before. The answers the run needs before it hands the sandbox its plan (the
engine's runtimes, the image's ID, whether the sandbox still runs) are read here too, as
docker-py reads them (``info()``, ``images.get(ref).id``, ``container.status``).
"""

from __future__ import annotations

import http.client
import json
import os
import re
import socket
from collections.abc import Mapping
from typing import Any
from urllib.parse import quote

from runner.errors import DockerAPIError

DEFAULT_SOCKET = "/var/run/docker.sock"

# docker-py's ``containers.create`` keyword -> the HostConfig field it sets
_HOST_CONFIG = {
    "runtime": "Runtime",
    "network_mode": "NetworkMode",
    "read_only": "ReadonlyRootfs",
    "tmpfs": "Tmpfs",
    "cap_drop": "CapDrop",
    "security_opt": "SecurityOpt",
    "pids_limit": "PidsLimit",
    "mem_limit": "Memory",
    "memswap_limit": "MemorySwap",
    "nano_cpus": "NanoCpus",
}
_KEYWORDS = frozenset({"name", "user", "labels", *_HOST_CONFIG})
_BYTES = re.compile(r"(\d+)([bkmg]?)", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}


EngineRefused = DockerAPIError
"""What every call raises when the engine answers with another status than the one
expected, or not at all (the helper then goes the SDK's way)."""


def socket_path(environ: Mapping[str, str]) -> str | None:
    """The engine's Unix socket as docker-py's ``from_env`` finds it (``DOCKER_HOST``, else
    the default); None for an engine reached otherwise (TCP, TLS, SSH)."""
    host = environ.get("DOCKER_HOST") or f"unix://{DEFAULT_SOCKET}"
    if not host.startswith("unix://") or environ.get("DOCKER_TLS_VERIFY"):
        return None
    path = host[len("unix://") :]
    return path if path.startswith("/") else None


def _bytes(value: Any) -> int | None:
    """A memory size as docker-py reads it (``512m``: 512 MiB); None for a form this does
    not read (the SDK's way then)."""
    if type(value) is int:
        return value
    match = _BYTES.fullmatch(value) if isinstance(value, str) else None
    if match is None:
        return None
    return int(match.group(1)) * _UNITS[match.group(2).lower()]


def create_body(
    image: str,
    command: list[str],
    mounts: list[tuple[str, str, bool]],
    options: Mapping[str, Any],
) -> dict[str, Any] | None:
    """The JSON docker-py's ``containers.create(image, command, mounts=..., detach=True,
    **options)`` posts to ``/containers/create`` (``mounts`` as (target, source, read-only)
    binds, as :func:`runner.adapters.docker_engine.create_container` makes them); None for
    a keyword or value this does not translate."""
    if not set(options) <= _KEYWORDS or not isinstance(options.get("name"), str):
        return None
    host_config: dict[str, Any] = {}
    for keyword, field in _HOST_CONFIG.items():
        if keyword not in options:
            continue
        value = options[keyword]
        if keyword in ("mem_limit", "memswap_limit"):
            value = _bytes(value)
            if value is None:
                return None
        host_config[field] = value
    host_config["Mounts"] = [
        {"Target": target, "Source": source, "Type": "bind", "ReadOnly": read_only}
        for target, source, read_only in mounts
    ]
    body: dict[str, Any] = {
        "Tty": False,
        "OpenStdin": False,
        "StdinOnce": False,
        "AttachStdin": False,
        "AttachStdout": False,
        "AttachStderr": False,
        "Cmd": list(command),
        "Image": image,
        "NetworkDisabled": False,
        "HostConfig": host_config,
    }
    if options.get("user") is not None:
        body["User"] = str(options["user"])
    if options.get("labels") is not None:
        body["Labels"] = dict(options["labels"])
    return body


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(self.timeout)
            sock.connect(self._path)
        except BaseException:
            sock.close()
            raise
        self.sock = sock


class EngineSocket:
    """The engine at the Unix socket ``path``: one connection per call."""

    def __init__(self, path: str, timeout: float = 30.0) -> None:
        self.path = path
        self.timeout = timeout

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> EngineSocket | None:
        path = socket_path(os.environ if environ is None else environ)
        return cls(path) if path is not None else None

    def _connection(self) -> http.client.HTTPConnection:
        """A new connection to the engine (one per call)."""
        return _UnixConnection(self.path, self.timeout)

    def _call(self, method: str, path: str, expected: int, body: Any = None) -> Any:
        connection = self._connection()
        try:
            data = None if body is None else json.dumps(body).encode()
            headers = {"Content-Type": "application/json"} if data is not None else {}
            # no version in the path: the engine's own, the one docker-py's ``from_env``
            # settles on (it asks the engine for its version first)
            connection.request(method, path, body=data, headers=headers)
            response = connection.getresponse()
            payload = response.read(1 << 20)
            if response.status != expected:
                raise EngineRefused(
                    f"{method} {path}: {response.status} {payload[:200]!r}",
                    operation=f"{method} {path}",
                    status=response.status,
                )
            return json.loads(payload) if payload else None
        except (OSError, http.client.HTTPException, ValueError, RecursionError) as exc:
            raise EngineRefused(f"{method} {path}: {exc}", operation=f"{method} {path}") from None
        finally:
            connection.close()

    def runtimes(self) -> set[str]:
        """The OCI runtimes registered with the engine (``GET /info``), as
        :func:`runner.adapters.docker_engine.runtimes` reads them."""
        info = self._call("GET", "/info", 200)
        found = info.get("Runtimes") if isinstance(info, dict) else None
        if not isinstance(found, dict):
            raise EngineRefused("GET /info: no runtimes in the answer", operation="GET /info")
        return set(found)

    def image_id(self, ref: str) -> str | None:
        """The engine's ID of the image ``ref`` (``GET /images/{ref}/json``), None when it
        does not have it (the SDK's way then pulls it)."""
        path = f"/images/{quote(ref, safe='/:')}/json"
        try:
            image = self._call("GET", path, 200)
        except EngineRefused as exc:
            if exc.status == 404:
                return None
            raise
        found = image.get("Id") if isinstance(image, dict) else None
        if not isinstance(found, str) or not found:
            raise EngineRefused(f"GET {path}: no Id in the answer", operation=f"GET {path}")
        return found

    def status(self, container_id: str) -> str:
        """The container's state (``running``, ``exited``, …), as ``container.status``."""
        path = f"/containers/{quote(container_id, safe='')}/json"
        found = self._call("GET", path, 200)
        state = found.get("State") if isinstance(found, dict) else None
        status = state.get("Status") if isinstance(state, dict) else None
        if not isinstance(status, str):
            raise EngineRefused(f"GET {path}: no state in the answer", operation=f"GET {path}")
        return status

    def create(self, name: str, body: dict[str, Any]) -> str:
        """The new container's id."""
        made = self._call("POST", f"/containers/create?name={quote(name, safe='')}", 201, body)
        container_id = made.get("Id") if isinstance(made, dict) else None
        if not isinstance(container_id, str) or not container_id:
            raise EngineRefused(f"create {name}: no id in {made!r}", operation="create")
        return container_id

    def start(self, container_id: str) -> None:
        self._call("POST", f"/containers/{quote(container_id, safe='')}/start", 204)

    def remove(self, container_id: str) -> None:
        """Remove the container, running or not (as the SDK's ``remove(force=True)``)."""
        self._call("DELETE", f"/containers/{quote(container_id, safe='')}?force=1", 204)

"""The Docker engine's API on its unix socket, with the standard library only.

What a run asks of the engine before its container starts (the runtimes it has, the
image's ID, removing a stale container, creating and starting the container) goes through
here: the Docker SDK (docker, requests, urllib3: ~70 ms to import, on the path of every
run) then loads while the sandbox boots (:mod:`runner.backends.docker`). Errors become the
same evalrun errors, with the same texts, as the SDK's do in
:func:`runner.adapters.docker_engine.translated`; transient ones are retried the same way.

Only a local engine: with ``DOCKER_HOST`` naming anything but a unix socket (tcp, ssh,
TLS), :meth:`EngineSocket.from_environment` gives None and the SDK does everything.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
from collections.abc import Mapping
from typing import Any
from urllib.parse import quote, urlencode

from runner._internal.retry import call_with_retries
from runner.errors import (
    DockerAPIError,
    DockerImageNotFound,
    TransientDockerError,
)

DEFAULT_SOCKET = "/var/run/docker.sock"
DOCKER_HINT = "start the engine with `make host-up` (scripts/host-up.sh), or set DOCKER_HOST"


class _UnixConnection(http.client.HTTPConnection):
    """HTTP/1.1 to the engine's unix socket."""

    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self._path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


class EngineSocket:
    """Requests to the engine at the unix socket ``path``, each translated and (unless
    said otherwise) retried like the SDK's calls are. Each on a connection of its own: the
    runs of a sweep share one backend, on several threads."""

    def __init__(self, path: str = DEFAULT_SOCKET, *, timeout: float = 120.0) -> None:
        self.path = path
        self.timeout = timeout

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] | None = None) -> EngineSocket | None:
        """The engine ``DOCKER_HOST`` names (the default socket when unset), or None when it
        is not a unix socket."""
        host = (os.environ if environ is None else environ).get("DOCKER_HOST", "")
        if not host:
            return cls()
        if host.startswith("unix://"):
            return cls(host.removeprefix("unix://"))
        return None

    def _request(
        self, what: str, method: str, path: str, body: object = None, *, image: bool = False
    ) -> Any:
        """One request; the decoded JSON answer (None for an empty one), or the error."""
        payload = None if body is None else json.dumps(body).encode()
        headers = {"Content-Type": "application/json"} if payload is not None else {}
        connection = _UnixConnection(self.path, self.timeout)
        try:
            connection.request(method, path, body=payload, headers=headers)
            response = connection.getresponse()
            data = response.read()
        except (OSError, http.client.HTTPException) as exc:
            raise TransientDockerError(
                f"{what}: Docker engine unreachable: {exc.__class__.__name__}",
                operation=what,
                hint=DOCKER_HINT,
            ) from exc
        finally:
            connection.close()
        status = response.status
        if 200 <= status < 300:
            return json.loads(data) if data else None
        raise _refusal(what, status, _explanation(data), image=image)

    def call(
        self,
        what: str,
        method: str,
        path: str,
        body: object = None,
        *,
        image: bool = False,
        retries: bool = True,
    ) -> Any:
        """:meth:`_request`, with the SDK path's bounded retries of transient errors."""

        def attempt() -> Any:
            return self._request(what, method, path, body, image=image)

        return call_with_retries(attempt, what=what) if retries else attempt()

    # --- what the Docker backend asks before the start --------------------------------

    def runtimes(self) -> set[str]:
        """The OCI runtimes registered with the engine (``docker info``)."""
        info = self.call("docker info", "GET", "/info")
        return set((info.get("Runtimes") or {}).keys()) if isinstance(info, dict) else set()

    def image_id(self, ref: str) -> str:
        """The engine's ID of the image ``ref``; DockerImageNotFound when it lacks it."""
        what = f"inspect {ref}"
        found = self.call(what, "GET", f"/images/{quote(ref, safe='')}/json", image=True)
        return str(found["Id"])

    def remove(self, name: str, what: str = "remove container") -> bool:
        """Remove the container ``name`` (running or not); False when there was none."""
        try:
            self.call(what, "DELETE", f"/containers/{quote(name, safe='')}?force=1")
        except DockerAPIError as exc:
            if exc.status == 404:
                return False
            raise
        return True

    def create(self, name: str, body: Mapping[str, object]) -> str:
        """Create (not start) the container ``name`` as ``body`` asks; its ID."""
        query = urlencode({"name": name})
        made = self.call("create container", "POST", f"/containers/create?{query}", body)
        return str(made["Id"])

    def start(self, container_id: str) -> None:
        """Start the container (never retried: a start is not repeated blindly)."""
        self.call("start container", "POST", f"/containers/{container_id}/start", retries=False)

    def kill(self, container_id: str) -> None:
        self.call("kill container", "POST", f"/containers/{container_id}/kill", retries=False)


def _explanation(data: bytes) -> str:
    """What the engine said of an error: its JSON ``message``, else its text."""
    try:
        parsed = json.loads(data)
    except ValueError:
        return data.decode("utf-8", "replace").strip()
    if isinstance(parsed, dict) and isinstance(parsed.get("message"), str):
        return str(parsed["message"])
    return data.decode("utf-8", "replace").strip()


def _refusal(what: str, status: int, explanation: str, *, image: bool) -> Exception:
    """The evalrun error for an engine's error answer, as ``translated`` makes it."""
    if status == 404:
        if image:
            return DockerImageNotFound(
                f"{what}: image not found: {explanation}", operation=what, status=status
            )
        return DockerAPIError(f"{what}: not found: {explanation}", operation=what, status=status)
    if status >= 500:
        return TransientDockerError(
            f"{what}: Docker engine error {status}: {explanation}", operation=what, status=status
        )
    return DockerAPIError(
        f"{what}: Docker engine refused ({status}): {explanation}", operation=what, status=status
    )


__all__ = ["DEFAULT_SOCKET", "DOCKER_HINT", "EngineSocket"]

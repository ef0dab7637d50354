"""The Docker engine's API on its unix socket, with the standard library only.

All a run asks of a local engine goes through here: the runtimes it has, the image's ID,
removing a stale container, creating, starting, following (the multiplexed output stream),
waiting for, inspecting, killing and removing the container (:mod:`runner.backends.docker`).
The Docker SDK (docker, requests, urllib3) is ~70 ms of imports and ~1 ms of work per
call: CPU time a run spends while its sandbox needs the machine's cores too. Errors become
the same evalrun errors, with the same texts, as the SDK's do in
:func:`runner.adapters.docker_engine.translated`; transient ones are retried the same way.

Only a local engine: with ``DOCKER_HOST`` naming anything but a unix socket (tcp, ssh,
TLS), :meth:`EngineSocket.from_environment` gives None and the SDK does everything.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import struct
from collections.abc import Iterator, Mapping
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

    def __init__(self, path: str, timeout: float | None) -> None:
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

    def _response(
        self,
        what: str,
        method: str,
        path: str,
        body: object = None,
        *,
        image: bool = False,
        timeout: float | None = None,
        forever: bool = False,
    ) -> http.client.HTTPResponse:
        """The engine's answer to one request, its body unread (a stream, for attach and
        logs); an error answer raises, translated. Close it when done."""
        payload = None if body is None else json.dumps(body).encode()
        headers = {"Content-Type": "application/json"} if payload is not None else {}
        limit = None if forever else (self.timeout if timeout is None else timeout)
        connection = _UnixConnection(self.path, limit)
        try:
            connection.request(method, path, body=payload, headers=headers)
            response = connection.getresponse()
        except (OSError, http.client.HTTPException) as exc:
            connection.close()
            raise _unreachable(what, exc) from exc
        if 200 <= response.status < 300:
            return response  # closing it closes the connection (no keep-alive: one per call)
        try:
            data = _read(what, response.read)
        finally:
            connection.close()
        raise _refusal(what, response.status, _explanation(data), image=image)

    def call(
        self,
        what: str,
        method: str,
        path: str,
        body: object = None,
        *,
        image: bool = False,
        retries: bool = True,
        timeout: float | None = None,
    ) -> Any:
        """One request: the decoded JSON answer (None for an empty one), or the error; with
        the SDK path's bounded retries of transient errors unless ``retries`` is False."""

        def attempt() -> Any:
            with self._response(what, method, path, body, image=image, timeout=timeout) as answer:
                data = _read(what, answer.read)
            return json.loads(data) if data else None

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

    # --- following the container ------------------------------------------------------

    def attach(self, container_id: str) -> Iterator[tuple[int, bytes]]:
        """The container's output from its start on, as it comes: (1 for stdout, 2 for
        stderr, bytes) until the container's streams end."""
        what = "follow container output"
        path = f"/containers/{container_id}/attach?logs=1&stream=1&stdout=1&stderr=1"
        # no time limit: the stream lasts as long as the evaluation does
        with self._response(what, "POST", path, forever=True) as answer:
            yield from _frames(what, answer)

    def wait(self, container_id: str, timeout: float) -> int:
        """The container's exit status, once it has exited; a TransientDockerError when
        ``timeout`` seconds pass first (the caller then asks :meth:`inspect`)."""
        found = self.call(
            "wait for container",
            "POST",
            f"/containers/{container_id}/wait",
            retries=False,
            timeout=timeout,
        )
        return int(found.get("StatusCode", -1)) if isinstance(found, dict) else -1

    def inspect(self, container_id: str) -> dict[str, Any]:
        found = self.call("inspect container", "GET", f"/containers/{container_id}/json")
        return found if isinstance(found, dict) else {}

    def logs(self, container_id: str, tail: int) -> str:
        """The container's last ``tail`` lines of output (stdout and stderr, in order)."""
        what = "container logs"
        path = f"/containers/{container_id}/logs?stdout=1&stderr=1&tail={tail}"
        with self._response(what, "GET", path) as answer:
            data = b"".join(chunk for _, chunk in _frames(what, answer))
        return data.decode("utf-8", "replace")


def _unreachable(what: str, exc: BaseException) -> TransientDockerError:
    return TransientDockerError(
        f"{what}: Docker engine unreachable: {exc.__class__.__name__}",
        operation=what,
        hint=DOCKER_HINT,
    )


def _read(what: str, read: Any, *args: int) -> bytes:
    """``read(*args)`` of a response, a broken connection translated."""
    try:
        data: bytes = read(*args)
    except (OSError, http.client.HTTPException) as exc:
        raise _unreachable(what, exc) from exc
    return data


_FRAME = struct.Struct(">BxxxL")


def _frames(what: str, answer: http.client.HTTPResponse) -> Iterator[tuple[int, bytes]]:
    """The engine's multiplexed stream (a container without a terminal): frames of an
    8-byte header (stream: 1 stdout, 2 stderr; length) and that many bytes."""
    while header := _read(what, answer.read, _FRAME.size):
        if len(header) < _FRAME.size:
            return  # the stream ended inside a header
        stream, length = _FRAME.unpack(header)
        data = _read(what, answer.read, length)
        if data:
            yield stream, data
        if len(data) < length:
            return


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

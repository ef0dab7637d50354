"""The boundary to the Docker engine: connect, and translate its errors once.

``docker.errors`` and ``requests`` exceptions become evalrun errors here (and only
here), split into transient (daemon unreachable, 5xx: retried by type) and
permanent ones carrying the HTTP status; callers catch meaning, not status numbers.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import docker
import docker.errors
import requests.exceptions

from runner._internal.retry import call_with_retries
from runner.errors import (
    DockerAPIError,
    DockerImageNotFound,
    EvalrunError,
    TransientDockerError,
)

T = TypeVar("T")

log = logging.getLogger("evalrun.backend.docker")

DOCKER_HINT = "start the engine with `make host-up` (scripts/host-up.sh), or set DOCKER_HOST"


@contextmanager
def translated(what: str) -> Iterator[None]:
    """Translate Docker SDK and transport errors raised inside the block (cause chained)."""
    try:
        yield
    except docker.errors.ImageNotFound as exc:
        raise DockerImageNotFound(
            f"{what}: image not found: {exc.explanation}",
            operation=what,
            status=exc.status_code,
        ) from exc
    except docker.errors.NotFound as exc:
        raise DockerAPIError(
            f"{what}: not found: {exc.explanation}", operation=what, status=exc.status_code
        ) from exc
    except docker.errors.APIError as exc:
        status = exc.status_code or 0
        if status >= 500 or status == 0:
            raise TransientDockerError(
                f"{what}: Docker engine error {status}: {exc.explanation}",
                operation=what,
                status=exc.status_code,
            ) from exc
        raise DockerAPIError(
            f"{what}: Docker engine refused ({status}): {exc.explanation}",
            operation=what,
            status=status,
        ) from exc
    except docker.errors.DockerException as exc:
        raise TransientDockerError(
            f"{what}: Docker engine unreachable: {exc}", operation=what, hint=DOCKER_HINT
        ) from exc
    except (requests.exceptions.ConnectionError, requests.exceptions.Timeout) as exc:
        raise TransientDockerError(
            f"{what}: Docker engine unreachable: {exc.__class__.__name__}",
            operation=what,
            hint=DOCKER_HINT,
        ) from exc


def remove_container(container: Any, log: logging.Logger) -> None:
    """Remove ``container`` (stopped or not); a failure goes to ``log``, never raised."""
    try:
        with translated("remove container"):
            container.remove(force=True)
    except EvalrunError as exc:
        log.warning(
            "could not remove container",
            extra={"event": "container_remove_failed", "error": str(exc)},
        )


def docker_call(what: str, fn: Callable[[], T], *, retries: bool = True) -> T:
    """Run one Docker operation with translation and (by default) bounded retries."""

    def attempt() -> T:
        with translated(what):
            return fn()

    if not retries:
        return attempt()
    result: T = call_with_retries(attempt, what=what)
    return result


def connect(timeout: int = 120) -> Any:
    """A Docker client that has answered a ping (retried, then exit 5)."""

    def open_client() -> Any:
        client = docker.from_env(timeout=timeout)
        client.ping()
        return client

    return docker_call("connect to Docker engine", open_client)


def runtimes(client: Any) -> set[str]:
    """The OCI runtimes registered with the engine (``runc``, ``runsc``, …)."""
    info = docker_call("docker info", client.info)
    return set((info.get("Runtimes") or {}).keys())


def create_container(
    client: Any,
    image: str,
    command: list[str],
    mounts: list[tuple[str, str, bool]],
    options: dict[str, Any],
) -> Any:
    """Create (not start) a container: ``mounts`` as (target, source, read-only) binds,
    ``options`` as docker-py's ``containers.create`` keywords."""
    binds = [
        docker.types.Mount(target, source, type="bind", read_only=read_only)
        for target, source, read_only in mounts
    ]
    return client.containers.create(image, command, mounts=binds, detach=True, **options)


def image_id(client: Any, ref: str) -> str | None:
    """The engine's ID of the image ``ref``; one it does not have is pulled (then None: the
    run's container says which image it got)."""
    try:
        with translated(f"inspect {ref}"):
            found: str = client.images.get(ref).id
            return found
    except EvalrunError:
        pass
    repo, digest = ref.split("@", 1)
    log.info("pulling image", extra={"event": "image_pull", "image": ref})
    docker_call(f"pull {ref}", lambda: client.api.pull(repo, tag=digest))
    return None


def remove_named(client: Any, name: str) -> None:
    """Remove the container called ``name`` if there is one (a stale one of the same run)."""
    try:
        with translated("remove stale container"):
            client.containers.get(name).remove(force=True)
    except EvalrunError:
        pass

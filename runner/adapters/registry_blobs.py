"""Blobs in an OCI registry: whether one is there, pushing (present, mounted from a sibling
repository, or uploaded), and downloading with the digest and the declared size checked.

Every request goes through the one request path of :mod:`runner.adapters.registry`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path
from typing import BinaryIO, Literal

from runner.adapters.registry import (
    MANIFEST_TIMEOUT_S,
    ImageName,
    Response,
    _base_url,
    _refused,
    _request_facts,
    _retried,
    _scheme,
    _send,
)
from runner.errors import (
    InfrastructureError,
    IntegrityError,
    RegistryAPIError,
)


def blob_exists(name: ImageName, digest: str) -> bool:
    """Whether the repository holds the blob ``digest``."""
    url = f"{_base_url(name)}/blobs/{digest}"
    response = _retried(
        f"check blob {digest}", lambda: _send("HEAD", url, timeout=MANIFEST_TIMEOUT_S)
    )
    if response.status not in (200, 404):
        raise InfrastructureError(f"registry answered {response.status} for blob {digest}", url=url)
    return response.status == 200


def _absolute(name: ImageName, location: str) -> str:
    if location.startswith("/"):
        return f"{_scheme(name.registry)}://{name.registry}{location}"
    return location


def push_blob(
    name: ImageName, digest: str, size: int, path: Path | None, *, mount_from: Iterable[str] = ()
) -> Literal["exists", "mounted", "uploaded"]:
    """Make ``digest`` present in ``name``: already there, mounted from a sibling, or uploaded.

    Returns how: ``"exists"``, ``"mounted"`` or ``"uploaded"``.
    """
    if blob_exists(name, digest):
        return "exists"
    for other in mount_from:
        if other == name.repository:
            continue
        url = f"{_base_url(name)}/blobs/uploads/?mount={digest}&from={other}"

        def mount(url: str = url) -> Response:
            return _send("POST", url, data=b"")

        if _retried(f"mount {digest}", mount).status == 201:
            return "mounted"

    if path is None:
        raise InfrastructureError(
            f"blob {digest} is neither in {name} nor mountable, and there is no local copy",
            mount_from=list(mount_from),
        )

    def upload() -> None:
        with path.open("rb") as fh:
            _upload(name, digest, fh, size)

    _retried(f"upload {digest}", upload)
    return "uploaded"


def put_blob_bytes(name: ImageName, digest: str, data: bytes) -> None:
    """Upload a small blob (an image config) held in memory, unless already present."""
    if not blob_exists(name, digest):
        _retried(f"upload {digest}", lambda: _upload(name, digest, data, len(data)))


def _upload(name: ImageName, digest: str, data: bytes | BinaryIO, size: int) -> None:
    """A monolithic upload: POST to open a session, PUT the bytes with their digest."""
    start = _send("POST", f"{_base_url(name)}/blobs/uploads/", data=b"")
    if start.status != 202 or "location" not in start.headers:
        raise InfrastructureError(
            f"registry refused to start an upload ({start.status})", repository=str(name)
        )
    location = _absolute(name, start.headers["location"])
    sep = "&" if "?" in location else "?"
    url = f"{location}{sep}digest={digest}"
    response = _send(
        "PUT",
        url,
        data=data,
        headers={"Content-Type": "application/octet-stream", "Content-Length": str(size)},
    )
    if response.status != 201:
        raise _refused(
            f"registry refused blob {digest} ({response.status})",
            url,
            response,
            repository=str(name),
        )


def get_blob(name: ImageName, digest: str, dest: Path, *, max_bytes: int | None = None) -> None:
    """Download a blob to ``dest`` and check its digest (IntegrityError if it does not match).

    With ``max_bytes`` (the size its descriptor declares) the download stops, with an
    IntegrityError, as soon as the registry sends more: a blob is never larger than said.
    """
    url = f"{_base_url(name)}/blobs/{digest}"

    def fetch() -> None:
        h = hashlib.sha256()
        received = 0
        with dest.open("wb") as out:

            def write(chunk: bytes) -> None:
                nonlocal received
                received += len(chunk)
                if max_bytes is not None and received > max_bytes:
                    raise IntegrityError(
                        f"blob {digest} from {name} is larger than the {max_bytes} bytes "
                        "its descriptor declares",
                        expected=str(max_bytes),
                    )
                h.update(chunk)
                out.write(chunk)

            response = _send("GET", url, sink=write)
        if response.status != 200:
            raise RegistryAPIError(
                f"registry answered {response.status} for blob",
                **_request_facts(url),
                status=response.status,
            )
        if "sha256:" + h.hexdigest() != digest:
            raise IntegrityError(
                f"blob {digest} from {name} does not match its digest",
                expected=digest,
                found="sha256:" + h.hexdigest(),
            )

    _retried(f"get blob {digest}", fetch)


def get_blob_bytes(name: ImageName, digest: str, limit: int = 4 << 20) -> bytes:
    """A small blob (an image config) in memory, checked against its digest."""
    url = f"{_base_url(name)}/blobs/{digest}"
    response = _retried(f"get blob {digest}", lambda: _send("GET", url, max_bytes=limit))
    if response.status != 200:
        raise InfrastructureError(f"registry answered {response.status} for blob {digest}", url=url)
    if (
        len(response.body) > limit
        or "sha256:" + hashlib.sha256(response.body).hexdigest() != digest
    ):
        raise IntegrityError(f"blob {digest} from {name} does not match its digest")
    return response.body

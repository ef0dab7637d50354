"""A small OCI distribution client over HTTP(S): resolve tags, check manifests.

Used for the embedded default registry; errors are translated once, here, into
transient (connection refused, 5xx) and permanent ones.
"""

from __future__ import annotations

import hashlib
import json
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, TypedDict

from runner._internal.retry import call_with_retries
from runner.errors import (
    InfrastructureError,
    InputError,
    IntegrityError,
    RegistryAPIError,
    TransientInfrastructureError,
    TransientRegistryError,
)

MANIFEST_TYPES = ", ".join(
    [
        "application/vnd.oci.image.manifest.v1+json",
        "application/vnd.docker.distribution.manifest.v2+json",
        "application/vnd.oci.image.index.v1+json",
        "application/vnd.docker.distribution.manifest.list.v2+json",
    ]
)


class _RequestFacts(TypedDict):
    registry: str | None
    repository: str | None
    url: str


@dataclass(frozen=True)
class ImageName:
    registry: str
    repository: str

    @classmethod
    def parse(cls, name: str) -> ImageName:
        """``127.0.0.1:5000/evalrun/base`` → registry + repository."""
        first, _, rest = name.partition("/")
        if not rest or not ("." in first or ":" in first or first == "localhost"):
            raise InputError(
                f"image name {name!r} must start with a registry host (e.g. 127.0.0.1:5000/…)"
            )
        return cls(first, rest)

    def __str__(self) -> str:
        return f"{self.registry}/{self.repository}"


def _scheme(registry: str) -> str:
    host = registry.split(":")[0]
    return "http" if host in ("127.0.0.1", "localhost", "::1") else "https"


def _base_url(name: ImageName) -> str:
    return f"{_scheme(name.registry)}://{name.registry}/v2/{name.repository}"


def _request(method: str, url: str, timeout: float = 10.0) -> tuple[int, dict[str, str], bytes]:
    """A manifest-API request (``Accept``: every manifest type), translated by :func:`_send`."""
    return _send(method, url, headers={"Accept": MANIFEST_TYPES}, timeout=timeout)


def resolve_tag(name: ImageName, tag: str) -> str | None:
    """The manifest digest a tag points to, or None if the tag does not exist."""
    url = f"{_base_url(name)}/manifests/{tag}"
    status, headers, _ = call_with_retries(
        lambda: _request("HEAD", url), what=f"resolve {name}:{tag}"
    )
    if status == 404:
        return None
    if status != 200:
        raise InfrastructureError(f"registry answered {status} for {name}:{tag}", url=url)
    digest = headers.get("Docker-Content-Digest") or headers.get("docker-content-digest")
    if not digest:
        raise InfrastructureError("registry gave no Docker-Content-Digest", url=url)
    return str(digest)


def manifest_exists(name: ImageName, digest: str) -> bool:
    """Whether the registry holds a manifest with exactly this digest."""
    url = f"{_base_url(name)}/manifests/{digest}"
    status, _, _ = call_with_retries(lambda: _request("HEAD", url), what=f"check {name}@{digest}")
    if status in (404, 400):
        return False
    if status != 200:
        raise InfrastructureError(f"registry answered {status} for {name}@{digest}", url=url)
    return True


def registry_reachable(registry: str) -> bool:
    """A single, unretried probe of ``/v2/``."""
    try:
        status, _, _ = _request("GET", f"{_scheme(registry)}://{registry}/v2/", timeout=2.0)
    except TransientInfrastructureError:
        return False
    return status in (200, 401)


def get_manifest(name: ImageName, reference: str) -> dict[str, object]:
    url = f"{_base_url(name)}/manifests/{reference}"
    status, _, body = call_with_retries(lambda: _request("GET", url), what=f"get {name}")
    if status != 200:
        raise InfrastructureError(f"registry answered {status} for {name}@{reference}", url=url)
    data: dict[str, object] = json.loads(body)
    return data


# --------------------------------------------------------------------------- push


def _send(
    method: str,
    url: str,
    *,
    data: bytes | BinaryIO | None = None,
    headers: dict[str, str] | None = None,
    timeout: float = 300.0,
) -> tuple[int, dict[str, str], bytes]:
    """One request with a body; 5xx and connection failures are transient."""
    req = urllib.request.Request(url, data=data, method=method, headers=headers or {})  # noqa: S310
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:  # noqa: S310
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as exc:
        body = exc.read()
        if exc.code >= 500:
            raise TransientRegistryError(
                f"registry answered {exc.code}", **_request_facts(url), status=exc.code
            ) from exc
        return exc.code, dict(exc.headers), body
    except (urllib.error.URLError, TimeoutError, ConnectionError) as exc:
        reason = getattr(exc, "reason", exc)
        raise TransientRegistryError(
            f"registry unreachable: {reason}",
            **_request_facts(url),
            hint="start the local registry with `make host-up` (scripts/host-up.sh)",
        ) from exc


def _request_facts(url: str) -> _RequestFacts:
    """Which registry and repository a distribution-API URL addresses (for error fields)."""
    parts = urllib.parse.urlsplit(url)
    rest = parts.path.removeprefix("/v2/")
    repository = next(
        (rest.split(m, 1)[0] for m in ("/manifests/", "/blobs/", "/tags/") if m in rest), None
    )
    return {"registry": parts.netloc or None, "repository": repository or None, "url": url}


def blob_exists(name: ImageName, digest: str) -> bool:
    url = f"{_base_url(name)}/blobs/{digest}"
    status, _, _ = call_with_retries(lambda: _request("HEAD", url), what=f"check blob {digest}")
    return bool(status == 200)


def _absolute(name: ImageName, location: str) -> str:
    if location.startswith("/"):
        return f"{_scheme(name.registry)}://{name.registry}{location}"
    return location


def push_blob(
    name: ImageName, digest: str, size: int, path: Path | None, *, mount_from: Iterable[str] = ()
) -> str:
    """Make ``digest`` present in ``name``: already there, mounted from a sibling, or uploaded.

    Returns how: ``"exists"``, ``"mounted"`` or ``"uploaded"``.
    """
    if blob_exists(name, digest):
        return "exists"
    for other in mount_from:
        if other == name.repository:
            continue
        mount_url = f"{_base_url(name)}/blobs/uploads/?mount={digest}&from={other}"

        def mount(url: str = mount_url) -> tuple[int, dict[str, str], bytes]:
            return _send("POST", url, data=b"")

        status, _, _ = call_with_retries(mount, what=f"mount {digest}")
        if status == 201:
            return "mounted"

    if path is None:
        raise InfrastructureError(
            f"blob {digest} is neither in {name} nor mountable, and there is no local copy",
            mount_from=list(mount_from),
        )

    def upload() -> None:
        with path.open("rb") as fh:
            _upload(name, digest, fh, size)

    call_with_retries(upload, what=f"upload {digest}")
    return "uploaded"


def put_blob_bytes(name: ImageName, digest: str, data: bytes) -> None:
    """Upload a small blob (an image config) held in memory, unless already present."""
    if not blob_exists(name, digest):
        call_with_retries(lambda: _upload(name, digest, data, len(data)), what=f"upload {digest}")


def _upload(name: ImageName, digest: str, data: bytes | BinaryIO, size: int) -> None:
    """A monolithic upload: POST to open a session, PUT the bytes with their digest."""
    status, headers, _ = _send("POST", f"{_base_url(name)}/blobs/uploads/", data=b"")
    if status != 202 or "Location" not in headers:
        raise InfrastructureError(
            f"registry refused to start an upload ({status})", repository=str(name)
        )
    location = _absolute(name, headers["Location"])
    sep = "&" if "?" in location else "?"
    status, _, body = _send(
        "PUT",
        f"{location}{sep}digest={digest}",
        data=data,
        headers={"Content-Type": "application/octet-stream", "Content-Length": str(size)},
    )
    if status != 201:
        raise InfrastructureError(
            f"registry refused blob {digest} ({status})",
            repository=str(name),
            detail=body.decode("utf-8", "replace")[:500],
        )


def put_manifest(name: ImageName, reference: str, manifest: bytes, media_type: str) -> str:
    """PUT a manifest under a tag (or its digest); returns the digest the registry reports."""
    url = f"{_base_url(name)}/manifests/{reference}"
    status, headers, body = call_with_retries(
        lambda: _send("PUT", url, data=manifest, headers={"Content-Type": media_type}),
        what=f"put manifest {name}:{reference}",
    )
    if status != 201:
        raise InfrastructureError(
            f"registry refused the manifest for {name}:{reference} ({status})",
            detail=body.decode("utf-8", "replace")[:500],
        )
    digest = headers.get("Docker-Content-Digest") or headers.get("docker-content-digest") or ""
    return str(digest)


def get_blob(name: ImageName, digest: str, dest: Path) -> None:
    """Download a blob to ``dest`` and check its digest."""

    def fetch() -> None:
        url = f"{_base_url(name)}/blobs/{digest}"
        req = urllib.request.Request(url, method="GET")  # noqa: S310
        h = hashlib.sha256()
        try:
            with urllib.request.urlopen(req, timeout=300) as resp, dest.open("wb") as out:  # noqa: S310
                while chunk := resp.read(1 << 20):
                    h.update(chunk)
                    out.write(chunk)
        except urllib.error.HTTPError as exc:
            if exc.code >= 500:
                raise TransientRegistryError(
                    f"registry answered {exc.code}", **_request_facts(url), status=exc.code
                ) from exc
            raise RegistryAPIError(
                f"registry answered {exc.code} for blob", **_request_facts(url), status=exc.code
            ) from exc
        except (urllib.error.URLError, TimeoutError, ConnectionError) as exc:
            raise TransientRegistryError(
                f"registry unreachable: {getattr(exc, 'reason', exc)}", **_request_facts(url)
            ) from exc
        if "sha256:" + h.hexdigest() != digest:
            raise IntegrityError(
                f"blob {digest} from {name} does not match its digest",
                expected=digest,
                found="sha256:" + h.hexdigest(),
            )

    call_with_retries(fetch, what=f"get blob {digest}")


def get_manifest_bytes(name: ImageName, reference: str) -> bytes:
    """The exact manifest bytes (so their digest can be checked)."""
    url = f"{_base_url(name)}/manifests/{reference}"
    status, _, body = call_with_retries(lambda: _request("GET", url), what=f"get {name}")
    if status != 200:
        raise InfrastructureError(f"registry answered {status} for {name}@{reference}", url=url)
    return bytes(body)


def get_blob_bytes(name: ImageName, digest: str, limit: int = 4 << 20) -> bytes:
    """A small blob (an image config) in memory, checked against its digest."""
    url = f"{_base_url(name)}/blobs/{digest}"
    status, _, body = call_with_retries(lambda: _send("GET", url), what=f"get blob {digest}")
    if status != 200:
        raise InfrastructureError(f"registry answered {status} for blob {digest}", url=url)
    if len(body) > limit or "sha256:" + hashlib.sha256(body).hexdigest() != digest:
        raise IntegrityError(f"blob {digest} from {name} does not match its digest")
    return bytes(body)

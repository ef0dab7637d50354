"""A small OCI distribution client over HTTP(S): resolve tags, check manifests.

Used for the embedded default registry; errors are translated once, here, into
transient (connection refused, 5xx) and permanent ones.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from dataclasses import dataclass

from runner.errors import InfrastructureError, InputError, TransientInfrastructureError
from runner.retry import call_with_retries

MANIFEST_TYPES = ", ".join(
    [
        "application/vnd.oci.image.manifest.v1+json",
        "application/vnd.docker.distribution.manifest.v2+json",
        "application/vnd.oci.image.index.v1+json",
        "application/vnd.docker.distribution.manifest.list.v2+json",
    ]
)


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


def _request(method: str, url: str, timeout: float = 10.0) -> tuple[int, dict[str, str], bytes]:
    req = urllib.request.Request(url, method=method, headers={"Accept": MANIFEST_TYPES})  # noqa: S310
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:  # noqa: S310
            return resp.status, dict(resp.headers), resp.read() if method == "GET" else b""
    except urllib.error.HTTPError as exc:
        if exc.code >= 500:
            raise TransientInfrastructureError(f"registry answered {exc.code}", url=url) from None
        return exc.code, dict(exc.headers), b""
    except (urllib.error.URLError, TimeoutError, ConnectionError) as exc:
        reason = getattr(exc, "reason", exc)
        raise TransientInfrastructureError(
            f"registry unreachable: {reason}",
            url=url,
            hint="start the local registry with `make host-up` (scripts/host-up.sh)",
        ) from None


def resolve_tag(name: ImageName, tag: str) -> str | None:
    """The manifest digest a tag points to, or None if the tag does not exist."""
    url = f"{_scheme(name.registry)}://{name.registry}/v2/{name.repository}/manifests/{tag}"
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
    url = f"{_scheme(name.registry)}://{name.registry}/v2/{name.repository}/manifests/{digest}"
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
    url = f"{_scheme(name.registry)}://{name.registry}/v2/{name.repository}/manifests/{reference}"
    status, _, body = call_with_retries(lambda: _request("GET", url), what=f"get {name}")
    if status != 200:
        raise InfrastructureError(f"registry answered {status} for {name}@{reference}", url=url)
    data: dict[str, object] = json.loads(body)
    return data

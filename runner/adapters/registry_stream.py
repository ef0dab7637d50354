"""Streamed blob transfers: resumable downloads and uploads of large blobs.

The same request path, authentication and error translation as
:mod:`runner.adapters.registry` (its ``_urlopen`` seam included); here the caller
drives the bytes: it verifies what it reads and retries by type.
"""

from __future__ import annotations

import http.client
import re
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import BinaryIO, Literal

from runner.adapters import registry, registry_blobs
from runner.errors import (
    InputError,
    RegistryAccessDenied,
    RegistryAPIError,
    TransientRegistryError,
)

_CONTENT_RANGE = re.compile(r"^bytes (\d+)-(\d+)/(\d+)$")


@dataclass(frozen=True)
class BlobStream:
    """An open blob download: its chunks, the blob's full size and the offset of the first."""

    chunks: Iterator[bytes]
    total: int | None
    start: int


def stream_blob(
    name: registry.ImageName, digest: str, *, start: int = 0, _answered: bool = False
) -> BlobStream:
    """Start downloading blob ``digest`` at byte ``start`` (a ranged GET when not 0).

    Not retried here, and not checked: the caller verifies the bytes and retries by
    type (connection failures and 5xx, also from inside the chunks, are
    TransientRegistryError). A registry that ignores the range answers from byte 0
    (``start`` says so). A blob the registry does not have is an InputError.
    """
    url = f"{registry._base_url(name)}/blobs/{digest}"
    headers = {"Range": f"bytes={start}-"} if start else {}
    known = registry.AUTHORIZER.known(name.registry, name.repository)
    if known:
        headers["Authorization"] = known
    request = urllib.request.Request(url, method="GET", headers=headers)  # noqa: S310
    try:
        resp = registry._urlopen(request, registry.BLOB_TIMEOUT_S)
    except urllib.error.HTTPError as exc:
        exc.close()
        challenge = exc.headers.get("WWW-Authenticate") if exc.headers else None
        if exc.code == 401 and challenge and not _answered:
            registry.AUTHORIZER.answer(name.registry, name.repository, challenge)
            return stream_blob(name, digest, start=start, _answered=True)
        if exc.code == 401:
            raise RegistryAccessDenied(
                f"registry {name.registry} refused the credentials for {name.repository}",
                **registry._request_facts(url),
                status=401,
            ) from None
        if exc.code >= 500:
            raise TransientRegistryError(
                f"registry answered {exc.code}", **registry._request_facts(url), status=exc.code
            ) from exc
        if exc.code == 416 and start:
            return stream_blob(name, digest)
        if exc.code == 404:
            raise InputError(
                f"blob {digest} is not in {name}", **registry._request_facts(url), status=404
            ) from None
        raise RegistryAPIError(
            f"registry answered {exc.code} for blob {digest}",
            **registry._request_facts(url),
            status=exc.code,
        ) from exc
    except (urllib.error.URLError, TimeoutError, ConnectionError, http.client.HTTPException) as exc:
        untrusted = registry._untrusted(url, exc)
        if untrusted is not None:
            raise untrusted from None
        reason = getattr(exc, "reason", exc)
        raise TransientRegistryError(
            f"registry unreachable: {reason}",
            **registry._request_facts(url),
            hint="start the local registry with `make host-up` (scripts/host-up.sh)",
        ) from exc
    found = {k.lower(): v for k, v in resp.headers.items()}
    begin, total = 0, None
    match = _CONTENT_RANGE.match(found.get("content-range", ""))
    if resp.status == 206 and match:
        begin, total = int(match.group(1)), int(match.group(3))
    elif found.get("content-length", "").isdigit():
        total = int(found["content-length"])

    def chunks() -> Iterator[bytes]:
        try:
            while chunk := resp.read(registry._CHUNK):
                yield chunk
        except (OSError, TimeoutError, http.client.HTTPException) as exc:
            raise TransientRegistryError(
                f"blob download cut: {exc}", **registry._request_facts(url)
            ) from exc
        finally:
            close = getattr(resp, "close", None)
            if close is not None:
                close()

    return BlobStream(chunks(), total, begin)


def push_blob_stream(
    name: registry.ImageName, digest: str, size: int, open_stream: Callable[[], BinaryIO]
) -> Literal["exists", "uploaded"]:
    """Upload a blob whose bytes ``open_stream()`` produces (afresh on every retry).

    Nothing is sent when the repository holds the blob already; the registry checks
    the digest of what arrives (a mismatch is a refusal, exit 5).
    """
    if registry_blobs.blob_exists(name, digest):
        return "exists"

    def upload() -> None:
        with open_stream() as stream:
            registry_blobs._upload(name, digest, stream, size)

    registry._retried(f"upload {digest}", upload)
    return "uploaded"

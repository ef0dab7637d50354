"""The one OCI distribution client: image names, the one request path, tags, manifests and
referrers over HTTP(S); blobs are in :mod:`runner.adapters.registry_blobs`.

Every request to a registry goes through :func:`_send`, which turns urllib's
answers into a :class:`Response` or an evalrun error once, here: 5xx answers,
refused connections and timeouts are transient (each operation retries them
with the tenacity policy), any other unexpected status is a permanent
InfrastructureError naming the URL. Content is checked against its digest where
it is read (IntegrityError). Used for images (``runner.build``) and for bundles
as OCI artifacts (``runner.bundle.oci_artifacts``).
"""

from __future__ import annotations

import hashlib
import http.client
import ssl
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, BinaryIO, TypedDict, TypeVar

from tenacity import Retrying

from runner._internal.retry import call_with_retries, transient_policy
from runner._internal.strict_json import load_json_strict
from runner.adapters import registry_auth
from runner.adapters.registry_auth import opener, scheme
from runner.errors import (
    InfrastructureError,
    InputError,
    IntegrityError,
    RegistryAccessDenied,
    RegistryAPIError,
    RegistryUntrusted,
    TransientRegistryError,
)

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
MANIFEST_TYPES = ", ".join(
    [
        OCI_MANIFEST,
        "application/vnd.docker.distribution.manifest.v2+json",
        OCI_INDEX,
        "application/vnd.docker.distribution.manifest.list.v2+json",
    ]
)
# Manifests are small: a registry that takes longer is not answering.
MANIFEST_TIMEOUT_S = 10.0
# No manifest, index or referrers listing is larger (the distribution spec's own bound);
# a registry answering with more is not believed, and nothing beyond is read.
MAX_MANIFEST_BYTES = 4 << 20
# What of an error answer is read, for its message.
_MAX_ERROR_BYTES = 64 << 10
BLOB_TIMEOUT_S = 300.0
_CHUNK = 1 << 20
# Who answers registries' challenges for this process (a test may swap in a fresh one).
AUTHORIZER: registry_auth.Authorizer = registry_auth.AUTHORIZER
_T = TypeVar("_T")


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


@dataclass(frozen=True)
class ManifestRef:
    """What a registry says about a manifest without sending it."""

    media_type: str
    digest: str
    size: int


@dataclass(frozen=True)
class Response:
    """One registry answer; ``headers`` has lower-case names."""

    status: int
    headers: Mapping[str, str]
    body: bytes


def _scheme(registry: str) -> str:
    return scheme(registry)


def _base_url(name: ImageName) -> str:
    return f"{_scheme(name.registry)}://{name.registry}/v2/{name.repository}"


# --------------------------------------------------------------------------- the one request path


def _urlopen(request: urllib.request.Request, timeout: float) -> Any:
    # the seam unit tests replace: everything above it is this module's own logic
    return opener(request.host).open(request, timeout=timeout)


def _retry_policy() -> Retrying:
    return transient_policy()


def _read_bounded(resp: Any, limit: int, url: str) -> bytes:
    """At most ``limit`` bytes of an answer; IntegrityError when it holds more."""
    chunks: list[bytes] = []
    total = 0
    while chunk := resp.read(min(_CHUNK, limit + 1 - total)):
        chunks.append(chunk)
        total += len(chunk)
        if total > limit:
            raise IntegrityError(
                f"the registry answered with more than {limit} bytes",
                **_request_facts(url),
            )
    return b"".join(chunks)


def _untrusted(url: str, exc: BaseException) -> RegistryUntrusted | None:
    reason = getattr(exc, "reason", exc)
    if not isinstance(reason, ssl.SSLCertVerificationError):
        return None
    facts = _request_facts(url)
    return RegistryUntrusted(
        f"the TLS certificate of registry {facts['registry']} is not trusted: "
        f"{reason.verify_message}",
        **facts,
        hint=f"put its CA certificate in /etc/docker/certs.d/{facts['registry']}/ca.crt "
        "(or under $DOCKER_CONFIG/certs.d/)",
    )


def _rewind(data: bytes | BinaryIO | None, url: str) -> None:
    if data is None or isinstance(data, bytes):
        return
    if not data.seekable():
        raise RegistryAccessDenied(
            "the registry asked for credentials in the middle of a streamed upload",
            **_request_facts(url),
        )
    data.seek(0)


def _send(
    method: str,
    url: str,
    *,
    data: bytes | BinaryIO | None = None,
    headers: Mapping[str, str] | None = None,
    timeout: float = BLOB_TIMEOUT_S,
    sink: Callable[[bytes], object] | None = None,
    max_bytes: int = MAX_MANIFEST_BYTES,
) -> Response:
    """One request, not retried, authenticated as the registry asks.

    An Authorization that worked before for the repository is sent up front; a 401
    with a challenge is answered (registry_auth) and the request sent once more. A
    second 401 is RegistryAccessDenied (exit 4), and so is an untrusted certificate.
    """
    facts = _request_facts(url)
    registry, repository = facts["registry"] or "", facts["repository"]
    sent = dict(headers or {})
    known = AUTHORIZER.known(registry, repository)
    if known:
        sent["Authorization"] = known
    response = _send_once(
        method, url, data=data, headers=sent, timeout=timeout, sink=sink, max_bytes=max_bytes
    )
    challenge = response.headers.get("www-authenticate")
    if response.status != 401 or not challenge:
        return response
    sent["Authorization"] = AUTHORIZER.answer(registry, repository, challenge)
    _rewind(data, url)
    response = _send_once(
        method, url, data=data, headers=sent, timeout=timeout, sink=sink, max_bytes=max_bytes
    )
    if response.status == 401:
        AUTHORIZER.forget(registry, repository)
        raise RegistryAccessDenied(
            f"registry {registry} refused the credentials for {repository or 'its API'}",
            **facts,
            status=401,
            hint=f"check `docker login {registry}` (evalrun reads $DOCKER_CONFIG/config.json)",
        )
    return response


def _send_once(
    method: str,
    url: str,
    *,
    data: bytes | BinaryIO | None = None,
    headers: Mapping[str, str] | None = None,
    timeout: float = BLOB_TIMEOUT_S,
    sink: Callable[[bytes], object] | None = None,
    max_bytes: int = MAX_MANIFEST_BYTES,
) -> Response:
    """One plain request: any status comes back; 5xx and no answer are transient.

    With ``sink`` a successful answer's body is passed to it in chunks instead of
    being returned. A body to return is read to at most ``max_bytes`` (IntegrityError
    beyond), an error's body to a few KiB.
    """
    req = urllib.request.Request(url, data=data, method=method, headers=dict(headers or {}))  # noqa: S310
    try:
        with _urlopen(req, timeout) as resp:
            found = {k.lower(): v for k, v in resp.headers.items()}
            if sink is None:
                return Response(resp.status, found, _read_bounded(resp, max_bytes, url))
            while chunk := resp.read(_CHUNK):
                sink(chunk)
            return Response(resp.status, found, b"")
    except urllib.error.HTTPError as exc:
        if exc.code >= 500:
            raise TransientRegistryError(
                f"registry answered {exc.code}", **_request_facts(url), status=exc.code
            ) from exc
        found = {k.lower(): v for k, v in (exc.headers.items() if exc.headers else [])}
        return Response(exc.code, found, exc.read(_MAX_ERROR_BYTES))
    except (urllib.error.URLError, TimeoutError, ConnectionError, http.client.HTTPException) as exc:
        untrusted = _untrusted(url, exc)
        if untrusted is not None:
            raise untrusted from None
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
        (
            rest.split(m, 1)[0]
            for m in ("/manifests/", "/blobs/", "/tags/", "/referrers/")
            if m in rest
        ),
        None,
    )
    return {"registry": parts.netloc or None, "repository": repository or None, "url": url}


def _retried(what: str, fn: Callable[[], _T]) -> _T:
    result: _T = call_with_retries(fn, what=what, policy=_retry_policy())
    return result


def _refused(
    message: str, url: str, response: Response, repository: str | None = None
) -> InfrastructureError:
    detail = response.body[:500].decode("utf-8", "replace").strip()
    facts = _request_facts(url)
    if repository:
        facts["repository"] = repository
    return RegistryAPIError(message, **facts, status=response.status, detail=detail or None)


def _manifest_call(method: str, name: ImageName, reference: str, what: str) -> Response:
    url = f"{_base_url(name)}/manifests/{reference}"
    return _retried(
        what,
        lambda: _send(method, url, headers={"Accept": MANIFEST_TYPES}, timeout=MANIFEST_TIMEOUT_S),
    )


# --------------------------------------------------------------------------- manifests


def resolve_tag(name: ImageName, tag: str) -> str | None:
    """The manifest digest a tag points to, or None if the tag does not exist."""
    response = _manifest_call("HEAD", name, tag, f"resolve {name}:{tag}")
    url = f"{_base_url(name)}/manifests/{tag}"
    if response.status == 404:
        return None
    if response.status != 200:
        raise InfrastructureError(f"registry answered {response.status} for {name}:{tag}", url=url)
    digest = response.headers.get("docker-content-digest")
    if not digest:
        raise InfrastructureError("registry gave no Docker-Content-Digest", url=url)
    return digest


def manifest_exists(name: ImageName, digest: str) -> bool:
    """Whether the registry holds a manifest with exactly this digest."""
    response = _manifest_call("HEAD", name, digest, f"check {name}@{digest}")
    if response.status in (404, 400):
        return False
    if response.status != 200:
        raise InfrastructureError(
            f"registry answered {response.status} for {name}@{digest}",
            url=f"{_base_url(name)}/manifests/{digest}",
        )
    return True


def manifest_ref(name: ImageName, reference: str) -> ManifestRef | None:
    """Media type, digest and size of a manifest (by tag or digest), or None if absent."""
    response = _manifest_call("HEAD", name, reference, f"check {name}@{reference}")
    if response.status == 404:
        return None
    if response.status != 200:
        raise InfrastructureError(
            f"registry answered {response.status} for {name}@{reference}",
            url=f"{_base_url(name)}/manifests/{reference}",
        )
    return ManifestRef(
        media_type=response.headers.get("content-type", OCI_MANIFEST),
        digest=response.headers.get("docker-content-digest", reference),
        size=int(response.headers.get("content-length", "0")),
    )


def find_manifest(name: ImageName, reference: str) -> tuple[str, bytes] | None:
    """(media type, exact bytes) of a manifest, or None if absent; the caller checks its digest."""
    response = _manifest_call("GET", name, reference, f"get {name}@{reference}")
    if response.status == 404:
        return None
    if response.status != 200:
        raise InfrastructureError(
            f"registry answered {response.status} for {name}@{reference}",
            url=f"{_base_url(name)}/manifests/{reference}",
        )
    return response.headers.get("content-type", ""), response.body


def get_manifest_bytes(name: ImageName, reference: str) -> bytes:
    """The exact manifest bytes (so their digest can be checked); absent is an error."""
    found = find_manifest(name, reference)
    if found is None:
        raise InfrastructureError(
            f"registry answered 404 for {name}@{reference}",
            url=f"{_base_url(name)}/manifests/{reference}",
        )
    return found[1]


def put_manifest(name: ImageName, reference: str, manifest: bytes, media_type: str) -> str:
    """PUT a manifest under a tag (or its digest); returns the digest the registry reports.

    A registry that reports none is taken to have stored the bytes sent (their sha256).
    """
    url = f"{_base_url(name)}/manifests/{reference}"
    response = _retried(
        f"put manifest {name}:{reference}",
        lambda: _send("PUT", url, data=manifest, headers={"Content-Type": media_type}),
    )
    if response.status != 201:
        raise _refused(
            f"registry refused the manifest for {name}:{reference} ({response.status})",
            url,
            response,
        )
    reported = response.headers.get("docker-content-digest")
    return reported or "sha256:" + hashlib.sha256(manifest).hexdigest()


def referrers(name: ImageName, subject: str) -> list[dict[str, object]] | None:
    """The referrers API's descriptors for ``subject`` (the registry's JSON, unchecked beyond
    being objects); None when the registry lacks the API."""
    url = f"{_base_url(name)}/referrers/{subject}"
    response = _retried(
        f"list referrers of {name}@{subject}",
        lambda: _send("GET", url, headers={"Accept": OCI_INDEX}, timeout=MANIFEST_TIMEOUT_S),
    )
    if response.status in (404, 400, 405):
        return None
    if response.status != 200:
        raise _refused(f"registry answered {response.status} for the referrers", url, response)
    if OCI_INDEX not in response.headers.get("content-type", ""):
        return None
    try:
        index = load_json_strict(response.body)
    except ValueError as exc:
        raise IntegrityError(
            f"the registry's referrers listing is not valid JSON: {str(exc)[:120]}", url=url
        ) from None
    listed = index.get("manifests") if isinstance(index, dict) else None
    return [d for d in listed if isinstance(d, dict)] if isinstance(listed, list) else []

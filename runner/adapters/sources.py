"""Where inputs come from: fetch an input URI into the cache and verify it.

A model or dataset input is named by a URI (parsed by :mod:`runner.model.input_uri`,
re-exported here) and pinned by a digest:

==========================  ===========  ===============================================
URI                         kind         pinned by
==========================  ===========  ===============================================
``path``, ``file://path``   file or dir  sha256 of the bytes / tree digest (see below)
``https://host/path``       file         sha256 of the bytes
``s3://bucket/key``         file         sha256 of the bytes
``s3://bucket/prefix/``     directory    tree digest over every object under the prefix
``oci://reg/repo@sha256:…`` either       as above; the registry side is a plug-in
==========================  ===========  ===============================================

The tree digest is ``evalrun-input-tree/v1`` (:mod:`runner._internal.input_tree`), the
same wherever the directory lives. :func:`acquire` is the one entry point: it fetches
(streaming, bounded retries, resume where the server allows), verifies against the
declared digest while the bytes stream into the content-addressed cache
(:mod:`runner._internal.cas`), and returns an :class:`AcquiredInput` whose ``path`` is a
verified, read-only blob or tree. Remote inputs already in the cache are found by
digest without any network; local inputs are always re-hashed, so an edited file is
reported instead of silently replaced by its cached old bytes.

Errors (all name the input): a bad URI or digest, a missing file, a 4xx answer or a
directory entry that escapes its root → :class:`~runner.errors.InputError` (exit 2);
wrong bytes → :class:`~runner.errors.DigestMismatch` (exit 3, nothing cached); a
source still unreachable after retries, or a server whose TLS certificate is not
trusted → :class:`~runner.errors.InfrastructureError` (exit 5) naming the URL.
SDK and urllib3 errors are translated here and nowhere else.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import ssl
import threading
import urllib.parse
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, NamedTuple

import urllib3
from minio import Minio
from minio.credentials.providers import AWSConfigProvider, IamAwsProvider, Provider
from minio.credentials.providers import StaticProvider as _StaticProvider
from minio.error import InvalidResponseError, MinioException, S3Error, ServerError
from pydantic import BaseModel, ConfigDict, Field
from tenacity import Retrying

from runner._internal.cas import BlobWriter, ContentStore
from runner._internal.input_tree import (
    READ_CHUNK,
    InputFile,
    check_relative_path,
    hash_file,
    make_tree,
    scan_tree,
    tree_digest,
)
from runner._internal.retry import call_with_retries, transient_policy
from runner.errors import (
    DigestMismatch,
    EvalrunError,
    InfrastructureError,
    InputError,
    TransientInfrastructureError,
)
from runner.model.input_uri import (
    HttpsUri,
    InputUri,
    LocalUri,
    OciUri,
    S3Uri,
    parse_expected_digest,
    parse_input_uri,
    safe_file_name,
)

log = logging.getLogger("evalrun.inputs")

Progress = Callable[[int, int | None], None]
"""``progress(done_bytes, total_bytes)``; total is None while unknown and may grow once
(a local input is hashed, then the bytes missing from the cache are copied in)."""

_TRANSIENT_STATUS = {408, 425, 429}


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


# ----------------------------------------------------------------------------- options


def _default_retry_policy() -> Retrying:
    return transient_policy()


@dataclass(frozen=True)
class SourceOptions:
    """How remote inputs are reached. Every field has a working default."""

    ca_file: Path | None = None
    """PEM bundle of CAs for https:// inputs and an https S3 endpoint. It replaces the
    system store, as ``$REQUESTS_CA_BUNDLE`` does. Default: ``$REQUESTS_CA_BUNDLE``,
    then ``$SSL_CERT_FILE``, then the system store."""

    s3_endpoint: str | None = None
    """S3-compatible endpoint, ``http[s]://host[:port]``. Default: ``$AWS_ENDPOINT_URL_S3``,
    then ``$AWS_ENDPOINT_URL``, then AWS (``https://s3.amazonaws.com``)."""

    s3_region: str | None = None
    """Region for request signing. Default: ``$AWS_REGION``, then ``$AWS_DEFAULT_REGION``,
    then asked from the endpoint."""

    connect_timeout_s: float = 10.0
    """Seconds to establish a connection."""

    read_timeout_s: float = 120.0
    """Seconds without a byte before a transfer counts as stalled (then retried)."""

    parallel: int = 4
    """Objects of an S3 prefix transferred at once."""

    max_file_bytes: int = 1 << 40
    """A remote file larger than this is refused (a server must not fill the disk)."""

    retry_policy: Callable[[], Retrying] = _default_retry_policy
    """A fresh tenacity policy per transfer; tests inject one with a no-op sleep."""

    max_restarts: int = 8
    """How often a transfer that made progress may start a fresh retry policy."""

    environ: Mapping[str, str] | None = field(default=None, repr=False)
    """Environment to read (None: ``os.environ`` at call time)."""

    def env(self) -> Mapping[str, str]:
        """The environment these options read."""
        return os.environ if self.environ is None else self.environ


# ----------------------------------------------------------------------------- streams


class ByteStream(NamedTuple):
    """An open transfer: its chunks, the object's full size if known, and where it starts."""

    chunks: Iterator[bytes]
    total: int | None
    start: int
    """Offset of the first chunk: the one asked for, or 0 if the server ignored Range."""


Opener = Callable[[int], ByteStream]
"""``open_at(offset)``: start a transfer at ``offset`` (0 or a resume point). Raise
:class:`~runner.errors.TransientInfrastructureError` for what is worth retrying,
also from inside the chunk iterator."""


class _Meter:
    """Thread-safe byte counter feeding a :data:`Progress` callback."""

    def __init__(self, progress: Progress | None, total: int | None) -> None:
        self._progress = progress
        self._lock = threading.Lock()
        self.done = 0
        self.total = total

    def advance(self, n: int) -> None:
        if self._progress is None:
            return
        with self._lock:
            self.done += n
            self._progress(self.done, self.total)

    def learn_total(self, total: int | None) -> None:
        """Set the total once a transfer announces it (no-op when already known)."""
        if self._progress is None or total is None or self.total is not None:
            return
        with self._lock:
            self.total = total
            self._progress(self.done, self.total)

    def grow(self, extra: int) -> None:
        if self._progress is None or extra <= 0:
            return
        with self._lock:
            self.total = (self.total or 0) + extra
            self._progress(self.done, self.total)


def _close(chunks: Iterator[bytes]) -> None:
    close = getattr(chunks, "close", None)
    if close is not None:
        close()


def stream_into(
    writer: BlobWriter,
    open_at: Opener,
    *,
    what: str,
    source: str,
    options: SourceOptions,
    meter: _Meter | None = None,
) -> None:
    """Fill ``writer`` from ``open_at``, resuming after transient failures.

    Each retry resumes at the bytes already written when the server honours ``Range``
    (otherwise it starts over). Retries follow ``options.retry_policy``; a transfer that
    made progress before the policy gave up gets a fresh policy, at most
    ``options.max_restarts`` times. Still failing → InfrastructureError naming ``source``.
    """
    meter = meter or _Meter(None, None)

    def attempt() -> None:
        stream = open_at(writer.size)
        meter.learn_total(stream.total)
        if stream.start != writer.size:
            if stream.start != 0:
                raise TransientInfrastructureError(
                    f"{what}: server resumed at byte {stream.start}, asked {writer.size}",
                    url=source,
                )
            meter.advance(-writer.size)
            writer.reset()
        limit = options.max_file_bytes if stream.total is None else stream.total
        if limit > options.max_file_bytes:
            _close(stream.chunks)
            raise InputError(
                f"{what}: {source} is {stream.total} bytes, over the size limit",
                url=source,
                limit=options.max_file_bytes,
                hint="raise SourceOptions.max_file_bytes if this input is really that large",
            )
        try:
            for chunk in stream.chunks:
                writer.write(chunk)
                meter.advance(len(chunk))
                if writer.size > limit:
                    raise InputError(
                        f"{what}: {source} sent more bytes than it announced or than allowed",
                        url=source,
                        limit=limit,
                    )
        finally:
            _close(stream.chunks)  # release the connection whatever happened
        if stream.total is not None and writer.size != stream.total:
            raise TransientInfrastructureError(
                f"{what}: transfer ended at byte {writer.size} of {stream.total}", url=source
            )

    restarts = 0
    while True:
        mark = writer.size
        try:
            call_with_retries(attempt, what=f"{what}: {source}", policy=options.retry_policy())
            return
        except InfrastructureError as exc:
            transient = isinstance(exc.__cause__, TransientInfrastructureError)
            if transient and writer.size > mark and restarts < options.max_restarts:
                restarts += 1
                continue
            raise


# ----------------------------------------------------------------------------- https


def _ca_bundle(options: SourceOptions) -> str | None:
    env = options.env()
    chosen = (
        str(options.ca_file)
        if options.ca_file
        else env.get("REQUESTS_CA_BUNDLE") or env.get("SSL_CERT_FILE")
    )
    if chosen and not Path(chosen).is_file():
        raise InputError("CA bundle for TLS not found", ca_file=chosen)
    return chosen or None


def tls_context(options: SourceOptions) -> ssl.SSLContext:
    """A verifying TLS context: the CA bundle from ``options`` or the system store."""
    cafile = _ca_bundle(options)
    try:
        return ssl.create_default_context(cafile=cafile)
    except ssl.SSLError as exc:
        raise InputError(
            "CA bundle for TLS is not valid PEM", ca_file=cafile, error=str(exc)
        ) from None


def http_pool(options: SourceOptions) -> urllib3.PoolManager:
    """A connection pool that verifies TLS and never retries by itself (tenacity does)."""
    return urllib3.PoolManager(
        num_pools=4,
        maxsize=max(1, options.parallel),
        ssl_context=tls_context(options),
        retries=urllib3.Retry(
            total=None, connect=0, read=0, status=0, other=0, redirect=5, raise_on_status=False
        ),
        timeout=urllib3.Timeout(connect=options.connect_timeout_s, read=options.read_timeout_s),
    )


def _tls_refused(what: str, url: str, exc: BaseException) -> InfrastructureError:
    return InfrastructureError(
        f"{what}: TLS verification failed for {url}",
        url=url,
        error=str(exc),
        hint="the server's certificate is not trusted: pass its CA bundle (ca_file) or set "
        "REQUESTS_CA_BUNDLE / SSL_CERT_FILE",
    )


def _untrusted(reason: BaseException) -> bool:
    """A certificate the client refused (chain or name), as opposed to a broken transfer."""
    if isinstance(reason, urllib3.exceptions.SSLError) and reason.args:
        inner = reason.args[0]
        if isinstance(inner, BaseException):
            reason = inner
    return isinstance(reason, ssl.SSLCertVerificationError) or (
        isinstance(reason, urllib3.exceptions.SSLError | ssl.SSLError)
        and "CERTIFICATE_VERIFY_FAILED" in str(reason)
    )


def _translate_urllib3(exc: Exception, what: str, url: str) -> EvalrunError:
    reason: BaseException = exc
    if isinstance(exc, urllib3.exceptions.MaxRetryError) and exc.reason is not None:
        reason = exc.reason
    if _untrusted(reason):
        return _tls_refused(what, url, reason)
    if isinstance(reason, urllib3.exceptions.LocationParseError):
        return InputError(f"{what}: malformed URL", url=url, error=str(reason))
    return TransientInfrastructureError(f"{what}: cannot reach {url}", url=url, error=str(reason))


def _status_error(status: int, what: str, url: str) -> EvalrunError:
    if status >= 500 or status in _TRANSIENT_STATUS:
        return TransientInfrastructureError(f"{what}: HTTP {status} from {url}", url=url)
    if status in (401, 403):
        return InputError(
            f"{what}: access denied (HTTP {status}) at {url}",
            url=url,
            hint="https inputs must be readable without credentials (or presigned)",
        )
    if status in (404, 410):
        return InputError(f"{what}: not found (HTTP {status}) at {url}", url=url)
    if 400 <= status < 500:
        return InputError(f"{what}: refused (HTTP {status}) at {url}", url=url)
    return InfrastructureError(f"{what}: unexpected HTTP {status} from {url}", url=url)


_CONTENT_RANGE = re.compile(r"^bytes (\d+)-(\d+)/(\d+)$")


def _http_chunks(resp: urllib3.BaseHTTPResponse, what: str, url: str) -> Iterator[bytes]:
    try:
        yield from resp.stream(READ_CHUNK, decode_content=False)
    except (urllib3.exceptions.HTTPError, OSError) as exc:
        raise _translate_urllib3(exc, what, url) from exc
    finally:
        resp.release_conn()


def https_opener(pool: urllib3.PoolManager, uri: HttpsUri, *, what: str) -> Opener:
    """An :data:`Opener` for one HTTPS file: GET with ``Range`` when resuming."""
    url = uri.redacted

    def open_at(offset: int) -> ByteStream:
        headers = {"Accept-Encoding": "identity", "User-Agent": "evalrun"}
        if offset:
            headers["Range"] = f"bytes={offset}-"
        try:
            resp = pool.request(
                "GET", uri.url, headers=headers, preload_content=False, decode_content=False
            )
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise _translate_urllib3(exc, what, url) from exc
        if resp.status == 206 and offset:
            match = _CONTENT_RANGE.match(resp.headers.get("Content-Range", ""))
            if match and int(match.group(1)) == offset:
                return ByteStream(_http_chunks(resp, what, url), int(match.group(3)), offset)
            resp.release_conn()
            return open_at(0)  # an answer we cannot splice: start over
        if resp.status == 416 and offset:
            resp.release_conn()
            return open_at(0)
        if resp.status != 200:
            resp.drain_conn()
            resp.release_conn()
            raise _status_error(resp.status, what, url)
        length = resp.headers.get("Content-Length")
        total = int(length) if length and length.isdigit() else None
        return ByteStream(_http_chunks(resp, what, url), total, 0)

    return open_at


# ----------------------------------------------------------------------------- s3


def s3_endpoint(options: SourceOptions) -> str:
    """The S3 endpoint URL ``scheme://host[:port]`` the options select (see SourceOptions)."""
    env = options.env()
    endpoint = (
        options.s3_endpoint
        or env.get("AWS_ENDPOINT_URL_S3")
        or env.get("AWS_ENDPOINT_URL")
        or "https://s3.amazonaws.com"
    )
    parts = urllib.parse.urlsplit(endpoint if "://" in endpoint else f"https://{endpoint}")
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.path not in ("", "/"):
        raise InputError(
            "S3 endpoint must be http[s]://host[:port] without a path", endpoint=endpoint
        )
    return f"{parts.scheme}://{parts.netloc}"


def s3_client(options: SourceOptions) -> tuple[Minio, str]:
    """A MinIO SDK client for the configured endpoint, and that endpoint's URL.

    Credentials, first that works: ``$AWS_ACCESS_KEY_ID``/``$AWS_SECRET_ACCESS_KEY``
    (+ ``$AWS_SESSION_TOKEN``); the profile ``$AWS_PROFILE`` (default ``default``) of
    ``$AWS_SHARED_CREDENTIALS_FILE`` (default ``~/.aws/credentials``); IAM web identity or
    container credentials when their variables are set; else anonymous. A profile named
    explicitly in ``$AWS_PROFILE`` that cannot be read is an InputError, not anonymous.
    """
    env = options.env()
    endpoint = s3_endpoint(options)
    parts = urllib.parse.urlsplit(endpoint)
    region = options.s3_region or env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION")
    client = Minio(
        parts.netloc,
        secure=parts.scheme == "https",
        region=region or None,
        credentials=_s3_credentials(env),
        http_client=http_pool(options),
    )
    return client, endpoint


def _s3_credentials(env: Mapping[str, str]) -> Provider | None:
    access = env.get("AWS_ACCESS_KEY_ID") or env.get("AWS_ACCESS_KEY")
    secret = env.get("AWS_SECRET_ACCESS_KEY") or env.get("AWS_SECRET_KEY")
    if access and secret:
        return _StaticProvider(access, secret, env.get("AWS_SESSION_TOKEN") or None)
    home = env.get("HOME") or str(Path.home())
    filename = env.get("AWS_SHARED_CREDENTIALS_FILE") or str(Path(home) / ".aws" / "credentials")
    profile = env.get("AWS_PROFILE")
    config = AWSConfigProvider(filename=filename, profile=profile or "default")
    try:
        config.retrieve()
        return config
    except ValueError as exc:
        if profile:
            raise InputError(
                f"AWS_PROFILE={profile!r}: no usable credentials",
                credentials_file=filename,
                error=str(exc),
            ) from None
    if (
        env.get("AWS_WEB_IDENTITY_TOKEN_FILE")
        or env.get("AWS_CONTAINER_CREDENTIALS_RELATIVE_URI")
        or env.get("AWS_CONTAINER_CREDENTIALS_FULL_URI")
    ):
        return IamAwsProvider()
    return None  # anonymous: public buckets


_S3_NOT_FOUND = {"NoSuchKey", "NoSuchBucket", "ResourceNotFound"}
_S3_DENIED = {
    "AccessDenied",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "AllAccessDisabled",
    "ExpiredToken",
    "InvalidToken",
}


def _translate_s3(exc: Exception, what: str, source: str) -> EvalrunError:
    if isinstance(exc, S3Error):
        status = exc.response.status if exc.response is not None else 0
        if exc.code in _S3_NOT_FOUND:
            hint = None if source.endswith("/") else "a directory input's URI ends with '/'"
            return InputError(f"{what}: {source} not found ({exc.code})", uri=source, hint=hint)
        if exc.code in _S3_DENIED:
            return InputError(
                f"{what}: access to {source} denied ({exc.code})",
                uri=source,
                hint="set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE",
            )
        if status >= 500 or status in _TRANSIENT_STATUS or exc.code in ("SlowDown",):
            return TransientInfrastructureError(
                f"{what}: S3 error {exc.code} for {source}", uri=source
            )
        return InputError(f"{what}: S3 refused {source} ({exc.code}: {exc.message})", uri=source)
    if isinstance(exc, ServerError):
        return TransientInfrastructureError(
            f"{what}: S3 server error {exc.status_code} for {source}", uri=source
        )
    if isinstance(exc, InvalidResponseError):
        return TransientInfrastructureError(
            f"{what}: unexpected S3 answer for {source}", uri=source, error=str(exc)
        )
    if isinstance(exc, urllib3.exceptions.HTTPError | OSError):
        return _translate_urllib3(exc, what, source)
    if isinstance(exc, ValueError):
        return InputError(f"{what}: {exc}", uri=source)
    return InfrastructureError(f"{what}: S3 failure for {source}", uri=source, error=str(exc))


_S3_ERRORS = (MinioException, urllib3.exceptions.HTTPError, OSError, ValueError)


def s3_opener(
    client: Minio, bucket: str, key: str, *, total: int, what: str, source: str
) -> Opener:
    """An :data:`Opener` for one S3 object of known size (ranged GET when resuming)."""

    def chunks(resp: urllib3.BaseHTTPResponse) -> Iterator[bytes]:
        try:
            yield from resp.stream(READ_CHUNK, decode_content=False)
        except _S3_ERRORS as exc:
            raise _translate_s3(exc, what, source) from exc
        finally:
            resp.close()
            resp.release_conn()

    def open_at(offset: int) -> ByteStream:
        try:
            resp = client.get_object(bucket, key, offset=offset)
        except _S3_ERRORS as exc:
            raise _translate_s3(exc, what, source) from exc
        start = offset if resp.status == 206 else 0
        return ByteStream(chunks(resp), total, start)

    return open_at


class _Listed(NamedTuple):
    path: str
    key: str
    size: int


def _list_prefix(
    client: Minio, uri: S3Uri, *, what: str, options: SourceOptions, max_files: int
) -> list[_Listed]:
    def listing() -> list[_Listed]:
        found: list[_Listed] = []
        try:
            for obj in client.list_objects(uri.bucket, prefix=uri.key, recursive=True):
                key = obj.object_name or ""
                if key.endswith("/") and not obj.size:
                    continue  # a "folder" marker object, not a file
                rel = key[len(uri.key) :]
                try:
                    check_relative_path(rel)
                except ValueError as exc:
                    raise InputError(
                        f"{what}: object key escapes or is not a clean path ({exc}): {key!r}",
                        input=what,
                        entry=key,
                        uri=str(uri),
                    ) from None
                if len(found) >= max_files:
                    raise InputError(f"{what}: more than {max_files} objects under {uri}")
                found.append(_Listed(rel, key, int(obj.size or 0)))
        except _S3_ERRORS as exc:
            raise _translate_s3(exc, what, str(uri)) from exc
        return found

    found: list[_Listed] = call_with_retries(
        listing, what=f"{what}: listing {uri}", policy=options.retry_policy()
    )
    if not found:
        raise InputError(f"{what}: no objects under {uri}", input=what, uri=str(uri))
    return found


def _stat_s3(client: Minio, uri: S3Uri, *, what: str, options: SourceOptions) -> int:
    def stat() -> int:
        try:
            return int(client.stat_object(uri.bucket, uri.key).size or 0)
        except _S3_ERRORS as exc:
            raise _translate_s3(exc, what, str(uri)) from exc

    size: int = call_with_retries(stat, what=f"{what}: {uri}", policy=options.retry_policy())
    return size


# ----------------------------------------------------------------------------- oci


@dataclass(frozen=True)
class RemoteListing:
    """What an OCI resolver found: the files of the artifact and a way to read each."""

    kind: Literal["file", "directory"]
    files: tuple[InputFile, ...]
    """Every file: its path (the layer's title), sha256 (the layer digest) and size."""
    open_file: Callable[[InputFile, int], ByteStream]
    """``open_file(entry, offset)`` streams one file's bytes from ``offset``."""


OciResolver = Callable[[OciUri], RemoteListing]
"""Plug-in for ``oci://`` inputs (owned by the registry client). Given the reference,
it fetches the manifest *by its digest* (verifying it), and returns a
:class:`RemoteListing` (one file for kind ``file``). It transfers no blob itself:
:func:`acquire` checks the listing against the pinned digest first, then streams only
the blobs missing from the cache through ``open_file``, verifying every byte. Raise
:class:`~runner.errors.TransientInfrastructureError` for retryable failures, InputError
for a missing artifact, InfrastructureError otherwise."""


# ----------------------------------------------------------------------------- acquire


class AcquiredInput(_Frozen):
    """A verified input in the cache: what it is, where it came from, where it is now."""

    kind: Literal["file", "directory"]
    source: str = Field(
        description="Local path relative to the spec dir, https URL (no query), "
        "s3://bucket/key or oci://registry/repo@digest."
    )
    endpoint: str | None = Field(default=None, description="S3 endpoint URL (s3 only).")
    digest: str = Field(
        pattern=r"^sha256:[0-9a-f]{64}$",
        description="File: sha256 of its bytes. Directory: evalrun-input-tree/v1 digest.",
    )
    size: int = Field(ge=0, description="Total bytes (all files).")
    files: tuple[InputFile, ...] = Field(description="Every file; one entry for a file input.")
    path: Path = Field(description="The verified blob or read-only tree in the cache.")

    @property
    def sha256(self) -> str:
        """The digest's hex (a file's sha256 as ``LockedArtifact.sha256`` records it)."""
        return self.digest.removeprefix("sha256:")


def acquire(
    uri: str,
    expected: str,
    *,
    field: str,
    spec_dir: Path,
    store: ContentStore,
    progress: Progress | None = None,
    options: SourceOptions | None = None,
    oci: OciResolver | None = None,
) -> AcquiredInput:
    """Fetch (if needed), verify and cache one input; return where its verified bytes are.

    ``uri`` is the input URI, ``expected`` its pinned digest (``<hex>`` or ``sha256:<hex>``:
    a file's sha256, or a directory's tree digest), ``field`` names it in every error
    (``model``, ``datasets[0] (digits)``). Relative paths resolve against ``spec_dir``.
    ``progress(done, total)`` is called as bytes are hashed or transferred. ``oci``
    resolves ``oci://`` inputs; without it they are refused. Errors: see module docs.
    """
    options = options or SourceOptions()
    parsed = parse_input_uri(uri, field=f"{field}.uri")
    want = parse_expected_digest(expected, field=f"{field}.sha256")
    meter = _Meter(progress, None)
    if isinstance(parsed, LocalUri):
        return _acquire_local(
            parsed, want, field=field, spec_dir=spec_dir, store=store, meter=meter
        )
    if isinstance(parsed, HttpsUri):
        return _acquire_https(parsed, want, field=field, store=store, meter=meter, options=options)
    if isinstance(parsed, S3Uri):
        return _acquire_s3(parsed, want, field=field, store=store, meter=meter, options=options)
    return _acquire_oci(
        parsed, want, field=field, store=store, meter=meter, options=options, oci=oci
    )


def _mismatch(field: str, want: str, found: str, source: str, hint: str) -> DigestMismatch:
    return DigestMismatch(field, expected=want, found=found, path=source, hint=hint)


def _file_result(
    store: ContentStore, want: str, *, name: str, source: str, endpoint: str | None = None
) -> AcquiredInput:
    path = store.blob_path(want)
    size = path.stat().st_size
    hexd = want.removeprefix("sha256:")
    entry = InputFile(path=safe_file_name(name), sha256=hexd, size=size)
    return AcquiredInput(
        kind="file",
        source=source,
        endpoint=endpoint,
        digest=want,
        size=size,
        files=(entry,),
        path=path,
    )


def _tree_result(
    store: ContentStore,
    want: str,
    files: Sequence[InputFile],
    *,
    source: str,
    endpoint: str | None = None,
) -> AcquiredInput:
    return AcquiredInput(
        kind="directory",
        source=source,
        endpoint=endpoint,
        digest=want,
        size=sum(f.size for f in files),
        files=tuple(files),
        path=store.tree_path(want),
    )


def _acquire_local(
    uri: LocalUri, want: str, *, field: str, spec_dir: Path, store: ContentStore, meter: _Meter
) -> AcquiredInput:
    path = uri.resolve(spec_dir)
    source = Path(os.path.relpath(path, spec_dir)).as_posix()
    hint = (
        "the input changed since its digest was pinned; check its origin (if you changed "
        "it, `evalrun lock --refresh-pins` sets the pin to what it is now)"
    )
    if path.is_dir():
        tree = scan_tree(path, what=field)
        meter.grow(tree.size)
        meter.advance(tree.size)
        if tree.digest != want:
            raise _mismatch(
                field,
                want,
                tree.digest,
                str(path),
                hint + " (a directory is pinned by its evalrun-input-tree/v1 digest)",
            )
        if store.tree_files(want) is None:
            unique = {f.sha256: f for f in tree.files if not store.has_blob(f.sha256)}
            meter.grow(sum(f.size for f in unique.values()))
            for f in unique.values():
                # Verified by content, so a path swapped since the scan cannot smuggle bytes in.
                store.put_file(
                    path.joinpath(*f.path.split("/")),
                    what=f"{field}: {f.path}",
                    expected=f.sha256,
                    on_bytes=meter.advance,
                )
            store.materialize_tree(tree.files, what=field)
        return _tree_result(store, want, tree.files, source=source)
    if path.is_file():
        try:
            found, size = hash_file(path)
        except OSError as exc:
            raise InputError(f"{field}: cannot read input file ({exc})", path=str(path)) from None
        meter.grow(size)
        meter.advance(size)
        if f"sha256:{found}" != want:
            raise _mismatch(field, want, f"sha256:{found}", str(path), hint)
        if not store.has_blob(want):
            meter.grow(size)
            store.put_file(path, what=field, expected=want, on_bytes=meter.advance)
        return _file_result(store, want, name=Path(uri.path).name, source=source)
    if path.exists():
        raise InputError(f"{field}: not a regular file or directory", path=str(path))
    raise InputError(f"{field}: input not found", path=str(path), uri=uri.path)


def _fetch_blob(
    store: ContentStore,
    want: str,
    open_at: Opener,
    *,
    what: str,
    source: str,
    options: SourceOptions,
    meter: _Meter,
) -> None:
    with store.filling(want):
        if store.has_blob(want):
            return
        with store.writer(what=what, expected=want) as writer:
            try:
                stream_into(writer, open_at, what=what, source=source, options=options, meter=meter)
                writer.commit()
            except DigestMismatch as exc:
                exc.fields.setdefault("path", source)
                raise


def _acquire_https(
    uri: HttpsUri,
    want: str,
    *,
    field: str,
    store: ContentStore,
    meter: _Meter,
    options: SourceOptions,
) -> AcquiredInput:
    if not store.has_blob(want):
        log.info(
            "fetching input", extra={"event": "input.fetch", "input": field, "url": uri.redacted}
        )
        opener = https_opener(http_pool(options), uri, what=field)
        _fetch_blob(
            store, want, opener, what=field, source=uri.redacted, options=options, meter=meter
        )
    return _file_result(store, want, name=uri.name, source=uri.redacted)


def _acquire_s3(
    uri: S3Uri,
    want: str,
    *,
    field: str,
    store: ContentStore,
    meter: _Meter,
    options: SourceOptions,
) -> AcquiredInput:
    source = str(uri)
    if not uri.is_prefix:
        if store.has_blob(want):
            return _file_result(
                store,
                want,
                name=uri.key.rsplit("/", 1)[-1],
                source=source,
                endpoint=s3_endpoint(options),
            )
        client, endpoint = s3_client(options)
        size = _stat_s3(client, uri, what=field, options=options)
        meter.grow(size)
        opener = s3_opener(client, uri.bucket, uri.key, total=size, what=field, source=source)
        _fetch_blob(store, want, opener, what=field, source=source, options=options, meter=meter)
        return _file_result(
            store, want, name=uri.key.rsplit("/", 1)[-1], source=source, endpoint=endpoint
        )
    cached = store.tree_files(want)
    if cached is not None:
        return _tree_result(store, want, cached, source=source, endpoint=s3_endpoint(options))
    client, endpoint = s3_client(options)
    with store.filling(want):
        cached = store.tree_files(want)
        if cached is None:
            cached = _fetch_s3_tree(
                client, uri, want, field=field, store=store, meter=meter, options=options
            )
    return _tree_result(store, want, cached, source=source, endpoint=endpoint)


def _fetch_s3_tree(
    client: Minio,
    uri: S3Uri,
    want: str,
    *,
    field: str,
    store: ContentStore,
    meter: _Meter,
    options: SourceOptions,
) -> tuple[InputFile, ...]:
    """Stage every object (digests unknown until read), check the tree, then publish."""
    listed = _list_prefix(client, uri, what=field, options=options, max_files=200_000)
    meter.grow(sum(item.size for item in listed))
    writers: list[BlobWriter] = []
    lock = threading.Lock()

    def one(item: _Listed) -> InputFile:
        writer = store.writer(what=f"{field}: {item.path}")
        with lock:
            writers.append(writer)
        source = f"s3://{uri.bucket}/{item.key}"
        opener = s3_opener(client, uri.bucket, item.key, total=item.size, what=field, source=source)
        stream_into(writer, opener, what=field, source=source, options=options, meter=meter)
        return InputFile(path=item.path, sha256=writer.seal(), size=writer.size)

    try:
        pool = ThreadPoolExecutor(max_workers=max(1, options.parallel))
        try:
            files = list(pool.map(one, listed))
        finally:
            pool.shutdown(wait=True, cancel_futures=True)  # a failure stops the rest
        tree = make_tree(files)
        if tree.digest != want:
            raise _mismatch(
                field,
                want,
                tree.digest,
                str(uri),
                "the objects under the prefix are not the pinned directory; nothing was cached",
            )
        for writer in writers:
            writer.commit()
    finally:
        for writer in writers:
            writer.discard()
    store.materialize_tree(tree.files, what=field)
    return tree.files


def _acquire_oci(
    uri: OciUri,
    want: str,
    *,
    field: str,
    store: ContentStore,
    meter: _Meter,
    options: SourceOptions,
    oci: OciResolver | None,
) -> AcquiredInput:
    source = str(uri)
    # The name of a file input comes from the URI alone, so a cache hit locks the same.
    name = uri.repository.rsplit("/", 1)[-1]
    cached = store.tree_files(want)
    if cached is not None:
        return _tree_result(store, want, cached, source=source)
    if store.has_blob(want):
        return _file_result(store, want, name=name, source=source)
    if oci is None:
        raise InputError(
            f"{field}: oci:// inputs need the registry client, which this command lacks",
            field=field,
            uri=source,
        )
    listing = oci(uri)
    if listing.kind == "file":
        if len(listing.files) != 1:
            raise InputError(
                f"{field}: {source} is a file artifact with {len(listing.files)} files"
            )
        found = f"sha256:{listing.files[0].sha256}"
    else:
        try:
            found = tree_digest(listing.files)
        except ValueError as exc:
            raise InputError(f"{field}: {source} lists its files badly ({exc})") from None
    if found != want:
        raise _mismatch(field, want, found, source, "the artifact is not the pinned input")
    missing = {f.sha256: f for f in listing.files if not store.has_blob(f.sha256)}
    meter.grow(sum(f.size for f in missing.values()))
    for entry in missing.values():
        _fetch_blob(
            store,
            f"sha256:{entry.sha256}",
            functools.partial(listing.open_file, entry),
            what=f"{field}: {entry.path}",
            source=source,
            options=options,
            meter=meter,
        )
    if listing.kind == "file":
        return _file_result(store, want, name=name, source=source)
    store.materialize_tree(listing.files, what=field)
    return _tree_result(store, want, listing.files, source=source)


__all__ = [
    "AcquiredInput",
    "ByteStream",
    "HttpsUri",
    "InputUri",
    "LocalUri",
    "OciResolver",
    "OciUri",
    "Progress",
    "RemoteListing",
    "S3Uri",
    "SourceOptions",
    "acquire",
    "parse_expected_digest",
    "parse_input_uri",
]

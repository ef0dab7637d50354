"""The contract every input source keeps: options, byte streams, resumable transfer, results.

A source kind turns its URI into an :data:`Opener` (``open_at(offset)`` → :class:`ByteStream`);
:func:`stream_into` fills a cache writer from it, resuming after transient failures
under a fresh tenacity policy, bounded by :attr:`SourceOptions.max_file_bytes`;
:func:`fetch_blob` does that for one blob pinned by its digest, at most once at a time.
What a source hands back is an :class:`AcquiredInput`: a verified blob or read-only tree
in the content-addressed cache (:func:`file_result`, :func:`tree_result`), or a
:class:`~runner.errors.DigestMismatch` (:func:`digest_mismatch`) and nothing cached.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, NamedTuple

from pydantic import BaseModel, ConfigDict, Field
from tenacity import Retrying

from runner._internal.cas import BlobWriter, ContentStore
from runner._internal.input_tree import (
    InputFile,
)
from runner._internal.retry import call_with_retries, transient_policy
from runner.errors import (
    DigestMismatch,
    InfrastructureError,
    InputError,
    TransientInfrastructureError,
)
from runner.model.input_uri import (
    safe_file_name,
)

Progress = Callable[[int, int | None], None]
"""``progress(done_bytes, total_bytes)``; total is None while unknown and may grow once
(a local input is hashed, then the bytes missing from the cache are copied in)."""


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


class Meter:
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
    meter: Meter | None = None,
) -> None:
    """Fill ``writer`` from ``open_at``, resuming after transient failures.

    Each retry resumes at the bytes already written when the server honours ``Range``
    (otherwise it starts over). Retries follow ``options.retry_policy``; a transfer that
    made progress before the policy gave up gets a fresh policy, at most
    ``options.max_restarts`` times. Still failing → InfrastructureError naming ``source``.
    """
    meter = meter or Meter(None, None)

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


def digest_mismatch(field: str, want: str, found: str, source: str, hint: str) -> DigestMismatch:
    """The error for bytes that are not the pinned input (nothing was cached)."""
    return DigestMismatch(field, expected=want, found=found, path=source, hint=hint)


def file_result(
    store: ContentStore, want: str, *, name: str, source: str, endpoint: str | None = None
) -> AcquiredInput:
    """The :class:`AcquiredInput` of the cached blob ``want``, named ``name``."""
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


def tree_result(
    store: ContentStore,
    want: str,
    files: Sequence[InputFile],
    *,
    source: str,
    endpoint: str | None = None,
) -> AcquiredInput:
    """The :class:`AcquiredInput` of the cached read-only tree ``want``."""
    return AcquiredInput(
        kind="directory",
        source=source,
        endpoint=endpoint,
        digest=want,
        size=sum(f.size for f in files),
        files=tuple(files),
        path=store.tree_path(want),
    )


def fetch_blob(
    store: ContentStore,
    want: str,
    open_at: Opener,
    *,
    what: str,
    source: str,
    options: SourceOptions,
    meter: Meter,
) -> None:
    """Fetch the blob ``want`` through ``open_at`` into the cache (a no-op if it is there)."""
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

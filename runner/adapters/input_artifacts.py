"""Inputs as OCI artifacts in a registry: publish a cached input by digest, read one back.

:func:`publish_input` pushes a verified input from the content-addressed cache as the
artifact :mod:`runner._internal.input_artifact` describes (one tar layer per file, or
packs of small files when an input has many),
skipping every blob the repository already holds; the same input always gives the
same manifest digest, so a second publish sends nothing. :func:`oci_resolver` is the
``oci://`` plug-in of :func:`runner.adapters.sources.acquire`: it fetches a manifest
by its digest (checking it), lists the files, and streams each file out of its layer
while checking the layer's exact tar framing and its digest; the cache checks every
file's sha256 as the bytes arrive. A blob altered in the registry is a
:class:`~runner.errors.DigestMismatch` (exit 3) and nothing is cached; a registry that
stays unreachable after bounded retries is an InfrastructureError (exit 5).
"""

from __future__ import annotations

import hashlib
import io
import logging
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from runner._internal.cas import ContentStore
from runner._internal.input_artifact import (
    MANIFEST_TYPE,
    MAX_MANIFEST_BYTES,
    Layer,
    MemberLayout,
    build_artifact,
    group_files,
    layer_layout,
    members_layout,
    parse_manifest,
    sha256_digest,
)
from runner._internal.input_tree import READ_CHUNK, InputFile
from runner.adapters import registry, registry_blobs, registry_stream
from runner.adapters.registry import ImageName
from runner.adapters.sources import ByteStream, OciResolver, OciUri, Progress, RemoteListing
from runner.errors import DigestMismatch, InputError, IntegrityError, TransientRegistryError

log = logging.getLogger("evalrun.inputs")

INPUTS_SUFFIX = "-inputs"
_LAYER_MEMO = "oci-layer-v1"


def inputs_repository(image_repository: str) -> ImageName:
    """Where a spec's inputs are published: the image's repository + ``-inputs``."""
    return ImageName.parse(image_repository + INPUTS_SUFFIX)


@dataclass(frozen=True)
class PublishedInput:
    """Where an input was published, and what that cost."""

    reference: str
    """``registry/repository@sha256:…`` of the artifact's manifest."""
    uploaded_bytes: int
    already_present: bool


# --------------------------------------------------------------------------- publish


def _layer_parts(store: ContentStore, files: Sequence[InputFile]) -> list[bytes | Path]:
    """A layer's bytes in order: each member's header, cached blob and padding, then the end."""
    members, size = members_layout(files)
    parts: list[bytes | Path] = []
    for member in members:
        parts += [member.header, store.blob_path(member.file.sha256), member.pad]
    parts.append(b"\0" * (size - members[-1].end))
    return parts


def layer_of(store: ContentStore, files: InputFile | Sequence[InputFile]) -> Layer:
    """The layer cached file(s) are published as (its digest computed once, then remembered)."""
    group = (files,) if isinstance(files, InputFile) else tuple(files)
    _, size = members_layout(group)
    memo = "\n".join(f"{f.path}\n{f.sha256}\n{f.size}" for f in group)
    key = hashlib.sha256(memo.encode()).hexdigest()
    members = group if len(group) > 1 else ()
    remembered = store.recall(_LAYER_MEMO, key)
    if remembered and remembered.startswith("sha256:") and len(remembered) == 71:
        return Layer(group[0], remembered, size, members=members)
    h = hashlib.sha256()
    for part in _layer_parts(store, group):
        if isinstance(part, bytes):
            h.update(part)
            continue
        with part.open("rb") as blob:
            while chunk := blob.read(READ_CHUNK):
                h.update(chunk)
    digest = "sha256:" + h.hexdigest()
    store.remember(_LAYER_MEMO, key, digest)
    return Layer(group[0], digest, size, members=members)


class _LayerReader(io.RawIOBase):
    """The bytes of one layer, read from the cached blobs: headers, contents, padding, end."""

    def __init__(self, parts: list[bytes | Path], on_bytes: Callable[[int], None]) -> None:
        self._parts: list[bytes | io.FileIO | Path] = list(parts)
        self._on_bytes = on_bytes

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        view = memoryview(buffer).cast("B")
        while self._parts:
            part = self._parts[0]
            if isinstance(part, Path):  # opened when reached: a pack has many blobs
                part = self._parts[0] = io.FileIO(part, "rb")
            if isinstance(part, bytes):
                if not part:  # no padding after a file of whole blocks: 0 would mean EOF
                    self._parts.pop(0)
                    continue
                n = min(len(view), len(part))
                view[:n] = part[:n]
                rest = part[n:]
                if rest:
                    self._parts[0] = rest
                else:
                    self._parts.pop(0)
            else:
                n = part.readinto(view) or 0
                if n == 0:
                    part.close()
                    self._parts.pop(0)
                    continue
            self._on_bytes(n)
            return n
        return 0

    def close(self) -> None:
        for part in self._parts:
            if isinstance(part, io.FileIO):
                part.close()
        self._parts = []
        super().close()


@dataclass
class _UploadMeter:
    progress: Progress | None
    total: int = 0
    done: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, n: int) -> None:
        if self.progress is not None:
            with self._lock:
                self.done += n
                self.progress(self.done, self.total)


def publish_input(
    store: ContentStore,
    repository: ImageName,
    *,
    kind: Literal["file", "directory"],
    digest: str,
    files: Sequence[InputFile],
    annotations: Mapping[str, str],
    progress: Progress | None = None,
) -> PublishedInput:
    """Publish the cached input (every file's blob must be in ``store``); idempotent.

    ``digest`` is the input's digest (``sha256:…``: file sha256 or tree digest);
    ``annotations`` name it (role, name, and a dataset's split, license, source).
    ``progress(done, total)`` follows the bytes uploaded. Registry failures after
    bounded retries raise InfrastructureError (exit 5).
    """
    layers = [layer_of(store, group) for group in group_files(files)]
    artifact = build_artifact(kind, digest, layers, annotations)
    if len(artifact.manifest) > MAX_MANIFEST_BYTES:
        raise InputError(
            f"input {digest} has {len(files)} files: its artifact's manifest would be "
            f"{len(artifact.manifest)} bytes, over the registry's {MAX_MANIFEST_BYTES}",
            hint="ship many small files as a few archives or shards (tar, parquet, "
            "webdataset) inside the input directory",
        )
    reference = f"{repository}@{artifact.digest}"
    if registry.manifest_exists(repository, artifact.digest):
        return PublishedInput(reference, 0, already_present=True)
    meter = _UploadMeter(progress, total=sum(layer.size for layer in artifact.layers))
    uploaded = 0
    for layer in artifact.layers:
        parts = _layer_parts(store, layer.files)
        started = meter.done

        def open_stream(
            parts: list[bytes | Path] = parts, start: int = started
        ) -> io.BufferedReader:
            meter.add(start - meter.done)  # a retry starts this layer over
            return io.BufferedReader(_LayerReader(parts, meter.add), READ_CHUNK)

        how = registry_stream.push_blob_stream(repository, layer.digest, layer.size, open_stream)
        if how == "uploaded":
            uploaded += layer.size
        else:
            meter.add(layer.size)
    registry_blobs.put_blob_bytes(repository, artifact.config_digest, artifact.config)
    pushed = registry.put_manifest(repository, artifact.digest, artifact.manifest, MANIFEST_TYPE)
    if pushed != artifact.digest:
        raise IntegrityError(
            "the registry stored the input artifact under another digest",
            repository=str(repository),
            expected=artifact.digest,
            found=pushed,
        )
    log.info(
        "input published",
        extra={"event": "input.published", "reference": reference, "uploaded": uploaded},
    )
    return PublishedInput(reference, uploaded, already_present=False)


# --------------------------------------------------------------------------- read back


@dataclass
class _LayerProgress:
    """How far the layer hash has followed the file bytes handed out so far."""

    hasher: hashlib._Hash | None = None
    fed: int = 0


def _not_as_published(where: str, layer: Layer, problem: str) -> IntegrityError:
    """A layer's bytes are not the tar evalrun published (exit 3)."""
    return IntegrityError(
        f"{where}: {problem}",
        layer=layer.digest,
        hint="the registry does not hold what was published; re-publish with "
        "`evalrun lock` from the original input",
    )


def _layer_stream(
    name: ImageName, layer: Layer, offset: int, state: _LayerProgress, source: str
) -> ByteStream:
    """The file's bytes from ``offset``, out of its layer, framing and digest checked."""
    if layer.raw:  # an oras file: the blob is the file; the cache checks its sha256
        raw = registry_stream.stream_blob(name, layer.digest, start=offset)
        return ByteStream(raw.chunks, raw.total, raw.start)
    layout = layer_layout(layer.file.path, layer.file.size)
    head, size = len(layout.header), layer.file.size
    resume = offset > 0 and state.hasher is not None and state.fed == offset
    opened = registry_stream.stream_blob(name, layer.digest, start=head + offset if offset else 0)
    if opened.start == 0 or not resume:
        state.hasher = hashlib.sha256() if opened.start == 0 else None
        state.fed = 0
    content_start = max(0, opened.start - head)

    def refuse(problem: str) -> IntegrityError:
        return _not_as_published(f"layer of {layer.file.path} in {source}", layer, problem)

    def chunks() -> Iterator[bytes]:
        pos = opened.start
        for chunk in opened.chunks:
            view = memoryview(chunk)
            while view:
                if pos < head:
                    take = view[: head - pos]
                    if bytes(take) != layout.header[pos : pos + len(take)]:
                        raise refuse("its tar header is not evalrun's for this file")
                elif pos < head + size:
                    take = view[: head + size - pos]
                else:
                    take = view[: layout.blob_size - pos]
                    if not take:
                        raise refuse("more bytes than the layer's size")
                    if (
                        bytes(take)
                        != layout.tail[pos - head - size : pos - head - size + len(take)]
                    ):
                        raise refuse("its tar end is not evalrun's")
                if state.hasher is not None:
                    state.hasher.update(take)
                if head <= pos < head + size:
                    state.fed = pos - head + len(take)
                    yield bytes(take)
                pos += len(take)
                view = view[len(take) :]
        if pos < layout.blob_size:
            raise TransientRegistryError(
                f"layer of {layer.file.path} ended at byte {pos} of {layout.blob_size}",
                registry=name.registry,
                repository=name.repository,
            )
        if state.hasher is not None:
            found = "sha256:" + state.hasher.hexdigest()
            if found != layer.digest:
                raise DigestMismatch(
                    f"{source}: layer of {layer.file.path}",
                    expected=layer.digest,
                    found=found,
                    hint="the blob was altered in the registry after it was published",
                )

    return ByteStream(chunks(), size, content_start)


def _member_stream(
    name: ImageName, layer: Layer, member: MemberLayout, offset: int, source: str
) -> ByteStream:
    """One file's bytes from ``offset``, out of a pack layer, its tar framing checked.

    Ranged from the member's header (or the resume point), so a pack is never fetched
    whole for one file; the layer's digest is not recomputed (that needs the whole blob):
    the file's sha256, from the manifest pinned by digest, is what the cache checks.
    """
    size = member.file.size
    want = member.content_start + offset if offset else member.offset
    opened = registry_stream.stream_blob(name, layer.digest, start=want)
    begin, content, end = member.offset, member.content_start, member.content_start + size
    skip_to = want if opened.start == want else begin

    def refuse(problem: str) -> IntegrityError:
        where = f"pack layer holding {member.file.path} in {source}"
        return _not_as_published(where, layer, problem)

    def chunks() -> Iterator[bytes]:
        pos = opened.start
        for chunk in opened.chunks:
            view = memoryview(chunk)
            while view and pos < member.end:
                if pos < skip_to:
                    take = view[: skip_to - pos]
                elif pos < content:
                    take = view[: content - pos]
                    if bytes(take) != member.header[pos - begin : pos - begin + len(take)]:
                        raise refuse("its tar header is not evalrun's for this file")
                elif pos < end:
                    take = view[: end - pos]
                    yield bytes(take)
                else:
                    take = view[: member.end - pos]
                    if any(take):
                        raise refuse("the padding after the file is not zeros")
                pos += len(take)
                view = view[len(take) :]
            if pos >= member.end:
                break
        if pos < member.end:
            raise TransientRegistryError(
                f"pack layer holding {member.file.path} ended at byte {pos} of {member.end}",
                registry=name.registry,
                repository=name.repository,
            )

    return ByteStream(chunks(), size, max(0, min(skip_to, end) - content))


def resolve_artifact(uri: OciUri) -> RemoteListing:
    """The files of the input artifact ``uri`` (manifest fetched by digest and checked)."""
    name = ImageName(uri.registry, uri.repository)
    source = str(uri)
    found = registry.find_manifest(name, uri.digest)
    if found is None:
        raise InputError(
            f"{source} is not in its registry",
            hint="the input artifact was deleted; publish it again with `evalrun lock`",
        )
    body = found[1]
    if sha256_digest(body) != uri.digest:
        raise DigestMismatch(
            f"{source}: manifest",
            expected=uri.digest,
            found=sha256_digest(body),
            hint="the registry answered with another manifest than the one pinned",
        )
    try:
        listing = parse_manifest(body)
    except ValueError as exc:
        raise InputError(f"{source} is not an input artifact: {exc}") from None
    by_path = {layer.file.path: layer for layer in listing.layers if not layer.packed}
    in_pack = {
        member.file.path: (layer, member)
        for layer in listing.layers
        if layer.packed
        for member in members_layout(layer.members)[0]
    }
    states: dict[str, _LayerProgress] = {}
    lock = threading.Lock()

    def open_file(entry: InputFile, offset: int) -> ByteStream:
        if entry.path in in_pack:
            layer, member = in_pack[entry.path]
            return _member_stream(name, layer, member, offset, source)
        with lock:
            state = states.setdefault(entry.path, _LayerProgress())
        return _layer_stream(name, by_path[entry.path], offset, state, source)

    return RemoteListing(
        kind=listing.kind,
        files=tuple(f for layer in listing.layers for f in layer.files),
        open_file=open_file,
    )


def oci_resolver() -> OciResolver:
    """The ``oci://`` plug-in for :func:`runner.adapters.sources.acquire`."""
    return resolve_artifact


__all__ = [
    "PublishedInput",
    "inputs_repository",
    "layer_of",
    "oci_resolver",
    "publish_input",
    "resolve_artifact",
]

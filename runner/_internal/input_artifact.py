"""An input published as an OCI artifact: its layers, config and manifest, as pure functions.

Every locked input (a file or a directory) is published by digest in the registry
that holds the evaluation image (repository ``<image repository>-inputs``), so any
machine can fetch it by digest and a Kubernetes node can mount it as an image volume.
The shape:

* an OCI image manifest (``application/vnd.oci.image.manifest.v1+json``) with
  ``artifactType`` :data:`ARTIFACT_TYPE`;
* one layer per file, in path order (an input of more than :data:`MAX_LAYERS` files
  packs them, below): an uncompressed tar
  (``application/vnd.oci.image.layer.v1.tar``) holding only that file at its path
  relative to the input's root, mode 0444, uid/gid 0, mtime 0 (the header of
  :func:`runner.shared.tarformat.file_header`), then zero padding and the two zero
  end blocks. Annotations: ``org.opencontainers.image.title`` = the path (what
  ``oras pull`` names the layer), :data:`FILE_SHA256` and :data:`FILE_SIZE` = the
  file's own sha256 and size. The layer's bytes are a pure function of
  (path, content), so publishing the same input twice uploads nothing;
* a config that is an OCI *image* config (``rootfs.diff_ids`` = the layer digests,
  since the layers are uncompressed), not the empty descriptor: containerd's image
  volumes unpack only manifests whose config lists the layers' diff ids
  (containerd/containerd#11907). ``os``/``architecture`` are fixed (``linux``/
  ``amd64``): the spec requires them and data has no platform;
* manifest annotations: the input's kind and digest (:data:`INPUT_KIND`,
  :data:`INPUT_DIGEST`) plus role, name and, for datasets, split, license, source.

**Packs.** Each layer is one overlay lower directory when a node mounts the artifact, and
a mount of ~450 fails (docs/data.md), so an input of more than :data:`MAX_LAYERS` files
is published in at most :data:`MAX_LAYERS` layers (:func:`group_files`): a file of at
least 1/:data:`PACK_TARGET` of the input's bytes keeps its own layer as above; runs of
smaller files, in path order, share a *pack* layer: the same tar members one after the
other (each header, content, zero padding), then the two end blocks. A pack's title is
``.evalrun-pack-<12 hex of its digest>.tar`` and :data:`PACK_FILES` lists its members
(``[[path, sha256, size], …]``, canonical JSON). Inputs of at most :data:`MAX_LAYERS`
files are published exactly as before packs existed.

Mounted (image volume) or unpacked, the artifact gives back the input's tree, and a
file input gives ``<mount>/<file name>``. Reading one back (:func:`parse_manifest`)
also accepts files pushed by ``oras push`` (a raw blob per file, named by its title).
"""

from __future__ import annotations

import hashlib
import json
import tarfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from runner._internal.input_tree import InputFile, check_relative_path, sorted_files
from runner._internal.oci import Descriptor
from runner._internal.strict_json import load_json_strict
from runner.shared.tarformat import file_header

ARTIFACT_TYPE = "application/vnd.evalrun.input.v1"
MANIFEST_TYPE = "application/vnd.oci.image.manifest.v1+json"
CONFIG_TYPE = "application/vnd.oci.image.config.v1+json"
LAYER_TYPE = "application/vnd.oci.image.layer.v1.tar"
TITLE = "org.opencontainers.image.title"
FILE_SHA256 = "org.evalrun.file.sha256"
FILE_SIZE = "org.evalrun.file.size"
INPUT_KIND = "org.evalrun.input.kind"
INPUT_DIGEST = "org.evalrun.input.digest"
INPUT_PREFIX = "org.evalrun.input."
PACK_FILES = "org.evalrun.pack.files"
MAX_LAYERS = 127
"""Most layers in one input artifact (a node mounts each as an overlay lower dir)."""
PACK_TARGET = 60
"""Bytes share per layer when packing: with it, big files plus packs stay ≤ 121 layers."""
FILE_MODE = 0o444
MAX_MANIFEST_BYTES = 4 << 20
"""What a registry keeps as one manifest (distribution's default limit)."""

_BLOCK = 512
_END = b"\0" * (2 * _BLOCK)


class AnnotatedDescriptor(Descriptor):
    """A layer's descriptor with its annotations (the file, or the pack of small files)."""

    annotations: dict[str, str]


@dataclass(frozen=True)
class LayerLayout:
    """The bytes around one file in its layer: ``header + content + tail``."""

    path: str
    size: int
    header: bytes
    tail: bytes

    @property
    def blob_size(self) -> int:
        """The layer's length in bytes."""
        return len(self.header) + self.size + len(self.tail)


def layer_layout(path: str, size: int) -> LayerLayout:
    """The deterministic tar around a file of ``size`` bytes at ``path`` (see module docs)."""
    info = file_header(check_relative_path(path), size)
    info.mode = FILE_MODE
    header = info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")
    return LayerLayout(path, size, header, b"\0" * (-size % _BLOCK) + _END)


@dataclass(frozen=True)
class MemberLayout:
    """Where one file sits in a (pack) layer: ``header + content + pad`` from ``offset``."""

    file: InputFile
    offset: int
    header: bytes
    pad: bytes

    @property
    def content_start(self) -> int:
        return self.offset + len(self.header)

    @property
    def end(self) -> int:
        """Just past its padding: where the next member (or the end blocks) begins."""
        return self.content_start + self.file.size + len(self.pad)


def members_layout(files: Sequence[InputFile]) -> tuple[tuple[MemberLayout, ...], int]:
    """Each file's place in a layer of ``files`` (in this order), and the layer's size.

    For one file this is exactly :func:`layer_layout`'s bytes.
    """
    members = []
    offset = 0
    for f in files:
        one = layer_layout(f.path, f.size)
        member = MemberLayout(f, offset, one.header, b"\0" * (-f.size % _BLOCK))
        members.append(member)
        offset = member.end
    return tuple(members), offset + len(_END)


def group_files(files: Sequence[InputFile]) -> list[tuple[InputFile, ...]]:
    """The files of an input as layers: one each up to :data:`MAX_LAYERS` files, else packed.

    Pure and deterministic (path order): a file of at least 1/:data:`PACK_TARGET` of the
    bytes keeps its own layer, runs of smaller ones fill packs of about that share. Each
    big file or size-closed pack takes ≥ one share (≤ PACK_TARGET of them) and every other
    pack ends at a big file or the end (≤ PACK_TARGET + 1): at most 2·PACK_TARGET + 1.
    """
    ordered = sorted_files(files)
    if len(ordered) <= MAX_LAYERS:
        return [(f,) for f in ordered]
    share = max(1, -(-sum(f.size for f in ordered) // PACK_TARGET))
    groups: list[tuple[InputFile, ...]] = []
    current: list[InputFile] = []
    filled = 0
    for f in ordered:
        if f.size >= share:
            if current:
                groups.append(tuple(current))
                current, filled = [], 0
            groups.append((f,))
            continue
        current.append(f)
        filled += f.size
        if filled >= share:
            groups.append(tuple(current))
            current, filled = [], 0
    if current:
        groups.append(tuple(current))
    return groups


@dataclass(frozen=True)
class Layer:
    """One file, or a pack of files (``members``), as a layer of a published input."""

    file: InputFile
    """The layer's file; for a pack, its first member."""
    digest: str
    """``sha256:<hex>`` of the layer's bytes (its tar, or the raw blob of an oras layer)."""
    size: int
    raw: bool = False
    """An ``oras push`` layer: the blob is the file itself, not a tar around it."""
    members: tuple[InputFile, ...] = ()
    """A pack's files in order (empty for a one-file layer)."""

    @property
    def files(self) -> tuple[InputFile, ...]:
        """Every file the layer holds, in order."""
        return self.members or (self.file,)

    @property
    def packed(self) -> bool:
        return len(self.members) > 1

    @property
    def layout(self) -> LayerLayout | None:
        """The tar around the file (None for a raw layer or a pack)."""
        if self.raw or self.packed:
            return None
        return layer_layout(self.file.path, self.file.size)

    def descriptor(self) -> AnnotatedDescriptor:
        """The layer's descriptor in the manifest."""
        if self.packed:
            listing = [[f.path, f.sha256, f.size] for f in self.members]
            notes = {
                TITLE: f".evalrun-pack-{self.digest[7:19]}.tar",
                PACK_FILES: canonical_json(listing).decode(),
            }
        else:
            notes = {
                TITLE: self.file.path,
                FILE_SHA256: self.file.sha256,
                FILE_SIZE: str(self.file.size),
            }
        return {
            "mediaType": LAYER_TYPE,
            "digest": self.digest,
            "size": self.size,
            "annotations": notes,
        }


def canonical_json(obj: Any) -> bytes:
    """Compact JSON with sorted keys: the same object always gives the same bytes."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def sha256_digest(data: bytes) -> str:
    """``sha256:<hex>`` of ``data``."""
    return "sha256:" + hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class InputArtifact:
    """A built artifact: its config and manifest bytes, their digests, and its layers."""

    config: bytes
    manifest: bytes
    layers: tuple[Layer, ...]

    @property
    def config_digest(self) -> str:
        return sha256_digest(self.config)

    @property
    def digest(self) -> str:
        """The manifest digest: what the lock records and an image volume pulls."""
        return sha256_digest(self.manifest)


def build_artifact(
    kind: Literal["file", "directory"],
    digest: str,
    layers: Sequence[Layer],
    annotations: Mapping[str, str],
) -> InputArtifact:
    """Config and manifest of an input artifact (pure; layers already digested).

    ``digest`` is the input's (file sha256 or tree digest, ``sha256:<hex>``);
    ``annotations`` are added to the manifest's (keys without :data:`INPUT_PREFIX`
    get it). Layers are ordered by path, as the tree digest orders them.
    """
    sorted_files(f for layer in layers for f in layer.files)  # clean, unique paths
    in_order = tuple(sorted(layers, key=lambda layer: layer.file.path.encode("utf-8")))
    if kind == "file" and (len(in_order) != 1 or in_order[0].packed):
        raise ValueError("a file input is published as exactly one layer")
    if len(in_order) > MAX_LAYERS:
        raise ValueError(f"{len(in_order)} layers, over {MAX_LAYERS}")
    config = canonical_json(
        {
            "architecture": "amd64",
            "os": "linux",
            "rootfs": {"type": "layers", "diff_ids": [layer.digest for layer in in_order]},
        }
    )
    notes = {
        (key if key.startswith("org.") else INPUT_PREFIX + key): value
        for key, value in annotations.items()
    }
    notes[INPUT_KIND] = kind
    notes[INPUT_DIGEST] = digest
    manifest = canonical_json(
        {
            "schemaVersion": 2,
            "mediaType": MANIFEST_TYPE,
            "artifactType": ARTIFACT_TYPE,
            "config": {
                "mediaType": CONFIG_TYPE,
                "digest": sha256_digest(config),
                "size": len(config),
            },
            "layers": [layer.descriptor() for layer in in_order],
            "annotations": dict(sorted(notes.items())),
        }
    )
    return InputArtifact(config=config, manifest=manifest, layers=in_order)


# --------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class ArtifactListing:
    """What a manifest says: the input's kind (None if it does not say) and its files."""

    kind: Literal["file", "directory"]
    layers: tuple[Layer, ...]
    digest: str | None
    """The input digest the manifest claims (evalrun artifacts), else None."""


def _text(value: object, what: str) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"{what} is missing or not a string")
    return value


def _layer(index: int, desc: object) -> Layer:
    where = f"layer {index}"
    if not isinstance(desc, dict):
        raise ValueError(f"{where} is not an object")
    notes = desc.get("annotations") or {}
    if not isinstance(notes, dict):
        raise ValueError(f"{where}: annotations are not an object")
    digest = _text(desc.get("digest"), f"{where} digest")
    size = desc.get("size")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise ValueError(f"{where}: size is not a byte count")
    if not digest.startswith("sha256:") or len(digest) != 71:
        raise ValueError(f"{where}: digest {digest!r} is not sha256:<64 hex>")
    if PACK_FILES in notes:
        return _pack_layer(where, desc, digest, size, notes[PACK_FILES])
    try:
        path = check_relative_path(_text(notes.get(TITLE), f"{where} title ({TITLE})"))
    except ValueError as exc:
        raise ValueError(f"{where}: title is not a clean relative path ({exc})") from None
    if FILE_SHA256 not in notes:
        # an `oras push` file: the blob is the file, its digest the file's sha256
        return Layer(InputFile(path=path, sha256=digest[7:], size=size), digest, size, raw=True)
    if desc.get("mediaType") != LAYER_TYPE:
        raise ValueError(f"{where} ({path}): media type {desc.get('mediaType')!r}")
    file_size = notes.get(FILE_SIZE)
    if not isinstance(file_size, str) or not file_size.isdigit():
        raise ValueError(f"{where} ({path}): {FILE_SIZE} is not a byte count")
    try:
        file = InputFile(path=path, sha256=str(notes[FILE_SHA256]), size=int(file_size))
    except ValueError as exc:
        raise ValueError(f"{where} ({path}): {exc}") from None
    layer = Layer(file, digest, size)
    if layer_layout(path, file.size).blob_size != size:
        raise ValueError(f"{where} ({path}): size {size} is not that of evalrun's layer")
    return layer


def _pack_layer(where: str, desc: dict[Any, Any], digest: str, size: int, raw: object) -> Layer:
    """A pack layer's members from its :data:`PACK_FILES` annotation, checked."""
    if desc.get("mediaType") != LAYER_TYPE:
        raise ValueError(f"{where} (pack): media type {desc.get('mediaType')!r}")
    try:
        listing = load_json_strict(_text(raw, f"{where} {PACK_FILES}").encode())
    except ValueError as exc:
        raise ValueError(f"{where}: {PACK_FILES} is not JSON ({exc})") from None
    if not isinstance(listing, list) or len(listing) < 2:
        raise ValueError(f"{where}: {PACK_FILES} is not a list of two or more files")
    members = []
    for i, item in enumerate(listing):
        ok = (
            isinstance(item, list)
            and len(item) == 3
            and isinstance(item[0], str)
            and isinstance(item[1], str)
            and isinstance(item[2], int)
            and not isinstance(item[2], bool)
        )
        if not ok:
            raise ValueError(f"{where}: {PACK_FILES}[{i}] is not [path, sha256, size]")
        try:
            path = check_relative_path(item[0])
            members.append(InputFile(path=path, sha256=item[1], size=item[2]))
        except ValueError as exc:
            raise ValueError(f"{where}: {PACK_FILES}[{i}]: {exc}") from None
    if [m.path for m in members] != [m.path for m in sorted_files(members)]:
        raise ValueError(f"{where}: the pack's files are not in path order")
    if members_layout(members)[1] != size:
        raise ValueError(f"{where}: size {size} is not that of evalrun's pack of these files")
    return Layer(members[0], digest, size, members=tuple(members))


def parse_manifest(body: bytes) -> ArtifactListing:
    """The files of an input artifact's manifest, checked (a ValueError says what is wrong).

    Paths must be clean, relative and unique (no file under another file); an
    evalrun layer must have the exact size of its tar. Kind: the manifest's
    :data:`INPUT_KIND`, else a directory for several layers and a file for one.
    """
    if len(body) > MAX_MANIFEST_BYTES:
        raise ValueError(f"manifest is {len(body)} bytes, over {MAX_MANIFEST_BYTES}")
    try:
        # strict, as every registry document: no duplicate keys, no NaN/Infinity
        data = load_json_strict(body)
    except ValueError as exc:
        raise ValueError(f"manifest is not JSON ({exc})") from None
    if not isinstance(data, dict) or data.get("schemaVersion") != 2:
        raise ValueError("not an image manifest (schemaVersion 2)")
    if data.get("mediaType", MANIFEST_TYPE) != MANIFEST_TYPE:
        raise ValueError(f"media type {data.get('mediaType')!r} is not an OCI image manifest")
    raw_layers = data.get("layers")
    if not isinstance(raw_layers, list) or not raw_layers:
        raise ValueError("the manifest lists no layers")
    if len(raw_layers) > MAX_LAYERS:
        raise ValueError(f"the manifest lists {len(raw_layers)} layers, over {MAX_LAYERS}")
    layers = tuple(_layer(i, desc) for i, desc in enumerate(raw_layers))
    try:
        sorted_files(f for layer in layers for f in layer.files)
    except ValueError as exc:
        raise ValueError(str(exc)) from None
    notes = data.get("annotations") or {}
    if not isinstance(notes, dict):
        raise ValueError("manifest annotations are not an object")
    kind: Literal["file", "directory"]
    several = len(layers) > 1 or layers[0].packed
    said = notes.get(INPUT_KIND) or ("directory" if several else "file")
    if said == "file":
        kind = "file"
    elif said == "directory":
        kind = "directory"
    else:
        raise ValueError(f"{INPUT_KIND} is {said!r}")
    if kind == "file" and (len(layers) != 1 or layers[0].packed):
        raise ValueError(f"a file input with {len(layers)} layers")
    claimed = notes.get(INPUT_DIGEST)
    return ArtifactListing(
        kind=kind, layers=layers, digest=claimed if isinstance(claimed, str) else None
    )

"""Deterministic OCI image assembly: normalized layers, timestamp-free config, manifest.

Docker runs the sandboxed install step; the bytes that get digested are written
here. A layer is re-written as an uncompressed tar whose every header is a pure
function of the file tree (entries sorted by path, mtime = ``SOURCE_DATE_EPOCH``,
numeric uid/gid kept, user and group names empty, no atime/ctime, pax records only
where a name needs them), so the manifest digest is a pure function of the files
and the config. Layers stay uncompressed: a gzip stream's bytes depend on the zlib
version, and the digest must not. Reading an image back and diffing two:
:mod:`runner._internal.image_contents`.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import tarfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, NotRequired, TypedDict

from runner._internal.tar import layer_members, layer_name

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
ASSEMBLY_SCHEME = "evalrun-oci/v1"
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

# The config fields copied from a built image; everything else there (hostname,
# parent image id, container config, timestamps) is build-host noise.
CONFIG_FIELDS = (
    "User",
    "ExposedPorts",
    "Env",
    "Entrypoint",
    "Cmd",
    "Volumes",
    "WorkingDir",
    "Labels",
    "StopSignal",
)
_PAX_KEEP_PREFIX = "SCHILY.xattr."


# --------------------------------------------------------------------------- documents
# The JSON documents evalrun writes and reads back. Static shapes only: what comes
# from a registry or ``docker save`` is not validated here (a missing key is a
# KeyError, as before); what evalrun writes has exactly these keys.


class Descriptor(TypedDict):
    """An OCI content descriptor: a blob named by digest, with its size and media type."""

    mediaType: str
    digest: str
    size: int


class RootFs(TypedDict):
    type: str
    diff_ids: list[str]


class HistoryEntry(TypedDict, total=False):
    created: str
    created_by: str
    empty_layer: bool


class ImageConfig(TypedDict, total=False):
    """An image config: platform, runtime settings (``config``), layer diff ids, history."""

    architecture: str
    os: str
    created: str
    # The runtime settings (CONFIG_FIELDS and more); copied field by field, never read.
    config: dict[str, object]
    rootfs: RootFs
    history: list[HistoryEntry]


class ImageManifest(TypedDict):
    """A single-platform OCI image manifest."""

    schemaVersion: int
    mediaType: str
    config: Descriptor
    layers: list[Descriptor]
    annotations: NotRequired[dict[str, str]]


def canonical_json(data: object) -> bytes:
    """The one JSON encoding used for every digested document."""
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def file_digest(path: Path) -> str:
    with path.open("rb") as fh:
        return "sha256:" + hashlib.file_digest(fh, "sha256").hexdigest()


def epoch_iso(epoch: int) -> str:
    """``SOURCE_DATE_EPOCH`` as the RFC 3339 time used for ``created``."""
    return dt.datetime.fromtimestamp(epoch, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True)
class Blob:
    """A file on disk with its digest, size and media type."""

    path: Path | None  # None: the blob is already in the registry (a base layer)
    digest: str
    size: int
    media_type: str

    def descriptor(self) -> Descriptor:
        return {"mediaType": self.media_type, "digest": self.digest, "size": self.size}


# --------------------------------------------------------------------------- layers


def link_target(member: tarfile.TarInfo) -> str:
    """A hard link's target, under the same name rules as every layer member."""
    return layer_name(member.linkname, what="image layer hard link target")


def normalize_layer(src: IO[bytes], dest: Path, epoch: int) -> Blob:
    """Rewrite the layer tar read from ``src`` (seekable) into ``dest``, deterministically.

    Entries are sorted by path; each hard-link group is carried by its smallest
    path so a link never precedes its target; headers keep only type, path, mode,
    uid, gid, size, link target, device numbers and ``SCHILY.xattr.*`` records.
    Names go through the strict reader's rules (:func:`runner._internal.tar.layer_name`):
    a ``..`` or absolute name raises IntegrityError.
    """
    with tarfile.open(fileobj=src, mode="r:") as tar:
        members: dict[str, tarfile.TarInfo] = {}
        # the root directory entry is skipped: it carries nothing a layer needs
        for name, member in layer_members(tar):
            members[name] = member  # a later entry for the same path wins, as on extraction
        # hard links: the smallest path of each group carries the data, so a link
        # never precedes its target in the sorted output
        groups: dict[str, list[str]] = {}
        for name, member in members.items():
            if member.islnk():
                target = link_target(member)
                if target in members and members[target].isreg():
                    groups.setdefault(target, [target]).append(name)
        group_of: dict[str, tuple[str, tarfile.TarInfo]] = {}
        for target, names in groups.items():
            for name in names:
                group_of[name] = (min(names), members[target])
        dest.parent.mkdir(parents=True, exist_ok=True)
        with (
            dest.open("wb") as out,
            tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT, encoding="utf-8") as w,
        ):
            for name in sorted(members):
                data_from: tarfile.TarInfo | None = None
                if name in group_of:
                    first, source = group_of[name]
                    info = _header(source, name, epoch)
                    if name == first:
                        data_from = source
                    else:
                        info.type, info.linkname, info.size = tarfile.LNKTYPE, first, 0
                else:
                    info = _header(members[name], name, epoch)
                    if members[name].isreg():
                        data_from = members[name]
                if data_from is None:
                    w.addfile(info)
                    continue
                fh = tar.extractfile(data_from)
                assert fh is not None
                with fh:
                    w.addfile(info, fh)
    return Blob(dest, file_digest(dest), dest.stat().st_size, OCI_LAYER)


def _header(member: tarfile.TarInfo, name: str, epoch: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = tarfile.REGTYPE if member.type == tarfile.AREGTYPE else member.type
    info.mode = member.mode & 0o7777
    info.uid, info.gid = member.uid, member.gid
    info.uname = info.gname = ""
    info.mtime = epoch
    info.size = member.size if member.isreg() else 0
    if member.issym() or member.islnk():
        info.linkname = link_target(member) if member.islnk() else member.linkname
    if member.ischr() or member.isblk():
        info.devmajor, info.devminor = member.devmajor, member.devminor
    info.pax_headers = {
        k: v for k, v in sorted(member.pax_headers.items()) if k.startswith(_PAX_KEEP_PREFIX)
    }
    return info


# --------------------------------------------------------------------------- config + manifest


def image_config(
    *,
    diff_ids: list[str],
    config: Mapping[str, object],
    epoch: int,
    history: list[str],
    architecture: str = "amd64",
) -> bytes:
    """An OCI image config whose every timestamp is ``epoch``; canonical JSON bytes."""
    if len(history) != len(diff_ids):
        raise ValueError("one history line per layer")
    created = epoch_iso(epoch)
    kept = {k: config[k] for k in CONFIG_FIELDS if config.get(k) not in (None, "", [], {})}
    doc: ImageConfig = {
        "architecture": architecture,
        "os": "linux",
        "created": created,
        "config": kept,
        "rootfs": {"type": "layers", "diff_ids": list(diff_ids)},
        "history": [{"created": created, "created_by": line} for line in history],
    }
    return canonical_json(doc)


def image_manifest(
    config: bytes, layers: list[Blob], annotations: Mapping[str, str] | None = None
) -> bytes:
    """An OCI image manifest over a config and its layers; canonical JSON bytes."""
    doc: ImageManifest = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": sha256_digest(config), "size": len(config)},
        "layers": [layer.descriptor() for layer in layers],
    }
    if annotations:
        doc["annotations"] = dict(annotations)
    return canonical_json(doc)


@dataclass(frozen=True)
class AssembledImage:
    """An image assembled on disk, ready to push; ``digest`` is the manifest digest."""

    layers: list[Blob]
    config: bytes
    manifest: bytes

    @property
    def digest(self) -> str:
        return sha256_digest(self.manifest)

    @property
    def config_digest(self) -> str:
        return sha256_digest(self.config)


def assemble(
    layers: list[Blob],
    config: Mapping[str, object],
    epoch: int,
    history: list[str],
    diff_ids: list[str] | None = None,
    annotations: Mapping[str, str] | None = None,
) -> AssembledImage:
    """Config + manifest over ``layers``; ``diff_ids`` only where a layer is compressed."""
    cfg = image_config(
        diff_ids=diff_ids if diff_ids is not None else [b.digest for b in layers],
        config=config,
        epoch=epoch,
        history=history,
    )
    return AssembledImage(
        layers=layers, config=cfg, manifest=image_manifest(cfg, layers, annotations)
    )


# OCI equivalents of Docker's layer media types (same bytes, same digest).
LAYER_TYPES = {
    "application/vnd.docker.image.rootfs.diff.tar.gzip": OCI_LAYER + "+gzip",
    "application/vnd.docker.image.rootfs.diff.tar": OCI_LAYER,
}


# --------------------------------------------------------------------------- docker save


@dataclass(frozen=True)
class SavedImage:
    """The layers and config of a ``docker save`` archive (legacy layout)."""

    config: ImageConfig
    layer_members: list[str]


def read_saved(archive: tarfile.TarFile) -> SavedImage:
    manifest = _json_member(archive, "manifest.json")
    if not isinstance(manifest, list) or len(manifest) != 1:
        raise ValueError("docker save archive must hold exactly one image")
    entry = manifest[0]
    config = _json_member(archive, entry["Config"])
    return SavedImage(config=config, layer_members=list(entry["Layers"]))


def _json_member(archive: tarfile.TarFile, name: str) -> Any:
    layer_name(name, what="archive member")
    fh = archive.extractfile(name)
    if fh is None:
        raise ValueError(f"{name} missing from archive")
    with fh:
        return json.loads(fh.read())


def copy_stream(chunks: Iterable[bytes], dest: Path) -> None:
    """Write an iterable of byte chunks (a Docker API stream) to ``dest``."""
    with dest.open("wb") as out:
        for chunk in chunks:
            out.write(chunk)


def empty_layer(path: Path) -> bool:
    """A layer with no entries at all (Docker commits these for metadata-only steps)."""
    with path.open("rb") as fh, tarfile.open(fileobj=fh, mode="r:") as tar:
        return tar.next() is None


def open_member(archive: tarfile.TarFile, name: str) -> IO[bytes]:
    """A member of an archive as a seekable file object; ``name`` must be a safe member name."""
    layer_name(name, what="archive member")
    fh = archive.extractfile(name)
    if fh is None:
        raise ValueError(f"{name} is not a file in the archive")
    return fh

"""Deterministic OCI image assembly: normalized layers, timestamp-free config, manifest.

Docker runs the sandboxed install step; the bytes that get digested are written
here. A layer is re-written as an uncompressed tar whose every header is a pure
function of the file tree (entries sorted by path, mtime = ``SOURCE_DATE_EPOCH``,
numeric uid/gid kept, user and group names empty, no atime/ctime, pax records only
where a name needs them), so the manifest digest is a pure function of the files
and the config. Layers stay uncompressed: a gzip stream's bytes depend on the zlib
version, and the digest must not.

Also here: reading a layer stack back into a per-file index, and the diff of two
images (files and config fields) that ``evalrun build --check`` reports.
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
_CHUNK = 1 << 20


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


class FileFacts(TypedDict):
    """One path of an image as ``build --check`` compares it (:meth:`FileEntry.describe`)."""

    type: str
    mode: str
    owner: str
    size: int
    sha256: str


class FileChange(TypedDict):
    """A path whose entry differs between two images; the sides it has, and which fields."""

    path: str
    change: str  # added, removed, changed
    fields: NotRequired[list[str]]
    expected: NotRequired[FileFacts]
    found: NotRequired[FileFacts]


class FieldChange(TypedDict):
    """A leaf of two JSON documents that differs, by dotted path (None: absent on that side)."""

    field: str
    expected: object
    found: object


class PackageChange(TypedDict):
    """A Debian package whose version differs (None: not installed on that side)."""

    package: str
    expected: str | None
    found: str | None


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


def _link_target(member: tarfile.TarInfo) -> str:
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
                target = _link_target(member)
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
        info.linkname = _link_target(member) if member.islnk() else member.linkname
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


# --------------------------------------------------------------------------- index and diff


@dataclass(frozen=True)
class FileEntry:
    """What the diff compares for one path."""

    kind: str  # f (file), d (dir), l (symlink), h (hard link), c/b (device), p (fifo)
    mode: str
    uid: int
    gid: int
    size: int
    sha256: str  # content hash for files; link target for links; "" otherwise

    def describe(self) -> FileFacts:
        return {
            "type": self.kind,
            "mode": self.mode,
            "owner": f"{self.uid}:{self.gid}",
            "size": self.size,
            "sha256": self.sha256,
        }


_KIND = {
    tarfile.REGTYPE: "f",
    tarfile.AREGTYPE: "f",
    tarfile.DIRTYPE: "d",
    tarfile.SYMTYPE: "l",
    tarfile.LNKTYPE: "h",
    tarfile.CHRTYPE: "c",
    tarfile.BLKTYPE: "b",
    tarfile.FIFOTYPE: "p",
}


def layer_entries(layer: IO[bytes]) -> Iterable[tuple[str, FileEntry | None]]:
    """(path, entry) per tar member; entry None for an OCI whiteout of that path.

    An opaque-directory marker yields ``(dir + "/", None)``.
    """
    with tarfile.open(fileobj=layer, mode="r:*") as tar:
        for name, member in layer_members(tar):
            parent, _, base = name.rpartition("/")
            if base == ".wh..wh..opq":
                yield (parent + "/" if parent else "/"), None
                continue
            if base.startswith(".wh."):
                yield (f"{parent}/{base[4:]}" if parent else base[4:]), None
                continue
            digest = ""
            if member.isreg():
                fh = tar.extractfile(member)
                assert fh is not None
                with fh:
                    h = hashlib.sha256()
                    while chunk := fh.read(_CHUNK):
                        h.update(chunk)
                    digest = h.hexdigest()
            elif member.issym():
                digest = member.linkname
            elif member.islnk():
                digest = "-> " + _link_target(member)
            yield (
                name,
                FileEntry(
                    kind=_KIND.get(member.type, "?"),
                    mode=f"{member.mode & 0o7777:04o}",
                    uid=member.uid,
                    gid=member.gid,
                    size=member.size if member.isreg() else 0,
                    sha256=digest,
                ),
            )


def filesystem_index(layers: Iterable[IO[bytes]]) -> dict[str, FileEntry]:
    """Apply layers in order (whiteouts delete); path → entry of the resulting tree."""
    index: dict[str, FileEntry] = {}
    for layer in layers:
        for name, entry in layer_entries(layer):
            if entry is None:
                if name.endswith("/"):
                    prefix = name if name != "/" else ""
                    for key in [k for k in index if k.startswith(prefix)]:
                        del index[key]
                else:
                    for key in [k for k in index if k == name or k.startswith(name + "/")]:
                        del index[key]
                continue
            if entry.kind == "h":
                target = index.get(entry.sha256.removeprefix("-> "))
                if target is not None:
                    entry = FileEntry(
                        "f", target.mode, target.uid, target.gid, target.size, target.sha256
                    )
            index[name] = entry
    return index


def diff_index(
    expected: Mapping[str, FileEntry], found: Mapping[str, FileEntry]
) -> list[FileChange]:
    """Per-path differences, sorted by path: added, removed, changed (with both sides)."""
    out: list[FileChange] = []
    for path in sorted(expected.keys() | found.keys()):
        a, b = expected.get(path), found.get(path)
        if a == b:
            continue
        if a is None:
            assert b is not None
            out.append({"path": "/" + path, "change": "added", "found": b.describe()})
        elif b is None:
            out.append({"path": "/" + path, "change": "removed", "expected": a.describe()})
        else:
            da, db = a.describe(), b.describe()
            out.append(
                {
                    "path": "/" + path,
                    "change": "changed",
                    "fields": sorted(k for k, v in da.items() if db.get(k) != v),
                    "expected": da,
                    "found": db,
                }
            )
    return out


def diff_json(expected: object, found: object, path: str = "") -> list[FieldChange]:
    """Leaf-level differences between two JSON documents, as dotted field paths."""
    if isinstance(expected, dict) and isinstance(found, dict):
        out: list[FieldChange] = []
        for key in sorted(expected.keys() | found.keys()):
            sub = f"{path}.{key}" if path else str(key)
            if key not in expected:
                out.append({"field": sub, "expected": None, "found": found[key]})
            elif key not in found:
                out.append({"field": sub, "expected": expected[key], "found": None})
            else:
                out += diff_json(expected[key], found[key], sub)
        return out
    if expected != found:
        return [{"field": path, "expected": expected, "found": found}]
    return []


# --------------------------------------------------------------------------- dpkg


def dpkg_packages(layer: IO[bytes]) -> dict[str, str]:
    """``package[:arch]`` → version of every installed package in a root tar's dpkg status."""
    with tarfile.open(fileobj=layer, mode="r:*") as tar:
        for name, member in layer_members(tar):
            if name == "var/lib/dpkg/status" and member.isreg():
                fh = tar.extractfile(member)
                assert fh is not None
                with fh:
                    return parse_dpkg_status(fh.read().decode("utf-8", "replace"))
    return {}


def parse_dpkg_status(text: str) -> dict[str, str]:
    packages: dict[str, str] = {}
    for stanza in text.split("\n\n"):
        fields: dict[str, str] = {}
        for line in stanza.splitlines():
            if line[:1] in (" ", "\t") or ":" not in line:
                continue
            key, _, value = line.partition(":")
            fields[key.strip()] = value.strip()
        if "Package" in fields and fields.get("Status", "").endswith(" installed"):
            arch = fields.get("Architecture", "")
            name = fields["Package"] + (f":{arch}" if arch and arch != "all" else "")
            packages[name] = fields.get("Version", "")
    return dict(sorted(packages.items()))


def diff_packages(expected: Mapping[str, str], found: Mapping[str, str]) -> list[PackageChange]:
    """Debian packages whose installed version moved (or that appeared or vanished)."""
    out: list[PackageChange] = []
    for name in sorted(expected.keys() | found.keys()):
        if expected.get(name) != found.get(name):
            out.append({"package": name, "expected": expected.get(name), "found": found.get(name)})
    return out


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

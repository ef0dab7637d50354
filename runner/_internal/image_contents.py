"""What is in an image, and what differs between two: the ``evalrun build --check`` diff.

A layer stack is read back into a per-file index (whiteouts applied, hard links
resolved); two indexes, two JSON documents (configs) or two Debian package lists
are compared into the changes the check reports. The dpkg status of a root
filesystem gives the package list the lock records of a base image.
"""

from __future__ import annotations

import contextlib
import hashlib
import lzma
import tarfile
import zlib
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import IO, NotRequired, TypedDict

from runner._internal.oci import link_target
from runner._internal.tar import layer_members
from runner.errors import IntegrityError

_CHUNK = 1 << 20


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


@contextlib.contextmanager
def _layer_errors() -> Iterator[None]:
    """A truncated, damaged or mis-compressed layer is an IntegrityError (one line, exit 3)."""
    try:
        yield
    except (tarfile.TarError, EOFError, zlib.error, lzma.LZMAError, OSError) as exc:
        raise IntegrityError(f"image layer is truncated or corrupt: {exc}") from exc


def layer_entries(layer: IO[bytes]) -> Iterable[tuple[str, FileEntry | None]]:
    """(path, entry) per tar member; entry None for an OCI whiteout of that path.

    An opaque-directory marker yields ``(dir + "/", None)``. A layer that is not a
    readable tar raises IntegrityError.
    """
    with _layer_errors():
        yield from _layer_entries(layer)


def _layer_entries(layer: IO[bytes]) -> Iterable[tuple[str, FileEntry | None]]:
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
                digest = "-> " + link_target(member)
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


def dpkg_packages(layer: IO[bytes]) -> dict[str, str]:
    """``package[:arch]`` → version of every installed package in a root tar's dpkg status."""
    with _layer_errors(), tarfile.open(fileobj=layer, mode="r:*") as tar:
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

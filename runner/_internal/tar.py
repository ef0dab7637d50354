"""The one strict tar reader and writer on the host.

Every tar the runner reads goes through :func:`scan_members` (regular files the
caller may read; everything else a problem) or :func:`layer_members` (OCI layers,
which legitimately hold links and devices); every tar it writes from a
directory goes through :func:`write_tree_tar` (image layers are re-written by
``runner._internal.oci.normalize_layer``, whose headers keep modes and owners
because they are image content). Member names follow the rules of
:mod:`runner.shared.tarformat`, the same module the in-container agent writes
its results frame with.

The rules: no absolute name, no ``..``, no empty or ``.`` component, bounded
name length; where content is read, only regular files (links, devices, FIFOs,
sparse files are problems), no duplicates, a bounded member count and size,
and nothing is extracted from a tar with any problem.
"""

from __future__ import annotations

import io
import os
import tarfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from runner._internal.tree import READ_CHUNK, open_beneath, open_root, scan_tree
from runner.errors import InputError, IntegrityError, UnsafeBundleEntry
from runner.shared.tarformat import file_header, member_name, member_name_reason


@dataclass(frozen=True)
class TarMember:
    """A tar member the runner will read: a regular file at a safe path."""

    path: str
    member: tarfile.TarInfo


@dataclass(frozen=True)
class MemberRules:
    """What :func:`scan_members` accepts, and how its problems name a member."""

    max_members: int
    max_file_bytes: int | None = None
    portable_names: bool = True
    label: str = "tar member"


# What tarfile raises besides TarError on headers it cannot parse (a GNU sparse map that
# is not numbers, a size no offset can hold): all of it is a damaged tar.
_HEADER_ERRORS = (ValueError, OverflowError, EOFError, IndexError, UnicodeError)


def iter_members(tar: tarfile.TarFile) -> Iterator[tarfile.TarInfo]:
    """Every member of ``tar`` in order; a header tarfile cannot parse is a ReadError."""
    while True:
        try:
            member = tar.next()
        except tarfile.TarError:
            raise
        except _HEADER_ERRORS as exc:
            raise tarfile.ReadError(f"unreadable tar header: {exc}") from exc
        if member is None:
            return
        yield member


def scan_members(tar: tarfile.TarFile, rules: MemberRules) -> tuple[list[TarMember], list[str]]:
    """Sort a tar's members into readable regular files and problems (one per bad member).

    Accepts regular files and directories at safe paths (a leading ``./`` is
    allowed; directories are skipped); refuses symlinks, hard links, devices,
    FIFOs, sparse files, unsafe or over-long names, duplicate names and files
    larger than ``rules.max_file_bytes``, each named in a problem. Stops reading
    after ``rules.max_members`` members (a problem too).
    """
    members: list[TarMember] = []
    problems: list[str] = []
    seen: set[str] = set()
    label = rules.label
    for count, member in enumerate(iter_members(tar), start=1):
        if count > rules.max_members:
            problems.append(f"more than {rules.max_members} tar members; the rest were not read")
            break
        name = member_name(member)
        if not name and member.isdir():
            continue
        reason = member_name_reason(name, portable=rules.portable_names)
        if reason:
            problems.append(f"{label} {member.name!r}: {reason}")
            continue
        if member.issym():
            problems.append(
                f"{label} {name!r} is a symlink (-> {member.linkname!r}); links are refused"
            )
            continue
        if member.islnk():
            problems.append(
                f"{label} {name!r} is a hard link (-> {member.linkname!r}); links are refused"
            )
            continue
        if member.isdir():
            continue
        if not member.isreg():
            problems.append(f"{label} {name!r} is a device, FIFO or other special file")
            continue
        if member.issparse():
            problems.append(f"{label} {name!r} is a sparse file; only plain files are read")
            continue
        if name in seen:
            problems.append(f"{label} {name!r} appears more than once")
            continue
        if rules.max_file_bytes is not None and member.size > rules.max_file_bytes:
            problems.append(f"{label} {name!r} is too large ({member.size} bytes)")
            continue
        seen.add(name)
        members.append(TarMember(name, member))
    return members, problems


def file_under_file(members: Sequence[TarMember]) -> tuple[str, str] | None:
    """(member, file) when a member lies under another member that is a file; else None."""
    paths = {m.path for m in members}
    for m in members:
        parts = m.path.split("/")
        for i in range(1, len(parts)):
            if "/".join(parts[:i]) in paths:
                return m.path, "/".join(parts[:i])
    return None


def open_tar(path: Path, *, what: str = "tar file") -> tarfile.TarFile:
    """Open an uncompressed tar for reading; the caller closes it.

    Raises InputError naming the file (and ``what`` it should be) if it is
    missing or not a tar.
    """
    if not path.is_file():
        raise InputError(f"{what} not found", file=str(path))
    try:
        return tarfile.open(path, mode="r:")  # the caller closes it
    except (tarfile.TarError, *_HEADER_ERRORS) as exc:
        raise InputError(f"not an uncompressed tar file: {exc}", file=str(path)) from exc


def open_tar_stream(fileobj: IO[bytes]) -> tarfile.TarFile:
    """A tar in an open binary file (a spool, a buffer), opened for reading; any header
    it cannot parse is a ReadError. The caller closes the tar and ``fileobj``."""
    try:
        return tarfile.open(fileobj=fileobj, mode="r:")  # the caller closes it
    except tarfile.TarError:
        raise
    except _HEADER_ERRORS as exc:
        raise tarfile.ReadError(f"unreadable tar header: {exc}") from exc


def open_tar_bytes(data: bytes) -> tarfile.TarFile:
    """A tar held in memory, opened for reading; any header it cannot parse is a ReadError."""
    return open_tar_stream(io.BytesIO(data))


def iter_chunks(tar: tarfile.TarFile, member: tarfile.TarInfo) -> Iterator[bytes]:
    """Yield the content of a regular-file member in :data:`READ_CHUNK` pieces."""
    source = tar.extractfile(member)
    if source is None:
        return
    with source:
        while chunk := source.read(READ_CHUNK):
            yield chunk


def extract_members(tar: tarfile.TarFile, members: Sequence[TarMember], dest: Path) -> int:
    """Write each member (as found by :func:`scan_members`) under the directory ``dest``.

    Files are created new (``O_EXCL``, mode 0644 whatever the tar says), parents
    as needed; returns the bytes written. The caller checked the members first,
    including :func:`file_under_file`.
    """
    total = 0
    for m in members:
        target = dest / m.path
        target.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        with io.FileIO(fd, "wb", closefd=True) as out:
            for chunk in iter_chunks(tar, m.member):
                out.write(chunk)
                total += len(chunk)
    return total


def write_tree_tar(root: Path, tar_path: Path) -> Path:
    """Write the regular files under ``root`` as a deterministic tar at ``tar_path`` (new).

    Regular files only, sorted by path, each with :func:`file_header` (mtime 0,
    uid/gid 0, empty owner names, mode 0644; PAX format only where a long name
    needs it): the same files always give the same bytes. Symlinks, devices and
    names the strict reader would refuse raise UnsafeBundleEntry; an existing
    ``tar_path`` raises InputError; the partial tar is removed on failure.
    """
    entries = scan_tree(root)
    for entry in entries:
        if entry.kind in ("symlink", "special"):
            raise UnsafeBundleEntry(
                f"refusing to tar {entry.path!r}: {entry.kind}",
                path=str(root / entry.path),
                reason=entry.kind,
            )
        reason = member_name_reason(entry.path, portable=True)
        if reason:
            raise UnsafeBundleEntry(
                f"refusing to tar {entry.path!r}: {reason}",
                path=str(root / entry.path),
                reason=reason,
            )
    files = [e.path for e in entries if e.kind == "file"]
    root_fd = open_root(root)
    try:
        out_fd = os.open(tar_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    except FileExistsError as exc:
        os.close(root_fd)
        raise InputError("tar file already exists", file=str(tar_path)) from exc
    try:
        with (
            io.FileIO(out_fd, "wb", closefd=True) as raw,
            io.BufferedWriter(raw, buffer_size=READ_CHUNK) as out,
            tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar,
        ):
            for path in files:
                fd = open_beneath(root_fd, path)
                with io.FileIO(fd, "rb", closefd=True) as src:
                    info = file_header(path, os.fstat(fd).st_size)
                    tar.addfile(info, io.BufferedReader(src, buffer_size=READ_CHUNK))
    except BaseException:
        tar_path.unlink(missing_ok=True)
        raise
    finally:
        os.close(root_fd)
    return tar_path


# --- image layers ---------------------------------------------------------------


def layer_name(name: str, *, what: str = "image layer member") -> str:
    """``name`` (a member or hard-link target) with leading ``./`` and '/' dropped, checked.

    Image layers keep any character, but the structure rule holds: a name with
    ``..``, an empty component or an over-long name raises IntegrityError. The
    root entry gives ``""``.
    """
    clean = name
    while clean.startswith("./"):
        clean = clean[2:]
    clean = clean.rstrip("/")
    if clean in ("", "."):
        return ""
    reason = member_name_reason(clean, portable=False)
    if reason:
        raise IntegrityError(f"{what} {name!r}: {reason}", member=name)
    return clean


def layer_members(tar: tarfile.TarFile) -> Iterator[tuple[str, tarfile.TarInfo]]:
    """(checked name, member) for every member of an image layer except its root entry.

    Links, devices and FIFOs are listed (a root filesystem has them); every
    name goes through :func:`layer_name`.
    """
    for member in iter_members(tar):
        name = layer_name(member.name)
        if name:
            yield name, member

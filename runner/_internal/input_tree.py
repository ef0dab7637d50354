"""Input files and directories as content: safe scanning, fast hashing, one tree digest.

A model or dataset input is either one file (identified by the sha256 of its bytes)
or a directory (identified by a *tree digest* over its files). This module scans a
local directory without ever following a link, hashes its files in parallel threads
(hashlib releases the GIL), and computes the tree digest defined below. Remote
sources (S3 prefixes, OCI artifacts) build the same :class:`InputFile` list from their
listings and get the same digest, so a directory has one identity wherever it lives.

Tree digest ``evalrun-input-tree/v1``
-------------------------------------
The digest of a directory is ``"sha256:" + hex(SHA-256(E))`` where the byte string
``E`` is::

    b"evalrun-input-tree/v1\\n"
    + for each regular file, in ascending order of the UTF-8 bytes of its path:
          <sha256>  b" "  <size>  b" "  <path>  b"\\n"

with ``<sha256>`` the 64 lowercase hex digits of the SHA-256 of the file's bytes,
``<size>`` its length in bytes as ASCII decimal without leading zeros (``0`` for an
empty file), and ``<path>`` the file's path relative to the directory, ``/``-separated,
UTF-8 encoded, exactly as named (no Unicode normalisation, no case folding). Only
regular files appear; directories are implied by the paths, so an empty directory
contributes nothing (and a directory without any file is refused as an input).
Paths obey :func:`check_relative_path`: non-empty, relative, no ``.``/``..``/empty
component, no control character (which rules out NUL and newline, so the encoding
above is unambiguous), valid UTF-8, at most 255 bytes per component and 4096 in all;
no path may be both a file and a directory prefix of another file, and no path may
repeat. File modes, owners and times are not part of the digest: the executable bit
is reported in :class:`InputFile` but left out because inputs are data (the code
lives in the image) and mode bits do not survive S3 or ``oras pull`` round trips,
while the identity of a checkpoint must.

Example: a directory holding only ``a.txt`` with the 3 bytes ``abc`` encodes as the
two lines ``evalrun-input-tree/v1`` and
``ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad 3 a.txt``, each ended
by ``\\n``, and its digest is
``sha256:757e4f8ea3d93f138c0dba2fd2def74f978fa6ef40b00c2762fd0b916847978a``
(``printf 'evalrun-input-tree/v1\\n%s 3 a.txt\\n' "$(printf abc | sha256sum | cut -c1-64)" |
sha256sum`` gives the same).

Walking: the root is opened with ``O_NOFOLLOW | O_DIRECTORY`` and every entry below it
is reached relative to its parent's descriptor with ``O_NOFOLLOW``, so a symlink (to
a file or a directory, inside or outside the root), a FIFO, socket or device is
refused with an :class:`~runner.errors.InputError` naming the input and the entry,
and an entry swapped for a link between listing and reading is refused the same way.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import stat
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator

from runner.errors import InputError
from runner.shared.inputs import READ_CHUNK as READ_CHUNK
from runner.shared.inputs import TREE_TAG as TREE_TAG
from runner.shared.inputs import hash_fd as hash_fd
from runner.shared.inputs import tree_digest_of

# No mmap for hashing: a file truncated while mapped kills the process with SIGBUS.
MAX_FILES = 200_000
MAX_DEPTH = 64
MAX_PATH_BYTES = 4096
MAX_NAME_BYTES = 255

Sha256Hex = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]
TreeDigest = Annotated[str, StringConstraints(pattern=r"^sha256:[0-9a-f]{64}$")]

_OPEN_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# O_NONBLOCK: opening a FIFO swapped in after the listing must not hang the scan.
_OPEN_FILE = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK


def check_relative_path(path: str) -> str:
    """Return ``path`` if it is a safe relative file path (see module docs); else ValueError."""
    if not path:
        raise ValueError("empty path")
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in path):
        raise ValueError("control character (NUL, newline, …) in name")
    try:
        encoded = path.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("name is not valid UTF-8") from None
    if path.startswith("/"):
        raise ValueError("absolute path")
    if len(encoded) > MAX_PATH_BYTES:
        raise ValueError(f"path longer than {MAX_PATH_BYTES} bytes")
    for part in path.split("/"):
        if part in ("", ".", ".."):
            raise ValueError(f"path component {part!r} (escapes or is not canonical)")
        if len(part.encode("utf-8")) > MAX_NAME_BYTES:
            raise ValueError(f"name longer than {MAX_NAME_BYTES} bytes")
    return path


class InputFile(BaseModel):
    """One regular file of an input: where it sits, what it holds, how big it is."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    path: str = Field(description="Path relative to the input root, '/'-separated.")
    sha256: Sha256Hex = Field(description="SHA-256 of the file's bytes, lowercase hex.")
    size: int = Field(ge=0, description="Length in bytes.")
    executable: bool = Field(
        default=False,
        exclude=True,
        description="Any x bit set at the local source: informative only, neither digested "
        "nor serialized (so a lock does not depend on where the bytes came from).",
    )

    @field_validator("path")
    @classmethod
    def _safe_path(cls, value: str) -> str:
        return check_relative_path(value)


class InputTree(BaseModel):
    """A directory input: its tree digest, total size and every file, sorted by path."""

    model_config = ConfigDict(frozen=True, extra="forbid", defer_build=True)

    digest: TreeDigest
    size: int = Field(ge=0)
    files: tuple[InputFile, ...]


def sorted_files(files: Iterable[InputFile]) -> tuple[InputFile, ...]:
    """``files`` in digest order; ValueError on a repeated path or a file/directory clash."""
    ordered = tuple(sorted(files, key=lambda f: f.path.encode("utf-8")))
    for before, after in itertools.pairwise(ordered):
        if before.path == after.path:
            raise ValueError(f"path listed twice: {after.path}")
    paths = {f.path for f in ordered}
    for f in ordered:
        parts = f.path.split("/")
        for i in range(1, len(parts)):
            prefix = "/".join(parts[:i])
            if prefix in paths:
                raise ValueError(f"{prefix} is both a file and a directory (of {f.path})")
    return ordered


def tree_digest(files: Iterable[InputFile]) -> str:
    """The ``evalrun-input-tree/v1`` digest (``sha256:<hex>``) of a directory's file list."""
    return tree_digest_of((f.path, f.sha256, f.size) for f in sorted_files(files))


def make_tree(files: Iterable[InputFile]) -> InputTree:
    """An :class:`InputTree` over ``files`` (sorted, checked, digested)."""
    ordered = sorted_files(files)
    return InputTree(digest=tree_digest(ordered), size=sum(f.size for f in ordered), files=ordered)


def hash_file(path: Path) -> tuple[str, int]:
    """(sha256 hex, size) of a regular file; a symlink or special file is refused (OSError)."""
    fd = os.open(path, _OPEN_FILE)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(f"{path} is not a regular file")
        _advise_sequential(fd)
        return hash_fd(fd)
    finally:
        os.close(fd)


def default_workers() -> int:
    """Files hashed at once: one per CPU, at most 8 (hashing is CPU-bound and GIL-free)."""
    return max(1, min(8, os.cpu_count() or 1))


def _advise_sequential(fd: int) -> None:
    if hasattr(os, "posix_fadvise"):
        with contextlib.suppress(OSError):  # advice only; some filesystems do not take it
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)


class _Scan:
    """One directory scan: the walk, then parallel hashing, each entry checked on open."""

    def __init__(self, root: Path, what: str, max_files: int, max_depth: int) -> None:
        self.root = root
        self.what = what
        self.max_files = max_files
        self.max_depth = max_depth
        self.found: list[tuple[str, int]] = []  # (relative path, size from the listing)

    def refuse(self, entry: str, reason: str) -> InputError:
        return InputError(
            f"{self.what}: {reason}: {entry}",
            input=self.what,
            entry=entry,
            root=str(self.root),
            hint="directory inputs may hold only regular files and directories, "
            "all inside the input root",
        )

    def walk(self, dir_fd: int, prefix: str, depth: int) -> None:
        if depth > self.max_depth:
            raise self.refuse(prefix.rstrip("/"), f"nested deeper than {self.max_depth} levels")
        with os.scandir(dir_fd) as entries:
            listed = sorted(entries, key=lambda e: e.name)
        for entry in listed:
            rel = prefix + entry.name
            try:
                check_relative_path(rel)
            except ValueError as exc:
                raise self.refuse(ascii(rel), f"unacceptable name ({exc})") from None
            if entry.is_symlink():
                raise self.refuse(rel, "symbolic link (links are never followed)")
            if entry.is_dir(follow_symlinks=False):
                sub = self.open_dir(dir_fd, entry.name, rel)
                try:
                    self.walk(sub, rel + "/", depth + 1)
                finally:
                    os.close(sub)
            elif entry.is_file(follow_symlinks=False):
                if len(self.found) >= self.max_files:
                    raise self.refuse(rel, f"more than {self.max_files} files")
                self.found.append((rel, entry.stat(follow_symlinks=False).st_size))
            else:
                raise self.refuse(rel, "special file (FIFO, socket or device)")

    def open_dir(self, dir_fd: int, name: str, rel: str) -> int:
        try:
            return os.open(name, _OPEN_DIR, dir_fd=dir_fd)
        except OSError as exc:
            raise self.refuse(rel, f"cannot open directory ({exc.strerror})") from None

    def hash_one(self, root_fd: int, rel: str) -> InputFile:
        parts = rel.split("/")
        dir_fd = root_fd
        opened: list[int] = []
        try:
            for i, part in enumerate(parts[:-1]):
                dir_fd = self.open_dir(dir_fd, part, "/".join(parts[: i + 1]))
                opened.append(dir_fd)
            try:
                fd = os.open(parts[-1], _OPEN_FILE, dir_fd=dir_fd)
            except OSError as exc:
                raise self.refuse(
                    rel, f"cannot open ({exc.strerror}; changed while scanning?)"
                ) from None
            opened.append(fd)
            before = os.fstat(fd)
            if not stat.S_ISREG(before.st_mode):
                raise self.refuse(rel, "not a regular file any more (changed while scanning)")
            _advise_sequential(fd)
            hexdigest, size = hash_fd(fd)
            if size != before.st_size or size != os.fstat(fd).st_size:
                raise self.refuse(rel, "file changed size while it was read")
            return InputFile(
                path=rel, sha256=hexdigest, size=size, executable=bool(before.st_mode & 0o111)
            )
        finally:
            for fd_ in reversed(opened):
                os.close(fd_)


def scan_tree(
    root: Path,
    *,
    what: str,
    workers: int | None = None,
    max_files: int = MAX_FILES,
    max_depth: int = MAX_DEPTH,
) -> InputTree:
    """Scan and hash the directory ``root`` (not followed if it is a link) into an InputTree.

    ``what`` names the input in errors (``model``, ``datasets[0] (digits)``). Every file
    is listed; symlinks, special files, bad names, more than ``max_files`` files or more
    than ``max_depth`` levels raise :class:`~runner.errors.InputError` naming the entry,
    as does a directory without any file.
    """
    scan = _Scan(root, what, max_files, max_depth)
    try:
        root_fd = os.open(root, _OPEN_DIR)
    except OSError as exc:
        raise InputError(
            f"{what}: cannot open input directory ({exc.strerror})", input=what, path=str(root)
        ) from None
    try:
        scan.walk(root_fd, "", 0)
        if not scan.found:
            raise InputError(f"{what}: input directory holds no files", input=what, path=str(root))
        # Largest first, so one big shard does not start last and run alone.
        order: Sequence[str] = [rel for rel, _ in sorted(scan.found, key=lambda t: -t[1])]
        count = min(workers or default_workers(), len(order))
        if count == 1:
            files = [scan.hash_one(root_fd, rel) for rel in order]
        else:
            pool = ThreadPoolExecutor(max_workers=count, thread_name_prefix="hash")
            try:
                files = list(pool.map(lambda rel: scan.hash_one(root_fd, rel), order))
            finally:
                # On a refusal, do not hash the rest; running reads end before root_fd closes.
                pool.shutdown(wait=True, cancel_futures=True)
    finally:
        os.close(root_fd)
    try:
        return make_tree(files)
    except ValueError as exc:  # cannot happen for a real directory; kept as a guard
        raise InputError(f"{what}: {exc}", input=what, path=str(root)) from None

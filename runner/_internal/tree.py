"""Walking, reading and digesting directory trees without following links.

:func:`scan_tree` lists a tree and :func:`open_beneath` opens one file in it;
neither follows a symlink anywhere below the root, so a link can neither be
read through nor swapped in mid-walk. Bundles, the tar writer and the two tree
digests (:class:`TreeDigestFormat`) all walk trees with these.
"""

from __future__ import annotations

import contextlib
import enum
import errno
import hashlib
import io
import os
import shutil
import stat
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Literal

from runner.errors import InputError, UnsafeBundleEntry
from runner.shared.tarformat import MAX_DEPTH, path_structure_reason, unsafe_path_reason

# Large enough that syscalls are negligible, small enough to stay in L2 while hashed.
READ_CHUNK = 1 << 20

EntryKind = Literal["file", "dir", "symlink", "special"]


@dataclass(frozen=True)
class TreeEntry:
    """One entry found under a root; ``path`` is '/'-separated and root-relative."""

    path: str
    kind: EntryKind
    size: int
    links: int = 1


def _kind_of(mode: int) -> EntryKind:
    if stat.S_ISREG(mode):
        return "file"
    if stat.S_ISDIR(mode):
        return "dir"
    if stat.S_ISLNK(mode):
        return "symlink"
    return "special"


def open_root(root: Path) -> int:
    """A directory fd for ``root`` (which itself may be a link: the caller named it).

    Raises InputError naming ``root`` if it is missing or not a directory.
    """
    try:
        return os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except FileNotFoundError as exc:
        raise InputError("directory not found", file=str(root)) from exc
    except NotADirectoryError as exc:
        raise InputError("not a directory", file=str(root)) from exc


def scan_tree(root: Path) -> list[TreeEntry]:
    """List everything under ``root`` (not root itself), sorted by path, following no links.

    Directories are opened relative to their parent with O_NOFOLLOW, so a link
    can neither be listed through nor swapped in mid-walk. Symlinks, devices,
    FIFOs and sockets are reported with their kind, never opened. Names that
    are not safe paths (see :func:`unsafe_path_reason`) are reported as they are.
    Nesting deeper than :data:`MAX_DEPTH` raises UnsafeBundleEntry.
    """
    root_fd = open_root(root)
    out: list[TreeEntry] = []
    try:
        _scan_dir(root_fd, "", out, 0)
    finally:
        os.close(root_fd)
    out.sort(key=lambda e: e.path)
    return out


def _scan_dir(dir_fd: int, prefix: str, out: list[TreeEntry], depth: int) -> None:
    if depth > MAX_DEPTH:
        raise UnsafeBundleEntry(
            f"directories nested deeper than {MAX_DEPTH} levels at {prefix!r}",
            path=prefix,
            reason="nesting too deep",
        )
    with os.scandir(dir_fd) as it:
        entries = list(it)
    for entry in entries:
        rel = prefix + entry.name
        st = entry.stat(follow_symlinks=False)
        kind = _kind_of(st.st_mode)
        size = st.st_size if kind == "file" else 0
        out.append(TreeEntry(rel, kind, size, st.st_nlink if kind == "file" else 1))
        if kind == "dir":
            sub_fd = os.open(
                entry.name,
                os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                dir_fd=dir_fd,
            )
            try:
                _scan_dir(sub_fd, rel + "/", out, depth + 1)
            finally:
                os.close(sub_fd)


def open_beneath(root_fd: int, path: str, *, portable: bool = True) -> int:
    """Open the regular file ``path`` under the directory ``root_fd`` for reading.

    Every component is opened with O_NOFOLLOW relative to its parent, so no
    symlink anywhere on the way is followed. Raises UnsafeBundleEntry for an
    unsafe path (:func:`unsafe_path_reason`; only the structure rule when
    ``portable`` is False), a link, or anything that is not a regular file;
    FileNotFoundError if it does not exist.
    """
    reason = unsafe_path_reason(path) if portable else path_structure_reason(path)
    if reason:
        raise UnsafeBundleEntry(f"unsafe path {path!r}", path=path, reason=reason)
    parts = path.split("/")
    fd = os.dup(root_fd)
    try:
        for part in parts[:-1]:
            try:
                next_fd = os.open(
                    part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd
                )
            except OSError as exc:
                if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                    raise UnsafeBundleEntry(
                        f"{path!r}: {part!r} is a symlink or not a directory",
                        path=path,
                        reason="symlink or non-directory on the path",
                    ) from exc
                raise
            os.close(fd)
            fd = next_fd
        try:
            # O_NONBLOCK: opening a FIFO must not hang; it is rejected just below
            file_fd = os.open(
                parts[-1], os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=fd
            )
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise UnsafeBundleEntry(
                    f"{path!r} is a symlink", path=path, reason="symlink"
                ) from exc
            raise
    finally:
        os.close(fd)
    mode = os.fstat(file_fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(file_fd)
        kind = _kind_of(mode)
        raise UnsafeBundleEntry(
            f"{path!r} is not a regular file ({kind})",
            path=path,
            reason=f"not a regular file: {kind}",
        )
    os.set_blocking(file_fd, True)
    return file_fd


def hash_fd(fd: int, copy_to: int | None = None) -> tuple[str, int]:
    """(sha256 hex, size) of everything read from ``fd``; also written to ``copy_to`` if given."""
    digest = hashlib.sha256()
    buffer = bytearray(READ_CHUNK)
    view = memoryview(buffer)
    size = 0
    with io.FileIO(fd, "rb", closefd=False) as reader:
        while n := reader.readinto(buffer):
            chunk = view[:n]
            digest.update(chunk)
            if copy_to is not None:
                written = 0
                while written < n:
                    written += os.write(copy_to, chunk[written:])
            size += n
    return digest.hexdigest(), size


def sha256_file(path: Path) -> str:
    """sha256 hex of one file the caller named (a link there is followed: the caller chose it)."""
    with path.open("rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def remove_tree(path: Path) -> None:
    """Remove ``path`` and everything under it, read-only entries included; links not followed."""
    if path.is_symlink() or not path.is_dir():
        path.unlink(missing_ok=True)
        return
    for dirpath, dirnames, _ in os.walk(path):
        with contextlib.suppress(OSError):
            Path(dirpath).chmod(0o700)
        for name in dirnames:
            sub = Path(dirpath) / name
            if not sub.is_symlink():
                with contextlib.suppress(OSError):
                    sub.chmod(0o700)
    shutil.rmtree(path)


# --- tree digests ---------------------------------------------------------------


class TreeDigestFormat(enum.Enum):
    """The two recorded byte layouts of a tree digest; locks and bundles hold values of both.

    Both start from the tag ``evalrun-tree/v1`` yet hash different lines: a
    historical accident (two modules each wrote their own) that cannot be
    repaired without changing recorded values, which ``evalrun rerun`` re-checks.
    New callers pick one of these two; there is no third.

    ``BUILD_CONTEXT`` (``context_sha256`` of an image lock): one line
    ``"<path> <x|-> <sha256 hex>\\n"`` per regular file, ``x`` when the runner may
    execute it; ``__pycache__`` trees and ``*.pyc`` files are left out; the value
    is the bare hex digest.

    ``CODE`` (``code_digest`` of a preprocessing step): one line
    ``"<path>\\0sha256:<sha256 hex>\\n"`` per regular file; ``__pycache__`` trees
    are left out (``*.pyc`` elsewhere are not); the value is ``sha256:``-prefixed.

    In both, paths are root-relative, '/'-separated, ordered component by
    component (as ``sorted()`` orders ``pathlib`` paths: ``a/b`` before ``a-c``);
    a ``__pycache__`` anywhere in the root's own path leaves every file out (as
    it always did); devices, FIFOs and sockets are skipped unread.
    """

    BUILD_CONTEXT = "build-context"
    CODE = "code"


_TREE_TAG = b"evalrun-tree/v1\n"


def digest_tree(root: Path, fmt: TreeDigestFormat, *, what: str) -> str:
    """The digest of the directory ``root`` in the layout ``fmt``; no link is followed.

    A symlink anywhere below ``root`` raises InputError naming it (``what``, e.g.
    "build context", says whose); so does nesting deeper than :data:`MAX_DEPTH`.
    """
    try:
        entries = scan_tree(root)
    except UnsafeBundleEntry as exc:
        raise InputError(f"{what}: {exc.message}", file=str(root)) from exc
    entries.sort(key=lambda e: e.path.split("/"))
    in_pycache = "__pycache__" in root.parts
    h = hashlib.sha256(_TREE_TAG)
    root_fd = open_root(root)
    try:
        for entry in entries:
            if entry.kind == "symlink":
                raise InputError(
                    f"{what} contains a symlink: {entry.path}", file=str(root / entry.path)
                )
            if entry.kind != "file" or in_pycache or "__pycache__" in entry.path.split("/"):
                continue
            if fmt is TreeDigestFormat.BUILD_CONTEXT:
                if PurePosixPath(entry.path).suffix == ".pyc":
                    continue
                exe = "x" if os.access(root / entry.path, os.X_OK) else "-"
                h.update(f"{entry.path} {exe} {_sha256_beneath(root_fd, entry.path)}\n".encode())
            else:
                h.update(f"{entry.path}\0sha256:{_sha256_beneath(root_fd, entry.path)}\n".encode())
    finally:
        os.close(root_fd)
    return h.hexdigest() if fmt is TreeDigestFormat.BUILD_CONTEXT else "sha256:" + h.hexdigest()


def _sha256_beneath(root_fd: int, path: str) -> str:
    fd = open_beneath(root_fd, path, portable=False)
    try:
        return hash_fd(fd)[0]
    finally:
        os.close(fd)

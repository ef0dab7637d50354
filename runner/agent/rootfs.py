"""Rootfs content digest: a deterministic hash over the image's files, and its table.

One line per entry, sorted by path: type, path, mode, uid, gid, size and the
sha256 of a file's bytes or a link's target. Timestamps are left out. Paths that
the container runtime mounts or rewrites at start are excluded, so the digest
computed at build time equals the one the agent recomputes in the sandbox.

The lines themselves are the image's **digest table** (:data:`TABLE_PATH` in images
evalrun builds): the rootfs digest is the sha256 of the scheme line followed by the
table, so a table is bound to the locked digest by hashing it, and single files can
be checked against it without walking the whole image.
"""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Iterator

from runner.shared.rootfs_table import ROOTFS_SCHEME, table_digest

__all__ = ["ROOTFS_SCHEME", "rootfs_digest", "rootfs_entries", "rootfs_table"]

# Mount points and runtime-managed files; their content is not part of the image.
EXCLUDED = (
    "/proc",
    "/sys",
    "/dev",
    "/tmp",
    "/run",
    "/evalrun",
    "/etc/hosts",
    "/etc/hostname",
    "/etc/resolv.conf",
    "/etc/mtab",
    "/.dockerenv",
    "/var/run/secrets",
)


def hash_workers() -> int:
    """Threads that hash files at once: every core (hashlib and reads release the GIL)."""
    return max(2, min(32, (os.cpu_count() or 1) * 2))


def file_sha256(path: str) -> str:
    try:
        with open(path, "rb") as fh:
            return hashlib.file_digest(fh, "sha256").hexdigest()
    except PermissionError:
        return "unreadable"


def is_excluded(path: str, excluded: tuple[str, ...] = EXCLUDED) -> bool:
    """Whether ``path`` (absolute, normalized) is a runtime path outside the digest."""
    return any(path == e or path.startswith(e + "/") for e in excluded)


def rootfs_entries(root: str = "/", excluded: tuple[str, ...] = EXCLUDED) -> Iterator[str]:
    """Yield one canonical line per filesystem entry under ``root``, sorted by path.

    The tree is walked in one thread; file contents are hashed on all cores.
    """
    root = root.rstrip("/") or "/"
    stack = [root]
    entries: list[str] = []
    files: list[tuple[int, str, str]] = []  # (index in entries, head, full path)
    while stack:
        directory = stack.pop()
        try:
            names = os.listdir(directory)
        except PermissionError:
            entries.append(f"unreadable-dir {_rel(root, directory)}")
            continue
        for name in names:
            full = os.path.join(directory, name)
            rel = _rel(root, full)
            if is_excluded(rel, excluded):
                continue
            st = os.lstat(full)
            mode = stat.S_IMODE(st.st_mode)
            head = f"{rel} {mode:04o} {st.st_uid}:{st.st_gid}"
            if stat.S_ISDIR(st.st_mode):
                entries.append(f"d {head}")
                stack.append(full)
            elif stat.S_ISLNK(st.st_mode):
                entries.append(f"l {head} -> {os.readlink(full)}")
            elif stat.S_ISREG(st.st_mode):
                files.append((len(entries), f"f {head} {st.st_size}", full))
                entries.append("")
            else:
                entries.append(f"o {head} {stat.S_IFMT(st.st_mode):o}")
    # imported here: a run checked by what it uses never walks the image (and under gVisor
    # each module the agent loads costs it ~5 ms on the evaluation's CPU)
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(hash_workers()) as pool:
        digests = pool.map(file_sha256, [f[2] for f in files], chunksize=64)
        for (index, head, _), digest in zip(files, digests, strict=True):
            entries[index] = f"{head} {digest}"
    entries.sort(key=lambda line: line.split(" ", 2)[1])
    yield from entries


def _rel(root: str, full: str) -> str:
    if root == "/":
        return full
    return "/" + os.path.relpath(full, root)


def rootfs_table(root: str = "/") -> bytes:
    """The digest table of the filesystem under ``root``: one line per entry."""
    return b"".join(
        line.encode("utf-8", "surrogateescape") + b"\n" for line in rootfs_entries(root)
    )


def rootfs_digest(root: str = "/") -> tuple[str, int]:
    """Return (``sha256:…`` digest, entry count) of the filesystem under ``root``."""
    lines = [line.encode("utf-8", "surrogateescape") + b"\n" for line in rootfs_entries(root)]
    return table_digest(lines), len(lines)

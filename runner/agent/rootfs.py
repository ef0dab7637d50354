"""Rootfs content digest: a deterministic hash over the image's files.

One line per entry, sorted by path: type, path, mode, uid, gid, size and the
sha256 of a file's bytes or a link's target. Timestamps are left out. Paths that
the container runtime mounts or rewrites at start are excluded, so the digest
computed at build time equals the one the agent recomputes in the sandbox.
"""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Iterator

ROOTFS_SCHEME = "evalrun-rootfs/v1"

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


def _file_sha256(path: str) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def _excluded(path: str, excluded: tuple[str, ...]) -> bool:
    return any(path == e or path.startswith(e + "/") for e in excluded)


def rootfs_entries(root: str = "/", excluded: tuple[str, ...] = EXCLUDED) -> Iterator[str]:
    """Yield one canonical line per filesystem entry under ``root``, sorted by path."""
    root = root.rstrip("/") or "/"
    stack = [root]
    entries: list[str] = []
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
            if _excluded(rel, excluded):
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
                try:
                    digest = _file_sha256(full)
                except PermissionError:
                    digest = "unreadable"
                entries.append(f"f {head} {st.st_size} {digest}")
            else:
                entries.append(f"o {head} {stat.S_IFMT(st.st_mode):o}")
    entries.sort(key=lambda line: line.split(" ", 2)[1])
    yield from entries


def _rel(root: str, full: str) -> str:
    if root == "/":
        return full
    return "/" + os.path.relpath(full, root)


def rootfs_digest(root: str = "/") -> tuple[str, int]:
    """Return (``sha256:…`` digest, entry count) of the filesystem under ``root``."""
    h = hashlib.sha256(f"{ROOTFS_SCHEME}\n".encode())
    count = 0
    for line in rootfs_entries(root):
        h.update(line.encode("utf-8", "surrogateescape") + b"\n")
        count += 1
    return "sha256:" + h.hexdigest(), count

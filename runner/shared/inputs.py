"""Input content as host and agent both check it: streaming sha256 and the tree digest.

Standard library only (the in-container agent imports it). The tree digest
``evalrun-input-tree/v1`` of a directory input is defined once, here; the host's
scanner (``runner._internal.input_tree``) adds the path rules and parallel hashing.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Callable, Iterable

TREE_TAG = "evalrun-input-tree/v1"
READ_CHUNK = 1024 * 1024
"""Bytes per read while hashing: syscalls cost little next to SHA-256 at this size, and
the buffer stays in L2 between the read and the hash (4 MiB is no faster)."""


def tree_digest_of(entries: Iterable[tuple[str, str, int]]) -> str:
    """``sha256:<hex>`` over ``(path, sha256 hex, size)`` of every regular file of a tree.

    The encoding: ``b"evalrun-input-tree/v1\\n"``, then one line
    ``<sha256> <size> <path>\\n`` per file in ascending order of the UTF-8 bytes of the
    path. The caller makes sure paths are clean and unique.
    """
    h = hashlib.sha256(TREE_TAG.encode() + b"\n")
    for path, sha256, size in sorted(entries, key=lambda e: e[0].encode("utf-8")):
        h.update(f"{sha256} {size} {path}\n".encode())
    return "sha256:" + h.hexdigest()


def hash_fd(fd: int, *, on_bytes: Callable[[int], None] | None = None) -> tuple[str, int]:
    """(sha256 hex, bytes read) of an open descriptor from its offset to EOF, streaming."""
    digest = hashlib.sha256()
    buffer = bytearray(READ_CHUNK)
    view = memoryview(buffer)
    size = 0
    with io.FileIO(fd, "rb", closefd=False) as reader:
        while n := reader.readinto(buffer):
            digest.update(view[:n])
            size += n
            if on_bytes is not None:
                on_bytes(n)
    return digest.hexdigest(), size

"""Input content as host and agent both check it: streaming sha256 and the tree digest.

Standard library only (the in-container agent imports it). The tree digest
``evalrun-input-tree/v1`` of a directory input is defined once, here; the host's
scanner (``runner._internal.input_tree``) adds the path rules and parallel hashing.
"""

from __future__ import annotations

import hashlib
import io
import mmap
from collections.abc import Callable, Iterable

TREE_TAG = "evalrun-input-tree/v1"
READ_CHUNK = 1024 * 1024
"""Bytes per read while hashing: syscalls cost little next to SHA-256 at this size, and
the buffer stays in L2 between the read and the hash (4 MiB is no faster)."""


MAP_FROM = 4 * 1024 * 1024
"""Files from this size on are hashed where they lie (:func:`hash_mapped`) by the agent.
Measured in gVisor (digits image, cold, one CPU): below 1 MiB a read is sooner (mapping
and unmapping cost more than the copy), from 1 to 4 MiB both take as long, from 4 MiB on
a mapping is about twice as fast."""
_MAP_SLICE = 64 * 1024 * 1024
_HEAD = 16


def hash_mapped(fd: int, size: int) -> tuple[str, bytes] | None:
    """(sha256 hex, first 16 bytes) of the first ``size`` bytes of the regular file open
    as ``fd``, hashed from a read-only mapping of it; None when it cannot be mapped (the
    caller then reads it).

    In gVisor's sandbox a read copies the file's bytes out of the sandbox's own cache of
    them (~0.4 GB/s cold under the ptrace platform); a mapping hashes those pages where they
    lie, 1.5 to 2 times sooner for the agent's libraries and inputs. A file made shorter
    while it is hashed ends the process (SIGBUS): the run fails, it never passes.
    """
    if size <= 0:  # a length of 0 would map the whole file
        return None
    try:
        view = mmap.mmap(fd, size, prot=mmap.PROT_READ)
    except (OSError, ValueError, OverflowError):
        return None
    with view:
        digest = hashlib.sha256()
        with memoryview(view) as whole:
            for start in range(0, size, _MAP_SLICE):  # slices: the GIL is let go per call
                digest.update(whole[start : start + _MAP_SLICE])
        return digest.hexdigest(), bytes(view[:_HEAD])


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

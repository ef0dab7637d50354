"""Reading a file that someone else named: regular files only, never blocking, never unbounded.

A spec, a lock, a key or a matrix file is named by a user, but its path can lead to a
FIFO (opening it for reading would wait for a writer), ``/dev/zero`` (reading never
ends), a directory or a file far larger than anything evalrun writes. Every such read
goes through :func:`read_regular_file`: opened with ``O_NONBLOCK``, checked with
``fstat`` on the descriptor it will read (so it cannot be swapped after the check),
and read to at most ``max_bytes``.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from runner.errors import RefusedFile

_CHUNK = 1 << 20


def _kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file"


def read_regular_file(path: Path, *, max_bytes: int, follow_links: bool = True) -> bytes:
    """The bytes of the regular file ``path``, at most ``max_bytes`` of them.

    Raises FileNotFoundError when nothing is there, and :class:`RefusedFile` (with a
    reason fit for a one-line message) for a directory, FIFO, device or socket, a file
    larger than ``max_bytes`` (by its size, or by what a read returns for files such as
    those in ``/proc`` that report none), a name the system refuses (too long, a loop
    of links) or a permission error. ``follow_links=False`` also refuses a symlink.
    """
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | (0 if follow_links else os.O_NOFOLLOW)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise RefusedFile(exc.strerror or type(exc).__name__) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise RefusedFile(f"is {_kind(st.st_mode)}, not a regular file")
        if st.st_size > max_bytes:
            raise RefusedFile(f"is {st.st_size} bytes; the limit is {max_bytes}")
        os.set_blocking(fd, True)
        chunks: list[bytes] = []
        total = 0
        while total <= max_bytes:
            try:
                chunk = os.read(fd, min(_CHUNK, max_bytes + 1 - total))
            except OSError as exc:
                raise RefusedFile(exc.strerror or type(exc).__name__) from None
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
        if total > max_bytes:
            raise RefusedFile(f"is larger than {max_bytes} bytes")
        return b"".join(chunks)
    finally:
        os.close(fd)


__all__ = ["RefusedFile", "read_regular_file"]

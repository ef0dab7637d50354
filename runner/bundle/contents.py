"""One file of a bundle, read the only way bundle files are read after verification.

A bundle is a directory or its ``.tar`` form. :func:`read_bundle_file` returns the
bytes of one payload or metadata file: a regular file at a safe path (in a directory,
opened component by component with ``O_NOFOLLOW``; in a tar, a regular member of a tar
that holds no link, device or duplicate), never more than ``max_bytes``. Callers that
hold a :class:`~runner.bundle.verify.VerifiedBundle` read through it, which also checks
the bytes against the signed manifest, so what they use is exactly what was verified.
"""

from __future__ import annotations

import os
import tarfile
from pathlib import Path

from runner._internal.files import RefusedFile
from runner._internal.tar import iter_chunks
from runner._internal.tree import READ_CHUNK, open_beneath, open_root
from runner.bundle.archive import open_bundle_tar, scan_tar
from runner.errors import IntegrityError, UnsafeBundleEntry


def _read_fd(fd: int, max_bytes: int) -> bytes:
    if os.fstat(fd).st_size > max_bytes:
        raise RefusedFile(f"larger than {max_bytes} bytes")
    chunks: list[bytes] = []
    total = 0
    while total <= max_bytes:
        chunk = os.read(fd, min(READ_CHUNK, max_bytes + 1 - total))
        if not chunk:
            break
        chunks.append(chunk)
        total += len(chunk)
    if total > max_bytes:
        raise RefusedFile(f"larger than {max_bytes} bytes")
    return b"".join(chunks)


def _from_directory(root: Path, name: str, max_bytes: int) -> bytes:
    root_fd = open_root(root)
    try:
        fd = open_beneath(root_fd, name)
    finally:
        os.close(root_fd)
    try:
        return _read_fd(fd, max_bytes)
    finally:
        os.close(fd)


def _from_tar(tar_path: Path, name: str, max_bytes: int) -> bytes:
    try:
        with open_bundle_tar(tar_path) as tar:
            members, problems = scan_tar(tar)
            if problems:
                raise UnsafeBundleEntry(
                    f"bundle tar {tar_path.name}: {problems[0]}",
                    path=str(tar_path),
                    reason=problems[0],
                )
            member = next((m for m in members if m.path == name), None)
            if member is None:
                raise FileNotFoundError(name)
            if member.member.size > max_bytes:
                raise RefusedFile(f"larger than {max_bytes} bytes")
            return b"".join(iter_chunks(tar, member.member))
    except (tarfile.TarError, EOFError) as exc:
        raise IntegrityError(
            f"bundle tar {tar_path.name} is truncated or corrupt: {exc}", path=str(tar_path)
        ) from exc


def read_bundle_file(bundle: Path, name: str, *, max_bytes: int) -> bytes:
    """The bytes of the file ``name`` ('/'-separated) of the bundle directory or tar ``bundle``.

    Raises FileNotFoundError when the bundle has no such file, UnsafeBundleEntry
    (exit 3) for a link, special file or unsafe path on the way, IntegrityError for a
    corrupt tar, and :class:`~runner._internal.files.RefusedFile` when the file is
    larger than ``max_bytes``. Nothing is read beyond ``max_bytes``.
    """
    if bundle.is_dir():
        return _from_directory(bundle, name, max_bytes)
    return _from_tar(bundle, name, max_bytes)


__all__ = ["read_bundle_file"]

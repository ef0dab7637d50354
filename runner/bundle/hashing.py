"""Hashing the files of a bundle, several at once, without following a link."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from runner._internal.tree import hash_fd, open_beneath, open_root
from runner.errors import UnsafeBundleEntry

_T = TypeVar("_T")
_R = TypeVar("_R")


@dataclass(frozen=True)
class FileDigest:
    """The sha256 hex and size of one file, as read by the runner."""

    path: str
    sha256: str
    size: int


def default_workers() -> int:
    """How many files are hashed at once: one per CPU, at most 8."""
    return max(1, min(8, os.cpu_count() or 1))


def hash_files(
    root: Path, paths: Sequence[str], *, workers: int | None = None
) -> tuple[dict[str, FileDigest], dict[str, str]]:
    """Hash each regular file ``paths[i]`` under ``root``; return (digests, errors).

    Files are opened with :func:`open_beneath` (no link is followed) and read in
    :data:`READ_CHUNK` pieces, several files at once. ``errors`` maps each path
    that could not be hashed to the reason (missing, symlink, not a regular file).
    """
    root_fd = open_root(root)
    try:

        def one(path: str) -> FileDigest | str:
            try:
                fd = open_beneath(root_fd, path)
            except UnsafeBundleEntry as exc:
                return exc.reason
            except FileNotFoundError:
                return "missing"
            except OSError as exc:
                return f"cannot open: {exc.strerror}"
            try:
                sha, size = hash_fd(fd)
            except OSError as exc:
                return f"cannot read: {exc.strerror}"
            finally:
                os.close(fd)
            return FileDigest(path, sha, size)

        results = map_in_threads(one, paths, workers)
    finally:
        os.close(root_fd)
    digests: dict[str, FileDigest] = {}
    errors: dict[str, str] = {}
    for path, result in zip(paths, results, strict=True):
        if isinstance(result, FileDigest):
            digests[path] = result
        else:
            errors[path] = result
    return digests, errors


def map_in_threads(fn: Callable[[_T], _R], items: Sequence[_T], workers: int | None) -> list[_R]:
    """``[fn(item) for item in items]`` on up to ``workers`` threads (default_workers())."""
    count = workers or default_workers()
    if count <= 1 or len(items) <= 1:
        return [fn(item) for item in items]
    with ThreadPoolExecutor(max_workers=min(count, len(items))) as pool:
        return list(pool.map(fn, items))

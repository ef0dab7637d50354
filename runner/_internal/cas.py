"""A content-addressed cache for inputs: blobs by sha256, directory trees of hard links.

Layout under the root (the integrator passes ``Settings().cache``, i.e. ``$EVALRUN_CACHE``
or ``~/.cache/evalrun``)::

    blobs/sha256/<hex>       file contents, mode 0444, named by the sha256 of their bytes
    trees/<hex>/             a directory input, materialized from blobs (read-only)
    trees/<hex>.json         its file list (``InputFile``s), written before the tree appears
    tmp/                     partial writes; same filesystem, so publishing is a rename
    locks/<key>.lock         advisory locks so two processes do not fetch the same thing twice
    memo/<kind>/<hex>        small derived facts worth not recomputing (e.g. the digest of
                             the OCI layer a blob is published as), keyed by a digest

Promises:

* A blob only appears complete and verified: bytes stream into a temp file while being
  hashed, the file is fsynced and compared with the expected digest, and only then
  linked into place. A mismatch raises :class:`~runner.errors.DigestMismatch` and leaves
  nothing behind. Two processes writing the same blob both succeed; the first link wins
  and the second is dropped, so an existing blob's inode never changes.
* A tree only appears complete: it is built in ``tmp/`` from hard links to its blobs
  (a copy only where a link is impossible: another filesystem, the link-count limit),
  made read-only, fsynced, and renamed into place. A tree present is a tree complete.
* Nothing here ever follows a link in a name it did not make, and names come only from
  validated :class:`~runner._internal.input_tree.InputFile` paths and hex digests.

The cache is trusted like the rest of the runner host: hits are not re-hashed
(:meth:`ContentStore.verify_blob` does that on demand).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import io
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import TracebackType

from runner._internal.input_tree import (
    READ_CHUNK,
    InputFile,
    hash_file,
    sorted_files,
    tree_digest,
)
from runner.errors import DigestMismatch, IntegrityError

_HEX = re.compile(r"^[0-9a-f]{64}$")
_BLOB_MODE = 0o444
_DIR_MODE = 0o555
# A link-count limit (ext4: 65000) or another filesystem forces a copy; nothing else does.
_COPY_INSTEAD = {errno.EXDEV, errno.EMLINK, errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP}


def _hex_of(digest: str) -> str:
    """``<hex>`` from ``<hex>`` or ``sha256:<hex>``; ValueError for anything else."""
    value = digest.removeprefix("sha256:")
    if not _HEX.match(value):
        raise ValueError(f"not a sha256 digest: {digest!r}")
    return value


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_tree(path: Path) -> None:
    """Delete a (possibly read-only) directory tree that this store made."""
    if path.is_symlink() or not path.is_dir():
        return
    for dirpath, _dirs, _files in os.walk(path):  # top-down: unlock before descending
        Path(dirpath).chmod(0o700)
    shutil.rmtree(path)


class BlobWriter:
    """Streams bytes into a temp file while hashing them; :meth:`commit` publishes.

    Use as a context manager: leaving it without :meth:`commit` (an error, a mismatch,
    or a caller that staged and then decided against it) removes the temp file.
    """

    def __init__(self, store: ContentStore, *, what: str, expected: str | None) -> None:
        self._store = store
        self.what = what
        self.expected = _hex_of(expected) if expected is not None else None
        fd, name = tempfile.mkstemp(dir=store.tmp_dir, prefix="blob-")
        self._fd: int | None = fd
        self._temp = Path(name)
        self._hash = hashlib.sha256()
        self.size = 0
        self._sealed: str | None = None

    def __enter__(self) -> BlobWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.discard()

    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Append ``data`` (hashing it on the way)."""
        if self._fd is None or self._sealed is not None:
            raise RuntimeError("write after seal, commit or discard")
        self._hash.update(data)
        view = memoryview(data)
        while view:
            view = view[os.write(self._fd, view) :]
        self.size += len(data)

    def reset(self) -> None:
        """Start over from byte 0 (a source that could not resume where it stopped)."""
        if self._fd is None or self._sealed is not None:
            raise RuntimeError("reset after seal, commit or discard")
        os.ftruncate(self._fd, 0)
        os.lseek(self._fd, 0, os.SEEK_SET)
        self._hash = hashlib.sha256()
        self.size = 0

    def seal(self) -> str:
        """Finish: fsync, and check the expected digest. Returns the hex digest.

        Raises :class:`~runner.errors.DigestMismatch` (and discards the bytes) when the
        content is not what was expected. A sealed writer can still be discarded.
        """
        if self._sealed is not None:
            return self._sealed
        if self._fd is None:
            raise RuntimeError("seal after discard")
        os.fsync(self._fd)
        os.close(self._fd)
        self._fd = None
        found = self._hash.hexdigest()
        if self.expected is not None and found != self.expected:
            self.discard()
            raise DigestMismatch(
                self.what,
                expected=f"sha256:{self.expected}",
                found=f"sha256:{found}",
                hint="the source does not hold the bytes the spec pins; nothing was cached",
            )
        self._sealed = found
        return found

    def commit(self) -> Path:
        """Seal, then publish as ``blobs/sha256/<hex>`` (read-only); returns that path."""
        found = self.seal()
        target = self._store.blob_path(found)
        self._temp.chmod(_BLOB_MODE)
        try:
            os.link(self._temp, target)
        except FileExistsError:
            pass  # another writer published the same bytes first; keep its inode
        except OSError as exc:
            if exc.errno not in _COPY_INSTEAD:
                raise
            self._temp.replace(target)  # no hard links here: an atomic rename is enough
        _fsync_dir(target.parent)
        self.discard()
        return target

    def discard(self) -> None:
        """Drop the temp file (idempotent)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        with contextlib.suppress(FileNotFoundError):
            self._temp.unlink()


class ContentStore:
    """The content-addressed input cache rooted at ``root`` (created on first use)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.blobs_dir = root / "blobs" / "sha256"
        self.trees_dir = root / "trees"
        self.tmp_dir = root / "tmp"
        self.locks_dir = root / "locks"
        self.memo_dir = root / "memo"
        for d in (self.blobs_dir, self.trees_dir, self.tmp_dir, self.locks_dir):
            d.mkdir(parents=True, exist_ok=True)

    # ------------------------------------------------------------------ blobs

    def blob_path(self, digest: str) -> Path:
        """Where the blob with this sha256 (``hex`` or ``sha256:hex``) lives or would live."""
        return self.blobs_dir / _hex_of(digest)

    def has_blob(self, digest: str) -> bool:
        """Whether the blob is in the cache."""
        return self.blob_path(digest).is_file()

    def writer(self, *, what: str, expected: str | None = None) -> BlobWriter:
        """A :class:`BlobWriter`; with ``expected``, a mismatch raises and caches nothing.

        Without ``expected`` the bytes are named by what they hash to (for sources whose
        per-file digests are learnt only by downloading, such as an S3 prefix): seal
        them, check the whole first, then commit or discard.
        """
        return BlobWriter(self, what=what, expected=expected)

    def put_file(
        self,
        source: Path,
        *,
        what: str,
        expected: str,
        on_bytes: Callable[[int], None] | None = None,
    ) -> Path:
        """Copy a local file in, verified while it streams; returns the blob path.

        A hit (the blob already there) reads nothing. The source is opened without
        following a link (the caller resolves the input path first).
        """
        if self.has_blob(expected):
            return self.blob_path(expected)
        fd = os.open(source, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
        try:
            with (
                self.writer(what=what, expected=expected) as w,
                io.FileIO(fd, "rb", closefd=False) as reader,
            ):
                buffer = bytearray(READ_CHUNK)
                view = memoryview(buffer)
                while n := reader.readinto(buffer):
                    w.write(view[:n])
                    if on_bytes is not None:
                        on_bytes(n)
                return w.commit()
        finally:
            os.close(fd)

    def verify_blob(self, digest: str) -> bool:
        """Re-hash a cached blob; False if it is missing or no longer matches its name."""
        path = self.blob_path(digest)
        try:
            return hash_file(path)[0] == _hex_of(digest)
        except FileNotFoundError:
            return False

    # ------------------------------------------------------------------ trees

    def tree_path(self, digest: str) -> Path:
        """Where the tree with this ``sha256:<hex>`` tree digest lives or would live."""
        return self.trees_dir / _hex_of(digest)

    def tree_files(self, digest: str) -> tuple[InputFile, ...] | None:
        """The file list (sorted) of a cached tree, or None when the tree is not here."""
        path = self.tree_path(digest)
        listing = path.with_suffix(".json")
        if not path.is_dir():
            return None
        try:
            raw = json.loads(listing.read_text(encoding="utf-8"))
            files = tuple(InputFile.model_validate(item) for item in raw["files"])
        except (OSError, ValueError, KeyError, TypeError):
            return None
        if tree_digest(files) != f"sha256:{_hex_of(digest)}":
            return None
        return files

    def materialize_tree(self, files: Sequence[InputFile], *, what: str) -> Path:
        """Build (or find) ``trees/<hex>`` for ``files``, whose blobs must all be cached.

        The tree is assembled from hard links in ``tmp/`` and renamed into place, so it is
        complete or absent; every file is 0444 and every directory 0555. Returns its path.
        """
        files = sorted_files(files)
        digest = tree_digest(files)
        target = self.tree_path(digest)
        if self.tree_files(digest) is not None:
            return target
        missing = [f.path for f in files if not self.has_blob(f.sha256)]
        if missing:
            raise IntegrityError(
                f"{what}: cannot build its tree, {len(missing)} blob(s) not in the cache",
                input=what,
                first_missing=missing[0],
            )
        listing = target.with_suffix(".json")
        self._write_listing(listing, files)
        staging = Path(tempfile.mkdtemp(dir=self.tmp_dir, prefix="tree-"))
        try:
            made: set[Path] = {staging}
            for f in files:
                dest = staging.joinpath(*f.path.split("/"))
                for parent in reversed(dest.parents):
                    if parent not in made and staging in parent.parents:
                        parent.mkdir()
                        made.add(parent)
                self._link_or_copy(self.blob_path(f.sha256), dest)
            for d in sorted(made, key=lambda p: len(p.parts), reverse=True):
                _fsync_dir(d)
                d.chmod(_DIR_MODE)
            try:
                staging.rename(target)
            except OSError as exc:
                if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                    raise
                # another process published the same tree first; its copy is as good
            else:
                _fsync_dir(self.trees_dir)
        finally:
            if staging.exists():
                remove_tree(staging)
        return target

    def _write_listing(self, listing: Path, files: Sequence[InputFile]) -> None:
        payload = {"digest": tree_digest(files), "files": [f.model_dump() for f in files]}
        fd, name = tempfile.mkstemp(dir=self.tmp_dir, prefix="listing-")
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            json.dump(payload, out, sort_keys=True, separators=(",", ":"))
            out.flush()
            os.fsync(out.fileno())
        Path(name).chmod(_BLOB_MODE)
        Path(name).replace(listing)

    @staticmethod
    def _link_or_copy(blob: Path, dest: Path) -> None:
        try:
            os.link(blob, dest, follow_symlinks=False)
        except OSError as exc:
            if exc.errno not in _COPY_INSTEAD:
                raise
            shutil.copyfile(blob, dest, follow_symlinks=False)
            dest.chmod(_BLOB_MODE)

    # ------------------------------------------------------------------ memo

    def recall(self, kind: str, key: str) -> str | None:
        """A fact remembered under ``kind``/``key`` (a digest), or None."""
        if not re.fullmatch(r"[a-z0-9-]+", kind):
            raise ValueError(f"bad memo kind {kind!r}")
        try:
            return (self.memo_dir / kind / _hex_of(key)).read_text(encoding="utf-8").strip()
        except (FileNotFoundError, UnicodeDecodeError):
            return None

    def remember(self, kind: str, key: str, value: str) -> None:
        """Remember ``value`` under ``kind``/``key`` (atomically; the last writer wins)."""
        if not re.fullmatch(r"[a-z0-9-]+", kind):
            raise ValueError(f"bad memo kind {kind!r}")
        folder = self.memo_dir / kind
        folder.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=self.tmp_dir, prefix="memo-")
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(value + "\n")
        Path(name).replace(folder / _hex_of(key))

    # ------------------------------------------------------------------ locking

    @contextlib.contextmanager
    def filling(self, key: str) -> Iterator[None]:
        """Hold an exclusive inter-process lock named by a digest while filling it.

        Not needed for safety (writes are atomic and idempotent); it keeps a second
        process from transferring the same gigabytes while the first is at it. The
        lock is released if the holder dies.
        """
        path = self.locks_dir / f"{_hex_of(key)}.lock"
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

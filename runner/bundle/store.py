"""The local bundle store: content addressed, write-once, atomic.

Layout under ``$EVALRUN_HOME`` (default: the user data dir, e.g. ``~/.local/share/evalrun``)::

    bundles/sha256-<bundle digest>/   one read-only bundle per digest (see runner.bundle.build)
    runs/<run id>.json                run index: run id -> bundle digest, outcome, created
    tmp/                              staging; same filesystem, so a put is one rename

A bundle is assembled in a staging dir under ``tmp/`` and moved into ``bundles/``
by a single rename, so an interrupted run leaves nothing half-written there. The
run index is created with a hard link (never overwritten). Storing a digest that
is already present is a no-op that returns the stored bundle.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import stat
import tempfile
import time
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import platformdirs
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from runner._internal.sanitize import exception_text
from runner._internal.tree import open_beneath, remove_tree, scan_tree
from runner.bundle.metadata import (
    ENVELOPE_NAME,
    MANIFEST_NAME,
    METADATA_MAX_BYTES,
    STATEMENT_NAME,
    Statement,
    load_json_strict,
)
from runner.bundle.signing import DsseEnvelope, b64_decode_canonical
from runner.bundle.store_paths import StorePaths, parse_digest
from runner.errors import (
    BundleNotFound,
    InputError,
    IntegrityError,
    StoreConflict,
    StoreFull,
    UnsafeBundleEntry,
)

_RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class RunIndexEntry(BaseModel):
    """``runs/<run_id>.json``: which bundle holds a run, how it ended, when it was stored."""

    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)

    schema_: Literal["evalrun/run-index/v1"] = Field(default="evalrun/run-index/v1", alias="schema")
    run_id: str
    bundle_digest: str
    outcome: str | None
    created: datetime


class StoredBundle(BaseModel):
    """A bundle in the store."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    digest: str = Field(description="'sha256:' + sha256 hex of the bundle's statement.json")
    path: Path
    run_id: str
    outcome: str | None
    created: datetime | None = Field(
        default=None, description="when the run index entry was written (None if unindexed)"
    )


def default_root() -> Path:
    """``$EVALRUN_HOME`` if set, else the platform user data dir for evalrun."""
    env = os.environ.get("EVALRUN_HOME")
    if env:
        return Path(env).expanduser()
    return Path(platformdirs.user_data_dir("evalrun"))


def _outcome_of(predicate: Mapping[str, Any]) -> str | None:
    outcome = predicate.get("outcome")
    if isinstance(outcome, str):
        return outcome
    if isinstance(outcome, Mapping) and isinstance(outcome.get("status"), str):
        status: str = outcome["status"]
        return status
    return None


# The errno values of a filesystem (or quota) that is full.
_FULL = frozenset({errno.ENOSPC, errno.EDQUOT})


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _read_beneath(root: Path, name: str) -> bytes:
    root_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fd = open_beneath(root_fd, name)
    finally:
        os.close(root_fd)
    try:
        if os.fstat(fd).st_size > METADATA_MAX_BYTES:
            raise IntegrityError(f"{name} is too large", path=str(root / name))
        chunks: list[bytes] = []
        while chunk := os.read(fd, 1 << 20):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def _make_read_only(root: Path) -> None:
    # files 0444 and subdirectories 0555; root itself stays writable until it is renamed
    for dirpath, _, filenames in os.walk(root, topdown=False):
        here = Path(dirpath)
        for name in filenames:
            (here / name).chmod(0o444, follow_symlinks=False)
        if here != root:
            here.chmod(0o555)


class Store(StorePaths):
    """The content-addressed bundle store rooted at ``root`` (default: :func:`default_root`)."""

    def __init__(self, root: Path | None = None) -> None:
        super().__init__(root if root is not None else default_root())

    def _ensure_layout(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        for sub in (self.bundles_dir, self.runs_dir, self.tmp_dir):
            sub.mkdir(exist_ok=True, mode=0o755)

    def bundle_path(self, digest: str) -> Path:
        """Where the bundle with ``digest`` lives (or would live)."""
        return self.bundles_dir / f"sha256-{parse_digest(digest)}"

    @contextlib.contextmanager
    def staging_dir(self) -> Iterator[Path]:
        """Yield a fresh empty directory inside the store's ``tmp/``.

        Build the bundle there and :meth:`put` it inside the ``with`` block: on
        leaving the block, whatever is still in the staging dir is removed —
        always on failure (including Ctrl-C), and on success once put has moved
        the bundle out.
        """
        with self.writing():
            self._ensure_layout()
            path = Path(tempfile.mkdtemp(prefix="stage-", dir=self.tmp_dir))
        try:
            with self.writing():
                yield path
        finally:
            if path.exists() or path.is_symlink():
                remove_tree(path)

    @contextlib.contextmanager
    def writing(self) -> Iterator[None]:
        """Turn a full filesystem (ENOSPC, EDQUOT) inside the block into :class:`StoreFull`.

        One line naming the file (when the OS said which) and the store; the staging dir
        is removed by :meth:`staging_dir`, so nothing that looks like a bundle is left.
        """
        try:
            yield
        except OSError as exc:
            if exc.errno not in _FULL:
                raise
            where = f"writing {exc.filename}" if exc.filename else "writing a bundle"
            raise StoreFull(
                f"no space left on device while {where} (store {self.root}); nothing was stored",
                hint="free space on that filesystem, or point EVALRUN_HOME at another one, "
                "and run again",
            ) from exc

    def put(self, staged_bundle_dir: Path) -> StoredBundle:
        """Move a built bundle from a staging dir into the store and index its run.

        ``staged_bundle_dir`` must lie under the store's ``tmp/`` (use
        :meth:`staging_dir`) so the move is one atomic rename. Cheap structural
        checks run first (statement.json is the envelope's payload, no links or
        special files); they do not re-hash the payload — :func:`runner.bundle.verify.verify_bundle`
        does that. The stored bundle is read-only. If the digest is already
        stored, the staged copy is removed and the stored one returned. Raises
        StoreConflict if the run id is already indexed to another bundle.
        """
        self._ensure_layout()
        staged = staged_bundle_dir
        if staged.is_symlink() or not staged.is_dir():
            raise InputError("staged bundle is not a directory", file=str(staged))
        if not staged.resolve().is_relative_to(self.tmp_dir.resolve()):
            raise InputError(
                "bundle to store is not staged inside the store",
                file=str(staged),
                hint="build it in a dir from Store.staging_dir() so the move is atomic",
            )
        statement, statement_bytes = self._check_staged(staged)
        hexdigest = hashlib.sha256(statement_bytes).hexdigest()
        digest = f"sha256:{hexdigest}"
        run_id = statement.run_id
        outcome = _outcome_of(statement.predicate)
        self._refuse_index_conflict(run_id, digest)

        final = self.bundles_dir / f"sha256-{hexdigest}"
        moved = False
        if final.exists():
            remove_tree(staged)
        else:
            _make_read_only(staged)
            try:
                staged.rename(final)
            except OSError as exc:
                if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                    raise
                remove_tree(staged)  # another put stored the same digest first
            else:
                moved = True
                final.chmod(0o555)
                _fsync_dir(self.bundles_dir)
                _fsync_dir(self.tmp_dir)

        try:
            entry = self._index(
                RunIndexEntry(
                    run_id=run_id, bundle_digest=digest, outcome=outcome, created=datetime.now(UTC)
                )
            )
        except OSError:
            if moved:  # a bundle no index names (e.g. the disk filled): not stored after all
                remove_tree(final)
            raise
        return StoredBundle(
            digest=digest, path=final, run_id=run_id, outcome=outcome, created=entry.created
        )

    def _check_staged(self, staged: Path) -> tuple[Statement, bytes]:
        for entry in scan_tree(staged):
            if entry.kind in ("symlink", "special"):
                raise UnsafeBundleEntry(
                    f"refusing to store {entry.path!r}: {entry.kind}",
                    path=str(staged / entry.path),
                    reason=entry.kind,
                )
        try:
            statement_bytes = _read_beneath(staged, STATEMENT_NAME)
            envelope_bytes = _read_beneath(staged, ENVELOPE_NAME)
            manifest_st = (staged / MANIFEST_NAME).lstat()
        except FileNotFoundError as exc:
            raise IntegrityError(
                f"not a bundle: {Path(exc.filename or '?').name} missing", path=str(staged)
            ) from exc
        if not stat.S_ISREG(manifest_st.st_mode):
            raise IntegrityError(f"not a bundle: {MANIFEST_NAME} is not a file", path=str(staged))
        try:
            envelope = DsseEnvelope.model_validate(load_json_strict(envelope_bytes))
            payload = b64_decode_canonical(envelope.payload)
            statement = Statement.model_validate(load_json_strict(statement_bytes))
        except (ValidationError, ValueError) as exc:
            raise IntegrityError(
                f"not a well-formed bundle: {exception_text(exc)}", path=str(staged)
            ) from exc
        if payload != statement_bytes:
            raise IntegrityError(
                f"{STATEMENT_NAME} is not the payload signed in {ENVELOPE_NAME}", path=str(staged)
            )
        return statement, statement_bytes

    def _index_path(self, run_id: str) -> Path:
        if not _RUN_ID.match(run_id):
            raise InputError(f"not a run id: {run_id!r}")
        return self.runs_dir / f"{run_id}.json"

    def _read_index(self, run_id: str) -> RunIndexEntry | None:
        path = self._index_path(run_id)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        try:
            return RunIndexEntry.model_validate(load_json_strict(data))
        except (ValidationError, ValueError) as exc:
            raise IntegrityError(
                f"corrupt run index entry: {exception_text(exc)}", path=str(path)
            ) from exc

    def _refuse_index_conflict(self, run_id: str, digest: str) -> None:
        existing = self._read_index(run_id)
        if existing is not None and existing.bundle_digest != digest:
            raise StoreConflict(
                f"run {run_id} is already stored as another bundle",
                run_id=run_id,
                expected=existing.bundle_digest,
                found=digest,
                hint="a new attempt gets a new run id (evalrun run --rerun)",
            )

    def _index(self, entry: RunIndexEntry) -> RunIndexEntry:
        target = self._index_path(entry.run_id)
        data = json.dumps(entry.model_dump(mode="json", by_alias=True), indent=2, sort_keys=True)
        fd, tmp_name = tempfile.mkstemp(prefix="index-", dir=self.tmp_dir)
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as out:
                out.write(data + "\n")
                out.flush()
                os.fsync(out.fileno())
            tmp.chmod(0o444)
            try:
                os.link(tmp, target)  # atomic create-if-absent: the index is never overwritten
            except FileExistsError:
                existing = self._read_index(entry.run_id)
                if existing is None or existing.bundle_digest != entry.bundle_digest:
                    raise StoreConflict(
                        f"run {entry.run_id} is already stored as another bundle",
                        run_id=entry.run_id,
                        expected=existing.bundle_digest if existing else None,
                        found=entry.bundle_digest,
                    ) from None
                return existing
            _fsync_dir(self.runs_dir)
            return entry
        finally:
            tmp.unlink(missing_ok=True)

    def get(self, digest: str) -> StoredBundle:
        """The stored bundle with ``digest`` (``sha256:<hex>``, ``sha256-<hex>`` or hex).

        Raises BundleNotFound if it is not stored. Does not verify the bundle.
        """
        path = self.bundle_path(digest)
        if not path.is_dir():
            raise BundleNotFound("no stored bundle with this digest", digest=digest)
        try:
            statement_bytes = _read_beneath(path, STATEMENT_NAME)
            statement = Statement.model_validate(load_json_strict(statement_bytes))
        except (OSError, UnsafeBundleEntry, ValidationError, ValueError) as exc:
            raise IntegrityError(
                f"stored bundle is corrupt: {exception_text(exc)}", path=str(path)
            ) from exc
        full = f"sha256:{parse_digest(digest)}"
        entry = self._read_index(statement.run_id)
        return StoredBundle(
            digest=full,
            path=path,
            run_id=statement.run_id,
            outcome=_outcome_of(statement.predicate),
            created=entry.created if entry and entry.bundle_digest == full else None,
        )

    def find_run(self, run_id: str) -> StoredBundle | None:
        """The stored bundle of ``run_id``, or None if that run was never stored.

        Raises IntegrityError if the index names a bundle that is not in the store.
        """
        entry = self._read_index(run_id)
        if entry is None:
            return None
        try:
            return self.get(entry.bundle_digest)
        except BundleNotFound as exc:
            raise IntegrityError(
                f"run {run_id} is indexed to a bundle missing from the store",
                run_id=run_id,
                digest=entry.bundle_digest,
            ) from exc

    def runs(self) -> list[RunIndexEntry]:
        """Every indexed run, oldest first."""
        if not self.runs_dir.is_dir():
            return []
        entries = [
            entry
            for path in self.runs_dir.glob("*.json")
            if (entry := self._read_index(path.stem)) is not None
        ]
        return sorted(entries, key=lambda e: (e.created, e.run_id))

    def remove_stale_staging(self, older_than_s: float = 24 * 3600) -> list[Path]:
        """Remove staging dirs left by killed runs (older than ``older_than_s``); return them."""
        if not self.tmp_dir.is_dir():
            return []
        cutoff = time.time() - older_than_s
        removed: list[Path] = []
        for path in self.tmp_dir.iterdir():
            with contextlib.suppress(FileNotFoundError):
                if path.lstat().st_mtime < cutoff:
                    remove_tree(path)
                    removed.append(path)
        return removed


__all__ = [
    "BundleNotFound",
    "RunIndexEntry",
    "Store",
    "StoreConflict",
    "StoredBundle",
    "default_root",
    "parse_digest",
]

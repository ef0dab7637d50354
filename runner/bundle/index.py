"""Run history: a queryable SQLite index over the bundle store.

The bundles stay the source of truth. The index (``$EVALRUN_HOME/history.sqlite``)
holds what ``runs ls`` filters on — spec name, model/dataset/image digests,
outcome, dates, reproduction links — and is brought up to date from the
``bundles/`` directory before every query: bundles it has not seen are read,
bundles that disappeared are dropped. Deleting the file loses nothing;
:meth:`History.rebuild` (``evalrun runs reindex``) recreates it from the bundles.

The index reads ``statement.json`` without verifying signatures: it is a cache
for finding runs. Anything that acts on a run (rerun, report, diff, audit)
verifies the bundle itself.

Because it is a cache, nothing in it can break a listing: a file that is not a
database, a truncated or damaged one, another schema version or missing tables are
thrown away and rebuilt from the bundles; when ``history.sqlite`` cannot be a file
here at all (a directory, a FIFO in its place) the index lives in memory for this
process. A bundle whose record cannot be stored is listed as unreadable, never fatal;
values read back are checked for their column's type.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import stat
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from runner._internal.sanitize import one_line
from runner.bundle.index_sql import (
    _COLUMNS,
    _LISTING,
    _LISTING_COLUMNS,
    _SCHEMA,
    _children,
    _listing_covers,
    _listing_sql,
    _metric_row,
    _row_record,
    _select,
    insert_record,
)
from runner.bundle.run_records import (
    ListRow,
    MetricRecord,
    RunFilter,
    RunRecord,
    record_from_predicate,
)
from runner.bundle.store_paths import StorePaths, parse_digest
from runner.errors import BundleNotFound, InputError, IntegrityError

log = logging.getLogger("evalrun.index")

INDEX_NAME = "history.sqlite"
SCHEMA_VERSION = "7"

# SQLite's page cache for one connection, in KiB (negative: a size, not pages); the
# default 2 MiB spills to disk while a reindex of 100,000 runs writes its indexes.
_CACHE_KIB = -65536
_T = TypeVar("_T")
# What a damaged index raises: not a database, or text in it that is not UTF-8 (SQLite
# stores what it is given; Python's sqlite3 raises when it decodes such a value).
_DAMAGE = (sqlite3.DatabaseError, UnicodeDecodeError)


@dataclass(frozen=True)
class SyncReport:
    added: int
    removed: int
    unreadable: tuple[str, ...]
    total: int


class History:
    """The SQLite run index of one store."""

    def __init__(self, store: StorePaths) -> None:
        self.store = store
        self.path = store.root / INDEX_NAME
        self._memory: sqlite3.Connection | None = None

    @contextlib.contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        conn = self._open()
        try:
            yield conn
            conn.commit()
        except BaseException:
            conn.rollback()
            raise
        finally:
            if conn is not self._memory:
                conn.close()

    def _open(self) -> sqlite3.Connection:
        """A connection to a usable index: the file, started over if it is not one this
        evalrun can use, or an in-memory index when no file can be there."""
        if self._memory is not None:
            return self._memory
        self.store.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        if not self._file_possible():
            return self._in_memory()
        for attempt in range(2):
            conn: sqlite3.Connection | None = None
            try:
                conn = sqlite3.connect(self.path, timeout=30.0)
                conn.execute("PRAGMA foreign_keys = ON")
                conn.execute(f"PRAGMA cache_size = {_CACHE_KIB}")
                self._ensure_schema(conn)
                return conn
            except _DAMAGE:
                # not a database (damaged, truncated): the index is a cache, start it over
                if conn is not None:
                    conn.close()
                if attempt == 0:
                    self._remove_files()
        return self._in_memory()

    def _file_possible(self) -> bool:
        """Whether the index can be a regular file at its path (a link there is removed)."""
        try:
            st = self.path.lstat()
        except FileNotFoundError:
            return True
        except OSError:
            return False
        if stat.S_ISLNK(st.st_mode):
            self.path.unlink()  # never write through a link planted in the cache's place
            return True
        if stat.S_ISREG(st.st_mode):
            return True
        log.warning(
            "the run index path is not a regular file; indexing in memory",
            extra={"event": "index_in_memory", "path": str(self.path)},
        )
        return False

    def _in_memory(self) -> sqlite3.Connection:
        conn = sqlite3.connect(":memory:")
        conn.execute("PRAGMA foreign_keys = ON")
        self._ensure_schema(conn)
        self._memory = conn
        return conn

    @staticmethod
    def _ensure_schema(conn: sqlite3.Connection) -> None:
        """Create the schema in an empty database; DatabaseError for any other content
        (another version, someone else's tables): the caller starts the file over."""
        try:
            row = conn.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone()
        except sqlite3.DatabaseError:
            row = None
        if row is not None and row[0] == SCHEMA_VERSION:
            return
        # under the write lock, and looked at again: another process (or thread) may be
        # creating the schema right now; seeing its tables half made is not "another schema"
        conn.execute("BEGIN IMMEDIATE")
        try:
            row = conn.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone()
        except sqlite3.OperationalError:  # no meta table yet
            row = None
        if row is not None and row[0] == SCHEMA_VERSION:
            conn.commit()
            return
        if conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]:
            conn.rollback()
            raise sqlite3.DatabaseError("the run index holds another schema")
        for statement in _SCHEMA.strip().split(";"):
            if statement.strip():
                conn.execute(statement)
        conn.execute("INSERT INTO meta VALUES ('schema', ?)", (SCHEMA_VERSION,))
        conn.commit()

    def _bundle_dirs(self) -> dict[str, Path]:
        found: dict[str, Path] = {}
        if not self.store.bundles_dir.is_dir():
            return found
        with os.scandir(self.store.bundles_dir) as entries:
            for entry in entries:
                name = entry.name
                if (
                    name.startswith("sha256-")
                    and len(name) == 71
                    and entry.is_dir(follow_symlinks=False)
                ):
                    found["sha256:" + name[7:]] = self.store.bundles_dir / name
        return found

    def sync(self) -> SyncReport:
        """Index bundles added to the store since the last sync; drop removed ones.

        Concurrent syncs (two ``evalrun`` processes) serialize on SQLite's write
        lock and re-read the index under it, so no bundle is indexed twice. An index
        found damaged on the way is rebuilt.
        """
        return self._recovering(self._sync)

    def _recovering(self, fn: Callable[[], _T]) -> _T:
        """``fn()``; if the index turns out damaged, start it over and run ``fn`` once more."""
        try:
            return fn()
        except _DAMAGE as exc:
            log.warning(
                "the run index is damaged; rebuilding it from the bundles",
                extra={"event": "index_rebuilt", "path": str(self.path), "error": str(exc)},
            )
            if self._memory is not None:
                self._memory.close()
                self._memory = None
            elif self._file_possible():
                self._remove_files()
            try:
                return fn()
            except _DAMAGE:
                self._memory = None
                self._in_memory()
                return fn()

    def _bundles_stamp(self) -> str | None:
        """What changes whenever a bundle folder is added or removed (the folder's mtime)."""
        try:
            st = self.store.bundles_dir.stat()
        except OSError:
            return None
        return f"{st.st_ino}:{st.st_mtime_ns}:{st.st_nlink}"

    def _sync(self) -> SyncReport:
        # taken before the listing: a bundle added after it changes the stamp again
        stamp = self._bundles_stamp()
        with self._connect() as conn:
            row = conn.execute("SELECT value FROM meta WHERE key = 'bundles_stamp'").fetchone()
            if stamp is not None and row is not None and row[0] == stamp:
                total = conn.execute("SELECT count(*) FROM runs").fetchone()[0]
                return SyncReport(added=0, removed=0, unreadable=(), total=int(total))
        on_disk = self._bundle_dirs()
        unreadable: list[str] = []
        added = removed = 0
        with self._connect() as conn:
            known = {row[0] for row in conn.execute("SELECT bundle_digest FROM runs")}
            if known != on_disk.keys():
                conn.execute("BEGIN IMMEDIATE")
                known = {row[0] for row in conn.execute("SELECT bundle_digest FROM runs")}
                for digest in known - on_disk.keys():
                    self._delete(conn, digest)
                    removed += 1
                if on_disk.keys() - known:
                    # the predicate models load only when there are bundles to read
                    from runner.bundle.reader import read_predicate
                for digest in sorted(on_disk.keys() - known):
                    try:
                        predicate = read_predicate(on_disk[digest])
                    except IntegrityError:
                        unreadable.append(digest)
                        continue
                    conn.execute("SAVEPOINT one_bundle")
                    try:
                        self._delete(conn, digest)
                        record = record_from_predicate(digest, on_disk[digest], predicate)
                        self._insert(conn, record)
                    except (sqlite3.InterfaceError, sqlite3.DataError, OverflowError, ValueError):
                        # a value SQLite cannot hold: this bundle is unreadable, not the index
                        conn.execute("ROLLBACK TO one_bundle")
                        conn.execute("RELEASE one_bundle")
                        unreadable.append(digest)
                        continue
                    conn.execute("RELEASE one_bundle")
                    added += 1
            total = conn.execute("SELECT count(*) FROM runs").fetchone()[0]
            if stamp is not None and not unreadable:
                # an unreadable bundle is looked at again next time (it may be half-written)
                conn.execute("INSERT OR REPLACE INTO meta VALUES ('bundles_stamp', ?)", (stamp,))
        return SyncReport(
            added=added, removed=removed, unreadable=tuple(unreadable), total=int(total)
        )

    @staticmethod
    def _delete(conn: sqlite3.Connection, digest: str) -> None:
        for table in ("datasets", "metrics", "runs"):
            conn.execute(f"DELETE FROM {table} WHERE bundle_digest = ?", (digest,))  # noqa: S608

    def rebuild(self) -> SyncReport:
        """Throw the index away and recreate it from the bundles."""
        if self._memory is not None:
            self._memory.close()
            self._memory = None
        if self._file_possible():
            self._remove_files()
        return self.sync()

    def _remove_files(self) -> None:
        for suffix in ("", "-journal", "-wal", "-shm"):
            path = Path(str(self.path) + suffix)
            with contextlib.suppress(FileNotFoundError, IsADirectoryError, PermissionError):
                if not path.is_dir() or path.is_symlink():
                    path.unlink()

    _insert = staticmethod(insert_record)

    def query(self, flt: RunFilter | None = None, *, sync: bool = True) -> list[RunRecord]:
        """Indexed runs matching ``flt``, oldest first (by start time, then run id)."""
        if sync:
            self.sync()
        sql, params = _select(_COLUMNS, flt or RunFilter())

        def select() -> list[RunRecord]:
            with self._connect() as conn:
                rows = conn.execute(sql, params).fetchall()
                return self._records(conn, rows)

        return self._recovering(lambda: self._resynced(select))

    def listing(self, flt: RunFilter | None = None) -> list[ListRow]:
        """What ``runs ls`` shows of the runs ``flt`` matches, oldest first; one query.
        A row without text in every cell (damaged, planted) is not listed."""
        self.sync()
        sql, params = _select(_LISTING, flt or RunFilter(), listed=True)

        def select() -> list[ListRow]:
            with self._connect() as conn:
                return [list(row) for row in conn.execute(sql, params)]

        return self._recovering(lambda: self._resynced(select))

    def listing_lines(
        self, flt: RunFilter | None, min_widths: Sequence[int]
    ) -> tuple[list[int], list[str]]:
        """:meth:`listing` laid out: the width of each column (its longest cell, at least
        ``min_widths``) and, oldest first, each run's line — its cells each padded to its
        column's width but the last, two blanks apart, as Python's ``%-Ns`` pads.

        SQLite lays them out (:func:`_listing_sql`: no Python per cell) when the filter
        reads only what the index ``runs_listing`` holds; a filter on another column
        (model, image, dataset, reproduction) reads the table, once, and Python lays out.
        """
        if len(min_widths) != len(_LISTING_COLUMNS):
            raise ValueError(f"{len(_LISTING_COLUMNS)} column widths, got {len(min_widths)}")
        flt = flt or RunFilter()
        if not _listing_covers(flt):
            rows = self.listing(flt)
            if not rows:
                return list(min_widths), []
            columns = zip(*rows, strict=True)
            widths = [
                max(least, *map(len, c)) for least, c in zip(min_widths, columns, strict=True)
            ]
            layout = "  ".join([*(f"%-{w}s" for w in widths[:-1]), "%s"])
            return widths, [layout % tuple(row) for row in rows]
        self.sync()
        widths_sql, lines_sql, params = _listing_sql(flt)

        def select() -> tuple[list[int], list[str]]:
            with self._connect() as conn:
                conn.execute("BEGIN")  # one snapshot: the widths are those of the lines
                found = conn.execute(widths_sql, params).fetchone()
                widths = [
                    max(n if type(n) is int else 0, least)
                    for n, least in zip(found, min_widths, strict=True)
                ]
                lines = conn.execute(lines_sql, [*widths[:-1], *params]).fetchall()
            return widths, [line for (line,) in lines]

        return self._recovering(lambda: self._resynced(select))

    def _resynced(self, fn: Callable[[], _T]) -> _T:
        """``fn()`` over an index that is in sync (sync again if it was just rebuilt empty)."""
        with self._connect() as conn:
            empty = conn.execute("SELECT count(*) FROM runs").fetchone()[0] == 0
        if empty and self._bundle_dirs():
            self._sync()
        return fn()

    def _records(self, conn: sqlite3.Connection, rows: list[tuple[object, ...]]) -> list[RunRecord]:
        """Rows of ``runs`` (in :data:`_COLUMNS` order) with their datasets and metrics.

        Two more queries in all: every dataset and metric row when most runs are
        selected, those of the selected runs (in batches) otherwise.
        """
        datasets: dict[str, list[tuple[str, str, str]]] = {}
        metrics: dict[str, list[MetricRecord]] = {}
        if rows:
            for d, n, sha, sp in _children(conn, "name, sha256, split", "datasets", rows):
                datasets.setdefault(str(d), []).append((str(n), str(sha), str(sp)))
            for d, n, v, lo, hi, p in _children(
                conn, "name, value, low, high, passed", "metrics", rows
            ):
                metrics.setdefault(str(d), []).append(_metric_row(n, v, lo, hi, p))
        out = []
        for row in rows:
            record = _row_record(self.store.bundles_dir, row, datasets, metrics)
            if record is not None:
                out.append(record)
        return out

    def _record(self, conn: sqlite3.Connection, row: sqlite3.Row) -> RunRecord:
        digest = row["bundle_digest"]
        datasets = {
            str(digest): [
                (str(n), str(s), str(sp))
                for n, s, sp in conn.execute(
                    "SELECT name, sha256, split FROM datasets WHERE bundle_digest = ? "
                    "ORDER BY rowid",
                    (digest,),
                )
            ]
        }
        metrics = {
            str(digest): [
                _metric_row(n, v, lo, hi, p)
                for n, v, lo, hi, p in conn.execute(
                    "SELECT name, value, low, high, passed FROM metrics WHERE bundle_digest = ? "
                    "ORDER BY rowid",
                    (digest,),
                )
            ]
        }
        record = _row_record(self.store.bundles_dir, row, datasets, metrics)
        if record is None:
            raise sqlite3.DatabaseError("a run index row without a digest or run id")
        return record

    def lookup(self, ref: str) -> RunRecord:
        """The one indexed run (or audit) named by ``ref``.

        ``ref`` is a run id, a bundle digest (``sha256:…``/hex) or an unambiguous
        prefix (at least 6 characters) of either. Raises BundleNotFound or
        InputError (ambiguous).
        """
        self.sync()
        return self._recovering(lambda: self._resynced(lambda: self._lookup(ref)))

    def _lookup(self, ref: str) -> RunRecord:
        text = ref.strip()
        exact_digest: str | None = None
        with contextlib.suppress(InputError):
            exact_digest = "sha256:" + parse_digest(text)
        with self._connect() as conn:
            conn.row_factory = sqlite3.Row
            if exact_digest is not None:
                rows = conn.execute(
                    f"SELECT {_COLUMNS} FROM runs WHERE bundle_digest = ?",  # noqa: S608
                    (exact_digest,),
                ).fetchall()
            else:
                rows = conn.execute(
                    f"SELECT {_COLUMNS} FROM runs WHERE run_id = ?",  # noqa: S608
                    (text,),
                ).fetchall()
                bare = text.lower().removeprefix("sha256:").removeprefix("sha256-")
                if not rows and len(bare) >= 6:
                    rows = conn.execute(
                        f"SELECT {_COLUMNS} FROM runs "  # noqa: S608
                        "WHERE run_id LIKE ? OR bundle_digest LIKE ?",
                        (text + "%", "sha256:" + bare + "%"),
                    ).fetchall()
            if len(rows) > 1:
                raise InputError(
                    f"{one_line(ref, limit=80)!r} names {len(rows)} runs",
                    hint="give more characters: "
                    + ", ".join(f"{r['run_id']} ({r['bundle_digest'][:19]}…)" for r in rows[:5]),
                )
            if not rows:
                raise BundleNotFound(
                    f"no stored run or bundle matches {one_line(ref, limit=80)!r}",
                    hint="`evalrun runs ls` lists stored runs; `evalrun pull REF` fetches one",
                )
            return self._record(conn, rows[0])


__all__ = ["History", "SyncReport"]

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
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from runner._internal.sanitize import one_line
from runner.bundle.reader import read_predicate
from runner.bundle.run_records import (
    MetricRecord,
    RunFilter,
    RunRecord,
    normalize_time,
    record_from_predicate,
)
from runner.bundle.store import BundleNotFound, Store, parse_digest
from runner.errors import InputError, IntegrityError

INDEX_NAME = "history.sqlite"
SCHEMA_VERSION = "3"

_SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE runs (
    bundle_digest TEXT PRIMARY KEY,
    run_id TEXT NOT NULL,
    kind TEXT NOT NULL,
    spec_name TEXT,
    spec_digest TEXT,
    lock_digest TEXT,
    attempt INTEGER,
    image_ref TEXT,
    image_digest TEXT,
    model_sha256 TEXT,
    outcome TEXT,
    exit_code INTEGER,
    started TEXT,
    finished TEXT,
    seed INTEGER,
    backend TEXT,
    reproduction_of TEXT,
    reproduction_verdict TEXT
);
CREATE INDEX runs_run_id ON runs (run_id);
CREATE INDEX runs_started ON runs (started);
CREATE TABLE datasets (
    bundle_digest TEXT NOT NULL REFERENCES runs (bundle_digest) ON DELETE CASCADE,
    name TEXT, sha256 TEXT, split TEXT
);
CREATE INDEX datasets_sha ON datasets (sha256);
CREATE TABLE metrics (
    bundle_digest TEXT NOT NULL REFERENCES runs (bundle_digest) ON DELETE CASCADE,
    name TEXT, value REAL, low REAL, high REAL, passed INTEGER
);
"""


@dataclass(frozen=True)
class SyncReport:
    added: int
    removed: int
    unreadable: tuple[str, ...]
    total: int


def _digest_pattern(value: str) -> str:
    """A LIKE pattern matching a full or abbreviated sha256 digest, with or without prefix."""
    text = value.strip().lower().removeprefix("sha256:").removeprefix("sha256-")
    if not text or any(c not in "0123456789abcdef" for c in text):
        raise InputError(f"not a sha256 digest or prefix: {one_line(value, limit=80)!r}")
    return f"%{text}%"


class History:
    """The SQLite run index of one store."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.path = store.root / INDEX_NAME

    @contextlib.contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        self.store.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        conn = sqlite3.connect(self.path, timeout=30.0)
        try:
            conn.execute("PRAGMA foreign_keys = ON")
            self._ensure_schema(conn)
        except sqlite3.DatabaseError:
            # not a database (damaged, truncated): the index is a cache, start it over
            conn.close()
            self._remove_files()
            conn = sqlite3.connect(self.path, timeout=30.0)
            conn.execute("PRAGMA foreign_keys = ON")
            self._ensure_schema(conn)
        try:
            yield conn
            conn.commit()
        except BaseException:
            conn.rollback()
            raise
        finally:
            conn.close()

    def _ensure_schema(self, conn: sqlite3.Connection) -> None:
        try:
            row = conn.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone()
        except sqlite3.DatabaseError:
            row = None
        if row is not None and row[0] == SCHEMA_VERSION:
            return
        # an index of another version (or a damaged one) is a cache: start it over
        conn.execute("BEGIN IMMEDIATE")
        for (name,) in conn.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table'"
        ).fetchall():
            conn.execute(f'DROP TABLE IF EXISTS "{name}"')
        for statement in _SCHEMA.strip().split(";"):
            if statement.strip():
                conn.execute(statement)
        conn.execute("INSERT INTO meta VALUES ('schema', ?)", (SCHEMA_VERSION,))
        conn.commit()

    def _bundle_dirs(self) -> dict[str, Path]:
        found: dict[str, Path] = {}
        if not self.store.bundles_dir.is_dir():
            return found
        for path in self.store.bundles_dir.iterdir():
            name = path.name
            if name.startswith("sha256-") and len(name) == 71 and path.is_dir():
                found["sha256:" + name[7:]] = path
        return found

    def sync(self) -> SyncReport:
        """Index bundles added to the store since the last sync; drop removed ones.

        Concurrent syncs (two ``evalrun`` processes) serialize on SQLite's write
        lock and re-read the index under it, so no bundle is indexed twice.
        """
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
                for digest in sorted(on_disk.keys() - known):
                    try:
                        predicate = read_predicate(on_disk[digest])
                    except IntegrityError:
                        unreadable.append(digest)
                        continue
                    self._delete(conn, digest)
                    self._insert(conn, record_from_predicate(digest, on_disk[digest], predicate))
                    added += 1
            total = conn.execute("SELECT count(*) FROM runs").fetchone()[0]
        return SyncReport(
            added=added, removed=removed, unreadable=tuple(unreadable), total=int(total)
        )

    @staticmethod
    def _delete(conn: sqlite3.Connection, digest: str) -> None:
        for table in ("datasets", "metrics", "runs"):
            conn.execute(f"DELETE FROM {table} WHERE bundle_digest = ?", (digest,))  # noqa: S608

    def rebuild(self) -> SyncReport:
        """Throw the index away and recreate it from the bundles."""
        self._remove_files()
        return self.sync()

    def _remove_files(self) -> None:
        for suffix in ("", "-journal", "-wal", "-shm"):
            Path(str(self.path) + suffix).unlink(missing_ok=True)

    @staticmethod
    def _insert(conn: sqlite3.Connection, r: RunRecord) -> None:
        conn.execute(
            "INSERT INTO runs VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
            (
                r.bundle_digest,
                r.run_id,
                r.kind,
                r.spec_name,
                r.spec_digest,
                r.lock_digest,
                r.attempt,
                r.image_ref,
                r.image_digest,
                r.model_sha256,
                r.outcome,
                r.exit_code,
                r.started,
                r.finished,
                r.seed,
                r.backend,
                r.reproduction_of,
                r.reproduction_verdict,
            ),
        )
        conn.executemany(
            "INSERT INTO datasets VALUES (?,?,?,?)",
            [(r.bundle_digest, n, s, sp) for n, s, sp in r.datasets],
        )
        conn.executemany(
            "INSERT INTO metrics VALUES (?,?,?,?,?,?)",
            [
                (
                    r.bundle_digest,
                    m.name,
                    m.value,
                    m.low,
                    m.high,
                    None if m.passed is None else int(m.passed),
                )
                for m in r.metrics
            ],
        )

    def query(self, flt: RunFilter | None = None, *, sync: bool = True) -> list[RunRecord]:
        """Indexed runs matching ``flt``, oldest first (by start time, then run id)."""
        if sync:
            self.sync()
        flt = flt or RunFilter()
        where: list[str] = []
        params: list[object] = []
        if flt.kind is not None:
            where.append("kind = ?")
            params.append(flt.kind)
        if flt.spec is not None:
            where.append("spec_name = ?")
            params.append(flt.spec)
        if flt.outcome is not None:
            where.append("outcome = ?")
            params.append(flt.outcome)
        if flt.model is not None:
            where.append("model_sha256 LIKE ?")
            params.append(_digest_pattern(flt.model))
        if flt.image is not None:
            where.append("(image_digest LIKE ? OR image_ref LIKE ?)")
            params += [_digest_pattern(flt.image)] * 2
        if flt.dataset is not None:
            where.append(
                "bundle_digest IN (SELECT bundle_digest FROM datasets WHERE sha256 LIKE ?)"
            )
            params.append(_digest_pattern(flt.dataset))
        if flt.since is not None:
            where.append("started >= ?")
            params.append(normalize_time(flt.since))
        if flt.until is not None:
            where.append("started <= ?")
            params.append(normalize_time(flt.until, end_of_day=True))
        if flt.reproduction_of is not None:
            where.append("reproduction_of = ?")
            params.append(flt.reproduction_of)
        sql = "SELECT * FROM runs"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY started, run_id"
        with self._connect() as conn:
            conn.row_factory = sqlite3.Row
            rows = conn.execute(sql, params).fetchall()
            records = self._records(conn, rows)
        if flt.limit is not None:
            records = records[-flt.limit :] if flt.limit > 0 else []
        return records

    def _records(self, conn: sqlite3.Connection, rows: list[sqlite3.Row]) -> list[RunRecord]:
        """Rows of ``runs`` with their datasets and metrics (two queries in all)."""
        datasets: dict[str, list[tuple[str, str, str]]] = {}
        metrics: dict[str, list[MetricRecord]] = {}
        if rows:
            for d, n, sha, sp in conn.execute(
                "SELECT bundle_digest, name, sha256, split FROM datasets ORDER BY rowid"
            ):
                datasets.setdefault(d, []).append((str(n), str(sha), str(sp)))
            for d, n, v, lo, hi, p in conn.execute(
                "SELECT bundle_digest, name, value, low, high, passed FROM metrics ORDER BY rowid"
            ):
                metrics.setdefault(d, []).append(
                    MetricRecord(n, v, lo, hi, None if p is None else bool(p))
                )
        out = []
        for row in rows:
            digest = row["bundle_digest"]
            fields = {k: row[k] for k in row.keys()}  # noqa: SIM118 (sqlite3.Row)
            out.append(
                RunRecord(
                    path=self.store.bundle_path(digest),
                    datasets=tuple(datasets.get(digest, ())),
                    metrics=tuple(metrics.get(digest, ())),
                    **fields,
                )
            )
        return out

    def _record(self, conn: sqlite3.Connection, row: sqlite3.Row) -> RunRecord:
        digest = row["bundle_digest"]
        datasets = tuple(
            (str(n), str(s), str(sp))
            for n, s, sp in conn.execute(
                "SELECT name, sha256, split FROM datasets WHERE bundle_digest = ? ORDER BY rowid",
                (digest,),
            )
        )
        metrics = tuple(
            MetricRecord(n, v, lo, hi, None if p is None else bool(p))
            for n, v, lo, hi, p in conn.execute(
                "SELECT name, value, low, high, passed FROM metrics WHERE bundle_digest = ? "
                "ORDER BY rowid",
                (digest,),
            )
        )
        fields = {k: row[k] for k in row.keys()}  # noqa: SIM118 (sqlite3.Row)
        return RunRecord(
            path=self.store.bundle_path(digest), datasets=datasets, metrics=metrics, **fields
        )

    def lookup(self, ref: str) -> RunRecord:
        """The one indexed run (or audit) named by ``ref``.

        ``ref`` is a run id, a bundle digest (``sha256:…``/hex) or an unambiguous
        prefix (at least 6 characters) of either. Raises BundleNotFound or
        InputError (ambiguous).
        """
        self.sync()
        text = ref.strip()
        exact_digest: str | None = None
        with contextlib.suppress(InputError):
            exact_digest = "sha256:" + parse_digest(text)
        with self._connect() as conn:
            conn.row_factory = sqlite3.Row
            if exact_digest is not None:
                rows = conn.execute(
                    "SELECT * FROM runs WHERE bundle_digest = ?", (exact_digest,)
                ).fetchall()
            else:
                rows = conn.execute("SELECT * FROM runs WHERE run_id = ?", (text,)).fetchall()
                bare = text.lower().removeprefix("sha256:").removeprefix("sha256-")
                if not rows and len(bare) >= 6:
                    rows = conn.execute(
                        "SELECT * FROM runs WHERE run_id LIKE ? OR bundle_digest LIKE ?",
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

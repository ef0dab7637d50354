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
import dataclasses
import datetime as dt
import hashlib
import json
import re
import sqlite3
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from runner.bundle.archive import extract_bundle_tar
from runner.bundle.metadata import STATEMENT_NAME
from runner.bundle.reader import read_predicate
from runner.bundle.store import BundleNotFound, Store, parse_digest
from runner.errors import InputError, IntegrityError
from runner.model.predicate import (
    AuditPredicate,
    ConfidenceInterval,
    MetricResult,
    Predicate,
    RunPredicate,
    SpecRef,
)

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
class MetricRecord:
    name: str
    value: float | None
    low: float | None
    high: float | None
    passed: bool | None


@dataclass(frozen=True)
class RunRecord:
    """One indexed bundle: a run, or an audit report (``kind == "audit"``)."""

    run_id: str
    bundle_digest: str
    path: Path
    kind: str
    spec_name: str | None
    spec_digest: str | None
    lock_digest: str | None
    attempt: int | None
    image_ref: str | None
    image_digest: str | None
    model_sha256: str | None
    outcome: str | None
    exit_code: int | None
    started: str | None
    finished: str | None
    seed: int | None
    backend: str | None
    reproduction_of: str | None
    reproduction_verdict: str | None
    datasets: tuple[tuple[str, str, str], ...] = ()
    metrics: tuple[MetricRecord, ...] = field(default=())

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["path"] = str(self.path)
        data["datasets"] = [{"name": n, "sha256": s, "split": sp} for n, s, sp in self.datasets]
        return data


@dataclass(frozen=True)
class RunFilter:
    """What ``runs ls`` selects; every field narrows the result, None means any."""

    spec: str | None = None
    model: str | None = None
    dataset: str | None = None
    image: str | None = None
    outcome: str | None = None
    since: str | None = None
    until: str | None = None
    kind: str | None = "run"
    reproduction_of: str | None = None
    limit: int | None = None


@dataclass(frozen=True)
class SyncReport:
    added: int
    removed: int
    unreadable: tuple[str, ...]
    total: int


def normalize_time(value: str, *, end_of_day: bool = False) -> str:
    """An ISO date or date-time as a UTC ISO string comparable with the stored ones.

    A bare date means the start of that day (UTC), or its end with ``end_of_day``.
    ``30d``, ``12h`` or ``2w`` mean that long before now (for scheduled audits).
    """
    text = value.strip()
    relative = re.fullmatch(r"(\d{1,5})([hdw])", text)
    if relative:
        hours = int(relative[1]) * {"h": 1, "d": 24, "w": 168}[relative[2]]
        moment = dt.datetime.now(dt.UTC) - dt.timedelta(hours=hours)
        return moment.isoformat(timespec="milliseconds")
    try:
        if len(text) == 10:
            day = dt.date.fromisoformat(text)
            moment = dt.datetime.combine(
                day, dt.time.max if end_of_day else dt.time.min, tzinfo=dt.UTC
            )
        else:
            moment = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
            if moment.tzinfo is None:
                moment = moment.replace(tzinfo=dt.UTC)
    except ValueError:
        raise InputError(
            f"not a date: {value!r}",
            hint="use YYYY-MM-DD, an ISO 8601 date-time, or a span back from now (30d, 12h, 2w)",
        ) from None
    return moment.astimezone(dt.UTC).isoformat(timespec="milliseconds")


def _digest_pattern(value: str) -> str:
    """A LIKE pattern matching a full or abbreviated sha256 digest, with or without prefix."""
    text = value.strip().lower().removeprefix("sha256:").removeprefix("sha256-")
    if not text or any(c not in "0123456789abcdef" for c in text):
        raise InputError(f"not a sha256 digest or prefix: {value!r}")
    return f"%{text}%"


def _normalized(moment: str | None) -> str | None:
    """A recorded time in the index's comparable form (as recorded if it does not parse)."""
    if not moment:
        return None
    with contextlib.suppress(InputError):
        return normalize_time(moment)
    return moment


def record_from_predicate(digest: str, path: Path, predicate: Predicate) -> RunRecord:
    """Flatten a predicate into the fields the index stores (a run set or audit has fewer)."""
    spec = predicate.spec if not isinstance(predicate, AuditPredicate) else SpecRef()
    record = RunRecord(
        run_id=predicate.run_id,
        bundle_digest=digest,
        path=path,
        kind=predicate.kind,
        spec_name=spec.name,
        spec_digest=spec.digest,
        lock_digest=None if isinstance(predicate, AuditPredicate) else predicate.lock_digest,
        attempt=None,
        image_ref=None,
        image_digest=None,
        model_sha256=None,
        outcome=None if predicate.outcome is None else str(predicate.outcome),
        exit_code=predicate.exit_code,
        started=_normalized(predicate.timestamps.started),
        finished=_normalized(predicate.timestamps.finished),
        seed=None,
        backend=None,
        reproduction_of=None,
        reproduction_verdict=None,
    )
    if not isinstance(predicate, RunPredicate):
        return record
    origin, repro = predicate.reproduction_of, predicate.reproduction
    return dataclasses.replace(
        record,
        attempt=predicate.attempt,
        image_ref=predicate.image.ref,
        image_digest=predicate.image.digest,
        model_sha256=predicate.model.sha256,
        seed=predicate.seeds.seed,
        backend=predicate.backend,
        reproduction_of=origin.run_id if origin is not None else None,
        reproduction_verdict=repro.verdict if repro is not None else None,
        datasets=tuple((str(d.name), str(d.sha256), str(d.split)) for d in predicate.datasets),
        metrics=tuple(_metric_record(m) for m in predicate.metrics),
    )


def _metric_record(m: MetricResult) -> MetricRecord:
    ci = m.ci or ConfidenceInterval()
    return MetricRecord(
        name=m.name,
        value=None if m.value is None else float(m.value),
        low=None if ci.low is None else float(ci.low),
        high=None if ci.high is None else float(ci.high),
        passed=m.passed,
    )


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
                    f"{ref!r} names {len(rows)} runs",
                    hint="give more characters: "
                    + ", ".join(f"{r['run_id']} ({r['bundle_digest'][:19]}…)" for r in rows[:5]),
                )
            if not rows:
                raise BundleNotFound(
                    f"no stored run or bundle matches {ref!r}",
                    hint="`evalrun runs ls` lists stored runs; `evalrun pull REF` fetches one",
                )
            return self._record(conn, rows[0])


@dataclass(frozen=True)
class LocatedBundle:
    """A bundle directory to act on, and where it came from."""

    path: Path
    digest: str | None
    source: str


def _statement_digest(bundle: Path) -> str | None:
    """The bundle digest (sha256 of statement.json), or None if it cannot be read."""
    try:
        return "sha256:" + hashlib.sha256((bundle / STATEMENT_NAME).read_bytes()).hexdigest()
    except OSError:
        return None


def locate_bundle(ref: str, store: Store, scratch: Path | None = None) -> LocatedBundle:
    """Find the bundle named by ``ref``: a bundle directory or ``.tar``, or a run in the store.

    A ``.tar`` is extracted (safely) under ``scratch``. Registry references are
    handled by :mod:`runner.bundle.oci_artifacts`, not here.
    """
    path = Path(ref).expanduser()
    if path.is_dir():
        return LocatedBundle(path=path, digest=_statement_digest(path), source=f"directory {path}")
    if path.is_file():
        if scratch is None:
            raise InputError("a bundle .tar needs a scratch directory to be read", file=str(path))
        dest = scratch / "bundle"
        extract_bundle_tar(path, dest)
        return LocatedBundle(path=dest, digest=_statement_digest(dest), source=f"tar {path}")
    record = History(store).lookup(ref)
    return LocatedBundle(path=record.path, digest=record.bundle_digest, source="store")


def format_table(records: Sequence[RunRecord]) -> str:
    """``runs ls`` as a plain-text table."""
    header = ["run id", "spec", "outcome", "started (UTC)", "metrics", "bundle"]
    rows = []
    for r in records:
        metrics = ", ".join(f"{m.name}={m.value:.4f}" for m in r.metrics if m.value is not None)
        repro = f" ↺{r.reproduction_verdict}" if r.reproduction_of else ""
        rows.append(
            [
                r.run_id,
                r.spec_name or "?",
                (r.outcome or "?") + repro,
                (r.started or "?")[:19].replace("T", " "),
                metrics or "—",
                r.bundle_digest[:19] + "…",
            ]
        )
    if not rows:
        return "(no runs)"
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(header, widths, strict=True)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    lines += [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows
    ]
    return "\n".join(lines)


def dumps(records: Sequence[RunRecord]) -> str:
    return json.dumps([r.as_dict() for r in records], indent=2, sort_keys=True)


__all__ = [
    "History",
    "LocatedBundle",
    "RunFilter",
    "RunRecord",
    "SyncReport",
    "format_table",
    "locate_bundle",
    "normalize_time",
    "record_from_predicate",
]

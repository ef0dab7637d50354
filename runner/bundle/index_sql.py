"""The run index's SQL: its schema, the columns, the queries a :class:`RunFilter` makes,
and how a record is stored and its values read back checked for type. Used by
:mod:`runner.bundle.index`."""

from __future__ import annotations

import dataclasses
import re
import sqlite3
from collections.abc import Sequence
from pathlib import Path

from runner._internal.sanitize import one_line
from runner.bundle.run_records import (
    MetricRecord,
    RunFilter,
    RunRecord,
    listing_row,
    normalize_time,
)
from runner.errors import InputError

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
    reproduction_verdict TEXT,
    ls_run_id TEXT, ls_spec TEXT, ls_backend TEXT, ls_outcome TEXT, ls_started TEXT,
    ls_metrics TEXT, ls_bundle TEXT
);
CREATE INDEX runs_run_id ON runs (run_id);
CREATE INDEX runs_listing ON runs (
    started, run_id, kind, spec_name, outcome,
    ls_run_id, ls_spec, ls_backend, ls_outcome, ls_started, ls_metrics, ls_bundle
);
CREATE TABLE datasets (
    bundle_digest TEXT NOT NULL REFERENCES runs (bundle_digest) ON DELETE CASCADE,
    name TEXT, sha256 TEXT, split TEXT
);
CREATE INDEX datasets_sha ON datasets (sha256);
CREATE INDEX datasets_bundle ON datasets (bundle_digest);
CREATE TABLE metrics (
    bundle_digest TEXT NOT NULL REFERENCES runs (bundle_digest) ON DELETE CASCADE,
    name TEXT, value REAL, low REAL, high REAL, passed INTEGER
);
CREATE INDEX metrics_bundle ON metrics (bundle_digest);
"""


def _digest_pattern(value: str) -> str:
    """A LIKE pattern matching a full or abbreviated sha256 digest, with or without prefix."""
    text = value.strip().lower().removeprefix("sha256:").removeprefix("sha256-")
    if not text or any(c not in "0123456789abcdef" for c in text):
        raise InputError(f"not a sha256 digest or prefix: {one_line(value, limit=80)!r}")
    return f"%{text}%"


_INT_COLUMNS = frozenset({"attempt", "exit_code", "seed"})
# The columns of ``runs``, in the order queries select them.
_COLUMN_NAMES = (
    "bundle_digest",
    "run_id",
    "kind",
    "spec_name",
    "spec_digest",
    "lock_digest",
    "attempt",
    "image_ref",
    "image_digest",
    "model_sha256",
    "outcome",
    "exit_code",
    "started",
    "finished",
    "seed",
    "backend",
    "reproduction_of",
    "reproduction_verdict",
)
_COLUMNS = ", ".join(_COLUMN_NAMES)
_BUNDLE_DIGEST = re.compile(r"sha256:([0-9a-f]{64})")
# What ``runs ls`` reads: each run's cells (:func:`listing_row`), made (escaped and cut)
# when the run was indexed, one column each. The index ``runs_listing`` holds them too,
# in listing order, with the columns the usual filters read (kind, spec, outcome, start):
# such a listing reads that index alone, never the table.
_LISTING_COLUMNS = (
    "ls_run_id",
    "ls_spec",
    "ls_backend",
    "ls_outcome",
    "ls_started",
    "ls_metrics",
    "ls_bundle",
)
_LISTING = ", ".join(_LISTING_COLUMNS)
# A row evalrun wrote has text in every cell; one that does not (a damaged or planted
# index) is not listed. Text sorts above every number and below every blob (NULL
# compares as nothing): two comparisons, cheaper than typeof() over 100,000 rows.
_LISTING_SHAPE = " AND ".join(f"{c} >= '' AND {c} < x''" for c in _LISTING_COLUMNS)


def _text(value: str | None) -> str | None:
    """``value`` as SQLite can store it: lone surrogates (from a bundle's odd strings)
    written as their escape; everything else unchanged."""
    if value is None:
        return None
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return value.encode("utf-8", "backslashreplace").decode("utf-8")
    return value


def _storable(r: RunRecord) -> RunRecord:
    texts = {
        f.name: _text(getattr(r, f.name))
        for f in dataclasses.fields(r)
        if f.name not in ("path", "datasets", "metrics") and isinstance(getattr(r, f.name), str)
    }
    return dataclasses.replace(
        r,
        **texts,  # type: ignore[arg-type]
        datasets=tuple(
            (_text(n) or "", _text(s) or "", _text(sp) or "") for n, s, sp in r.datasets
        ),
        metrics=tuple(dataclasses.replace(m, name=_text(m.name) or "") for m in r.metrics),
    )


def _real(value: object) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _metric_row(n: object, v: object, lo: object, hi: object, p: object) -> MetricRecord:
    return MetricRecord(
        str(n),
        _real(v),
        _real(lo),
        _real(hi),
        None if not isinstance(p, int) else bool(p),
    )


def _children(
    conn: sqlite3.Connection, columns: str, table: str, rows: list[tuple[object, ...]]
) -> list[tuple[object, ...]]:
    """The ``table`` rows of the bundles in ``rows``, in insertion order."""
    sql = f"SELECT bundle_digest, {columns} FROM {table}"  # noqa: S608 (fixed names)
    total = conn.execute("SELECT count(*) FROM runs").fetchone()[0]
    if len(rows) * 4 >= total:
        return conn.execute(sql + " ORDER BY rowid").fetchall()
    digests = [row[0] for row in rows]
    found: list[tuple[object, ...]] = []
    for start in range(0, len(digests), 500):
        batch = digests[start : start + 500]
        marks = ",".join("?" * len(batch))
        found += conn.execute(
            f"{sql} WHERE bundle_digest IN ({marks}) ORDER BY rowid", batch
        ).fetchall()
    return found


def _row_record(
    bundles_dir: Path,
    row: Sequence[object],
    datasets: dict[str, list[tuple[str, str, str]]],
    metrics: dict[str, list[MetricRecord]],
) -> RunRecord | None:
    """The record of one row of ``runs`` (in :data:`_COLUMNS` order), every value of its
    column's type (None where it is not); a row without a valid digest or run id is
    skipped."""
    digest, run_id = row[0], row[1]
    if not isinstance(digest, str) or not isinstance(run_id, str):
        return None
    match = _BUNDLE_DIGEST.fullmatch(digest)
    if match is None:
        return None
    fields: dict[str, object] = {
        key: value
        # exact types: a bool is not an int here
        if type(value) is (int if key in _INT_COLUMNS else str)
        else None
        for key, value in zip(_COLUMN_NAMES, row, strict=True)
    }
    fields["kind"] = fields.get("kind") or "run"
    fields["bundle_digest"], fields["run_id"] = digest, run_id
    return RunRecord(
        path=bundles_dir / f"sha256-{match.group(1)}",
        datasets=tuple(datasets.get(digest, ())),
        metrics=tuple(metrics.get(digest, ())),
        **fields,  # type: ignore[arg-type]
    )


def _select(columns: str, flt: RunFilter, *, listed: bool = False) -> tuple[str, list[object]]:
    """The SQL (and its parameters) selecting ``columns`` of the runs ``flt`` matches,
    oldest first; with ``listed``, only rows with all their listing cells."""
    condition, params = _where(flt, listed=listed)
    sql = f"SELECT {columns} FROM runs WHERE {condition} ORDER BY started, run_id"  # noqa: S608
    return sql, params


def _where(flt: RunFilter, *, listed: bool = False) -> tuple[str, list[object]]:
    """The condition (and its parameters) on ``runs`` that selects what ``flt`` matches."""
    where: list[str] = [_LISTING_SHAPE] if listed else []
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
        where.append("bundle_digest IN (SELECT bundle_digest FROM datasets WHERE sha256 LIKE ?)")
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
    condition = " AND ".join(where) or "1"
    if flt.limit is not None:
        # the newest N, then back to oldest first
        condition = (
            "rowid IN (SELECT rowid FROM runs WHERE "  # noqa: S608 (fixed column names)
            f"{condition} ORDER BY started DESC, run_id DESC LIMIT ?)"
        )
        params.append(max(flt.limit, 0))
    return condition, params


def _listing_covers(flt: RunFilter) -> bool:
    """Whether what ``flt`` reads is all in the index ``runs_listing``."""
    return (flt.model, flt.image, flt.dataset, flt.reproduction_of) == (None,) * 4


def _listing_sql(flt: RunFilter) -> tuple[str, str, list[object]]:
    """The listing of what ``flt`` matches, laid out by SQLite: the SQL of the column
    widths (the longest cell of each), that of the lines (each cell but the last padded
    to its width, given as parameters before ``params``), and ``params``.

    ``printf``'s ``!`` flag counts width in characters (code points), as Python's ``len``
    does, so the lines are those ``%-Ns`` makes of the same cells; ``length`` and ``%s``
    both stop at a NUL, which no cell holds (escaped when indexed).
    """
    condition, params = _where(flt, listed=True)
    longest = ", ".join(f"max(length({c}))" for c in _LISTING_COLUMNS)
    *padded, last = _LISTING_COLUMNS
    layout = "  ".join(["%-!*s"] * len(padded) + ["%s"])
    cells = ", ".join([*(f"?, {c}" for c in padded), last])
    return (
        f"SELECT {longest} FROM runs WHERE {condition}",  # noqa: S608 (fixed names)
        f"SELECT printf('{layout}', {cells}) FROM runs "  # noqa: S608
        f"WHERE {condition} ORDER BY started, run_id",
        params,
    )


def insert_record(conn: sqlite3.Connection, r: RunRecord) -> None:
    """Store ``r`` (one row in runs, its datasets and metrics)."""
    r = _storable(r)
    conn.execute(
        f"INSERT INTO runs VALUES ({','.join('?' * 25)})",  # noqa: S608 (placeholders)
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
            *listing_row(r),
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

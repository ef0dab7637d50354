"""``evalrun runs ls`` as a plain-text table."""

from __future__ import annotations

from collections.abc import Sequence

from runner._internal.sanitize import is_one_line, one_line
from runner.bundle.run_records import ListRow, RunRecord, metrics_cell

_HEADER = ["run id", "spec", "backend", "outcome", "started (UTC)", "metrics", "bundle"]


def format_table(records: Sequence[RunRecord]) -> str:
    """``runs ls`` as a plain-text table."""
    return _table([_row(r) for r in records])


def format_listing(rows: Sequence[ListRow]) -> str:
    """``runs ls`` from the index's listing rows (:meth:`History.listing`): the same table."""
    return _table([_listing_row(r) for r in rows])


def _table(rows: list[list[str]]) -> str:
    header = _HEADER
    if not rows:
        return "(no runs)"
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(header, widths, strict=True)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    lines += [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows
    ]
    return "\n".join(lines)


# Cell limits (characters) of the table's columns.
_LIMITS = (140, 80, 40, 80, 2000, 300)


def _row(r: RunRecord) -> list[str]:
    return _cells(
        r.run_id,
        r.spec_name,
        r.backend,
        r.outcome,
        r.reproduction_of,
        r.reproduction_verdict,
        r.started,
        r.bundle_digest,
        metrics_cell(r.metrics),
    )


def _listing_row(row: ListRow) -> list[str]:
    return _cells(*row)


def _cells(
    run_id: str,
    spec_name: str | None,
    backend: str | None,
    outcome: str | None,
    reproduction_of: str | None,
    reproduction_verdict: str | None,
    started: str | None,
    bundle_digest: str,
    metrics: str | None,
) -> list[str]:
    """One row: every cell one line and cut to its column's limit."""
    repro = f" ↺{reproduction_verdict}" if reproduction_of else ""
    cells = [
        run_id,
        spec_name or "?",
        # run sets and audits have no backend of their own; old runs may lack one
        backend or "—",
        (outcome or "?") + repro,
        (started or "?")[:19].replace("T", " "),
        metrics or "—",
    ]
    # most rows need no escaping or cutting: one check for the whole row
    if not is_one_line("".join(cells)) or any(
        len(c) > n for c, n in zip(cells, _LIMITS, strict=True)
    ):
        cells = [one_line(c, limit=n) for c, n in zip(cells, _LIMITS, strict=True)]
    # the index only holds rows whose digest is sha256 hex
    return [*cells, bundle_digest[:19] + "…"]

"""``evalrun runs ls`` as a plain-text table.

Each run's cells are made once, escaped and cut, when the run is indexed
(:func:`runner.bundle.run_records.listing_row`); listing 100,000 runs is then one
query, the column widths and one format string per line.
"""

from __future__ import annotations

from collections.abc import Sequence

from runner.bundle.run_records import ListRow, RunRecord, listing_row

_HEADER = ("run id", "spec", "backend", "outcome", "started (UTC)", "metrics", "bundle")


def format_table(records: Sequence[RunRecord]) -> str:
    """``runs ls`` as a plain-text table."""
    return format_listing([listing_row(r) for r in records])


def format_listing(rows: Sequence[ListRow]) -> str:
    """``runs ls`` from listing rows (:meth:`History.listing`, :func:`listing_row`)."""
    if not rows:
        return "(no runs)"
    widths = [max(map(len, column)) for column in zip(_HEADER, *rows, strict=True)]
    # the last column (the digest cell, never empty) is not padded: no trailing blanks
    line = "  ".join([*(f"%-{w}s" for w in widths[:-1]), "%s"])
    lines = [line % _HEADER, "  ".join("-" * w for w in widths)]
    lines += [line % tuple(row) for row in rows]
    return "\n".join(lines)

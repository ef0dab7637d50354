"""``evalrun runs ls`` as a plain-text table.

Each run's cells are made once, escaped and cut, when the run is indexed
(:func:`runner.bundle.run_records.listing_row`). Listing 100,000 runs is then two
reads of the index: the column widths, and each run's line laid out by SQLite
(:meth:`History.listing_lines`); this module adds the header.
"""

from __future__ import annotations

from collections.abc import Sequence

from runner.bundle.run_records import ListRow, RunRecord, listing_row

HEADER = ("run id", "spec", "backend", "outcome", "started (UTC)", "metrics", "bundle")
HEADER_WIDTHS = tuple(map(len, HEADER))


def format_table(records: Sequence[RunRecord]) -> str:
    """``runs ls`` as a plain-text table."""
    return format_listing([listing_row(r) for r in records])


def format_listing(rows: Sequence[ListRow]) -> str:
    """``runs ls`` from listing rows (:meth:`History.listing`, :func:`listing_row`)."""
    if not rows:
        return "(no runs)"
    widths = [max(map(len, column)) for column in zip(HEADER, *rows, strict=True)]
    # the last column (the digest cell, never empty) is not padded: no trailing blanks
    line = _layout(widths)
    return format_lines(widths, [line % tuple(row) for row in rows])


def format_lines(widths: Sequence[int], lines: Sequence[str]) -> str:
    """``runs ls`` from lines already laid out to ``widths`` (:meth:`History.listing_lines`,
    given :data:`HEADER_WIDTHS`): the same table as :func:`format_listing`."""
    if not lines:
        return "(no runs)"
    head = [_layout(widths) % HEADER, "  ".join("-" * w for w in widths)]
    return "\n".join([*head, *lines])


def _layout(widths: Sequence[int]) -> str:
    return "  ".join([*(f"%-{w}s" for w in widths[:-1]), "%s"])

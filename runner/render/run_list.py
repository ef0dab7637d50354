"""``evalrun runs ls`` as a plain-text table."""

from __future__ import annotations

from collections.abc import Sequence

from runner._internal.sanitize import one_line
from runner.bundle.run_records import RunRecord


def format_table(records: Sequence[RunRecord]) -> str:
    """``runs ls`` as a plain-text table."""
    header = ["run id", "spec", "backend", "outcome", "started (UTC)", "metrics", "bundle"]
    rows = []
    for r in records:
        metrics = ", ".join(
            f"{one_line(m.name, limit=60)}={m.value:.4f}" for m in r.metrics if m.value is not None
        )
        repro = f" ↺{r.reproduction_verdict}" if r.reproduction_of else ""
        rows.append(
            [
                one_line(r.run_id, limit=140),
                one_line(r.spec_name or "?", limit=80),
                # run sets and audits have no backend of their own; old runs may lack one
                one_line(r.backend or "—", limit=40),
                one_line((r.outcome or "?") + repro, limit=80),
                one_line((r.started or "?")[:19].replace("T", " ")),
                one_line(metrics or "—", limit=300),
                one_line(r.bundle_digest[:19]) + "…",
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

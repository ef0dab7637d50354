"""``evalrun report`` as self-contained HTML: a run, a run set, an audit.

Each page is a pure function of what it shows (no clock, no random ids; plots drawn as
inline SVG by :mod:`runner.render.svg`), so the same bundle gives byte-identical files.
The HTML needs nothing outside itself (no scripts, fonts, images or links).
"""

from __future__ import annotations

import html
import json
from collections.abc import Sequence
from dataclasses import replace

from pydantic import JsonValue

from runner._internal.sanitize import map_strings, one_line
from runner.model.predicate import AuditPredicate, ConfidenceInterval, RunSetPredicate
from runner.render.markdown import (
    ROLE_HEADER,
    metric_rows_with_role,
    promotion_lines,
    stderr_lines,
)
from runner.render.run_report import ReportData, report_sections
from runner.render.safe import line_view
from runner.render.svg import metrics_svg, slices_svg

_CSS = (
    "body{font-family:sans-serif;max-width:960px;margin:2em auto;color:#222}"
    "table{border-collapse:collapse;margin:.5em 0 1.5em}"
    "td,th{border:1px solid #ccc;padding:3px 8px;text-align:left;vertical-align:top;"
    "overflow-wrap:anywhere}"
    "th{background:#f3f3f3}.kv th{width:11em}code{font-size:90%}"
    ".FAIL{color:#c0392b;font-weight:bold}.pass{color:#1e8449}"
)


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], cls: str = "") -> str:
    out = [f'<table class="{cls}">' if cls else "<table>"]
    if header:
        out.append("<tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header) + "</tr>")
    for row in rows:
        cells = []
        for i, cell in enumerate(row):
            text = html.escape(cell)
            if cls == "kv" and i == 0:
                cells.append(f"<th>{text}</th>")
            elif cls == "metrics" and i == len(row) - 1:
                cells.append(f'<td class="{text}">{text}</td>')
            else:
                cells.append(f"<td>{text}</td>")
        out.append("<tr>" + "".join(cells) + "</tr>")
    out.append("</table>")
    return "".join(out)


def render_html(data: ReportData) -> str:
    """The report as one self-contained HTML document (deterministic)."""
    lock = map_strings(data.lock, one_line)
    stderr = stderr_lines(data.predicate)
    data = replace(
        data,
        predicate=line_view(data.predicate),
        lock=lock if isinstance(lock, dict) else {},
        slices=tuple(replace(s, name=one_line(s.name)) for s in data.slices),
    )
    p = data.predicate
    title = f"evalrun report — {p.spec.name} — {p.run_id}"
    body = [f"<h1>{html.escape(title)}</h1>"]
    sections = report_sections(data)
    body.append("<h2>Summary</h2>" + _table([], [list(r) for r in sections[0][1]], "kv"))
    if stderr:
        body.append(f"<h2>Evaluation stderr (last {len(stderr)} lines)</h2>")
        body.append("<pre>" + html.escape("\n".join(stderr)) + "</pre>")
    body.append("<h2>Metrics</h2>")
    body.append(_table(ROLE_HEADER, metric_rows_with_role(p.metrics), "metrics"))
    promotions = promotion_lines(p.metrics)
    if promotions:
        body.append("<ul>" + "".join(f"<li>{html.escape(x)}</li>" for x in promotions) + "</ul>")
    body.append(metrics_svg(p.metrics))
    if data.slices:
        body.append(f"<h2>Per-slice breakdown (by {html.escape(str(data.slice_field))})</h2>")
        body.append(
            _table(
                [str(data.slice_field), "n", "correct", "accuracy"],
                [[s.name, str(s.n), str(s.correct), f"{s.accuracy:.4f}"] for s in data.slices],
            )
        )
        body.append(slices_svg(data.slices))
    repro = p.reproduction
    if repro is not None:
        body.append("<h2>Reproduction</h2>")
        body.append(
            "<p>verdict: <b>"
            + html.escape(str(repro.verdict))
            + "</b>"
            + (f" — {html.escape(repro.reason)}" if repro.reason else "")
            + "</p>"
        )
        body.append(
            _table(
                ["metric", "original", "re-run", "delta", "verdict"],
                [
                    [
                        str(m.name),
                        _fmt(m.original),
                        _fmt(m.rerun),
                        _fmt(m.delta),
                        str(m.verdict),
                    ]
                    for m in repro.metrics
                ],
            )
        )
    for name, rows in sections[1:]:
        body.append(f"<h2>{html.escape(name)}</h2>" + _table([], [list(r) for r in rows], "kv"))
    return _document(title, body)


def _fmt(value: JsonValue) -> str:
    if isinstance(value, float):
        return f"{value:+.4f}" if value < 0 else f"{value:.4f}"
    return "—" if value is None else str(value)


def render_audit_html(predicate: AuditPredicate, verification: str) -> str:
    """An audit bundle's report as one self-contained HTML document (deterministic)."""
    p = line_view(predicate)
    title = f"evalrun reproduction audit {p.run_id}"
    summary = [
        ["started", str(p.started)],
        ["verification", verification],
        ["sample", f"seed {p.seed}: {len(p.runs)} of {p.sampled_from} runs"],
        ["filters", json.dumps(p.filters.to_json(), sort_keys=True)],
        [
            "result",
            f"{p.outcome} ({p.reproduced} reproduced, {p.failed} not; exit {p.exit_code})",
        ],
    ]
    rows = [
        [
            str(e.run_id),
            str(e.spec),
            "yes" if e.reproduced else "NO",
            f"{e.category}: {e.detail}",
            str(e.rerun_id or "—"),
        ]
        for e in p.runs
    ]
    body = [
        f"<h1>{html.escape(title)}</h1>",
        _table([], summary, "kv"),
        "<h2>Runs</h2>",
        _table(["run", "spec", "reproduced", "why", "re-run"], rows),
    ]
    return _document(title, body)


def _document(title: str, body: Sequence[str]) -> str:
    """A self-contained page: inline CSS only, a CSP that forbids fetching anything."""
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        '<meta http-equiv="Content-Security-Policy" content="default-src \'none\'; '
        "style-src 'unsafe-inline'; img-src data:\">"
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head>\n"
        "<body>\n" + "\n".join(body) + "\n</body></html>\n"
    )


def _n(value: float | None) -> str:
    return "—" if value is None else f"{value:.4f}"


def render_run_set_html(predicate: RunSetPredicate, verification: str) -> str:
    """A run set's report: per-seed metrics with bootstrap CIs, then the spread across seeds."""
    p = line_view(predicate)
    title = f"evalrun run set {p.run_id} — {p.spec.name}"
    names = [str(s.name) for s in p.across_seeds]
    summary = [
        ["outcome", f"{p.outcome} (exit {p.exit_code})"],
        ["seeds", json.dumps(p.seeds.seeds)],
        ["verification", verification],
    ]
    per_seed = []
    for row in p.members:
        by = {m.name: m for m in row.metrics}
        cells = [str(row.seed), str(row.run_id or row.outcome)]
        for n in names:
            m = by.get(n)
            ci = (m.ci if m is not None else None) or ConfidenceInterval()
            value = m.value if m is not None else None
            cells.append(f"{_n(value)} [{_n(ci.low)}, {_n(ci.high)}]")
        per_seed.append(cells)
    across = []
    for s in p.across_seeds:
        ci = s.ci or ConfidenceInterval()
        across.append(
            [str(s.name), str(s.n), _n(s.mean), _n(s.sd), f"[{_n(ci.low)}, {_n(ci.high)}]"]
        )
    body = [
        f"<h1>{html.escape(title)}</h1>",
        _table([], summary, "kv"),
        "<h2>Per seed (value and bootstrap CI)</h2>",
        _table(["seed", "run", *names], per_seed),
        "<h2>Across seeds (mean, sd, Student-t CI of the mean)</h2>",
        _table(["metric", "n", "mean", "sd", "CI"], across),
    ]
    return _document(title, body)


__all__ = ["render_audit_html", "render_html", "render_run_set_html"]

"""``evalrun report``: a full run report as self-contained HTML or Markdown.

Everything shown comes from the bundle (predicate, lock, per-sample outputs)
plus the verification result of that bundle. Rendering is a pure function of
those: no clock, no random ids, floats printed at fixed precision, plots drawn
as inline SVG by this module — the same bundle gives byte-identical files.
The HTML needs nothing outside itself (no scripts, fonts, images or links).
"""

from __future__ import annotations

import html
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from pydantic import JsonValue

from runner.bundle.reader import expect_kind, read_predicate
from runner.model.predicate import (
    AuditPredicate,
    ConfidenceInterval,
    JsonObject,
    MetricResult,
    RunPredicate,
    RunSetPredicate,
    json_at,
)
from runner.render.markdown import (
    ROLE_HEADER,
    metric_rows,
    metric_rows_with_role,
    promotion_lines,
    reproduction_markdown,
)

MAX_SLICES = 40
MAX_SAMPLES = 2_000_000


@dataclass(frozen=True)
class SliceRow:
    name: str
    n: int
    correct: int

    @property
    def accuracy(self) -> float:
        return self.correct / self.n if self.n else 0.0


@dataclass(frozen=True)
class ReportData:
    """What a report shows about one bundle."""

    predicate: RunPredicate
    # the bundle's eval.lock.json as found (a lock of any evalrun version; shown, not trusted)
    lock: JsonObject
    slice_field: str | None
    slices: tuple[SliceRow, ...]
    verification: str
    bundle_digest: str | None


def per_slice(predictions: Path) -> tuple[str | None, tuple[SliceRow, ...]]:
    """Accuracy per slice of the per-sample outputs.

    Slices by the ``slice`` field when samples carry one, otherwise by ``label``.
    Samples without label/prediction are skipped; an unreadable file gives none.
    """
    try:
        lines = predictions.read_text(encoding="utf-8").splitlines()[:MAX_SAMPLES]
    except (OSError, UnicodeDecodeError):
        return None, ()
    samples = []
    for line in lines:
        try:
            sample = json.loads(line)
        except ValueError:
            continue
        if isinstance(sample, dict) and "label" in sample and "prediction" in sample:
            samples.append(sample)
    if not samples:
        return None, ()
    key = "slice" if any("slice" in s for s in samples) else "label"
    counts: dict[str, list[int]] = {}
    for s in samples:
        bucket = counts.setdefault(str(s.get(key)), [0, 0])
        bucket[0] += 1
        bucket[1] += int(s["prediction"] == s["label"])

    def order(name: str) -> tuple[int, float, str]:
        try:
            return (0, float(name), name)
        except ValueError:
            return (1, 0.0, name)

    rows = tuple(
        SliceRow(n, c[0], c[1]) for n, c in sorted(counts.items(), key=lambda kv: order(kv[0]))
    )
    return key, rows[:MAX_SLICES]


def load_report_data(
    bundle: Path,
    verification: str,
    digest: str | None = None,
    *,
    predicate: RunPredicate | None = None,
) -> ReportData:
    """Read what the report needs from a bundle directory (``predicate``: already read)."""
    if predicate is None:
        predicate = expect_kind(read_predicate(bundle), RunPredicate, bundle)
    try:
        lock = json.loads((bundle / "eval.lock.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        lock = {}
    slice_field, slices = per_slice(bundle / "results" / "predictions.jsonl")
    return ReportData(
        predicate=predicate,
        lock=lock if isinstance(lock, dict) else {},
        slice_field=slice_field,
        slices=slices,
        verification=verification,
        bundle_digest=digest,
    )


# --------------------------------------------------------------------------- plots


def _num(value: float) -> str:
    """SVG coordinates at fixed precision (deterministic text)."""
    text = f"{value:.2f}".rstrip("0").rstrip(".")
    return "0" if text in ("-0", "") else text


def _axis_range(values: Sequence[float]) -> tuple[float, float]:
    """The plotted span: the values with a margin, kept inside [0, 1] for proportions."""
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return 0.0, 1.0
    lo, hi = min(finite), max(finite)
    span = hi - lo or abs(hi) * 0.1 or 1.0
    lo, hi = lo - span * 0.25, hi + span * 0.25
    if min(finite) >= 0.0 and max(finite) <= 1.0:
        lo, hi = max(lo, 0.0), min(hi, 1.0)
    return lo, hi


def metrics_svg(metrics: Sequence[MetricResult]) -> str:
    """Each metric as a point with its confidence interval and threshold mark."""
    rows = [m for m in metrics if m.value is not None]
    if not rows:
        return ""
    values: list[float] = []
    for m in rows:
        ci_low, ci_high = (m.ci.low, m.ci.high) if m.ci is not None else (None, None)
        values += [float(v) for v in (m.value, ci_low, ci_high, m.threshold) if v is not None]
    lo, hi = _axis_range(values)
    left, width, row_h = 140.0, 420.0, 34.0
    height = 40.0 + row_h * len(rows)

    def x(v: float) -> float:
        return left + (v - lo) / (hi - lo) * width

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{_num(left + width + 30)}" '
        f'height="{_num(height)}" viewBox="0 0 {_num(left + width + 30)} {_num(height)}" '
        'role="img" aria-label="metrics with confidence intervals">',
        f'<line x1="{_num(left)}" y1="{_num(height - 24)}" x2="{_num(left + width)}" '
        f'y2="{_num(height - 24)}" stroke="#555"/>',
    ]
    for i in range(5):
        v = lo + (hi - lo) * i / 4
        parts.append(
            f'<text x="{_num(x(v))}" y="{_num(height - 8)}" font-size="11" '
            f'text-anchor="middle">{v:.3f}</text>'
        )
    for i, m in enumerate(rows):
        y = 20.0 + row_h * i
        assert m.value is not None  # rows keep only metrics with a value
        parts.append(
            f'<text x="{_num(left - 8)}" y="{_num(y + 4)}" font-size="12" '
            f'text-anchor="end">{html.escape(m.name)}</text>'
        )
        if m.ci is not None and m.ci.low is not None and m.ci.high is not None:
            parts.append(
                f'<line x1="{_num(x(float(m.ci.low)))}" y1="{_num(y)}" '
                f'x2="{_num(x(float(m.ci.high)))}" y2="{_num(y)}" stroke="#1f6fb2" '
                'stroke-width="3"/>'
            )
        if m.threshold is not None:
            parts.append(
                f'<line x1="{_num(x(float(m.threshold)))}" y1="{_num(y - 10)}" '
                f'x2="{_num(x(float(m.threshold)))}" y2="{_num(y + 10)}" stroke="#c0392b" '
                'stroke-width="2" stroke-dasharray="3,2"/>'
            )
        colour = "#1e8449" if m.passed is True else "#c0392b" if m.passed is False else "#333"

        parts.append(
            f'<circle cx="{_num(x(float(m.value)))}" cy="{_num(y)}" r="5" fill="{colour}"/>'
        )
    parts.append("</svg>")
    return "".join(parts)


def slices_svg(slices: Sequence[SliceRow]) -> str:
    """Per-slice accuracy as horizontal bars (0 to 1)."""
    if not slices:
        return ""
    left, width, bar_h, gap = 90.0, 400.0, 14.0, 4.0
    height = 10.0 + (bar_h + gap) * len(slices) + 10.0
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{_num(left + width + 90)}" '
        f'height="{_num(height)}" viewBox="0 0 {_num(left + width + 90)} {_num(height)}" '
        'role="img" aria-label="accuracy per slice">'
    ]
    for i, row in enumerate(slices):
        y = 10.0 + (bar_h + gap) * i
        parts.append(
            f'<text x="{_num(left - 6)}" y="{_num(y + bar_h - 3)}" font-size="11" '
            f'text-anchor="end">{html.escape(row.name[:14])}</text>'
            f'<rect x="{_num(left)}" y="{_num(y)}" width="{_num(width)}" '
            f'height="{_num(bar_h)}" fill="#eee"/>'
            f'<rect x="{_num(left)}" y="{_num(y)}" width="{_num(width * row.accuracy)}" '
            f'height="{_num(bar_h)}" fill="#1f6fb2"/>'
            f'<text x="{_num(left + width + 6)}" y="{_num(y + bar_h - 3)}" '
            f'font-size="11">{row.accuracy:.3f} (n={row.n})</text>'
        )
    parts.append("</svg>")
    return "".join(parts)


# --------------------------------------------------------------------------- sections


def _sections(data: ReportData) -> list[tuple[str, list[tuple[str, str]]]]:
    """Key/value sections shared by the HTML and Markdown forms."""
    p = data.predicate
    env = p.env
    gpus = ", ".join(str(g.get("name")) for g in env.gpus())
    wheels = data.lock.get("wheels")
    summary = [
        ("run id", f"{p.run_id} (attempt {p.attempt})"),
        ("outcome", str(p.outcome) + (f" — {p.reason}" if p.reason else "")),
        ("verification", data.verification),
        ("bundle digest", data.bundle_digest or "—"),
        ("backend", str(p.backend)),
        ("started", str(p.timestamps.started)),
        ("finished", str(p.timestamps.finished)),
        ("evalrun", str(p.evalrun_version)),
    ]
    model_rows = [("model", f"{p.model.path} sha256:{p.model.sha256} ({p.model.size} bytes)")]
    data_rows = [
        (
            f"dataset {d.name}",
            f"sha256:{d.sha256} — split: {d.split}; license: {d.license}; source: {d.source}",
        )
        for d in p.datasets
    ]
    config = [
        ("params", json.dumps(p.params, sort_keys=True)),
        ("seed", str(p.seeds.seed)),
        ("determinism", json.dumps(p.seeds.determinism or {}, sort_keys=True)),
    ]
    environment = [
        ("image", str(p.image.ref)),
        ("rootfs", f"expected {p.image.rootfs_expected}, found {p.image.rootfs_found}"),
        (
            "sandbox",
            f"{p.sandbox.runtime_used} (requested {p.sandbox.runtime_requested}), "
            f"network {p.sandbox.network}",
        ),
        ("OS", str(env.at("os.PRETTY_NAME"))),
        ("kernel", str(env.at("kernel.release"))),
        ("Python", str(env.at("python.version"))),
        (
            "packages",
            ", ".join(f"{pkg.get('name')}=={pkg.get('version')}" for pkg in env.packages()) or "—",
        ),
        ("CPU", f"{env.at('cpu.model')} ({env.at('cpu.usable_cpus')} usable)"),
        (
            "GPU",
            f"{gpus}; driver {env.at('gpu.driver_version')}, "
            f"CUDA {env.at('gpu.cuda_driver_version')}"
            if env.gpu_visible
            else f"none visible ({env.at('gpu.reason')})",
        ),
    ]
    lineage = [
        ("spec", f"{p.spec.name} {p.spec.digest}"),
        ("lock", str(p.lock_digest)),
        ("base image", str(json_at(data.lock, "base.ref") or "—")),
        (
            "wheels",
            ", ".join(
                f"{w.get('filename')} sha256:{str(w.get('sha256'))[:16]}…"
                for w in (wheels if isinstance(wheels, list) else [])
                if isinstance(w, dict)
            )
            or "—",
        ),
        ("code", f"commit {p.source.commit}, dirty: {p.source.dirty}"),
        ("build context", f"sha256:{p.source.tree_sha256}"),
    ]
    origin = p.reproduction_of
    if origin is not None:
        lineage.append(("reproduction of", f"{origin.run_id} (bundle {origin.bundle_digest})"))
    return [
        ("Summary", summary),
        ("Model", model_rows),
        ("Data", data_rows),
        ("Configuration", config),
        ("Environment", environment),
        ("Lineage", lineage),
    ]


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
    p = data.predicate
    title = f"evalrun report — {p.spec.name} — {p.run_id}"
    body = [f"<h1>{html.escape(title)}</h1>"]
    sections = _sections(data)
    body.append("<h2>Summary</h2>" + _table([], [list(r) for r in sections[0][1]], "kv"))
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


def render_markdown_full(data: ReportData) -> str:
    """The report as Markdown (deterministic); the same content as the HTML, no plots."""
    p = data.predicate
    lines = [f"# evalrun report — {p.spec.name} — {p.run_id}", ""]
    sections = _sections(data)

    def kv(rows: Sequence[tuple[str, str]]) -> None:
        for key, value in rows:
            lines.append(f"- {key}: {value}")
        lines.append("")

    lines += ["## Summary", ""]
    kv(sections[0][1])
    lines += ["## Metrics", ""]
    rows = metric_rows(p.metrics)
    if rows:
        lines.append("| metric | value | confidence interval | threshold | verdict |")
        lines.append("|---|---|---|---|---|")
        lines += ["| " + " | ".join(r) + " |" for r in rows]
    else:
        lines.append("No metrics were computed.")
    lines.append("")
    if data.slices:
        lines += [f"## Per-slice breakdown (by {data.slice_field})", ""]
        lines.append(f"| {data.slice_field} | n | correct | accuracy |")
        lines.append("|---|---|---|---|")
        lines += [f"| {s.name} | {s.n} | {s.correct} | {s.accuracy:.4f} |" for s in data.slices]
        lines.append("")
    repro = reproduction_markdown(p)
    if repro:
        lines += [*repro[1:], ""]
    for name, section_rows in sections[1:]:
        lines += [f"## {name}", ""]
        kv(section_rows)
    return "\n".join(lines).rstrip("\n") + "\n"


def render_audit_html(predicate: AuditPredicate, verification: str) -> str:
    """An audit bundle's report as one self-contained HTML document (deterministic)."""
    p = predicate
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
    p = predicate
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


__all__ = [
    "ReportData",
    "SliceRow",
    "load_report_data",
    "metrics_svg",
    "per_slice",
    "render_audit_html",
    "render_html",
    "render_markdown_full",
    "render_run_set_html",
    "slices_svg",
]

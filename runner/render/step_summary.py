"""The Markdown a CI job page shows for a run (appended to ``$GITHUB_STEP_SUMMARY``).

The same facts as the terminal: run id, outcome and reason, the metric table (role,
value, confidence interval, threshold, verdict), the verdict, the bundle, its digest and
whether it verified. Every string that comes from a bundle, a spec or an error is passed
through :func:`md_text`: Markdown and HTML are escaped, so a metric name, a reason or an
evaluation's stderr shows as the text it is and never formats, links or injects markup;
line breaks are folded (a table row stays one row) and lengths are bounded.
"""

from __future__ import annotations

import html
import re
from collections.abc import Sequence
from dataclasses import dataclass

from runner.model.outcome import Outcome
from runner.model.predicate import MetricResult, RunPredicate, RunSetPredicate
from runner.render.markdown import (
    ROLE_HEADER,
    metric_rows_with_role,
    promotion_lines,
    stderr_markdown,
)

CELL_MAX = 300
# Markdown's ASCII punctuation that can start or end emphasis, links and images (``[``
# escaped, ``(`` cannot follow a link text), tables, code, headings, math or footnotes.
_MARKDOWN = re.compile(r"([\\`*_{}\[\]#+!|~^$])")
_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")

VERDICTS = {
    0: "PASS: every metric meets its threshold",
    6: "FAIL: the evaluation did not meet its thresholds",
}
# How a run ended, said for what it is: a crash or a timeout is not a missed threshold.
OUTCOME_VERDICTS = {
    Outcome.PASSED: "PASS: every metric meets its threshold",
    Outcome.COMPLETED: "PASS: the evaluation completed (no thresholds declared)",
    Outcome.THRESHOLDS_FAILED: "FAIL: the evaluation did not meet its thresholds",
    Outcome.EVALUATION_FAILED: "FAIL: the evaluation crashed (see its stderr)",
    Outcome.TIMEOUT: "FAIL: the evaluation timed out",
    Outcome.BAD_OUTPUT: "FAIL: bad output — the per-sample output could not be scored",
}
PARTIAL_VERDICT = (
    "FAIL: bad output — only some metrics could be computed (shown; they do not count)"
)
_MARKS = {0: "✅", 6: "❌"}


def md_text(value: object, limit: int = CELL_MAX) -> str:
    """``value`` as inert Markdown text: HTML and Markdown escaped, one line, bounded."""
    text = "—" if value is None else str(value)
    text = " ".join(_CONTROL.sub("\ufffd", text).split())
    if len(text) > limit:
        text = text[: limit - 1] + "…"
    return _MARKDOWN.sub(r"\\\1", html.escape(text, quote=True))


def verdict_text(
    exit_code: int, outcome: object, *, plain: bool = False, partial: bool = False
) -> str:
    """The verdict line of a run (the terminal's with ``plain``; else with a mark in front).

    A known outcome says how the run ended (crashed, timed out, bad output, thresholds
    failed); ``partial``: a bad-output run that still has some metrics. Anything else
    (a sweep's or an odd bundle's) falls back to the exit code.
    """
    parsed = Outcome.parse(outcome)
    if parsed is Outcome.BAD_OUTPUT and partial:
        text = PARTIAL_VERDICT
    elif parsed in OUTCOME_VERDICTS and parsed is not None and parsed.exit_code == exit_code:
        text = OUTCOME_VERDICTS[parsed]
    else:
        text = VERDICTS.get(exit_code, f"NOT EVALUATED: {outcome}")
    return text if plain else f"{_MARKS.get(exit_code, '⚠️')} {text}"


def _table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> list[str]:
    lines = ["| " + " | ".join(md_text(h) for h in header) + " |"]
    lines.append("|" + "---|" * len(header))
    lines += ["| " + " | ".join(md_text(c) for c in row) + " |" for row in rows]
    return lines


def metric_table_markdown(metrics: Sequence[MetricResult]) -> list[str]:
    """The terminal's metric table as escaped Markdown (and the promotion lines)."""
    rows = metric_rows_with_role(metrics)
    if not rows:
        return ["No metrics were computed."]
    lines = _table(ROLE_HEADER, rows)
    promotions = promotion_lines(metrics)
    if promotions:
        lines.append("")
        lines += [f"- {md_text(p)}" for p in promotions]
    return lines


def _facts(rows: Sequence[tuple[str, object]]) -> list[str]:
    return [f"- **{label}**: {md_text(value)}" for label, value in rows]


def run_summary(
    predicate: RunPredicate,
    *,
    exit_code: int,
    bundle: str,
    digest: str,
    verified: str,
    reused: bool = False,
) -> str:
    """The summary of ``evalrun run``: what the terminal prints, as Markdown."""
    p = predicate
    lines = [
        f"### evalrun run: {md_text(p.spec.name)} — "
        f"{md_text(verdict_text(exit_code, p.outcome, partial=bool(p.metrics)))}",
        "",
        *_facts(
            [
                ("run id", p.run_id + (" (existing run)" if reused else "")),
                ("outcome", f"{p.outcome}" + (f" — {p.reason}" if p.reason else "")),
                ("exit code", exit_code),
            ]
        ),
        *stderr_markdown(p),
        "",
        *metric_table_markdown(p.metrics),
        "",
        *_facts([("bundle", bundle), ("digest", digest), ("verify", verified)]),
    ]
    return "\n".join(lines) + "\n"


def run_set_summary(predicate: RunSetPredicate, *, bundle: str, digest: str | None) -> str:
    """The summary of a run set: each seed's outcome and metrics, and the spread across seeds."""
    p = predicate
    exit_code = p.exit_code if p.exit_code is not None else _exit_of(p.outcome)
    names = list(dict.fromkeys(m.name for member in p.members for m in member.metrics))
    rows = [
        [
            member.seed,
            member.run_id,
            member.outcome,
            *[_value(next((m for m in member.metrics if m.name == n), None)) for n in names],
        ]
        for member in p.members
    ]
    spread = [
        [
            s.name,
            s.n,
            _num(s.mean),
            _num(s.sd),
            f"[{_num(s.ci.low)}, {_num(s.ci.high)}]" if s.ci is not None else s.note,
        ]
        for s in p.across_seeds
    ]
    lines = [
        f"### evalrun run set: {md_text(p.spec.name)} — "
        f"{md_text(verdict_text(exit_code, p.outcome))}",
        "",
        *_facts([("run set", p.run_id), ("outcome", p.outcome), ("exit code", exit_code)]),
        "",
        *_table(["seed", "run id", "outcome", *names], rows),
        "",
        *_table(["metric", "n", "mean", "sd", "CI across seeds (Student t)"], spread),
        "",
        *_facts([("bundle", bundle), ("digest", digest)]),
    ]
    return "\n".join(lines) + "\n"


def rerun_summary(predicate: RunPredicate, *, exit_code: int, bundle: str, digest: str) -> str:
    """The summary of ``evalrun rerun``: the re-run's verdict per metric against the original."""
    p = predicate
    origin, repro = p.reproduction_of, p.reproduction
    verdict = repro.verdict if repro else None
    head = "✅ REPRODUCED" if exit_code == 0 else f"❌ NOT REPRODUCED ({verdict or p.outcome})"
    rows = [
        [
            m.name,
            _num(m.original),
            _num(m.rerun),
            "—" if m.delta is None else f"{m.delta:+.4f}",
            m.verdict,
        ]
        for m in (repro.metrics if repro else ())
    ]
    lines = [
        f"### evalrun rerun: {md_text(p.spec.name)} — {md_text(head)}",
        "",
        *_facts(
            [
                ("original", origin.run_id if origin else None),
                ("re-run", p.run_id),
                ("outcome", f"{p.outcome}" + (f" — {p.reason}" if p.reason else "")),
                (
                    "verdict",
                    f"{verdict}" + (f" — {repro.reason}" if repro and repro.reason else ""),
                ),
                ("exit code", exit_code),
            ]
        ),
        "",
        *(_table(["metric", "original", "re-run", "delta", "verdict"], rows) if rows else []),
        "",
        *_facts([("bundle", bundle), ("digest", digest)]),
    ]
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class SweepCellSummary:
    """One cell of a sweep as the summary shows it: its axes and its run, or its error."""

    label: str
    exit_code: int
    predicate: RunPredicate | None = None
    error: str | None = None


def sweep_summary(spec_name: str | None, cells: Sequence[SweepCellSummary], exit_code: int) -> str:
    """The summary of ``evalrun sweep``: a row per cell with its outcome and metric values."""
    names = list(dict.fromkeys(m.name for c in cells if c.predicate for m in c.predicate.metrics))
    rows = []
    for c in cells:
        p = c.predicate
        values = [_value(p.metric(n) if p else None) for n in names]
        what = p.outcome if p else f"error: {c.error}"
        rows.append([c.label, p.run_id if p else None, what, c.exit_code, *values])
    head = verdict_text(exit_code, "see the cells")
    lines = [
        f"### evalrun sweep: {md_text(spec_name)} — {md_text(head)}",
        "",
        *_table(["cell", "run id", "outcome", "exit code", *names], rows),
    ]
    return "\n".join(lines) + "\n"


def error_summary(command: str, message: str, exit_code: int) -> str:
    """The summary of a command that failed before it had a result (exit ``exit_code``)."""
    return (
        f"### evalrun {md_text(command)} — ⚠️ ERROR (exit {exit_code})\n\n{md_text(message, 2000)}\n"
    )


def _num(value: float | None) -> str:
    return "—" if value is None else f"{value:.4f}"


def _value(m: MetricResult | None) -> str:
    if m is None:
        return "—"
    mark = {True: "", False: " ✗", None: ""}[m.passed]
    return _num(m.value) + mark


def _exit_of(outcome: object) -> int:
    parsed = Outcome.parse(outcome)
    return parsed.exit_code if parsed is not None else 1


__all__ = [
    "SweepCellSummary",
    "error_summary",
    "md_text",
    "metric_table_markdown",
    "rerun_summary",
    "run_set_summary",
    "run_summary",
    "sweep_summary",
    "verdict_text",
]

"""Human-readable run reports (``report.md`` in every bundle, and the terminal summary)."""

from __future__ import annotations

import re
from collections.abc import Sequence

from pydantic import JsonValue

from runner._internal.sanitize import one_line
from runner.model.predicate import MetricResult, RunPredicate
from runner.render.safe import markdown_view

Metrics = Sequence[MetricResult]


def _fmt(value: JsonValue) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    return "—" if value is None else str(value)


def percent(level: float | None) -> str:
    """A confidence level as whole percent (``0.95`` → ``95``); ``?`` for none or one that
    is not a level at all (a bundle may say anything)."""
    if level is None or not 0 < level <= 1:
        return "?"
    return str(int(level * 100))


def _signed(value: float | None) -> str:
    return f"{0.0 if value is None else value:+.4f}"


def metric_rows(metrics: Metrics) -> list[list[str]]:
    """Per metric: name, value, confidence interval, threshold, verdict."""
    rows = []
    for m in metrics:
        ci = m.ci
        ci_text = (
            f"[{_fmt(ci.low)}, {_fmt(ci.high)}] ({percent(ci.level)}% {ci.method})"
            if ci is not None and ci.low is not None
            else "—"
        )
        verdict = {True: "pass", False: "FAIL", None: "—"}[m.passed]
        direction = ">=" if (m.direction or "higher_is_better") == "higher_is_better" else "<="
        rows.append(
            [
                one_line(m.name, limit=200),
                _fmt(m.value),
                one_line(ci_text, limit=300),
                f"{direction} {m.threshold}" if m.threshold is not None else "—",
                verdict,
            ]
        )
    return rows


ROLE_HEADER = ["metric", "role", "value", "confidence interval", "threshold", "verdict"]


def _role(m: MetricResult) -> str:
    role = m.role or "primary"
    return f"{role} (promoted)" if m.promoted is not None and not m.promoted.is_empty() else role


# Beyond this many classes the matrix stays in the bundle (metrics.json, the predicate).
MAX_MATRIX_CLASSES = 20


def confusion_lines(metrics: Metrics) -> list[str]:
    """A Markdown table per metric that carries a confusion matrix (rows: true label)."""
    lines: list[str] = []
    for m in metrics:
        matrix = m.confusion_matrix
        if matrix is None or matrix.labels is None or matrix.counts is None:
            continue
        labels = [str(v) for v in matrix.labels]
        lines += ["", f"Confusion matrix of {m.name} (rows: true label, columns: predicted):", ""]
        if len(labels) > MAX_MATRIX_CLASSES:
            lines.append(f"{len(labels)} classes: see `confusion_matrix` in the predicate.")
            continue
        lines.append("| true \\ predicted | " + " | ".join(labels) + " |")
        lines.append("|" + "---|" * (len(labels) + 1))
        for label, row in zip(labels, matrix.counts, strict=False):
            lines.append(f"| {label} | " + " | ".join(str(c) for c in row) + " |")
    return lines


def metric_rows_with_role(metrics: Metrics) -> list[list[str]]:
    """:func:`metric_rows` with the metric's role after its name.

    A supplementary metric's threshold never gates: its verdict says whether the
    threshold was met and that it did not count.
    """
    rows = []
    for m, row in zip(metrics, metric_rows(metrics), strict=True):
        verdict = row[4]
        met = m.threshold_met
        if m.gating is False and met is not None:
            verdict = ("met" if met else "missed") + " (not gating)"
        rows.append([row[0], _role(m), *row[1:4], verdict])
    return rows


def promotion_lines(metrics: Metrics) -> list[str]:
    """One line per supplementary metric promoted to gate, with its justification."""
    return [
        one_line(f"promoted to gating: {m.name} — {m.promoted.justification}")
        for m in metrics
        if m.promoted is not None
    ]


def custom_metric_lines(metrics: Metrics) -> list[str]:
    """One line per custom metric: its code (file, function, digest) and where it ran."""
    lines = []
    for m in metrics:
        c = m.custom
        if c is None:
            continue
        where = c.recomputed_in or {}
        line = (
            f"custom metric {m.name}: {c.function}() in {c.file} (sha256 {c.file_sha256}), "
            f"recomputed by the runner in a {where.get('runtime', '?')} sandbox of image "
            f"{where.get('image', '?')}, network {where.get('network', '?')}"
        )
        if c.container_reported is not None:
            line += f"; the container reported {c.container_reported} (not used)"
        lines.append(one_line(line, limit=600))
    return lines


def metric_table(metrics: Metrics) -> str:
    """A plain-text table for the terminal (with each metric's role)."""
    header = ROLE_HEADER
    rows = metric_rows_with_role(metrics)
    if not rows:
        return "(no metrics)"
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(header, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    lines += promotion_lines(metrics)
    lines += custom_metric_lines(metrics)
    return "\n".join(lines)


def render_markdown(predicate: RunPredicate) -> str:
    """``report.md``: what ran, on what, with which result. Deterministic for a predicate."""
    p = markdown_view(predicate)
    lines = [
        f"# evalrun report — {p.spec.name}",
        "",
        f"- run id: `{p.run_id}` (attempt {p.attempt})",
        f"- outcome: **{p.outcome}**" + (f" — {p.reason}" if p.reason else ""),
        f"- spec digest: `{p.spec.digest}`",
        f"- lock digest: `{p.lock_digest}`",
        f"- image: `{p.image.ref}`",
        f"- rootfs digest: expected `{p.image.rootfs_expected}`, found `{p.image.rootfs_found}`",
        f"- sandbox: {p.sandbox.runtime_used} (requested {p.sandbox.runtime_requested}), "
        f"network {p.sandbox.network}",
        f"- seed: {p.seeds.seed}",
        f"- started: {p.timestamps.started}, finished: {p.timestamps.finished}",
        "",
        "## Metrics",
        "",
    ]
    rows = metric_rows_with_role(p.metrics)
    if rows:
        lines.append("| " + " | ".join(ROLE_HEADER) + " |")
        lines.append("|" + "---|" * len(ROLE_HEADER))
        lines += ["| " + " | ".join(r) + " |" for r in rows]
        notes = promotion_lines(p.metrics) + custom_metric_lines(p.metrics)
        if notes:
            lines.append("")
            lines += [f"- {line}" for line in notes]
        lines += confusion_lines(p.metrics)
    else:
        lines.append("No metrics were computed.")
    lines += stderr_markdown(predicate)
    lines += provenance_markdown(p)
    lines += perturbation_lines(p)
    lines += ["", "## Inputs", ""]
    lines.append(f"- model `{p.model.path}` sha256 `{p.model.sha256}`")
    for ds in p.datasets:
        lines.append(
            f"- dataset {ds.name} (`{ds.split}`) sha256 `{ds.sha256}`"
            f" — license: {ds.license}; source: {ds.source}"
        )
    lines.append(f"- code: commit `{p.source.commit}`, dirty: {p.source.dirty}")
    lines += ["", "## Environment", ""]
    env = p.env
    lines.append(f"- OS: {env.at('os.PRETTY_NAME')}; kernel {env.at('kernel.release')}")
    lines.append(f"- Python {env.at('python.version')}; {env.package_count()} packages")
    lines.append(f"- CPU: {env.at('cpu.model')} ({env.at('cpu.usable_cpus')} usable)")
    lines.append(
        "- GPU: "
        + (
            ", ".join(str(g.get("name", "?")) for g in env.gpus())
            + f"; driver {env.at('gpu.driver_version')}, "
            f"CUDA {env.at('gpu.cuda_driver_version')}"
            if env.gpu_visible
            else f"none visible ({env.at('gpu.reason')})"
        )
    )
    lines += reproduction_markdown(p)
    return "\n".join(lines) + "\n"


# A line of the evaluation's stderr is shown up to this long (the bundle keeps all of it).
STDERR_LINE_LIMIT = 500


def stderr_lines(predicate: RunPredicate) -> list[str]:
    """The end of the evaluation's stderr as recorded, each line intact but terminal-safe.

    Indentation and punctuation are kept (a traceback reads as one); control characters
    are escaped and each line is bounded. Empty for a run that recorded none.
    """
    return [
        one_line(line.rstrip().expandtabs(4), limit=STDERR_LINE_LIMIT)
        for line in predicate.stderr_tail or ()
    ]


def stderr_markdown(predicate: RunPredicate) -> list[str]:
    """The ``## Evaluation stderr`` section: the recorded tail in a fenced code block.

    Inside a fence nothing is Markdown or HTML; the fence is longer than any run of
    backticks in the text, so no line can close it. Empty when none was recorded.
    """
    lines = stderr_lines(predicate)
    if not lines:
        return []
    longest = max((len(run) for line in lines for run in re.findall("`+", line)), default=0)
    fence = "`" * max(3, longest + 1)
    return [
        "",
        f"## Evaluation stderr (last {len(lines)} lines)",
        "",
        fence + "text",
        *lines,
        fence,
    ]


def provenance_markdown(predicate: RunPredicate) -> list[str]:
    """The ``## Provenance`` section: who launched the run, when, why, with which steps."""
    prov = predicate.provenance
    if prov.is_empty():
        return []
    who = prov.launched_by
    ci = who.ci
    why = prov.rationale
    lines = [
        "",
        "## Provenance",
        "",
        f"- launched by: {who.user or 'unknown user'} on {who.host or '?'}"
        f" at {prov.launched_at} (evalrun {prov.evalrun_version})",
    ]
    if ci is not None and not ci.is_empty():
        lines.append(
            f"- CI: {ci.system}, pipeline {_fmt(ci.pipeline)}, "
            f"run {_fmt(ci.run_id)}, job {_fmt(ci.job_url)}"
        )
    if who.evidence is not None:
        lines.append(f"- these launcher claims are {who.evidence}")
        lines.append(f"- bound to the signing key: keyid {who.signer_keyid}")
    lines.append(
        f"- rationale: {why.text} (from {why.source})" if why.text else "- rationale: none given"
    )
    if prov.comparison_group:
        lines.append(f"- comparison group: {prov.comparison_group}")
    for step in prov.preprocessing:
        lines.append(
            f"- preprocessing {step.name}: `{step.code}` `{step.code_digest}` params {step.params}"
        )
    return lines


def reproduction_markdown(predicate: RunPredicate) -> list[str]:
    """The ``## Reproduction`` section of a re-run's report (empty for an original run)."""
    origin, repro = predicate.reproduction_of, predicate.reproduction
    if origin is None or repro is None:
        return []
    lines = [
        "",
        "## Reproduction",
        "",
        f"- re-run of `{origin.run_id}` (bundle `{origin.bundle_digest}`)",
        f"- verdict: **{repro.verdict}**" + (f" — {repro.reason}" if repro.reason else ""),
        "",
        "| metric | original | re-run | delta | verdict |",
        "|---|---|---|---|---|",
    ]
    for m in repro.metrics:
        lines.append(
            f"| {m.name} | {_fmt(m.original)} | {_fmt(m.rerun)} | {_fmt(m.delta)} | {m.verdict} |"
        )
    return lines


def perturbation_lines(predicate: RunPredicate) -> list[str]:
    """The sensitivity table: each metric under each perturbation, its change and CI."""
    if not predicate.perturbations:
        return []
    lines = [
        "",
        "## Sensitivity to data perturbations",
        "",
        "| perturbation | kind | n | metric | value | change | change CI (paired bootstrap) |",
        "|---|---|---|---|---|---|---|",
    ]
    for p in predicate.perturbations:
        for m in p.metrics:
            dci = m.delta_ci
            low, high = (dci.low, dci.high) if dci is not None else (None, None)
            lines.append(
                f"| {p.name} | {p.kind} | {p.n} | {m.name} | "
                f"{_fmt(m.value)} | {_signed(m.delta)} | [{_signed(low)}, {_signed(high)}] |"
            )
    return lines

"""Human-readable run reports (``report.md`` in every bundle, and the terminal summary)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    return "—" if value is None else str(value)


def metric_rows(predicate: Mapping[str, Any]) -> list[list[str]]:
    rows = []
    for m in predicate.get("metrics") or []:
        ci = m.get("ci") or {}
        level = ci.get("level")
        ci_text = (
            f"[{_fmt(ci.get('low'))}, {_fmt(ci.get('high'))}] "
            f"({int(level * 100) if level else '?'}% {ci.get('method')})"
            if ci.get("low") is not None
            else "—"
        )
        verdict = {True: "pass", False: "FAIL", None: "—"}[m.get("passed")]
        threshold = m.get("threshold")
        direction = ">=" if m.get("direction", "higher_is_better") == "higher_is_better" else "<="
        rows.append(
            [
                m["name"],
                _fmt(m.get("value")),
                ci_text,
                f"{direction} {threshold}" if threshold is not None else "—",
                verdict,
            ]
        )
    return rows


ROLE_HEADER = ["metric", "role", "value", "confidence interval", "threshold", "verdict"]


def _role(m: Mapping[str, Any]) -> str:
    role = str(m.get("role") or "primary")
    return f"{role} (promoted)" if m.get("promoted") else role


def metric_rows_with_role(predicate: Mapping[str, Any]) -> list[list[str]]:
    """:func:`metric_rows` with the metric's role after its name.

    A supplementary metric's threshold never gates: its verdict says whether the
    threshold was met and that it did not count.
    """
    rows = []
    for m, row in zip(predicate.get("metrics") or [], metric_rows(predicate), strict=True):
        verdict = row[4]
        met = m.get("threshold_met")
        if m.get("gating") is False and met is not None:
            verdict = ("met" if met else "missed") + " (not gating)"
        rows.append([row[0], _role(m), *row[1:4], verdict])
    return rows


def promotion_lines(predicate: Mapping[str, Any]) -> list[str]:
    """One line per supplementary metric promoted to gate, with its justification."""
    lines = []
    for m in predicate.get("metrics") or []:
        promoted = m.get("promoted")
        if isinstance(promoted, Mapping):
            lines.append(f"promoted to gating: {m.get('name')} — {promoted.get('justification')}")
    return lines


def metric_table(predicate: Mapping[str, Any]) -> str:
    """A plain-text table for the terminal (with each metric's role)."""
    header = ROLE_HEADER
    rows = metric_rows_with_role(predicate)
    if not rows:
        return "(no metrics)"
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(header, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    lines += promotion_lines(predicate)
    return "\n".join(lines)


def render_markdown(predicate: Mapping[str, Any]) -> str:
    """``report.md``: what ran, on what, with which result. Deterministic for a predicate."""
    env = predicate.get("environment") or {}
    image = predicate.get("image") or {}
    lines = [
        f"# evalrun report — {predicate.get('spec', {}).get('name')}",
        "",
        f"- run id: `{predicate.get('run_id')}` (attempt {predicate.get('attempt')})",
        f"- outcome: **{predicate.get('outcome')}**"
        + (f" — {predicate['reason']}" if predicate.get("reason") else ""),
        f"- spec digest: `{predicate.get('spec', {}).get('digest')}`",
        f"- lock digest: `{predicate.get('lock_digest')}`",
        f"- image: `{image.get('ref')}`",
        f"- rootfs digest: expected `{image.get('rootfs_expected')}`, "
        f"found `{image.get('rootfs_found')}`",
        f"- sandbox: {predicate.get('sandbox', {}).get('runtime_used')} "
        f"(requested {predicate.get('sandbox', {}).get('runtime_requested')}), "
        f"network {predicate.get('sandbox', {}).get('network')}",
        f"- seed: {predicate.get('seeds', {}).get('seed')}",
        f"- started: {predicate.get('timestamps', {}).get('started')}, "
        f"finished: {predicate.get('timestamps', {}).get('finished')}",
        "",
        "## Metrics",
        "",
    ]
    rows = metric_rows_with_role(predicate)
    if rows:
        lines.append("| " + " | ".join(ROLE_HEADER) + " |")
        lines.append("|" + "---|" * len(ROLE_HEADER))
        lines += ["| " + " | ".join(r) + " |" for r in rows]
        promotions = promotion_lines(predicate)
        if promotions:
            lines.append("")
            lines += [f"- {line}" for line in promotions]
    else:
        lines.append("No metrics were computed.")
    lines += provenance_markdown(predicate)
    lines += perturbation_lines(predicate)
    lines += ["", "## Inputs", ""]
    model = predicate.get("model") or {}
    lines.append(f"- model `{model.get('path')}` sha256 `{model.get('sha256')}`")
    for ds in predicate.get("datasets") or []:
        lines.append(
            f"- dataset {ds.get('name')} (`{ds.get('split')}`) sha256 `{ds.get('sha256')}`"
            f" — license: {ds.get('license')}; source: {ds.get('source')}"
        )
    source = predicate.get("source") or {}
    lines.append(f"- code: commit `{source.get('commit')}`, dirty: {source.get('dirty')}")
    lines += ["", "## Environment", ""]
    osr = env.get("os") or {}
    lines.append(f"- OS: {osr.get('PRETTY_NAME')}; kernel {env.get('kernel', {}).get('release')}")
    lines.append(
        f"- Python {env.get('python', {}).get('version')}; "
        f"{len(env.get('packages') or [])} packages"
    )
    cpu = env.get("cpu") or {}
    lines.append(f"- CPU: {cpu.get('model')} ({cpu.get('usable_cpus')} usable)")
    gpu = env.get("gpu") or {}
    lines.append(
        "- GPU: "
        + (
            ", ".join(g.get("name", "?") for g in gpu.get("gpus", []))
            + f"; driver {gpu.get('driver_version')}, "
            f"CUDA {gpu.get('cuda_driver_version')}"
            if gpu.get("visible")
            else f"none visible ({gpu.get('reason')})"
        )
    )
    lines += reproduction_markdown(predicate)
    return "\n".join(lines) + "\n"


def provenance_markdown(predicate: Mapping[str, Any]) -> list[str]:
    """The ``## Provenance`` section: who launched the run, when, why, with which steps."""
    prov = predicate.get("provenance")
    if not isinstance(prov, Mapping) or not prov:
        return []
    who = prov.get("launched_by") or {}
    ci = who.get("ci") or {}
    why = prov.get("rationale") or {}
    lines = [
        "",
        "## Provenance",
        "",
        f"- launched by: {who.get('user') or 'unknown user'} on {who.get('host') or '?'}"
        f" at {prov.get('launched_at')} (evalrun {prov.get('evalrun_version')})",
    ]
    if ci:
        lines.append(
            f"- CI: {ci.get('system')}, pipeline {_fmt(ci.get('pipeline'))}, "
            f"run {_fmt(ci.get('run_id'))}, job {_fmt(ci.get('job_url'))}"
        )
    lines.append(
        f"- rationale: {why.get('text')} (from {why.get('source')})"
        if why.get("text")
        else "- rationale: none given"
    )
    if prov.get("comparison_group"):
        lines.append(f"- comparison group: {prov.get('comparison_group')}")
    for step in prov.get("preprocessing") or []:
        lines.append(
            f"- preprocessing {step.get('name')}: `{step.get('code')}` "
            f"`{step.get('code_digest')}` params {step.get('params')}"
        )
    return lines


def reproduction_markdown(predicate: Mapping[str, Any]) -> list[str]:
    """The ``## Reproduction`` section of a re-run's report (empty for an original run)."""
    origin = predicate.get("reproduction_of")
    repro = predicate.get("reproduction")
    if not isinstance(origin, Mapping) or not isinstance(repro, Mapping):
        return []
    lines = [
        "",
        "## Reproduction",
        "",
        f"- re-run of `{origin.get('run_id')}` (bundle `{origin.get('bundle_digest')}`)",
        f"- verdict: **{repro.get('verdict')}**"
        + (f" — {repro['reason']}" if repro.get("reason") else ""),
        "",
        "| metric | original | re-run | delta | verdict |",
        "|---|---|---|---|---|",
    ]
    for m in repro.get("metrics") or []:
        lines.append(
            f"| {m.get('name')} | {_fmt(m.get('original'))} | {_fmt(m.get('rerun'))} | "
            f"{_fmt(m.get('delta'))} | {m.get('verdict')} |"
        )
    return lines


def perturbation_lines(predicate: Mapping[str, Any]) -> list[str]:
    """The sensitivity table: each metric under each perturbation, its change and CI."""
    perts = predicate.get("perturbations") or []
    if not perts:
        return []
    lines = [
        "",
        "## Sensitivity to data perturbations",
        "",
        "| perturbation | kind | n | metric | value | change | change CI (paired bootstrap) |",
        "|---|---|---|---|---|---|---|",
    ]
    for p in perts:
        for m in p.get("metrics") or []:
            dci = m.get("delta_ci") or {}
            lines.append(
                f"| {p.get('name')} | {p.get('kind')} | {p.get('n')} | {m.get('name')} | "
                f"{_fmt(m.get('value'))} | {m.get('delta', 0.0):+.4f} | "
                f"[{dci.get('low', 0.0):+.4f}, {dci.get('high', 0.0):+.4f}] |"
            )
    return lines

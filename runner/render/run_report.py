"""``evalrun report`` for a run: what it shows, read from the bundle, and its Markdown form.

Everything shown comes from the bundle (predicate, lock, per-sample outputs) plus the
verification result of that bundle. :func:`report_sections` are the key/value sections
the HTML (:mod:`runner.render.html`) and Markdown forms share; both are pure functions of
:class:`ReportData`, with floats at fixed precision, so the same bundle gives
byte-identical files.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, replace

from runner._internal.sanitize import markdown_text
from runner._internal.strict_json import load_json_strict
from runner.bundle.reader import OpenedBundle, expect_kind
from runner.model.predicate import JsonObject, RunPredicate, json_at
from runner.render.markdown import (
    ROLE_HEADER,
    metric_rows_with_role,
    promotion_lines,
    reproduction_markdown,
    stderr_markdown,
)
from runner.render.safe import markdown_json, markdown_view

MAX_SLICES = 40
MAX_SAMPLES = 2_000_000
# What a report reads of a bundle at most; larger files are left out of the report.
MAX_LOCK_BYTES = 16 << 20
MAX_PREDICTIONS_BYTES = 256 << 20


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


def per_slice(predictions: bytes | None) -> tuple[str | None, tuple[SliceRow, ...]]:
    """Accuracy per slice of the per-sample outputs (the bytes of ``predictions.jsonl``).

    Slices by the ``slice`` field when samples carry one, otherwise by ``label``.
    Samples without label/prediction are skipped; no or unreadable outputs give none.
    """
    if predictions is None:
        return None, ()
    try:
        lines = predictions.decode("utf-8").splitlines()[:MAX_SAMPLES]
    except UnicodeDecodeError:
        return None, ()
    samples = []
    for line in lines:
        try:
            sample = load_json_strict(line)
        except ValueError:
            continue
        if isinstance(sample, dict) and "label" in sample and "prediction" in sample:
            samples.append(sample)
    if not samples:
        return None, ()
    key = "slice" if any("slice" in s for s in samples) else "label"
    counts: dict[str, list[int]] = {}
    for s in samples:
        bucket = counts.setdefault(_slice_name(s.get(key)), [0, 0])
        bucket[0] += 1
        bucket[1] += int(s["prediction"] == s["label"])

    def order(name: str) -> tuple[int, float, str]:
        try:
            return (0, float(name), name)
        except (ValueError, OverflowError):
            return (1, 0.0, name)

    rows = tuple(
        SliceRow(n, c[0], c[1]) for n, c in sorted(counts.items(), key=lambda kv: order(kv[0]))
    )
    return key, rows[:MAX_SLICES]


def _slice_name(value: object) -> str:
    # a slice is named by a scalar; anything else is shown by its type, not walked
    if value is None or isinstance(value, str | int | float | bool):
        return str(value)
    return f"({type(value).__name__})"


def load_report_data(opened: OpenedBundle) -> ReportData:
    """What the report of the run bundle ``opened`` shows: its predicate, and its lock and
    per-sample outputs as the signed bytes (bounded; absent or too large: not shown)."""
    predicate = expect_kind(opened.predicate, RunPredicate, opened.path)
    lock: object = {}
    lock_bytes = opened.read_optional("eval.lock.json", max_bytes=MAX_LOCK_BYTES)
    if lock_bytes is not None:
        try:
            lock = load_json_strict(lock_bytes)
        except ValueError:
            lock = {}
    predictions = opened.read_optional("results/predictions.jsonl", max_bytes=MAX_PREDICTIONS_BYTES)
    slice_field, slices = per_slice(predictions)
    return ReportData(
        predicate=predicate,
        lock=lock if isinstance(lock, dict) else {},
        slice_field=slice_field,
        slices=slices,
        verification=opened.verification,
        bundle_digest=opened.digest,
    )


def launcher_text(p: RunPredicate) -> str:
    """Who launched the run, and what that claim rests on (never more than it says)."""
    who = p.provenance.launched_by
    if who.is_empty():
        return "—"
    text = f"{who.user or 'unknown user'} on {who.host or '?'}"
    if who.ci is not None and not who.ci.is_empty():
        text += f", CI {who.ci.system} {who.ci.job_url or who.ci.run_id or ''}".rstrip()
    if who.evidence is None:
        return text + " (self-asserted)"
    return f"{text} ({who.evidence}; bound to signing keyid {who.signer_keyid})"


def provenance_rows(p: RunPredicate) -> list[tuple[str, str]]:
    """The facts of ``report.md``'s ``## Provenance`` section as key/value rows: who
    launched the run, when, from which CI job, why, in which group, after which
    preprocessing steps (empty for a run sealed before provenance was recorded)."""
    prov = p.provenance
    if prov.is_empty():
        return []
    who, ci, why = prov.launched_by, prov.launched_by.ci, prov.rationale
    rows = [
        ("launched by", launcher_text(p)),
        ("launched at", f"{prov.launched_at} (evalrun {prov.evalrun_version})"),
    ]
    if ci is not None and not ci.is_empty():
        rows.append(
            ("CI", f"{ci.system}, pipeline {ci.pipeline}, run {ci.run_id}, job {ci.job_url}")
        )
    if who.evidence is not None:
        rows.append(("launcher claims", f"{who.evidence}; signing keyid {who.signer_keyid}"))
    rows.append(("rationale", f"{why.text} (from {why.source})" if why.text else "none given"))
    if prov.comparison_group:
        rows.append(("comparison group", prov.comparison_group))
    for step in prov.preprocessing:
        rows.append(
            (
                f"preprocessing {step.name}",
                f"{step.code} {step.code_digest} params "
                + json.dumps(step.params or {}, sort_keys=True),
            )
        )
    return rows


def report_sections(data: ReportData) -> list[tuple[str, list[tuple[str, str]]]]:
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
        ("backend", str(p.backend) + (f" — {p.backend_target}" if p.backend_target else "")),
        ("started", str(p.timestamps.started)),
        ("finished", str(p.timestamps.finished)),
        ("evalrun", str(p.evalrun_version)),
        ("launched by", launcher_text(p)),
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
    provenance = provenance_rows(p)
    return [
        ("Summary", summary),
        *([("Provenance", provenance)] if provenance else []),
        ("Model", model_rows),
        ("Data", data_rows),
        ("Configuration", config),
        ("Environment", environment),
        ("Lineage", lineage),
    ]


def render_markdown_full(data: ReportData) -> str:
    """The report as Markdown (deterministic); the same content as the HTML, no plots."""
    lock = markdown_json(data.lock)
    stderr = stderr_markdown(data.predicate)
    data = replace(
        data,
        predicate=markdown_view(data.predicate),
        lock=lock if isinstance(lock, dict) else {},
        slice_field=None if data.slice_field is None else markdown_text(data.slice_field),
        slices=tuple(replace(s, name=markdown_text(s.name)) for s in data.slices),
        verification=markdown_text(data.verification),
        bundle_digest=None if data.bundle_digest is None else markdown_text(data.bundle_digest),
    )
    p = data.predicate
    lines = [f"# evalrun report — {p.spec.name} — {p.run_id}", ""]
    sections = report_sections(data)

    def kv(rows: Sequence[tuple[str, str]]) -> None:
        for key, value in rows:
            lines.append(f"- {key}: {value}")
        lines.append("")

    lines += ["## Summary", ""]
    kv(sections[0][1])
    if stderr:
        lines += [*stderr[1:], ""]
    lines += ["## Metrics", ""]
    rows = metric_rows_with_role(p.metrics)
    if rows:
        lines.append("| " + " | ".join(ROLE_HEADER) + " |")
        lines.append("|" + "---|" * len(ROLE_HEADER))
        lines += ["| " + " | ".join(r) + " |" for r in rows]
        lines += [f"- {line}" for line in promotion_lines(p.metrics)]
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

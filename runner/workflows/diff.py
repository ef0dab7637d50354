"""What differs between two runs, grouped by lineage, and how their metrics moved.

Pure functions over two predicates (the signed facts of each bundle). Groups:

- ``environment``: image, rootfs, sandbox runtime, OS, kernel, Python, packages,
  CPU, GPU, driver, CUDA, backend, evalrun version
- ``code``: commit, dirty flag, build-context digest
- ``data``: model and dataset digests, splits, licenses
- ``config``: params, seed, metric definitions, spec and lock digests

Metric comparison: the delta, whether it exceeds an absolute tolerance (when
one is given) and whether the two confidence intervals overlap. The same
per-metric judgement gives a re-run its reproduction verdict.

Gate (``evalrun diff`` exit code): ``b`` regressed when a metric that gates ``a`` (a
primary or promoted metric; every metric of bundles from before metric roles) is worse
in ``b``, in the metric's direction, beyond ``a``'s confidence interval (any worsening
when ``a`` recorded none) and beyond ``--tolerance`` when one is given — or has no value
in ``b`` at all. Then the exit code is 6 (:data:`REGRESSION_EXIT`), else 0.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from typing import TypedDict

from pydantic import JsonValue

from runner._internal.sanitize import one_line
from runner.model.predicate import (
    DatasetInput,
    JsonObject,
    MetricResult,
    MetricVerdict,
    RunPredicate,
)

GROUPS = ("environment", "code", "data", "config")
# the exit code of a diff whose candidate regressed on a gating metric (DESIGN.md: a run
# that failed its thresholds); 0 otherwise
REGRESSION_EXIT = 6

Verdict = MetricVerdict
# worst first: the overall verdict of a reproduction is its worst metric's
VERDICT_ORDER: tuple[Verdict, ...] = (
    "missing",
    "changed",
    "within_ci",
    "within_tolerance",
    "identical",
)


@dataclass(frozen=True)
class Change:
    group: str
    field: str
    a: JsonValue
    b: JsonValue


@dataclass(frozen=True)
class MetricDelta:
    name: str
    a: float | None
    b: float | None
    delta: float | None
    a_ci: tuple[float, float] | None
    b_ci: tuple[float, float] | None
    ci_overlap: bool | None
    tolerance: float | None
    exceeds_tolerance: bool | None
    verdict: Verdict
    gating: bool = False
    regressed: bool = False


class ChangeJson(TypedDict):
    field: str
    a: JsonValue
    b: JsonValue


class RunDiffJson(TypedDict):
    """``evalrun diff --json``: the changed fields by group, and every metric's delta."""

    a: str
    b: str
    changes: dict[str, list[ChangeJson]]
    metrics: list[JsonObject]  # each MetricDelta's fields
    regressed: list[str]  # gating metrics of b that regressed (see the module docstring)
    exit_code: int


@dataclass(frozen=True)
class RunDiff:
    a_run: str
    b_run: str
    changes: tuple[Change, ...]
    metrics: tuple[MetricDelta, ...]

    def group(self, name: str) -> list[Change]:
        return [c for c in self.changes if c.group == name]

    @property
    def regressions(self) -> list[MetricDelta]:
        """The gating metrics of ``b`` that regressed against ``a``."""
        return [m for m in self.metrics if m.regressed]

    @property
    def exit_code(self) -> int:
        """6 when a gating metric regressed (a CI gate fails), else 0."""
        return REGRESSION_EXIT if self.regressions else 0

    def as_dict(self) -> RunDiffJson:
        return {
            "a": self.a_run,
            "b": self.b_run,
            "changes": {
                g: [{"field": c.field, "a": c.a, "b": c.b} for c in self.group(g)] for g in GROUPS
            },
            "metrics": [asdict(m) for m in self.metrics],
            "regressed": [m.name for m in self.regressions],
            "exit_code": self.exit_code,
        }


def _num(value: float | None) -> float | None:
    return None if value is None else float(value)


def _ci(metric: MetricResult | None) -> tuple[float, float] | None:
    ci = metric.ci if metric is not None else None
    if ci is None or ci.low is None or ci.high is None:
        return None
    return float(ci.low), float(ci.high)


def judge_metric(
    name: str,
    a: MetricResult | None,
    b: MetricResult | None,
    tolerance: float | None = None,
) -> MetricDelta:
    """Compare metric ``a`` (original/baseline) with ``b`` (re-run/candidate).

    identical: same value; within_tolerance: ``|b - a| <= tolerance``; within_ci:
    b's value lies inside a's confidence interval; changed: none of those;
    missing: one side has no value.
    """
    va = _num(a.value) if a else None
    vb = _num(b.value) if b else None
    a_ci, b_ci = _ci(a), _ci(b)
    overlap = None
    if a_ci and b_ci:
        overlap = max(a_ci[0], b_ci[0]) <= min(a_ci[1], b_ci[1])
    if va is None or vb is None or not (math.isfinite(va) and math.isfinite(vb)):
        return MetricDelta(name, va, vb, None, a_ci, b_ci, overlap, tolerance, None, "missing")
    delta = vb - va
    exceeds = abs(delta) > tolerance if tolerance is not None else None
    verdict: Verdict
    if va == vb:
        verdict = "identical"
    elif tolerance is not None and not exceeds:
        verdict = "within_tolerance"
    elif a_ci is not None and a_ci[0] <= vb <= a_ci[1]:
        verdict = "within_ci"
    else:
        verdict = "changed"
    return MetricDelta(name, va, vb, delta, a_ci, b_ci, overlap, tolerance, exceeds, verdict)


def gates(metric: MetricResult) -> bool:
    """Whether ``metric`` gates its run: as recorded, else primary or promoted (a bundle
    from before metric roles: every metric was primary)."""
    if metric.gating is not None:
        return metric.gating
    return metric.role in (None, "primary") or metric.promoted is not None


def regressed(delta: MetricDelta, baseline: MetricResult | None) -> bool:
    """Whether the candidate regressed on ``baseline``'s gating metric (module docstring)."""
    if baseline is None or not gates(baseline) or delta.a is None or not math.isfinite(delta.a):
        return False
    if delta.b is None or not math.isfinite(delta.b):
        return True  # the gating metric has no value in the candidate
    higher = (baseline.direction or "higher_is_better") == "higher_is_better"
    worse = delta.b < delta.a if higher else delta.b > delta.a
    if not worse:
        return False
    if delta.a_ci is not None:
        beyond_ci = delta.b < delta.a_ci[0] if higher else delta.b > delta.a_ci[1]
        if not beyond_ci:
            return False
    return delta.tolerance is None or bool(delta.exceeds_tolerance)


def compare_metrics(
    a: Sequence[MetricResult],
    b: Sequence[MetricResult],
    tolerance: float | None = None,
) -> list[MetricDelta]:
    """Per metric name (in a's order, then b's new ones), the comparison of a with b."""
    by_a = {m.name: m for m in a}
    by_b = {m.name: m for m in b}
    names = list(by_a) + [n for n in by_b if n not in by_a]
    deltas = []
    for n in names:
        delta = judge_metric(n, by_a.get(n), by_b.get(n), tolerance)
        base = by_a.get(n)
        deltas.append(
            replace(
                delta,
                gating=base is not None and gates(base),
                regressed=regressed(delta, base),
            )
        )
    return deltas


def overall_verdict(deltas: Sequence[MetricDelta]) -> Verdict:
    """The worst per-metric verdict ("missing" when there is nothing to compare)."""
    if not deltas:
        return "missing"
    return min((d.verdict for d in deltas), key=VERDICT_ORDER.index)


def _packages(predicate: RunPredicate) -> dict[str, str]:
    return {
        str(p.get("name")): str(p.get("version")) for p in predicate.env.packages() if p.get("name")
    }


def _gpus(predicate: RunPredicate) -> str | None:
    gpus = predicate.env.at("gpu.gpus")
    if not isinstance(gpus, list) or not gpus:
        return None
    return ", ".join(str(g.get("name")) for g in predicate.env.gpus())


def _env(path: str) -> Callable[[RunPredicate], JsonValue]:
    return lambda p: p.env.at(path)


# (group, field as shown, how to read it from a predicate)
_SCALARS: tuple[tuple[str, str, Callable[[RunPredicate], JsonValue]], ...] = (
    ("environment", "image.ref", lambda p: p.image.ref),
    ("environment", "image.rootfs_found", lambda p: p.image.rootfs_found),
    ("environment", "sandbox.runtime_used", lambda p: p.sandbox.runtime_used),
    ("environment", "backend", lambda p: p.backend),
    ("environment", "evalrun_version", lambda p: p.evalrun_version),
    ("environment", "environment.os.PRETTY_NAME", _env("os.PRETTY_NAME")),
    ("environment", "environment.kernel.release", _env("kernel.release")),
    ("environment", "environment.python.version", _env("python.version")),
    ("environment", "environment.cpu.model", _env("cpu.model")),
    ("environment", "environment.cpu.usable_cpus", _env("cpu.usable_cpus")),
    ("environment", "environment.gpu.driver_version", _env("gpu.driver_version")),
    ("environment", "environment.gpu.cuda_driver_version", _env("gpu.cuda_driver_version")),
    ("code", "source.commit", lambda p: p.source.commit),
    ("code", "source.dirty", lambda p: p.source.dirty),
    ("code", "source.tree_sha256", lambda p: p.source.tree_sha256),
    ("data", "model.sha256", lambda p: p.model.sha256),
    ("data", "model.path", lambda p: p.model.path),
    ("config", "seeds.seed", lambda p: p.seeds.seed),
    ("config", "spec.digest", lambda p: p.spec.digest),
    ("config", "lock_digest", lambda p: p.lock_digest),
)
_DATASET_FIELDS = ("sha256", "split", "license", "source", "path")


def _dataset_facts(d: DatasetInput) -> dict[str, JsonValue]:
    return {
        "sha256": d.sha256,
        "split": d.split,
        "license": d.license,
        "source": d.source,
        "path": d.path,
    }


def _metric_config(m: MetricResult) -> dict[str, JsonValue]:
    """The metric's definition as recorded next to its value (what a diff compares)."""
    ci = m.ci
    return {
        "threshold": m.threshold,
        "direction": m.direction,
        "compute": m.compute,
        "ci.method": ci.method if ci is not None else None,
        "ci.level": ci.level if ci is not None else None,
        "ci.resamples": ci.resamples if ci is not None else None,
        # a custom metric is its code: another file digest is another metric definition
        **(
            {"custom.file_sha256": m.custom.file_sha256, "custom.function": m.custom.function}
            if m.custom is not None
            else {}
        ),
    }


def diff_runs(a: RunPredicate, b: RunPredicate, *, tolerance: float | None = None) -> RunDiff:
    """Everything that differs between run ``a`` and run ``b`` (predicates)."""
    changes: list[Change] = []
    for group, path, read in _SCALARS:
        va, vb = read(a), read(b)
        if va != vb:
            changes.append(Change(group, path, va, vb))
    ga, gb = _gpus(a), _gpus(b)
    if ga != gb:
        changes.append(Change("environment", "environment.gpu.gpus", ga, gb))
    pa, pb = _packages(a), _packages(b)
    for name in sorted(pa.keys() | pb.keys()):
        if pa.get(name) != pb.get(name):
            changes.append(Change("environment", f"packages.{name}", pa.get(name), pb.get(name)))
    da = {str(d.name): _dataset_facts(d) for d in a.datasets}
    db = {str(d.name): _dataset_facts(d) for d in b.datasets}
    for name in sorted(da.keys() | db.keys()):
        for key in _DATASET_FIELDS:
            va = da[name].get(key) if name in da else None
            vb = db[name].get(key) if name in db else None
            if va != vb:
                changes.append(Change("data", f"datasets.{name}.{key}", va, vb))
    for key in sorted(a.params.keys() | b.params.keys()):
        if a.params.get(key) != b.params.get(key):
            changes.append(Change("config", f"params.{key}", a.params.get(key), b.params.get(key)))
    ma = {m.name: _metric_config(m) for m in a.metrics}
    mb = {m.name: _metric_config(m) for m in b.metrics}
    for name in sorted(ma.keys() & mb.keys()):
        for key in [*ma[name], *(k for k in mb[name] if k not in ma[name])]:
            va, vb = ma[name].get(key), mb[name].get(key)
            if va != vb:
                changes.append(Change("config", f"metrics.{name}.{key}", va, vb))
    deltas = compare_metrics(a.metrics, b.metrics, tolerance)
    return RunDiff(
        a_run=a.run_id,
        b_run=b.run_id,
        changes=tuple(changes),
        metrics=tuple(deltas),
    )


def _show(value: JsonValue) -> str:
    if value is None:
        return "—"
    if isinstance(value, str):
        return one_line(value)
    return one_line(json.dumps(value, sort_keys=True))


def _f(value: float | None, signed: bool = False) -> str:
    if value is None:
        return "—"
    return f"{value:+.4f}" if signed else f"{value:.4f}"


def format_diff(d: RunDiff) -> str:
    """``evalrun diff`` for the terminal."""
    lines = [f"a: {one_line(d.a_run)}", f"b: {one_line(d.b_run)}", ""]
    for group in GROUPS:
        changes = d.group(group)
        if not changes:
            lines.append(f"{group}: same")
            continue
        lines.append(f"{group}:")
        for c in changes:
            lines.append(f"  {one_line(c.field)}: {_show(c.a)} → {_show(c.b)}")
    lines.append("")
    header = ["metric", "a", "b", "delta", "a CI", "b CI", "CIs overlap", "tolerance", "verdict"]
    rows = []
    for m in d.metrics:
        tol = "—"
        if m.tolerance is not None:
            tol = f"±{m.tolerance:g} " + ("EXCEEDED" if m.exceeds_tolerance else "ok")
        rows.append(
            [
                one_line(m.name, limit=80),
                _f(m.a),
                _f(m.b),
                _f(m.delta, signed=True),
                f"[{m.a_ci[0]:.4f}, {m.a_ci[1]:.4f}]" if m.a_ci else "—",
                f"[{m.b_ci[0]:.4f}, {m.b_ci[1]:.4f}]" if m.b_ci else "—",
                {True: "yes", False: "NO", None: "—"}[m.ci_overlap],
                tol,
                m.verdict + (" REGRESSED (gating)" if m.regressed else ""),
            ]
        )
    if rows:
        widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
        lines.append("  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)).rstrip())
        lines.append("  ".join("-" * w for w in widths))
        lines += [
            "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows
        ]
    else:
        lines.append("(no metrics on either side)")
    lines.append("")
    if d.regressions:
        names = ", ".join(one_line(m.name, limit=80) for m in d.regressions)
        lines.append(f"gate: FAIL — b regressed on gating metric(s) {names} (exit {d.exit_code})")
    else:
        lines.append("gate: pass — no gating metric of b regressed beyond a's confidence interval")
    return "\n".join(lines)


__all__ = [
    "GROUPS",
    "REGRESSION_EXIT",
    "Change",
    "MetricDelta",
    "RunDiff",
    "compare_metrics",
    "diff_runs",
    "format_diff",
    "judge_metric",
    "overall_verdict",
]

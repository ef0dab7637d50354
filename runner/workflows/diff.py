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
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

GROUPS = ("environment", "code", "data", "config")

Verdict = Literal["identical", "within_tolerance", "within_ci", "changed", "missing"]
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
    a: Any
    b: Any


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


@dataclass(frozen=True)
class RunDiff:
    a_run: str
    b_run: str
    changes: tuple[Change, ...]
    metrics: tuple[MetricDelta, ...]

    def group(self, name: str) -> list[Change]:
        return [c for c in self.changes if c.group == name]

    @property
    def identical_lineage(self) -> bool:
        return not self.changes

    def as_dict(self) -> dict[str, Any]:
        return {
            "a": self.a_run,
            "b": self.b_run,
            "changes": {
                g: [{"field": c.field, "a": c.a, "b": c.b} for c in self.group(g)] for g in GROUPS
            },
            "metrics": [asdict(m) for m in self.metrics],
        }


def _get(data: Mapping[str, Any], path: str) -> Any:
    node: Any = data
    for key in path.split("."):
        if not isinstance(node, Mapping):
            return None
        node = node.get(key)
    return node


def _num(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def _ci(metric: Mapping[str, Any] | None) -> tuple[float, float] | None:
    if not metric:
        return None
    ci = metric.get("ci")
    if not isinstance(ci, Mapping):
        return None
    low, high = _num(ci.get("low")), _num(ci.get("high"))
    return (low, high) if low is not None and high is not None else None


def judge_metric(
    name: str,
    a: Mapping[str, Any] | None,
    b: Mapping[str, Any] | None,
    tolerance: float | None = None,
) -> MetricDelta:
    """Compare metric ``a`` (original/baseline) with ``b`` (re-run/candidate).

    identical: same value; within_tolerance: ``|b - a| <= tolerance``; within_ci:
    b's value lies inside a's confidence interval; changed: none of those;
    missing: one side has no value.
    """
    va = _num(a.get("value")) if a else None
    vb = _num(b.get("value")) if b else None
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


def compare_metrics(
    a: Sequence[Mapping[str, Any]],
    b: Sequence[Mapping[str, Any]],
    tolerance: float | None = None,
) -> list[MetricDelta]:
    """Per metric name (in a's order, then b's new ones), the comparison of a with b."""
    by_a = {str(m.get("name")): m for m in a if isinstance(m, Mapping)}
    by_b = {str(m.get("name")): m for m in b if isinstance(m, Mapping)}
    names = list(by_a) + [n for n in by_b if n not in by_a]
    return [judge_metric(n, by_a.get(n), by_b.get(n), tolerance) for n in names]


def overall_verdict(deltas: Sequence[MetricDelta]) -> Verdict:
    """The worst per-metric verdict ("missing" when there is nothing to compare)."""
    if not deltas:
        return "missing"
    return min((d.verdict for d in deltas), key=VERDICT_ORDER.index)


def _packages(predicate: Mapping[str, Any]) -> dict[str, str]:
    packages = _get(predicate, "environment.packages") or []
    return {
        str(p.get("name")): str(p.get("version"))
        for p in packages
        if isinstance(p, Mapping) and p.get("name")
    }


def _gpus(predicate: Mapping[str, Any]) -> str | None:
    gpus = _get(predicate, "environment.gpu.gpus")
    if not isinstance(gpus, list) or not gpus:
        return None
    return ", ".join(str(g.get("name")) for g in gpus if isinstance(g, Mapping))


_SCALARS: tuple[tuple[str, str], ...] = (
    ("environment", "image.ref"),
    ("environment", "image.rootfs_found"),
    ("environment", "sandbox.runtime_used"),
    ("environment", "backend"),
    ("environment", "evalrun_version"),
    ("environment", "environment.os.PRETTY_NAME"),
    ("environment", "environment.kernel.release"),
    ("environment", "environment.python.version"),
    ("environment", "environment.cpu.model"),
    ("environment", "environment.cpu.usable_cpus"),
    ("environment", "environment.gpu.driver_version"),
    ("environment", "environment.gpu.cuda_driver_version"),
    ("code", "source.commit"),
    ("code", "source.dirty"),
    ("code", "source.tree_sha256"),
    ("data", "model.sha256"),
    ("data", "model.path"),
    ("config", "seeds.seed"),
    ("config", "spec.digest"),
    ("config", "lock_digest"),
)


def diff_runs(
    a: Mapping[str, Any], b: Mapping[str, Any], *, tolerance: float | None = None
) -> RunDiff:
    """Everything that differs between run ``a`` and run ``b`` (predicates)."""
    changes: list[Change] = []
    for group, path in _SCALARS:
        va, vb = _get(a, path), _get(b, path)
        if va != vb:
            changes.append(Change(group, path, va, vb))
    ga, gb = _gpus(a), _gpus(b)
    if ga != gb:
        changes.append(Change("environment", "environment.gpu.gpus", ga, gb))
    pa, pb = _packages(a), _packages(b)
    for name in sorted(pa.keys() | pb.keys()):
        if pa.get(name) != pb.get(name):
            changes.append(Change("environment", f"packages.{name}", pa.get(name), pb.get(name)))
    da = {str(d.get("name")): d for d in a.get("datasets") or [] if isinstance(d, Mapping)}
    db = {str(d.get("name")): d for d in b.get("datasets") or [] if isinstance(d, Mapping)}
    for name in sorted(da.keys() | db.keys()):
        for key in ("sha256", "split", "license", "source", "path"):
            va = da[name].get(key) if name in da else None
            vb = db[name].get(key) if name in db else None
            if va != vb:
                changes.append(Change("data", f"datasets.{name}.{key}", va, vb))
    prm_a = a.get("params") if isinstance(a.get("params"), Mapping) else {}
    prm_b = b.get("params") if isinstance(b.get("params"), Mapping) else {}
    assert isinstance(prm_a, Mapping) and isinstance(prm_b, Mapping)
    for key in sorted(prm_a.keys() | prm_b.keys()):
        if prm_a.get(key) != prm_b.get(key):
            changes.append(Change("config", f"params.{key}", prm_a.get(key), prm_b.get(key)))
    ma = {str(m.get("name")): m for m in a.get("metrics") or [] if isinstance(m, Mapping)}
    mb = {str(m.get("name")): m for m in b.get("metrics") or [] if isinstance(m, Mapping)}
    for name in sorted(ma.keys() & mb.keys()):
        for key in ("threshold", "direction", "compute", "ci.method", "ci.level", "ci.resamples"):
            va, vb = _get(ma[name], key), _get(mb[name], key)
            if va != vb:
                changes.append(Change("config", f"metrics.{name}.{key}", va, vb))
    deltas = compare_metrics(a.get("metrics") or [], b.get("metrics") or [], tolerance)
    return RunDiff(
        a_run=str(a.get("run_id")),
        b_run=str(b.get("run_id")),
        changes=tuple(changes),
        metrics=tuple(deltas),
    )


def _show(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, str):
        return value
    return json.dumps(value, sort_keys=True)


def _f(value: float | None, signed: bool = False) -> str:
    if value is None:
        return "—"
    return f"{value:+.4f}" if signed else f"{value:.4f}"


def format_diff(d: RunDiff) -> str:
    """``evalrun diff`` for the terminal."""
    lines = [f"a: {d.a_run}", f"b: {d.b_run}", ""]
    for group in GROUPS:
        changes = d.group(group)
        if not changes:
            lines.append(f"{group}: same")
            continue
        lines.append(f"{group}:")
        for c in changes:
            lines.append(f"  {c.field}: {_show(c.a)} → {_show(c.b)}")
    lines.append("")
    header = ["metric", "a", "b", "delta", "a CI", "b CI", "CIs overlap", "tolerance", "verdict"]
    rows = []
    for m in d.metrics:
        tol = "—"
        if m.tolerance is not None:
            tol = f"±{m.tolerance:g} " + ("EXCEEDED" if m.exceeds_tolerance else "ok")
        rows.append(
            [
                m.name,
                _f(m.a),
                _f(m.b),
                _f(m.delta, signed=True),
                f"[{m.a_ci[0]:.4f}, {m.a_ci[1]:.4f}]" if m.a_ci else "—",
                f"[{m.b_ci[0]:.4f}, {m.b_ci[1]:.4f}]" if m.b_ci else "—",
                {True: "yes", False: "NO", None: "—"}[m.ci_overlap],
                tol,
                m.verdict,
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
    return "\n".join(lines)


__all__ = [
    "GROUPS",
    "Change",
    "MetricDelta",
    "RunDiff",
    "compare_metrics",
    "diff_runs",
    "format_diff",
    "judge_metric",
    "overall_verdict",
]

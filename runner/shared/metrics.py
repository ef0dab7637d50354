"""Metric computation and confidence intervals from per-sample outputs.

Pure standard library on purpose: the same code runs inside the container (the
agent) and in the runner, which recomputes every metric from the per-sample
file and refuses the run if the container's aggregate differs. Same inputs and
seed give bit-identical floats on both sides.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from statistics import NormalDist
from typing import Any

from runner.shared.classification import confusion_matrix
from runner.shared.metric_catalogue import LEGACY
from runner.shared.metric_functions import Metric, build_metric
from runner.shared.sample_fields import FieldError, MetricUndefined, Sample, SampleFormatError

__all__ = [
    "MAX_SAMPLES",
    "MetricUndefined",
    "MetricValue",
    "SampleFormatError",
    "SampleRead",
    "compute_available",
    "compute_metric",
    "compute_metrics",
    "is_gating",
    "metric_function",
    "partial_reason",
    "perturbation_effects",
    "read_outputs",
    "read_samples",
    "select_perturbed",
    "threshold_verdicts",
]

MetricFn = Callable[[Sequence[Sample]], float]

MAX_SAMPLES = 5_000_000
# The leave-one-out values of the BCa acceleration are capped to bound the runtime.
MAX_JACKKNIFE = 2000


def metric_function(compute: str, field: str | None = None) -> MetricFn:
    """The function behind a spec's ``compute`` name (for parameter-free computes)."""
    definition = {"name": compute, "compute": compute, "field": field}
    if compute == "mean" and not field:
        raise ValueError("metric 'mean' needs 'field'")
    return build_metric(definition).value


@dataclass(frozen=True)
class MetricValue:
    name: str
    value: float
    ci_low: float | None
    ci_high: float | None
    ci_method: str
    ci_level: float
    resamples: int
    n: int
    # resamples on which the metric had no value (e.g. one class drawn); left out of the CI
    undefined_resamples: int = 0
    confusion_matrix: dict[str, Any] | None = None

    def as_dict(self) -> dict[str, Any]:
        ci: dict[str, Any] = {
            "low": self.ci_low,
            "high": self.ci_high,
            "method": self.ci_method,
            "level": self.ci_level,
            "resamples": self.resamples,
        }
        if self.undefined_resamples:
            ci["undefined_resamples"] = self.undefined_resamples
        out: dict[str, Any] = {"name": self.name, "value": self.value, "ci": ci, "n": self.n}
        if self.confusion_matrix is not None:
            out["confusion_matrix"] = self.confusion_matrix
        return out


def _percentile(sorted_values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default) of sorted values."""
    if not sorted_values:
        raise ValueError("no values")
    pos = (len(sorted_values) - 1) * q
    lo = math.floor(pos)
    hi = math.ceil(pos)
    if lo == hi:
        return sorted_values[lo]
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def _bootstrap_stats(
    metric: Metric, records: Sequence[Any], resamples: int, seed: int
) -> tuple[list[float], int]:
    """Sorted statistics of ``resamples`` resamples, and how many had no value."""
    rng = random.Random(seed)
    stats = []
    undefined = 0
    n = len(records)
    for _ in range(resamples):
        # choices() draws with replacement in C: the resampling loop stays cheap. It draws
        # the same indices whatever the records are, so resampling records is resampling
        # samples.
        try:
            stats.append(metric.aggregate(rng.choices(records, k=n)))
        except MetricUndefined:
            undefined += 1
    stats.sort()
    return stats, undefined


def _bca_interval(
    metric: Metric, records: Sequence[Any], point: float, stats: list[float], level: float
) -> tuple[float, float]:
    norm = NormalDist()
    below = sum(1 for v in stats if v < point) / len(stats)
    below = min(max(below, 1.0 / (len(stats) + 1)), 1 - 1.0 / (len(stats) + 1))
    z0 = norm.inv_cdf(below)
    # Jackknife acceleration; capped to keep the runtime bounded on big sets.
    jack = []
    for i in range(min(len(records), MAX_JACKKNIFE)):
        try:
            jack.append(metric.aggregate([*records[:i], *records[i + 1 :]]))
        except MetricUndefined:
            continue
    accel = 0.0
    if jack:
        mean_jack = math.fsum(jack) / len(jack)
        num = math.fsum((mean_jack - j) ** 3 for j in jack)
        den = 6.0 * math.fsum((mean_jack - j) ** 2 for j in jack) ** 1.5
        accel = num / den if den else 0.0
    alpha = (1 - level) / 2

    def adjusted(q: float) -> float:
        z = norm.inv_cdf(q)
        return norm.cdf(z0 + (z0 + z) / (1 - accel * (z0 + z)))

    return _percentile(stats, adjusted(alpha)), _percentile(stats, adjusted(1 - alpha))


def _wilson(successes: int, n: int, level: float) -> tuple[float, float]:
    z = NormalDist().inv_cdf(1 - (1 - level) / 2)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def _point(metric: Metric, records: Sequence[Any], what: str = "") -> float:
    try:
        return metric.aggregate(records)
    except MetricUndefined as exc:
        raise MetricUndefined(f"metric {metric.name}{what}: not defined here: {exc}") from None


def compute_metric(
    definition: Mapping[str, Any], samples: Sequence[Sample], seed: int
) -> MetricValue:
    """Compute one metric (as defined in the spec) and its confidence interval.

    Raises :class:`SampleFormatError` when a sample does not hold what the metric reads,
    and :class:`MetricUndefined` (a subclass) when the metric has no value on these
    samples (ROC-AUC with one class, R² of one sample).
    """
    if not samples:
        raise SampleFormatError("no samples to compute metrics from")
    metric = build_metric(definition)
    records = metric.records(samples)
    ci = definition.get("ci") or {}
    method = ci.get("method", "bootstrap_percentile")
    level = float(ci.get("level", 0.95))
    resamples = int(ci.get("resamples", 1000))
    value = _point(metric, records)
    low: float | None = None
    high: float | None = None
    undefined = 0
    if method == "none":
        resamples = 0
    elif method == "wilson":
        if metric.proportion is None:
            raise ValueError(f"metric {metric.name}: the Wilson interval needs a proportion")
        low, high = _wilson(sum(records), len(records), level)
        if metric.proportion == "misses":
            low, high = 1 - high, 1 - low
        resamples = 0
    else:
        # Each metric gets its own stream derived from the run seed and its name.
        stream = _metric_stream(metric, seed, definition["name"])
        stats, undefined = _bootstrap_stats(metric, records, resamples, stream)
        if stats and method == "bootstrap_bca":
            low, high = _bca_interval(metric, records, value, stats, level)
        elif stats:
            alpha = (1 - level) / 2
            low, high = _percentile(stats, alpha), _percentile(stats, 1 - alpha)
    matrix = None
    if metric.matrix_pair is not None:
        matrix = confusion_matrix([metric.matrix_pair(s) for s in samples])
    return MetricValue(
        name=definition["name"],
        value=value,
        ci_low=low,
        ci_high=high,
        ci_method=method,
        ci_level=level,
        resamples=resamples,
        n=len(samples),
        undefined_resamples=undefined,
        confusion_matrix=matrix,
    )


def compute_metrics(
    definitions: Iterable[Mapping[str, Any]], samples: Sequence[Sample], seed: int
) -> list[MetricValue]:
    return [compute_metric(d, samples, seed) for d in definitions]


def _refuse(name: str) -> float:
    raise ValueError(f"non-finite number {name}")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text[:40]} is not finite")
    return value


def read_samples(path: Path, definitions: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Read a per-sample JSON-lines file, checking each row has what the metrics need.

    Every row must carry an ``id`` and, for each metric, the fields it reads in the shape
    it reads them; the first problem is raised as a :class:`SampleFormatError` naming the
    file, the line, the field, the metric, and what was expected and found.
    """
    return _read(path, [build_metric(d) for d in definitions], strict=True).samples


@dataclass(frozen=True)
class SampleRead:
    """The samples of a per-sample file, and the metrics they cannot feed (name → why)."""

    samples: list[dict[str, Any]]
    unusable: dict[str, str]


def read_outputs(path: Path, definitions: Iterable[Mapping[str, Any]]) -> SampleRead:
    """Like :func:`read_samples`, but a field a metric cannot use sets only that metric aside.

    What no metric can do without (a row that is not a JSON object, a missing or duplicate
    ``id``, no samples at all) still raises :class:`SampleFormatError`. For every other
    metric the first problem (file, line, field, expected, found) is in ``unusable``.
    """
    return _read(path, [build_metric(d) for d in definitions], strict=False)


def _read(path: Path, metrics: list[Metric], *, strict: bool) -> SampleRead:
    readers: dict[str, list[str]] = {"id": []}
    for m in metrics:
        for field in m.reads.values():
            readers.setdefault(field, []).append(m.name)
    samples: list[dict[str, Any]] = []
    unusable: dict[str, str] = {}
    seen: set[str] = set()
    with path.open("rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            if not raw.strip():
                continue
            where = f"{path.name} line {lineno}"
            if len(samples) >= MAX_SAMPLES:
                raise SampleFormatError(f"{path.name}: more than {MAX_SAMPLES} samples")
            try:
                # strict: UTF-8, and no NaN/Infinity (nor 1e400) a signed bundle could not hold
                row = json.loads(raw.decode("utf-8"), parse_constant=_refuse, parse_float=_finite)
            except ValueError as exc:
                raise SampleFormatError(f"{where}: not JSON ({getattr(exc, 'msg', exc)})") from None
            if not isinstance(row, dict):
                raise SampleFormatError(f"{where}: expected an object")
            missing = sorted(readers.keys() - row.keys())
            if missing and (strict or "id" in missing):
                who = sorted({n for f in missing for n in readers[f]})
                raise SampleFormatError(
                    f"{where}: missing field(s) {missing}"
                    + (f" (read by metric(s) {', '.join(who)})" if who else "")
                )
            for m in metrics:
                if m.name in unusable:
                    continue
                lacks = sorted(f for f in set(m.reads.values()) if f not in row)
                if lacks:
                    unusable[m.name] = f"{where}: missing field(s) {lacks}"
                    continue
                try:
                    m.extract(row)
                    if m.matrix_pair is not None:
                        m.matrix_pair(row)
                except FieldError as exc:
                    if strict:
                        raise SampleFormatError(f"{where}: {exc} (metric {m.name})") from None
                    unusable[m.name] = f"{where}: {exc}"
            sid = str(row["id"])
            if sid in seen:
                raise SampleFormatError(f"{where}: duplicate sample id {sid!r}")
            seen.add(sid)
            samples.append(row)
    if not samples:
        raise SampleFormatError(f"{path.name}: no samples")
    return SampleRead(samples, unusable)


def compute_available(
    definitions: Iterable[Mapping[str, Any]],
    samples: Sequence[Sample],
    seed: int,
    unusable: Mapping[str, str],
) -> tuple[list[MetricValue], dict[str, str]]:
    """Every metric not in ``unusable`` that has a value, and all that could not be computed.

    The values are :func:`compute_metric`'s, bit for bit; a metric without a value on
    these samples joins the unusable ones with the reason.
    """
    values: list[MetricValue] = []
    left_out = dict(unusable)
    for d in definitions:
        if d["name"] in left_out:
            continue
        try:
            values.append(compute_metric(d, samples, seed))
        except SampleFormatError as exc:
            left_out[d["name"]] = str(exc)
    return values, left_out


def partial_reason(computed: Sequence[str], unusable: Mapping[str, str]) -> str:
    """Why a run whose outputs feed only some metrics failed, and what it could compute."""
    total = len(computed) + len(unusable)
    why = "; ".join(f"{name}: {reason}" for name, reason in unusable.items())
    done = f"computed: {', '.join(computed)}" if computed else "nothing could be computed"
    return f"per-sample output unusable for {len(unusable)} of {total} metrics ({why}); {done}"


def is_gating(definition: Mapping[str, Any]) -> bool:
    """Primary metrics gate; a supplementary one only when promoted (with a justification)."""
    return definition.get("role", "primary") == "primary" or bool(definition.get("promoted"))


def threshold_verdicts(
    definitions: Iterable[Mapping[str, Any]], values: Mapping[str, float]
) -> dict[str, dict[str, Any]]:
    """Per metric: pass/fail against its threshold (None when no threshold).

    Only gating metrics (:func:`is_gating`) get a ``passed`` verdict; a supplementary
    metric's threshold is reported as ``threshold_met`` and never decides the run.
    """
    verdicts: dict[str, dict[str, Any]] = {}
    for d in definitions:
        threshold = d.get("threshold")
        value = values[d["name"]]
        role = d.get("role", "primary")
        gating = is_gating(d)
        if threshold is None:
            verdicts[d["name"]] = {
                "threshold": None,
                "passed": None,
                "role": role,
                "gating": gating,
            }
            continue
        higher = d.get("direction", "higher_is_better") == "higher_is_better"
        met = value >= threshold if higher else value <= threshold
        verdicts[d["name"]] = {
            "threshold": threshold,
            "direction": d.get("direction", "higher_is_better"),
            "passed": met if gating else None,
            "threshold_met": met,
            "role": role,
            "gating": gating,
        }
    return verdicts


# --------------------------------------------------------------------------- perturbations


def _stream(seed: int, label: str) -> int:
    # Only the last 8 bytes of "seed:label" survive the modulus, so for labels of 8 bytes
    # or more the seed has no effect. Kept as is: images built before the catalogue compute
    # with it and the runner must agree with them (see _metric_stream).
    return int.from_bytes(f"{seed}:{label}".encode(), "big") % (2**63)


def _metric_stream(metric: Metric, seed: int, label: str) -> int:
    """The resampling stream of a metric: the old derivation for the pre-catalogue computes,
    a hash of seed and label (every bit of both counts) for the others."""
    if metric.compute in LEGACY:
        return _stream(seed, label)
    digest = hashlib.sha256(f"evalrun-bootstrap/v1:{seed}:{label}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % (2**63)


def select_perturbed(
    perturbation: Mapping[str, Any], baseline: Sequence[Sample], seed: int
) -> list[Sample]:
    """The samples a ``subsample`` or ``slice`` perturbation keeps from the baseline."""
    kind = perturbation["kind"]
    if kind == "subsample":
        rng = random.Random(_stream(perturbation.get("seed") or seed, perturbation["name"]))
        k = max(1, round(len(baseline) * float(perturbation["fraction"])))
        keep = set(rng.sample(range(len(baseline)), k))
        return [s for i, s in enumerate(baseline) if i in keep]
    if kind == "slice":
        field, value = perturbation["field"], perturbation["value"]
        return [s for s in baseline if s.get(field) == value]
    raise ValueError(f"perturbation {kind!r} is evaluated by re-running, not by selection")


def perturbation_effects(
    definitions: Iterable[Mapping[str, Any]],
    perturbation: Mapping[str, Any],
    baseline: Sequence[Sample],
    perturbed: Sequence[Sample],
    seed: int,
) -> dict[str, Any]:
    """Each metric on the perturbed samples, and its change from the baseline with a CI.

    The change's interval is a paired bootstrap over the baseline's sample ids: each
    resample draws ids, scores the baseline on them and the perturbed outputs on the
    drawn ids they contain, and takes the difference.
    """
    if not perturbed:
        raise SampleFormatError(f"perturbation {perturbation['name']}: no samples")
    by_id = {str(s["id"]): s for s in perturbed}
    ids = [str(s["id"]) for s in baseline]
    unknown = set(by_id) - set(ids)
    if unknown:
        raise SampleFormatError(
            f"perturbation {perturbation['name']}: sample ids not in the baseline: "
            f"{sorted(unknown)[:5]}"
        )
    effects = []
    for d in definitions:
        metric = build_metric(d)
        ci = d.get("ci") or {}
        level = float(ci.get("level", 0.95))
        resamples = int(ci.get("resamples", 1000))
        records = metric.records(perturbed)
        record_by_id = {str(s["id"]): r for s, r in zip(perturbed, records, strict=True)}
        base_records = metric.records(baseline)
        base_by_id = {i: r for i, r in zip(ids, base_records, strict=True)}
        value = _point(metric, records, f" under perturbation {perturbation['name']}")
        base_value = _point(metric, base_records)
        rng = random.Random(_metric_stream(metric, seed, f"{perturbation['name']}:{d['name']}"))
        deltas: list[float] = []
        values: list[float] = []
        for _ in range(resamples):
            draw = rng.choices(ids, k=len(ids))
            picked = [record_by_id[i] for i in draw if i in record_by_id]
            if not picked:
                continue
            try:
                v = metric.aggregate(picked)
                delta = v - metric.aggregate([base_by_id[i] for i in draw])
            except MetricUndefined:
                continue
            values.append(v)
            deltas.append(delta)
        deltas.sort()
        values.sort()
        alpha = (1 - level) / 2
        effects.append(
            {
                "name": d["name"],
                "value": value,
                "baseline": base_value,
                "delta": value - base_value,
                "ci": {
                    "low": _percentile(values, alpha) if values else None,
                    "high": _percentile(values, 1 - alpha) if values else None,
                    "level": level,
                    "method": "bootstrap_percentile",
                },
                "delta_ci": {
                    "low": _percentile(deltas, alpha) if deltas else None,
                    "high": _percentile(deltas, 1 - alpha) if deltas else None,
                    "level": level,
                    "method": "paired_bootstrap",
                },
                "n": len(perturbed),
            }
        )
    return {
        "name": perturbation["name"],
        "kind": perturbation["kind"],
        "n": len(perturbed),
        "metrics": effects,
    }

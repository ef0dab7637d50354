"""Metric computation and confidence intervals from per-sample outputs.

Pure standard library on purpose: the same code runs inside the container (the
agent) and in the runner, which recomputes every metric from the per-sample
file and refuses the run if the container's aggregate differs. Same inputs and
seed give bit-identical floats on both sides.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from statistics import NormalDist
from typing import Any

Sample = Mapping[str, Any]
MetricFn = Callable[[Sequence[Sample]], float]

MAX_SAMPLES = 5_000_000


class SampleFormatError(ValueError):
    """The per-sample file is not what the metrics need."""


def _accuracy(samples: Sequence[Sample]) -> float:
    return sum(1 for s in samples if s["prediction"] == s["label"]) / len(samples)


def _error_rate(samples: Sequence[Sample]) -> float:
    return 1.0 - _accuracy(samples)


def _macro_f1(samples: Sequence[Sample]) -> float:
    labels = sorted({s["label"] for s in samples} | {s["prediction"] for s in samples}, key=repr)
    tp = dict.fromkeys(labels, 0)
    fp = dict.fromkeys(labels, 0)
    fn = dict.fromkeys(labels, 0)
    for s in samples:
        if s["prediction"] == s["label"]:
            tp[s["label"]] += 1
        else:
            fp[s["prediction"]] += 1
            fn[s["label"]] += 1
    scores = []
    for label in labels:
        denom = 2 * tp[label] + fp[label] + fn[label]
        scores.append(0.0 if denom == 0 else 2 * tp[label] / denom)
    return sum(scores) / len(scores)


def _mean_of(field: str) -> MetricFn:
    def mean(samples: Sequence[Sample]) -> float:
        return math.fsum(float(s[field]) for s in samples) / len(samples)

    return mean


def metric_function(compute: str, field: str | None = None) -> MetricFn:
    """The function behind a spec's ``compute`` name."""
    if compute == "accuracy":
        return _accuracy
    if compute == "error_rate":
        return _error_rate
    if compute == "macro_f1":
        return _macro_f1
    if compute == "mean" and field:
        return _mean_of(field)
    raise ValueError(f"unknown metric computation {compute!r}")


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

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "value": self.value,
            "ci": {
                "low": self.ci_low,
                "high": self.ci_high,
                "method": self.ci_method,
                "level": self.ci_level,
                "resamples": self.resamples,
            },
            "n": self.n,
        }


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
    fn: MetricFn, samples: Sequence[Sample], resamples: int, seed: int
) -> list[float]:
    rng = random.Random(seed)
    stats = []
    if fn in (_accuracy, _error_rate):
        # Proportions: resample the 0/1 outcome vector directly (same statistic, ~10x faster).
        hits = [1 if s["prediction"] == s["label"] else 0 for s in samples]
        n = len(hits)
        for _ in range(resamples):
            acc = sum(rng.choices(hits, k=n)) / n
            stats.append(acc if fn is _accuracy else 1.0 - acc)
        stats.sort()
        return stats
    for _ in range(resamples):
        # choices() draws with replacement in C: the resampling loop stays cheap.
        stats.append(fn(rng.choices(samples, k=len(samples))))
    stats.sort()
    return stats


def _bca_interval(
    fn: MetricFn, samples: Sequence[Sample], point: float, stats: list[float], level: float
) -> tuple[float, float]:
    norm = NormalDist()
    below = sum(1 for v in stats if v < point) / len(stats)
    below = min(max(below, 1.0 / (len(stats) + 1)), 1 - 1.0 / (len(stats) + 1))
    z0 = norm.inv_cdf(below)
    # Jackknife acceleration; capped to keep the runtime bounded on big sets.
    n = len(samples)
    jack = [fn([*samples[:i], *samples[i + 1 :]]) for i in range(min(n, 2000))]
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


def compute_metric(
    definition: Mapping[str, Any], samples: Sequence[Sample], seed: int
) -> MetricValue:
    """Compute one metric (as defined in the spec) and its confidence interval."""
    if not samples:
        raise SampleFormatError("no samples to compute metrics from")
    fn = metric_function(definition["compute"], definition.get("field"))
    ci = definition.get("ci") or {}
    method = ci.get("method", "bootstrap_percentile")
    level = float(ci.get("level", 0.95))
    resamples = int(ci.get("resamples", 1000))
    value = fn(samples)
    low: float | None
    high: float | None
    if method == "none":
        low = high = None
        resamples = 0
    elif method == "wilson":
        correct = round(_accuracy(samples) * len(samples))
        low, high = _wilson(correct, len(samples), level)
        if definition["compute"] == "error_rate":
            low, high = 1 - high, 1 - low
        resamples = 0
    else:
        # Each metric gets its own stream derived from the run seed and its name.
        stream = int.from_bytes(f"{seed}:{definition['name']}".encode(), "big") % (2**63)
        stats = _bootstrap_stats(fn, samples, resamples, stream)
        if method == "bootstrap_bca":
            low, high = _bca_interval(fn, samples, value, stats, level)
        else:
            alpha = (1 - level) / 2
            low, high = _percentile(stats, alpha), _percentile(stats, 1 - alpha)
    return MetricValue(
        name=definition["name"],
        value=value,
        ci_low=low,
        ci_high=high,
        ci_method=method,
        ci_level=level,
        resamples=resamples,
        n=len(samples),
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
    """Read a per-sample JSON-lines file, checking each row has what the metrics need."""
    needed = {"id"}
    for d in definitions:
        if d["compute"] in ("accuracy", "error_rate", "macro_f1"):
            needed |= {"label", "prediction"}
        elif d.get("field"):
            needed.add(d["field"])
    samples: list[dict[str, Any]] = []
    seen: set[str] = set()
    with path.open("rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            if not raw.strip():
                continue
            if len(samples) >= MAX_SAMPLES:
                raise SampleFormatError(f"{path.name}: more than {MAX_SAMPLES} samples")
            try:
                # strict: UTF-8, and no NaN/Infinity (nor 1e400) a signed bundle could not hold
                row = json.loads(raw.decode("utf-8"), parse_constant=_refuse, parse_float=_finite)
            except ValueError as exc:
                raise SampleFormatError(
                    f"{path.name} line {lineno}: not JSON ({getattr(exc, 'msg', exc)})"
                ) from None
            if not isinstance(row, dict):
                raise SampleFormatError(f"{path.name} line {lineno}: expected an object")
            missing = needed - row.keys()
            if missing:
                raise SampleFormatError(
                    f"{path.name} line {lineno}: missing field(s) {sorted(missing)}"
                )
            sid = str(row["id"])
            if sid in seen:
                raise SampleFormatError(f"{path.name} line {lineno}: duplicate sample id {sid!r}")
            seen.add(sid)
            samples.append(row)
    if not samples:
        raise SampleFormatError(f"{path.name}: no samples")
    return samples


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
    return int.from_bytes(f"{seed}:{label}".encode(), "big") % (2**63)


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
    base_by_id = {str(s["id"]): s for s in baseline}
    effects = []
    for d in definitions:
        fn = metric_function(d["compute"], d.get("field"))
        ci = d.get("ci") or {}
        level = float(ci.get("level", 0.95))
        resamples = int(ci.get("resamples", 1000))
        value = fn(perturbed)
        base_value = fn(baseline)
        rng = random.Random(_stream(seed, f"{perturbation['name']}:{d['name']}"))
        deltas: list[float] = []
        values: list[float] = []
        for _ in range(resamples):
            draw = rng.choices(ids, k=len(ids))
            picked = [by_id[i] for i in draw if i in by_id]
            if not picked:
                continue
            v = fn(picked)
            values.append(v)
            deltas.append(v - fn([base_by_id[i] for i in draw]))
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
                    "low": _percentile(values, alpha),
                    "high": _percentile(values, 1 - alpha),
                    "level": level,
                    "method": "bootstrap_percentile",
                },
                "delta_ci": {
                    "low": _percentile(deltas, alpha),
                    "high": _percentile(deltas, 1 - alpha),
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

"""Metric computation and confidence intervals from per-sample outputs.

The per-sample file is read by :mod:`runner.shared.sample_file`, the intervals' resampling
is :mod:`runner.shared.resampling`, perturbations are :mod:`runner.shared.perturbations`.

Pure standard library on purpose: the same code runs inside the container (the
agent) and in the runner, which recomputes every metric from the per-sample
file and refuses the run if the container's aggregate differs. Same inputs and
seed give bit-identical floats on both sides.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import NamedTuple, NotRequired, TypedDict

from runner.shared.classification import ConfusionMatrix as ConfusionMatrix
from runner.shared.classification import confusion_matrix
from runner.shared.definitions import MetricDefinition as MetricDefinition
from runner.shared.metric_functions import build_metric
from runner.shared.resampling import (
    bca_interval,
    bootstrap_stats,
    metric_stream,
    percentile,
    point_value,
    wilson_interval,
)
from runner.shared.sample_fields import MetricUndefined, Sample, SampleFormatError

__all__ = [
    "MetricUndefined",
    "MetricValue",
    "SampleFormatError",
    "compute_available",
    "compute_metric",
    "compute_metrics",
    "is_gating",
    "metric_function",
    "partial_reason",
    "threshold_verdicts",
]

MetricFn = Callable[[Sequence[Sample]], float]


class CiRecord(TypedDict):
    low: float | None
    high: float | None
    method: str
    level: float
    resamples: int
    undefined_resamples: NotRequired[int]


class MetricRecord(TypedDict):
    """One metric in ``metrics.json``: :meth:`MetricValue.as_dict`."""

    name: str
    value: float
    ci: CiRecord
    n: int
    confusion_matrix: NotRequired[ConfusionMatrix]


class MetricVerdict(TypedDict):
    """One metric against its threshold (:func:`threshold_verdicts`)."""

    threshold: float | None
    direction: NotRequired[str]
    passed: bool | None
    threshold_met: NotRequired[bool]
    role: str
    gating: bool


def metric_function(compute: str, field: str | None = None) -> MetricFn:
    """The function behind a spec's ``compute`` name (for parameter-free computes)."""
    definition: MetricDefinition = {"name": compute, "compute": compute, "field": field}
    if compute == "mean" and not field:
        raise ValueError("metric 'mean' needs 'field'")
    return build_metric(definition).value


class MetricValue(NamedTuple):
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
    confusion_matrix: ConfusionMatrix | None = None

    def as_dict(self) -> MetricRecord:
        ci: CiRecord = {
            "low": self.ci_low,
            "high": self.ci_high,
            "method": self.ci_method,
            "level": self.ci_level,
            "resamples": self.resamples,
        }
        if self.undefined_resamples:
            ci["undefined_resamples"] = self.undefined_resamples
        out: MetricRecord = {"name": self.name, "value": self.value, "ci": ci, "n": self.n}
        if self.confusion_matrix is not None:
            out["confusion_matrix"] = self.confusion_matrix
        return out


def compute_metric(
    definition: MetricDefinition, samples: Sequence[Sample], seed: int
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
    ci = definition.get("ci")
    method = ci.get("method", "bootstrap_percentile") if ci else "bootstrap_percentile"
    level = float(ci.get("level", 0.95)) if ci else 0.95
    resamples = int(ci.get("resamples", 1000)) if ci else 1000
    value = point_value(metric, records)
    low: float | None = None
    high: float | None = None
    undefined = 0
    if method == "none":
        resamples = 0
    elif method == "wilson":
        if metric.proportion is None:
            raise ValueError(f"metric {metric.name}: the Wilson interval needs a proportion")
        low, high = wilson_interval(sum(records), len(records), level)
        if metric.proportion == "misses":
            low, high = 1 - high, 1 - low
        resamples = 0
    else:
        # Each metric gets its own stream derived from the run seed and its name.
        stream = metric_stream(metric, seed, definition["name"])
        stats, undefined = bootstrap_stats(metric, records, resamples, stream)
        if stats and method == "bootstrap_bca":
            low, high = bca_interval(metric, records, value, stats, level)
        elif stats:
            alpha = (1 - level) / 2
            low, high = percentile(stats, alpha), percentile(stats, 1 - alpha)
    matrix: ConfusionMatrix | None = None
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
    definitions: Iterable[MetricDefinition], samples: Sequence[Sample], seed: int
) -> list[MetricValue]:
    return [compute_metric(d, samples, seed) for d in definitions]


def compute_available(
    definitions: Iterable[MetricDefinition],
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


def is_gating(definition: MetricDefinition) -> bool:
    """Primary metrics gate; a supplementary one only when promoted (with a justification)."""
    return definition.get("role", "primary") == "primary" or bool(definition.get("promoted"))


def threshold_verdicts(
    definitions: Iterable[MetricDefinition], values: Mapping[str, float]
) -> dict[str, MetricVerdict]:
    """Per metric: pass/fail against its threshold (None when no threshold).

    Only gating metrics (:func:`is_gating`) get a ``passed`` verdict; a supplementary
    metric's threshold is reported as ``threshold_met`` and never decides the run.
    """
    verdicts: dict[str, MetricVerdict] = {}
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

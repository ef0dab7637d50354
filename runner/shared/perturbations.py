"""Declared perturbations: the samples a ``subsample`` or ``slice`` keeps, and each metric's
value on perturbed samples with its change from the baseline (a paired bootstrap CI)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any, TypedDict

from runner.shared.definitions import MetricDefinition, PerturbationDefinition
from runner.shared.metric_functions import build_metric
from runner.shared.resampling import legacy_stream, metric_stream, percentile, point_value
from runner.shared.sample_fields import MetricUndefined, Sample, SampleFormatError


class EffectCi(TypedDict):
    """An interval of a perturbed metric (its value's, or its change's)."""

    low: float | None
    high: float | None
    level: float
    method: str


class PerturbedMetricRecord(TypedDict):
    """One metric under a perturbation: value, baseline, change, their CIs."""

    name: str
    value: float
    baseline: float
    delta: float
    ci: EffectCi
    delta_ci: EffectCi
    n: int


class PerturbationRecord(TypedDict):
    """One perturbation's effects (``metrics.json``'s ``perturbations``)."""

    name: str
    kind: str
    n: int
    metrics: list[PerturbedMetricRecord]


def select_perturbed(
    perturbation: Mapping[str, Any], baseline: Sequence[Sample], seed: int
) -> list[Sample]:
    """The samples a ``subsample`` or ``slice`` perturbation keeps from the baseline."""
    import random  # here: a run without perturbations never loads it (see resampling)

    kind = perturbation["kind"]
    if kind == "subsample":
        rng = random.Random(legacy_stream(perturbation.get("seed") or seed, perturbation["name"]))
        k = max(1, round(len(baseline) * float(perturbation["fraction"])))
        keep = set(rng.sample(range(len(baseline)), k))
        return [s for i, s in enumerate(baseline) if i in keep]
    if kind == "slice":
        field, value = perturbation["field"], perturbation["value"]
        return [s for s in baseline if s.get(field) == value]
    raise ValueError(f"perturbation {kind!r} is evaluated by re-running, not by selection")


def perturbation_effects(
    definitions: Iterable[MetricDefinition],
    perturbation: PerturbationDefinition,
    baseline: Sequence[Sample],
    perturbed: Sequence[Sample],
    seed: int,
) -> PerturbationRecord:
    """Each metric on the perturbed samples, and its change from the baseline with a CI.

    The change's interval is a paired bootstrap over the baseline's sample ids: each
    resample draws ids, scores the baseline on them and the perturbed outputs on the
    drawn ids they contain, and takes the difference.
    """
    import random

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
    effects: list[PerturbedMetricRecord] = []
    for d in definitions:
        metric = build_metric(d)
        ci = d.get("ci")
        level = float(ci.get("level", 0.95)) if ci else 0.95
        resamples = int(ci.get("resamples", 1000)) if ci else 1000
        records = metric.records(perturbed)
        record_by_id = {str(s["id"]): r for s, r in zip(perturbed, records, strict=True)}
        base_records = metric.records(baseline)
        base_by_id = {i: r for i, r in zip(ids, base_records, strict=True)}
        value = point_value(metric, records, f" under perturbation {perturbation['name']}")
        base_value = point_value(metric, base_records)
        rng = random.Random(metric_stream(metric, seed, f"{perturbation['name']}:{d['name']}"))
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
                    "low": percentile(values, alpha) if values else None,
                    "high": percentile(values, 1 - alpha) if values else None,
                    "level": level,
                    "method": "bootstrap_percentile",
                },
                "delta_ci": {
                    "low": percentile(deltas, alpha) if deltas else None,
                    "high": percentile(deltas, 1 - alpha) if deltas else None,
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

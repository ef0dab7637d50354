"""Ranking the entries of a comparison: ties as ties, paired tests where samples are shared.

Two entries differ significantly when

- they share sample ids (both are single runs whose per-sample outputs carry the same
  ``id`` values): a **paired bootstrap** of the metric's difference over the shared
  samples — resampled by the runner with a fixed seed, so the verdict is reproducible —
  and the difference is significant when its interval excludes 0;
- otherwise: their recorded confidence intervals do not overlap (conservative:
  overlapping intervals do not prove that there is no difference).

Entries that do not differ significantly from the first entry of their block share its
rank (competition ranking: 1, 1, 3) and are shown as tied.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace

from pydantic import JsonValue

from runner.shared.definitions import MetricDefinition
from runner.shared.metric_functions import build_metric
from runner.shared.sample_fields import FieldError, MetricUndefined, Sample, SampleFormatError

SIGNIFICANCE_CRITERION = (
    "paired bootstrap of the difference on shared sample ids (interval excludes 0) where "
    "runs share samples; otherwise non-overlapping confidence intervals (as recorded per run)"
)
# The runner's own stream for paired resampling: the same bundles give the same verdict.
PAIRED_SEED = 20_261_130
PAIRED_RESAMPLES = 1000
PAIRED_LEVEL = 0.95
# Above this many shared samples the paired bootstrap is skipped (CI overlap decides).
MAX_PAIRED_SAMPLES = 20_000
MIN_PAIRED_SAMPLES = 2


@dataclass(frozen=True)
class Entry:
    """One thing ranked: a run or a run set (its seeds as one entry), with its value."""

    run_id: str
    bundle_digest: str
    kind: str  # "run" | "run_set"
    spec_name: str | None
    model: str | None
    model_sha256: str | None
    backend: str | None
    outcome: str | None
    started: str
    value: float
    ci_low: float | None
    ci_high: float | None
    ci_method: str | None
    ci_level: float | None
    # the metric's definition (for the paired test) and the per-sample outputs by id
    definition: MetricDefinition | None = None
    samples: Mapping[str, Sample] | None = None


@dataclass(frozen=True)
class PairedTest:
    """A paired bootstrap of ``value(a) - value(b)`` over the samples both runs share."""

    shared: int
    difference: float
    low: float
    high: float
    level: float
    resamples: int

    @property
    def significant(self) -> bool:
        return self.low > 0 or self.high < 0

    def as_dict(self) -> dict[str, JsonValue]:
        return {**asdict(self), "significant": self.significant}


@dataclass(frozen=True)
class RankedRun:
    rank: int
    run_id: str
    bundle_digest: str
    spec_name: str | None
    model_sha256: str | None
    outcome: str | None
    value: float
    ci_low: float | None
    ci_high: float | None
    ci_method: str | None
    ci_level: float | None
    significant_vs_leader: bool | None
    significant_vs_next: bool | None
    started: str = ""
    kind: str = "run"
    model: str | None = None
    backend: str | None = None
    tied: bool = False
    # how the verdict against the leader was reached: "paired" or "ci_overlap" (None: leader)
    test_vs_leader: str | None = None
    paired_vs_leader: PairedTest | None = None


def _pct(values: list[float], q: float) -> float:
    pos = (len(values) - 1) * q
    lo, hi = math.floor(pos), math.ceil(pos)
    return values[lo] + (values[hi] - values[lo]) * (pos - lo)


def paired_bootstrap(
    definition: MetricDefinition,
    a: Mapping[str, Sample],
    b: Mapping[str, Sample],
    *,
    seed: int = PAIRED_SEED,
    resamples: int = PAIRED_RESAMPLES,
    level: float = PAIRED_LEVEL,
    recorded: tuple[float, float] | None = None,
) -> PairedTest | None:
    """The paired bootstrap of ``metric(a) - metric(b)`` over the sample ids both hold.

    None when it cannot be done: too few or too many shared ids, a sample that does not
    hold what the metric reads, a metric without a value on the shared samples, or a
    definition the catalogue cannot compute (a custom metric), or — with ``recorded`` —
    per-sample outputs that do not give the runs' recorded values.
    """
    shared = sorted(a.keys() & b.keys())
    if not MIN_PAIRED_SAMPLES <= len(shared) <= MAX_PAIRED_SAMPLES:
        return None
    try:
        metric = build_metric(definition)
        ra = metric.records([a[i] for i in shared])
        rb = metric.records([b[i] for i in shared])
        point = metric.aggregate(ra) - metric.aggregate(rb)
        if recorded is not None and not (
            math.isclose(metric.value(list(a.values())), recorded[0], rel_tol=1e-9, abs_tol=1e-12)
            and math.isclose(
                metric.value(list(b.values())), recorded[1], rel_tol=1e-9, abs_tol=1e-12
            )
        ):
            return None
    except (FieldError, SampleFormatError, MetricUndefined, ValueError, KeyError, TypeError):
        return None
    rng = random.Random(seed)  # noqa: S311 - reproducible resampling, not secrecy
    n = len(shared)
    positions = range(n)
    diffs: list[float] = []
    for _ in range(resamples):
        idx = rng.choices(positions, k=n)
        try:
            diffs.append(
                metric.aggregate([ra[i] for i in idx]) - metric.aggregate([rb[i] for i in idx])
            )
        except MetricUndefined:
            continue
    if not diffs:
        return None
    diffs.sort()
    alpha = (1 - level) / 2
    return PairedTest(
        shared=n,
        difference=point,
        low=_pct(diffs, alpha),
        high=_pct(diffs, 1 - alpha),
        level=level,
        resamples=resamples,
    )


def _disjoint(a: Entry, b: Entry) -> bool | None:
    if a.ci_low is None or a.ci_high is None or b.ci_low is None or b.ci_high is None:
        return None
    return a.ci_high < b.ci_low or b.ci_high < a.ci_low


def differ(a: Entry, b: Entry) -> tuple[bool | None, str | None, PairedTest | None]:
    """Whether ``a`` and ``b`` differ significantly, by which test, and the paired result."""
    if a.samples is not None and b.samples is not None and a.definition is not None:
        paired = paired_bootstrap(a.definition, a.samples, b.samples, recorded=(a.value, b.value))
        if paired is not None:
            return paired.significant, "paired", paired
    disjoint = _disjoint(a, b)
    return disjoint, (None if disjoint is None else "ci_overlap"), None


def rank_entries(entries: Sequence[Entry], direction: str) -> list[RankedRun]:
    """Entries best first; ties (not significantly different from the block's first) share
    a rank; equal values keep the older entry first."""
    sign = -1.0 if direction == "higher_is_better" else 1.0
    ordered = sorted(entries, key=lambda e: (sign * e.value, e.started, e.run_id))
    # each pair is tested once (a paired bootstrap is the costly part of a comparison)
    tested: dict[tuple[int, int], tuple[bool | None, str | None, PairedTest | None]] = {}

    def differ_at(i: int, j: int) -> tuple[bool | None, str | None, PairedTest | None]:
        if (i, j) not in tested:
            tested[i, j] = differ(ordered[i], ordered[j])
        return tested[i, j]

    out: list[RankedRun] = []
    block_start = 0
    for i, e in enumerate(ordered):
        if i > 0:
            vs_block, _, _ = differ_at(block_start, i)
            same = e.value == ordered[block_start].value
            if not same and vs_block is not False:
                block_start = i
        vs_leader, test, paired = (None, None, None) if i == 0 else differ_at(0, i)
        vs_next = differ_at(i, i + 1)[0] if i + 1 < len(ordered) else None
        out.append(
            RankedRun(
                rank=block_start + 1,
                run_id=e.run_id,
                bundle_digest=e.bundle_digest,
                spec_name=e.spec_name,
                model_sha256=e.model_sha256,
                outcome=e.outcome,
                value=e.value,
                ci_low=e.ci_low,
                ci_high=e.ci_high,
                ci_method=e.ci_method,
                ci_level=e.ci_level,
                significant_vs_leader=vs_leader,
                significant_vs_next=vs_next,
                started=e.started,
                kind=e.kind,
                model=e.model,
                backend=e.backend,
                test_vs_leader=test,
                paired_vs_leader=paired,
            )
        )
    ranks = [r.rank for r in out]
    return [replace(r, tied=ranks.count(r.rank) > 1) for r in out]

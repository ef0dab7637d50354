"""The resampling behind every confidence interval: seeded streams, the bootstrap (percentile
and BCa), the Wilson interval, numpy's linear percentile.

Standard library only (the agent computes with it in the container, the runner recomputes
with it), and bit-identical on both sides for the same inputs and seed.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from itertools import repeat, starmap
from typing import TYPE_CHECKING, Any

from runner.shared.metric_catalogue import LEGACY
from runner.shared.metric_functions import Metric
from runner.shared.sample_fields import MetricUndefined

if TYPE_CHECKING:
    import random

# ``random`` and ``statistics`` are imported where an interval needs them: the agent
# computes point values only, and under gVisor each module it imports costs it ~5 ms.

# The leave-one-out values of the BCa acceleration are capped to bound the runtime.
MAX_JACKKNIFE = 2000


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default) of sorted values."""
    if not sorted_values:
        raise ValueError("no values")
    pos = (len(sorted_values) - 1) * q
    lo = math.floor(pos)
    hi = math.ceil(pos)
    if lo == hi:
        return sorted_values[lo]
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def bootstrap_stats(
    metric: Metric, records: Sequence[Any], resamples: int, seed: int
) -> tuple[list[float], int]:
    """Sorted statistics of ``resamples`` resamples, and how many had no value."""
    import random

    rng = random.Random(seed)
    stats = []
    undefined = 0
    for _ in range(resamples):
        # The same indices whatever the records are, so resampling records is resampling
        # samples.
        try:
            stats.append(metric.aggregate(resample(rng, records)))
        except MetricUndefined:
            undefined += 1
    stats.sort()
    return stats, undefined


def resample(rng: random.Random, records: Sequence[Any]) -> list[Any]:
    """``rng.choices(records, k=len(records))``, bit for bit: ``len(records)`` calls of
    ``rng.random()``, each giving the index ``floor(random() * n)`` with ``n`` a float.

    Every CPython since 3.6 draws so (3.6 to 3.8 truncate ``random() * len`` with ``int``:
    the same index), and the runner must agree with images of any of them; this is the
    same arithmetic with the loop in C (``map``), about a third faster than ``choices``.
    """
    n = len(records)
    scale = float(n)  # x * scale == scale * x in IEEE 754: the product choices() computes
    draws = starmap(rng.random, repeat((), n))
    return list(map(records.__getitem__, map(math.floor, map(scale.__mul__, draws))))


def bca_interval(
    metric: Metric, records: Sequence[Any], point: float, stats: list[float], level: float
) -> tuple[float, float]:
    from statistics import NormalDist

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

    return percentile(stats, adjusted(alpha)), percentile(stats, adjusted(1 - alpha))


def wilson_interval(successes: int, n: int, level: float) -> tuple[float, float]:
    from statistics import NormalDist

    z = NormalDist().inv_cdf(1 - (1 - level) / 2)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def point_value(metric: Metric, records: Sequence[Any], what: str = "") -> float:
    try:
        return metric.aggregate(records)
    except MetricUndefined as exc:
        raise MetricUndefined(f"metric {metric.name}{what}: not defined here: {exc}") from None


def legacy_stream(seed: int, label: str) -> int:
    # Only the last 8 bytes of "seed:label" survive the modulus, so for labels of 8 bytes
    # or more the seed has no effect. Kept as is: images built before the catalogue compute
    # with it and the runner must agree with them (see metric_stream).
    return int.from_bytes(f"{seed}:{label}".encode(), "big") % (2**63)


def metric_stream(metric: Metric, seed: int, label: str) -> int:
    """The resampling stream of a metric: the old derivation for the pre-catalogue computes,
    a hash of seed and label (every bit of both counts) for the others."""
    if metric.compute in LEGACY:
        return legacy_stream(seed, label)
    digest = hashlib.sha256(f"evalrun-bootstrap/v1:{seed}:{label}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % (2**63)

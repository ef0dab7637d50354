"""Metrics of predicted probabilities: log-loss, Brier score, expected calibration error.

Stdlib only. Per-sample losses are averaged with :func:`math.fsum`; the conventions are
scikit-learn's (log-loss clips probabilities to [ε, 1-ε] with ε the float64 machine
epsilon and does not renormalise rows; the binary Brier score is the mean squared error of
the positive-class probability, the multiclass one sums over classes). Calibration bins are
scikit-learn's ``calibration_curve(strategy="uniform")`` bins.
"""

from __future__ import annotations

import math
import sys
from bisect import bisect_left
from collections.abc import Sequence

EPS = sys.float_info.epsilon


def _clip(p: float) -> float:
    return min(max(p, EPS), 1.0 - EPS)


def binary_log_loss(positive: bool, p: float) -> float:
    """One sample's log-loss given the probability ``p`` of the positive class."""
    return -math.log(_clip(p if positive else 1.0 - p))


def log_loss(p_true: float) -> float:
    """One sample's log-loss given the probability its true class received."""
    return -math.log(_clip(p_true))


def binary_brier(positive: bool, p: float) -> float:
    return (p - (1.0 if positive else 0.0)) ** 2


def multiclass_brier(truth: int, probabilities: Sequence[float]) -> float:
    return math.fsum((p - (1.0 if k == truth else 0.0)) ** 2 for k, p in enumerate(probabilities))


def top_label(truth: int, probabilities: Sequence[float]) -> tuple[int, float]:
    """(1 if the most probable class is the true one else 0, its probability); ties: first."""
    best = max(range(len(probabilities)), key=lambda k: (probabilities[k], -k))
    return (1 if best == truth else 0), probabilities[best]


def bin_edges(bins: int) -> list[float]:
    """The inner edges of ``bins`` equal-width bins over [0, 1] (as numpy's linspace)."""
    step = 1.0 / bins
    return [i * step for i in range(1, bins)]


def expected_calibration_error(pairs: Sequence[tuple[int, float]], bins: int) -> float:
    """Σ over bins of (bin share) x |observed frequency - mean confidence|.

    ``pairs`` are (outcome 0/1, confidence in [0, 1]). A confidence equal to an edge goes
    to the lower bin, as in ``calibration_curve``.
    """
    edges = bin_edges(bins)
    outcome: list[int] = [0] * bins
    confidence: list[list[float]] = [[] for _ in range(bins)]
    for hit, p in pairs:
        b = bisect_left(edges, p)
        outcome[b] += hit
        confidence[b].append(p)
    gaps = [abs(outcome[b] - math.fsum(confidence[b])) for b in range(bins) if confidence[b]]
    return math.fsum(gaps) / len(pairs)

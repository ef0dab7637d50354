"""Regression metrics over (target, prediction) pairs: MAE, RMSE, R².

Stdlib only; sums are :func:`math.fsum`. R² follows scikit-learn's ``r2_score`` with its
default ``force_finite``: a constant target scores 1.0 when predicted exactly, else 0.0.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from runner.shared.sample_fields import MetricUndefined


def absolute_error(target: float, prediction: float) -> float:
    return abs(prediction - target)


def squared_error(target: float, prediction: float) -> float:
    return (prediction - target) ** 2


def root_mean(squared_errors: Sequence[float]) -> float:
    return math.sqrt(math.fsum(squared_errors) / len(squared_errors))


def r2(pairs: Sequence[tuple[float, float]]) -> float:
    """Coefficient of determination, 1 - SS_res / SS_tot."""
    if len(pairs) < 2:
        raise MetricUndefined("R² needs at least two samples")
    mean = math.fsum(t for t, _ in pairs) / len(pairs)
    total = math.fsum((t - mean) ** 2 for t, _ in pairs)
    residual = math.fsum((t - p) ** 2 for t, p in pairs)
    if total == 0.0:
        return 1.0 if residual == 0.0 else 0.0
    return 1.0 - residual / total

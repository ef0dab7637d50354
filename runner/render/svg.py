"""Plots for the run report, drawn as inline SVG at fixed precision (deterministic text)."""

from __future__ import annotations

import html
import math
from collections.abc import Sequence

from runner.model.predicate import MetricResult
from runner.render.run_report import SliceRow
from runner.shared.metric_catalogue import value_bounds


def _num(value: float) -> str:
    """SVG coordinates at fixed precision (deterministic text)."""
    text = f"{value:.2f}".rstrip("0").rstrip(".")
    return "0" if text in ("-0", "") else text


def _axis_range(values: Sequence[float]) -> tuple[float, float]:
    """The plotted span: the values with a margin, kept inside [0, 1] for proportions."""
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return 0.0, 1.0
    lo, hi = min(finite), max(finite)
    span = hi - lo or abs(hi) * 0.1 or 1.0
    lo, hi = lo - span * 0.25, hi + span * 0.25
    if min(finite) >= 0.0 and max(finite) <= 1.0:
        lo, hi = max(lo, 0.0), min(hi, 1.0)
    return lo, hi


def metric_axis(m: MetricResult) -> tuple[float, float]:
    """The span of ``m``'s own axis: 0 to 1 for a metric bounded to it (the catalogue
    knows which); else its value, CI and threshold with a margin, kept inside the
    metric's bounds; a metric the catalogue does not know: its data (inside [0, 1] when
    all of it is)."""
    ci_low, ci_high = (m.ci.low, m.ci.high) if m.ci is not None else (None, None)
    values = [float(v) for v in (m.value, ci_low, ci_high, m.threshold) if v is not None]
    bounds = value_bounds(m.compute)
    if bounds is None:
        return _axis_range(values)
    low, high = bounds
    if (low, high) == (0.0, 1.0):
        return 0.0, 1.0
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return (low if low is not None else 0.0), (high if high is not None else 1.0)
    lo, hi = min(finite), max(finite)
    span = hi - lo or abs(hi) * 0.1 or 1.0
    lo, hi = lo - span * 0.25, hi + span * 0.25
    if low is not None:
        lo = max(lo, low)
    if high is not None:
        hi = min(hi, high)
    return lo, hi


def _tick(value: float) -> str:
    return f"{value:.4g}"


def metrics_svg(metrics: Sequence[MetricResult]) -> str:
    """Each metric as a point with its confidence interval and threshold mark, each on its
    own axis (:func:`metric_axis`): an RMSE and an accuracy never share a scale."""
    rows = [m for m in metrics if m.value is not None]
    if not rows:
        return ""
    left, width, row_h = 140.0, 420.0, 56.0
    height = 12.0 + row_h * len(rows)
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{_num(left + width + 30)}" '
        f'height="{_num(height)}" viewBox="0 0 {_num(left + width + 30)} {_num(height)}" '
        'role="img" aria-label="metrics with confidence intervals, each on its own axis">',
    ]
    for i, m in enumerate(rows):
        assert m.value is not None  # rows keep only metrics with a value
        lo, hi = metric_axis(m)
        y = 20.0 + row_h * i

        def x(v: float, lo: float = lo, hi: float = hi) -> float:
            # a value outside the axis (a bundle may say anything) sits at its edge
            return left + min(max((v - lo) / (hi - lo), 0.0), 1.0) * width

        axis_y = y + 16
        parts.append(
            f'<text x="{_num(left - 8)}" y="{_num(y + 4)}" font-size="12" '
            f'text-anchor="end">{html.escape(m.name)}</text>'
            f'<line x1="{_num(left)}" y1="{_num(axis_y)}" x2="{_num(left + width)}" '
            f'y2="{_num(axis_y)}" stroke="#999"/>'
        )
        for k in range(3):
            v = lo + (hi - lo) * k / 2
            parts.append(
                f'<text x="{_num(x(v))}" y="{_num(axis_y + 12)}" font-size="10" '
                f'text-anchor="middle" fill="#555">{_tick(v)}</text>'
            )
        if m.ci is not None and m.ci.low is not None and m.ci.high is not None:
            parts.append(
                f'<line x1="{_num(x(float(m.ci.low)))}" y1="{_num(y)}" '
                f'x2="{_num(x(float(m.ci.high)))}" y2="{_num(y)}" stroke="#1f6fb2" '
                'stroke-width="3"/>'
            )
        if m.threshold is not None:
            parts.append(
                f'<line x1="{_num(x(float(m.threshold)))}" y1="{_num(y - 10)}" '
                f'x2="{_num(x(float(m.threshold)))}" y2="{_num(y + 10)}" stroke="#c0392b" '
                'stroke-width="2" stroke-dasharray="3,2"/>'
            )
        colour = "#1e8449" if m.passed is True else "#c0392b" if m.passed is False else "#333"
        parts.append(
            f'<circle cx="{_num(x(float(m.value)))}" cy="{_num(y)}" r="5" fill="{colour}"/>'
        )
    parts.append("</svg>")
    return "".join(parts)


def slices_svg(slices: Sequence[SliceRow]) -> str:
    """Per-slice accuracy as horizontal bars (0 to 1)."""
    if not slices:
        return ""
    left, width, bar_h, gap = 90.0, 400.0, 14.0, 4.0
    height = 10.0 + (bar_h + gap) * len(slices) + 10.0
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{_num(left + width + 90)}" '
        f'height="{_num(height)}" viewBox="0 0 {_num(left + width + 90)} {_num(height)}" '
        'role="img" aria-label="accuracy per slice">'
    ]
    for i, row in enumerate(slices):
        y = 10.0 + (bar_h + gap) * i
        parts.append(
            f'<text x="{_num(left - 6)}" y="{_num(y + bar_h - 3)}" font-size="11" '
            f'text-anchor="end">{html.escape(row.name[:14])}</text>'
            f'<rect x="{_num(left)}" y="{_num(y)}" width="{_num(width)}" '
            f'height="{_num(bar_h)}" fill="#eee"/>'
            f'<rect x="{_num(left)}" y="{_num(y)}" width="{_num(width * row.accuracy)}" '
            f'height="{_num(bar_h)}" fill="#1f6fb2"/>'
            f'<text x="{_num(left + width + 6)}" y="{_num(y + bar_h - 3)}" '
            f'font-size="11">{row.accuracy:.3f} (n={row.n})</text>'
        )
    parts.append("</svg>")
    return "".join(parts)

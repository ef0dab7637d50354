"""Classification metrics over (label, prediction) pairs and (positive?, score) pairs.

Stdlib only. Counts are integers and every ratio is one division of integers, so a
per-class score is correctly rounded; averages are :func:`math.fsum` sums. The conventions
are scikit-learn's (a class with no predicted or true samples scores 0; ROC-AUC counts a
tie as half; average precision steps at each distinct score), and the unit tests hold the
two together.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Hashable, Iterable, Sequence
from typing import Any, Literal, NamedTuple, TypedDict

from runner.shared.sample_fields import MetricUndefined

Pair = tuple[Hashable, Hashable]
Ratio = Literal["precision", "recall", "f1"]
Average = Literal["micro", "macro", "weighted"]
ScorePairs = Sequence[tuple[bool, float]]


def label_sort_key(value: Any) -> tuple[int, Any]:
    """A total, deterministic order of labels: numbers (booleans too), then strings, then others."""
    if isinstance(value, bool | int | float):
        return (0, value)
    if isinstance(value, str):
        return (1, value)
    return (2, repr(value))


class LabelCounts(NamedTuple):
    """Per class: true positives, false positives, false negatives and support (true count)."""

    labels: tuple[Hashable, ...]
    tp: Counter[Hashable]
    fp: Counter[Hashable]
    fn: Counter[Hashable]
    support: Counter[Hashable]
    n: int


def label_counts(pairs: Sequence[Pair]) -> LabelCounts:
    tp: Counter[Hashable] = Counter()
    fp: Counter[Hashable] = Counter()
    fn: Counter[Hashable] = Counter()
    support: Counter[Hashable] = Counter()
    seen: set[Hashable] = set()
    # counting the cells in C first keeps bootstrap resamples cheap
    for (truth, predicted), count in Counter(pairs).items():
        support[truth] += count
        seen.add(truth)
        seen.add(predicted)
        if predicted == truth:
            tp[truth] += count
        else:
            fp[predicted] += count
            fn[truth] += count
    return LabelCounts(tuple(sorted(seen, key=label_sort_key)), tp, fp, fn, support, len(pairs))


def _ratio(which: Ratio, tp: int, fp: int, fn: int) -> float:
    num, den = {
        "precision": (tp, tp + fp),
        "recall": (tp, tp + fn),
        "f1": (2 * tp, 2 * tp + fp + fn),
    }[which]
    return num / den if den else 0.0


def class_ratio(which: Ratio, counts: LabelCounts, positive: Hashable) -> float:
    """Precision, recall or F1 of one class against the rest (0 when it never occurs)."""
    return _ratio(which, counts.tp[positive], counts.fp[positive], counts.fn[positive])


def averaged_ratio(which: Ratio, counts: LabelCounts, average: Average) -> float:
    """Precision, recall or F1 averaged over the labels seen (true or predicted)."""
    if average == "micro":
        return _ratio(
            which,
            sum(counts.tp.values()),
            sum(counts.fp.values()),
            sum(counts.fn.values()),
        )
    scores = [class_ratio(which, counts, c) for c in counts.labels]
    if average == "macro":
        return math.fsum(scores) / len(scores)
    weights = [counts.support[c] for c in counts.labels]
    return math.fsum(s * w for s, w in zip(scores, weights, strict=True)) / counts.n


def balanced_accuracy(counts: LabelCounts) -> float:
    """Mean recall over the classes that occur among the true labels."""
    recalls = [counts.tp[c] / counts.support[c] for c in counts.labels if counts.support[c]]
    return math.fsum(recalls) / len(recalls)


class ConfusionMatrix(TypedDict):
    """Rows are true labels, columns predicted labels (as the samples hold them)."""

    labels: list[Hashable]
    counts: list[list[int]]


def confusion_matrix(pairs: Iterable[Pair]) -> ConfusionMatrix:
    """Rows are true labels, columns predicted labels, both in :func:`label_sort_key` order."""
    cells: Counter[Pair] = Counter(pairs)
    labels = sorted({t for t, _ in cells} | {p for _, p in cells}, key=label_sort_key)
    return {
        "labels": labels,
        "counts": [[cells[(t, p)] for p in labels] for t in labels],
    }


# --------------------------------------------------------------------------- from scores


def _by_score(pairs: ScorePairs) -> tuple[Counter[float], Counter[float]]:
    """How many positives and negatives have each distinct score."""
    positives: Counter[float] = Counter(score for is_pos, score in pairs if is_pos)
    negatives: Counter[float] = Counter(score for is_pos, score in pairs if not is_pos)
    return positives, negatives


def roc_auc(pairs: ScorePairs) -> float:
    """Area under the ROC curve: P(score of a positive > score of a negative), ties half.

    Computed from doubled mid-ranks in integers, so the result is one correctly rounded
    division whatever the order of the input.
    """
    positives, negatives = _by_score(pairs)
    p, n = positives.total(), negatives.total()
    if not p or not n:
        which = "positive" if not p else "negative"
        raise MetricUndefined(f"ROC-AUC needs positive and negative samples; none is {which}")
    doubled_rank_sum = 0
    below = 0
    pos, neg = positives.get, negatives.get  # .get: Counter's __missing__ is slow in a loop
    for score in sorted(positives.keys() | negatives.keys()):
        gained = pos(score, 0)
        tied = gained + neg(score, 0)
        # ranks below+1 … below+tied share the mid-rank; doubled: 2*below + tied + 1
        doubled_rank_sum += gained * (2 * below + tied + 1)
        below += tied
    return (doubled_rank_sum - p * (p + 1)) / (2 * p * n)


def average_precision(pairs: ScorePairs) -> float:
    """Area under the precision-recall curve as a step function over distinct scores.

    Sum of (recall gained at a threshold) x (precision at it), thresholds from the highest
    score down, tied scores taken together (scikit-learn's ``average_precision_score``).
    """
    positives, negatives = _by_score(pairs)
    p = positives.total()
    if not p:
        raise MetricUndefined("average precision needs positive samples; none is positive")
    terms = []
    tp = fp = 0
    pos, neg = positives.get, negatives.get
    for score in sorted(positives.keys() | negatives.keys(), reverse=True):
        gained = pos(score, 0)
        tp += gained
        fp += neg(score, 0)
        if gained:
            terms.append(gained * tp / (tp + fp))
    return math.fsum(terms) / p


def one_vs_rest(
    score_fn: Callable[[ScorePairs], float],
    records: Sequence[tuple[int, tuple[float, ...]]],
    classes: Sequence[str],
    average: Literal["macro", "weighted"],
) -> float:
    """A binary score metric per class (that class against the rest), averaged over classes.

    ``records`` are (index of the true class, one score per class); ``weighted`` weighs
    each class by how often it is the true class.
    """
    values = []
    weights = []
    for k, name in enumerate(classes):
        try:
            values.append(score_fn([(truth == k, scores[k]) for truth, scores in records]))
        except MetricUndefined as exc:
            raise MetricUndefined(f"class {name!r}: {exc}") from None
        weights.append(sum(1 for truth, _ in records if truth == k))
    if average == "macro":
        return math.fsum(values) / len(values)
    return math.fsum(v * w for v, w in zip(values, weights, strict=True)) / len(records)

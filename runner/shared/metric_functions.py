"""A metric definition made computable: one record per sample, and records → a float.

Stdlib only. :func:`build_metric` turns a definition (the spec's metric as JSON) into a
:class:`Metric`. Its ``extract`` reads what the metric needs from one sample (checking the
shape, see :mod:`runner.shared.sample_fields`) and its ``aggregate`` turns any list of
records into the value. Bootstrap intervals resample the records, so a record is all the
metric needs of its sample.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal, NamedTuple, cast

from runner.shared import calibration, classification, generation, regression
from runner.shared import sample_fields as read
from runner.shared.definitions import MetricDefinition
from runner.shared.metric_catalogue import CATALOGUE, reads
from runner.shared.sample_fields import FieldError, MetricUndefined, Sample

Record = Any
Extract = Callable[[Sample], Record]
Aggregate = Callable[[Sequence[Record]], float]
Proportion = Literal["hits", "misses"] | None
Fields = Mapping[str, str]

_NORMALIZE_DEFAULT = {"exact_match": "none", "token_f1": "squad"}


class Metric(NamedTuple):
    """A metric ready to compute: one record per sample, and records → value."""

    name: str
    compute: str
    reads: Fields
    extract: Extract
    aggregate: Aggregate
    # Wilson: records are 0/1 hits; "misses" reports the interval of 1 - the proportion
    proportion: Proportion = None
    # set when a confusion matrix is attached: a sample's (label, prediction)
    matrix_pair: Callable[[Sample], tuple[Any, Any]] | None = None

    def records(self, samples: Sequence[Sample]) -> list[Record]:
        """Every sample's record; a malformed one is named by its sample id."""
        out = []
        for s in samples:
            try:
                out.append(self.extract(s))
            except FieldError as exc:
                raise read.SampleFormatError(
                    f"sample {s.get('id')!r}: {exc} (metric {self.name})"
                ) from None
        return out

    def value(self, samples: Sequence[Sample]) -> float:
        return self.aggregate(self.records(samples))


# --------------------------------------------------------------------------- aggregates


def _nonempty(records: Sequence[Record]) -> Sequence[Record]:
    if not records:
        raise MetricUndefined("no samples")
    return records


def _mean(values: Sequence[float]) -> float:
    return math.fsum(_nonempty(values)) / len(values)


def _share(hits: Sequence[int]) -> float:
    # an int sum and one division: the pre-catalogue accuracy, bit for bit
    return sum(_nonempty(hits)) / len(hits)


def _complement_share(hits: Sequence[int]) -> float:
    return 1.0 - _share(hits)


def _legacy_macro_f1(pairs: Sequence[tuple[Any, Any]]) -> float:
    """macro_f1 as it always was (repr order, plain sum): old images must still agree.

    The pairs are counted first (``Counter``, a loop in C), then each distinct pair once:
    a bootstrap computes this 1,000 times over resamples, and a Python loop over every
    pair took three quarters of the runner's recomputation (0.1 s for 450 samples). The
    same integers, so the same float: each count is the number of pairs equal to a
    distinct one, and the first pair of each label (which the label sets keep, and ``repr``
    sorts) is the first key ``Counter`` keeps for it."""
    counts = Counter(_nonempty(pairs))
    labels = sorted({t for t, _ in counts} | {p for _, p in counts}, key=repr)
    tp = dict.fromkeys(labels, 0)
    fp = dict.fromkeys(labels, 0)
    fn = dict.fromkeys(labels, 0)
    for (truth, predicted), count in counts.items():
        if predicted == truth:
            tp[truth] += count
        else:
            fp[predicted] += count
            fn[truth] += count
    scores = []
    for label in labels:
        denom = 2 * tp[label] + fp[label] + fn[label]
        scores.append(0.0 if denom == 0 else 2 * tp[label] / denom)
    return sum(scores) / len(scores)


# --------------------------------------------------------------------------- by family


def _hits(d: MetricDefinition, f: Fields) -> tuple[Extract, Aggregate, Proportion]:
    """accuracy, error_rate: compared as found (as before the catalogue)."""
    label, prediction = f["label"], f["prediction"]

    def extract(row: Sample) -> int:
        return 1 if read.raw(row, prediction) == read.raw(row, label) else 0

    if d["compute"] == "accuracy":
        return extract, _share, "hits"
    return extract, _complement_share, "misses"


def _legacy(d: MetricDefinition, f: Fields) -> tuple[Extract, Aggregate, Proportion]:
    """macro_f1 and mean, exactly as before the catalogue."""
    if d["compute"] == "mean":
        field = f["field"]
        return (lambda row: read.legacy_number(row, field)), _mean, None
    label, prediction = f["label"], f["prediction"]

    def extract(row: Sample) -> tuple[Any, Any]:
        return read.hashable(row, label), read.hashable(row, prediction)

    return extract, _legacy_macro_f1, None


def _labels(d: MetricDefinition, f: Fields) -> tuple[Extract, Aggregate, Proportion]:
    """balanced_accuracy, precision, recall, f1 over (label, prediction) pairs."""
    label, prediction = f["label"], f["prediction"]
    compute, positive = d["compute"], d.get("positive")
    average = cast(classification.Average, d.get("average"))
    # the catalogue sends only these computes here (balanced_accuracy returns before use)
    ratio = cast(classification.Ratio, compute)

    def extract(row: Sample) -> tuple[read.Label, read.Label]:
        return read.label(row, label), read.label(row, prediction)

    def aggregate(pairs: Sequence[tuple[read.Label, read.Label]]) -> float:
        counts = classification.label_counts(_nonempty(pairs))
        if compute == "balanced_accuracy":
            return classification.balanced_accuracy(counts)
        if positive is not None:
            return classification.class_ratio(ratio, counts, positive)
        return classification.averaged_ratio(ratio, counts, average)

    return extract, aggregate, None


def _ranking(compute: str) -> Callable[[classification.ScorePairs], float]:
    return classification.roc_auc if compute == "roc_auc" else classification.average_precision


def _binary_scores(d: MetricDefinition, f: Fields) -> tuple[Extract, Aggregate, Proportion]:
    """The score metrics with ``positive``: each sample's score (or probability) for it."""
    compute, positive, label = d["compute"], d["positive"], f["label"]
    score_of = read.number if compute in ("roc_auc", "average_precision") else read.probability

    def pair(row: Sample) -> tuple[bool, float]:
        return read.label(row, label) == positive, score_of(row, f["score"])

    if compute in ("roc_auc", "average_precision"):
        ranking = _ranking(compute)

        def binary(pairs: Sequence[tuple[bool, float]]) -> float:
            try:
                return ranking(_nonempty(pairs))
            except MetricUndefined as exc:
                # a label 1 is not the class "1": say which class was looked for
                raise MetricUndefined(f"{exc} (positive: {positive!r})") from None

        return pair, binary, None
    if compute == "log_loss":
        return lambda row: calibration.binary_log_loss(*pair(row)), _mean, None
    if compute == "brier":
        return lambda row: calibration.binary_brier(*pair(row)), _mean, None
    bins = int(d["bins"])

    def outcome(row: Sample) -> tuple[int, float]:
        hit, p = pair(row)
        return (1 if hit else 0), p

    def ece(pairs: Sequence[tuple[int, float]]) -> float:
        return calibration.expected_calibration_error(_nonempty(pairs), bins)

    return outcome, ece, None


def _class_scores(d: MetricDefinition, f: Fields) -> tuple[Extract, Aggregate, Proportion]:
    """The score metrics over declared ``classes``: one score (or probability) per class."""
    compute, label = d["compute"], f["label"]
    declared = list(d["classes"])
    classes = [read.class_key(c) for c in declared]
    index = {c: i for i, c in enumerate(classes)}
    probabilities = compute not in ("roc_auc", "average_precision")

    def scored(row: Sample) -> tuple[int, tuple[float, ...]]:
        value = read.label(row, label)
        truth = index.get(read.class_key(value))
        if truth is None:
            raise FieldError(label, f"one of the classes {declared}", value)
        scores = read.class_scores(row, f["probabilities"], classes, probabilities=probabilities)
        return truth, scores

    if compute in ("roc_auc", "average_precision"):
        ranking = _ranking(compute)
        average: Literal["macro", "weighted"] = (
            "weighted" if d.get("average") == "weighted" else "macro"
        )

        def one_vs_rest(records: Sequence[tuple[int, tuple[float, ...]]]) -> float:
            return classification.one_vs_rest(ranking, _nonempty(records), classes, average)

        return scored, one_vs_rest, None
    if compute == "log_loss":

        def loss(row: Sample) -> float:
            truth, scores = scored(row)
            return calibration.log_loss(scores[truth])

        return loss, _mean, None
    if compute == "brier":
        return lambda row: calibration.multiclass_brier(*scored(row)), _mean, None
    bins = int(d["bins"])

    def ece(pairs: Sequence[tuple[int, float]]) -> float:
        return calibration.expected_calibration_error(_nonempty(pairs), bins)

    return lambda row: calibration.top_label(*scored(row)), ece, None


def _regression(d: MetricDefinition, f: Fields) -> tuple[Extract, Aggregate, Proportion]:
    target, prediction = f["target"], f["prediction"]

    def pair(row: Sample) -> tuple[float, float]:
        return read.number(row, target), read.number(row, prediction)

    if d["compute"] == "r2":
        return pair, regression.r2, None
    if d["compute"] == "mae":
        return lambda row: regression.absolute_error(*pair(row)), _mean, None

    def rmse(errors: Sequence[float]) -> float:
        return regression.root_mean(_nonempty(errors))

    return lambda row: regression.squared_error(*pair(row)), rmse, None


def _text(d: MetricDefinition, f: Fields) -> tuple[Extract, Aggregate, Proportion]:
    compute = d["compute"]
    steps = generation.normalization(d.get("normalize"), _NORMALIZE_DEFAULT[compute])
    prediction, reference = f["prediction"], f["reference"]
    if compute == "exact_match":

        def match(row: Sample) -> int:
            return generation.exact_match(
                read.text(row, prediction), read.texts(row, reference), steps
            )

        return match, _share, "hits"

    def f1(row: Sample) -> float:
        return generation.token_f1(read.text(row, prediction), read.texts(row, reference), steps)

    return f1, _mean, None


def _pass_at_k(d: MetricDefinition, f: Fields) -> tuple[Extract, Aggregate, Proportion]:
    k = int(d["k"])

    def extract(row: Sample) -> float:
        n, c = read.count(row, f["n"]), read.count(row, f["c"])
        if n < k:
            raise FieldError(f["n"], f"at least k={k} generations", n)
        if c > n:
            raise FieldError(f["c"], f"at most n={n} correct generations", c)
        return generation.pass_at_k(n, c, k)

    return extract, _mean, None


Family = Callable[[MetricDefinition, Fields], tuple[Extract, Aggregate, Proportion]]
_FAMILIES: dict[str, Family] = {
    "accuracy": _hits,
    "error_rate": _hits,
    "macro_f1": _legacy,
    "mean": _legacy,
    "balanced_accuracy": _labels,
    "precision": _labels,
    "recall": _labels,
    "f1": _labels,
    "mae": _regression,
    "rmse": _regression,
    "r2": _regression,
    "exact_match": _text,
    "token_f1": _text,
    "pass_at_k": _pass_at_k,
}
_SCORE_METRICS = ("roc_auc", "average_precision", "log_loss", "brier", "ece")


def build_metric(definition: MetricDefinition) -> Metric:
    """The :class:`Metric` a definition (a spec metric as JSON) describes."""
    compute = definition["compute"]
    if compute not in CATALOGUE:
        raise ValueError(f"unknown metric computation {compute!r}")
    f = reads(definition)
    family: Family
    if compute in _SCORE_METRICS:
        family = _binary_scores if definition.get("positive") is not None else _class_scores
    else:
        family = _FAMILIES[compute]
    extract, aggregate, proportion = family(definition, f)
    matrix_pair = None
    if definition.get("confusion_matrix"):
        label, prediction = f["label"], f["prediction"]

        def matrix_pair(row: Sample) -> tuple[read.Label, read.Label]:
            return read.label(row, label), read.label(row, prediction)

    return Metric(
        name=str(definition.get("name", compute)),
        compute=compute,
        reads=f,
        extract=extract,
        aggregate=aggregate,
        proportion=proportion,
        matrix_pair=matrix_pair,
    )

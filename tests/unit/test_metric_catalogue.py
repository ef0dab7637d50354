"""Every metric of the catalogue agrees with scikit-learn / SciPy (or the reference script).

Values are compared to 1e-12 on random inputs and on the edge cases that break metrics:
ties in scores, a single class present, perfect and all-wrong predictions, empty strings,
probabilities of exactly 0 and 1. Hypothesis drives the property tests.
"""

import math
import random
import re
import string
import warnings
from collections import Counter
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy.special import comb
from scipy.stats import mannwhitneyu
from sklearn import metrics as skm

from runner.shared.calibration import bin_edges
from runner.shared.metric_catalogue import CATALOGUE
from runner.shared.metrics import MetricUndefined, compute_metric
from runner.shared.resampling import percentile as _percentile

pytestmark = pytest.mark.unit

TOL = 1e-12
PROPERTY = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def value(compute, rows, **params):
    definition = {"name": "m", "compute": compute, "ci": {"method": "none"}, **params}
    return compute_metric(definition, rows, seed=0).value


def rows_of(**columns):
    n = len(next(iter(columns.values())))
    return [{"id": str(i), **{k: v[i] for k, v in columns.items()}} for i in range(n)]


def quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


def _labels(n, classes, acc, seed):
    rng = random.Random(seed)
    y = [rng.randrange(classes) for _ in range(n)]
    p = [t if rng.random() < acc else rng.randrange(classes) for t in y]
    return y, p


LABEL_CASES = {
    "random-5": _labels(300, 5, 0.7, 1),
    "random-2": _labels(101, 2, 0.6, 2),
    "strings": (
        ["cat", "dog", "dog", "bird", "cat", "cat"],
        ["cat", "dog", "cat", "cat", "bird", "fish"],
    ),
    "perfect": ([0, 1, 2, 2, 1], [0, 1, 2, 2, 1]),
    "all-wrong": ([0, 0, 1, 1], [1, 1, 0, 0]),
    "single-class": ([3, 3, 3, 3], [3, 3, 1, 3]),
    "predicted-only-class": ([0, 0, 1], [0, 2, 2]),
    "one-sample": ([1], [0]),
}


# --------------------------------------------------------------------------- labels


@pytest.mark.parametrize("case", sorted(LABEL_CASES))
def test_label_metrics_match_sklearn(case):
    y, p = LABEL_CASES[case]
    rows = rows_of(label=y, prediction=p)
    assert value("accuracy", rows) == pytest.approx(skm.accuracy_score(y, p), abs=TOL)
    assert value("error_rate", rows) == pytest.approx(1 - skm.accuracy_score(y, p), abs=TOL)
    assert value("balanced_accuracy", rows) == pytest.approx(
        quiet(skm.balanced_accuracy_score, y, p), abs=TOL
    )
    assert value("macro_f1", rows) == pytest.approx(
        skm.f1_score(y, p, average="macro", zero_division=0), abs=TOL
    )
    for compute, sk in (
        ("precision", skm.precision_score),
        ("recall", skm.recall_score),
        ("f1", skm.f1_score),
    ):
        for average in ("micro", "macro", "weighted"):
            expected = sk(y, p, average=average, zero_division=0)
            assert value(compute, rows, average=average) == pytest.approx(expected, abs=TOL)
        for cls in sorted(set(y) | set(p)):
            expected = sk(y, p, labels=[cls], average=None, zero_division=0)[0]
            assert value(compute, rows, positive=cls) == pytest.approx(expected, abs=TOL)


def test_positive_class_equals_sklearn_binary_average():
    y, p = LABEL_CASES["random-2"]
    rows = rows_of(label=y, prediction=p)
    for pos in (0, 1):
        assert value("f1", rows, positive=pos) == pytest.approx(
            skm.f1_score(y, p, pos_label=pos), abs=TOL
        )
        assert value("precision", rows, positive=pos) == pytest.approx(
            skm.precision_score(y, p, pos_label=pos), abs=TOL
        )


def test_positive_class_that_never_occurs_scores_zero():
    rows = rows_of(label=[0, 1, 1], prediction=[0, 1, 0])
    assert value("recall", rows, positive=7) == 0.0
    assert value("f1", rows, positive=7) == 0.0


@pytest.mark.parametrize("case", sorted(LABEL_CASES))
def test_confusion_matrix_matches_sklearn(case):
    y, p = LABEL_CASES[case]
    rows = rows_of(label=y, prediction=p)
    definition = {"name": "a", "compute": "accuracy", "confusion_matrix": True}
    matrix = compute_metric(definition, rows, 0).confusion_matrix
    labels = sorted(set(y) | set(p))
    assert matrix["labels"] == labels
    assert matrix["counts"] == skm.confusion_matrix(y, p, labels=labels).tolist()


@PROPERTY
@given(
    st.lists(st.tuples(st.integers(0, 4), st.integers(0, 4)), min_size=1, max_size=60),
    st.sampled_from(["micro", "macro", "weighted"]),
)
def test_averaged_ratios_match_sklearn_property(pairs, average):
    y = [a for a, _ in pairs]
    p = [b for _, b in pairs]
    rows = rows_of(label=y, prediction=p)
    for compute, sk in (
        ("precision", skm.precision_score),
        ("recall", skm.recall_score),
        ("f1", skm.f1_score),
    ):
        expected = sk(y, p, average=average, zero_division=0)
        assert value(compute, rows, average=average) == pytest.approx(expected, abs=TOL)
    assert value("balanced_accuracy", rows) == pytest.approx(
        quiet(skm.balanced_accuracy_score, y, p), abs=TOL
    )


# --------------------------------------------------------------------------- scores


def _scores(n, seed, ties=False, positives=0.4):
    rng = random.Random(seed)
    y = [1 if rng.random() < positives else 0 for _ in range(n)]
    s = [min(1.0, max(0.0, 0.3 * t + rng.random() * 0.8)) for t in y]
    if ties:
        s = [round(v, 1) for v in s]
    return y, s


SCORE_CASES = {
    "random": _scores(400, 1),
    "ties": _scores(300, 2, ties=True),
    "all-tied": ([0, 1, 1, 0, 1], [0.5] * 5),
    "perfect": ([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9]),
    "inverted": ([0, 0, 1, 1], [0.9, 0.8, 0.2, 0.1]),
    "rare": _scores(200, 3, positives=0.03),
    "extremes": ([0, 1, 1, 0, 1, 0], [0.0, 1.0, 0.0, 1.0, 0.7, 0.2]),
}


@pytest.mark.parametrize("case", sorted(SCORE_CASES))
def test_binary_score_metrics_match_sklearn(case):
    y, s = SCORE_CASES[case]
    rows = rows_of(label=y, score=s)
    assert value("roc_auc", rows, positive=1) == pytest.approx(skm.roc_auc_score(y, s), abs=TOL)
    assert value("average_precision", rows, positive=1) == pytest.approx(
        skm.average_precision_score(y, s), abs=TOL
    )
    assert value("log_loss", rows, positive=1) == pytest.approx(skm.log_loss(y, s), abs=TOL)
    assert value("brier", rows, positive=1) == pytest.approx(skm.brier_score_loss(y, s), abs=TOL)
    # the score read as the other class's score
    assert value("roc_auc", rows, positive=0) == pytest.approx(
        skm.roc_auc_score([1 - t for t in y], s), abs=TOL
    )


@pytest.mark.parametrize("case", sorted(SCORE_CASES))
def test_roc_auc_is_the_mann_whitney_statistic(case):
    y, s = SCORE_CASES[case]
    pos = [v for t, v in zip(y, s) if t]
    neg = [v for t, v in zip(y, s) if not t]
    u = mannwhitneyu(pos, neg, alternative="two-sided").statistic
    assert value("roc_auc", rows_of(label=y, score=s), positive=1) == pytest.approx(
        u / (len(pos) * len(neg)), abs=TOL
    )


def test_binary_score_metrics_on_string_labels():
    y = ["spam", "ham", "ham", "spam", "spam"]
    s = [0.9, 0.2, 0.6, 0.65, 0.4]
    rows = rows_of(label=y, score=s)
    assert value("roc_auc", rows, positive="spam") == pytest.approx(
        skm.roc_auc_score([t == "spam" for t in y], s), abs=TOL
    )
    assert value("log_loss", rows, positive="spam") == pytest.approx(
        skm.log_loss(y, [[1 - v, v] for v in s], labels=["ham", "spam"]), abs=TOL
    )


@PROPERTY
@given(
    st.lists(
        st.tuples(st.booleans(), st.integers(0, 8).map(lambda i: i / 8)), min_size=2, max_size=80
    ).filter(lambda xs: any(a for a, _ in xs) and not all(a for a, _ in xs))
)
def test_ranking_metrics_match_sklearn_with_ties_property(pairs):
    y = [int(a) for a, _ in pairs]
    s = [b for _, b in pairs]
    rows = rows_of(label=y, score=s)
    assert value("roc_auc", rows, positive=1) == pytest.approx(skm.roc_auc_score(y, s), abs=TOL)
    assert value("average_precision", rows, positive=1) == pytest.approx(
        skm.average_precision_score(y, s), abs=TOL
    )
    assert value("log_loss", rows, positive=1) == pytest.approx(skm.log_loss(y, s), abs=TOL)
    assert value("brier", rows, positive=1) == pytest.approx(skm.brier_score_loss(y, s), abs=TOL)


def test_score_metrics_without_both_classes_are_undefined():
    rows = rows_of(label=[1, 1, 1], score=[0.2, 0.4, 0.9])
    with pytest.raises(MetricUndefined, match="metric m: not defined here: .*none is negative"):
        value("roc_auc", rows, positive=1)
    with pytest.raises(MetricUndefined, match=r"none is positive \(positive: '1'\)"):
        value("average_precision", rows, positive="1")
    # defined with a single class: all positives ranked perfectly
    assert value("average_precision", rows, positive=1) == pytest.approx(
        skm.average_precision_score([1, 1, 1], [0.2, 0.4, 0.9]), abs=TOL
    )


def _probabilities(n, k, seed, sharp=2.0):
    rng = random.Random(seed)
    y, probs = [], []
    for _ in range(n):
        t = rng.randrange(k)
        raw = [rng.random() + (sharp * rng.random() if c == t else 0.0) for c in range(k)]
        total = sum(raw)
        probs.append([v / total for v in raw])
        y.append(t)
    return y, probs


def test_multiclass_score_metrics_match_sklearn():
    y, probs = _probabilities(300, 4, 5)
    classes = [0, 1, 2, 3]
    as_lists = rows_of(label=y, probabilities=probs)
    as_objects = rows_of(label=y, probabilities=[{str(c): p[c] for c in classes} for p in probs])
    for rows in (as_lists, as_objects):
        for average in ("macro", "weighted"):
            assert value("roc_auc", rows, classes=classes, average=average) == pytest.approx(
                skm.roc_auc_score(y, probs, multi_class="ovr", average=average, labels=classes),
                abs=TOL,
            )
            assert value(
                "average_precision", rows, classes=classes, average=average
            ) == pytest.approx(
                skm.average_precision_score(y, np.array(probs), average=average), abs=TOL
            )
        assert value("roc_auc", rows, classes=classes) == value(
            "roc_auc", rows, classes=classes, average="macro"
        )
        assert value("log_loss", rows, classes=classes) == pytest.approx(
            skm.log_loss(y, probs, labels=classes), abs=TOL
        )
        assert value("brier", rows, classes=classes) == pytest.approx(
            skm.brier_score_loss(y, probs, labels=classes), abs=TOL
        )


def test_multiclass_string_classes_follow_the_declared_order():
    classes = ["setosa", "versicolor", "virginica"]
    y, probs = _probabilities(90, 3, 6)
    names = [classes[t] for t in y]
    rows = rows_of(label=names, probabilities=[dict(zip(classes, p)) for p in probs])
    shuffled = ["virginica", "setosa", "versicolor"]
    assert value("log_loss", rows, classes=shuffled) == pytest.approx(
        skm.log_loss(names, probs, labels=classes), abs=TOL
    )
    assert value("roc_auc", rows, classes=shuffled) == pytest.approx(
        skm.roc_auc_score(names, probs, multi_class="ovr", labels=classes), abs=TOL
    )


def test_log_loss_clips_certain_mistakes_like_sklearn():
    rows = rows_of(label=[0, 1, 2], probabilities=[[1.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0, 0, 1]])
    expected = skm.log_loss([0, 1, 2], [[1, 0, 0], [1, 0, 0], [0, 0, 1]], labels=[0, 1, 2])
    assert value("log_loss", rows, classes=[0, 1, 2]) == pytest.approx(expected, abs=TOL)
    assert math.isfinite(expected) and expected > 10


def _ece_reference(outcome, confidence, bins):
    """ECE with calibration_curve's bins, in numpy."""
    edges = np.linspace(0.0, 1.0, bins + 1)
    ids = np.searchsorted(edges[1:-1], confidence)
    total = np.bincount(ids, minlength=bins)
    conf = np.bincount(ids, weights=confidence, minlength=bins)
    hits = np.bincount(ids, weights=outcome, minlength=bins)
    return float(np.sum(np.abs(hits - conf)) / len(confidence))


def test_bin_edges_are_numpy_linspace_bit_for_bit():
    for bins in (1, 2, 3, 7, 10, 15, 100, 999):
        assert bin_edges(bins) == np.linspace(0.0, 1.0, bins + 1)[1:-1].tolist()


@pytest.mark.parametrize("bins", [1, 5, 10, 15])
def test_binary_ece_matches_calibration_curve(bins):
    for y, s in SCORE_CASES.values():
        got = value("ece", rows_of(label=y, score=s), positive=1, bins=bins)
        assert got == pytest.approx(_ece_reference(np.array(y), np.array(s), bins), abs=TOL)


def test_binary_ece_weighs_the_calibration_curve_gaps():
    from sklearn.calibration import calibration_curve

    y, s = SCORE_CASES["random"]
    prob_true, prob_pred = calibration_curve(y, s, n_bins=10)
    ids = np.searchsorted(np.linspace(0, 1, 11)[1:-1], s)
    counts = np.bincount(ids, minlength=10)
    counts = counts[counts > 0]
    expected = float(np.sum(counts * np.abs(prob_true - prob_pred)) / len(s))
    assert value("ece", rows_of(label=y, score=s), positive=1, bins=10) == pytest.approx(
        expected, abs=TOL
    )


def test_multiclass_ece_is_top_label_calibration():
    y, probs = _probabilities(400, 3, 7, sharp=1.0)
    p = np.array(probs)
    conf = p.max(axis=1)
    hit = (p.argmax(axis=1) == np.array(y)).astype(float)
    got = value("ece", rows_of(label=y, probabilities=probs), classes=[0, 1, 2], bins=15)
    assert got == pytest.approx(_ece_reference(hit, conf, 15), abs=TOL)


def test_perfectly_calibrated_certain_predictions_have_zero_ece():
    rows = rows_of(label=[1, 0, 1, 0], score=[1.0, 0.0, 1.0, 0.0])
    assert value("ece", rows, positive=1, bins=10) == 0.0


# --------------------------------------------------------------------------- regression


REGRESSION_CASES = {
    "random": (
        [random.Random(1).gauss(3, 2) for _ in range(250)],
        [random.Random(2).gauss(3, 2) for _ in range(250)],
    ),
    "perfect": ([1.0, 2.0, 3.5], [1.0, 2.0, 3.5]),
    "constant-target-exact": ([2.0, 2.0, 2.0], [2.0, 2.0, 2.0]),
    "constant-target-off": ([2.0, 2.0, 2.0], [1.0, 2.0, 3.0]),
    "integers": ([1, 5, 9, 2], [2, 5, 7, 2]),
    "large": ([1e9 + i for i in range(50)], [1e9 + i * 1.01 for i in range(50)]),
}


@pytest.mark.parametrize("case", sorted(REGRESSION_CASES))
def test_regression_metrics_match_sklearn(case):
    t, p = REGRESSION_CASES[case]
    rows = rows_of(target=t, prediction=p)
    assert value("mae", rows) == pytest.approx(skm.mean_absolute_error(t, p), abs=TOL)
    assert value("rmse", rows) == pytest.approx(skm.root_mean_squared_error(t, p), abs=TOL)
    assert value("r2", rows) == pytest.approx(skm.r2_score(t, p), abs=TOL, rel=TOL)


@PROPERTY
@given(
    st.lists(
        st.tuples(st.floats(-1e3, 1e3, allow_nan=False), st.floats(-1e3, 1e3, allow_nan=False)),
        min_size=2,
        max_size=50,
    )
)
def test_regression_metrics_match_sklearn_property(pairs):
    t = [a for a, _ in pairs]
    p = [b for _, b in pairs]
    rows = rows_of(target=t, prediction=p)
    assert value("mae", rows) == pytest.approx(skm.mean_absolute_error(t, p), abs=1e-9)
    assert value("rmse", rows) == pytest.approx(skm.root_mean_squared_error(t, p), abs=1e-9)
    ours = value("r2", rows)
    theirs = skm.r2_score(t, p)
    # sklearn's mean is not exactly rounded; on near-constant targets the two can part a
    # little, so compare there relative to the residual scale
    assert ours == pytest.approx(theirs, abs=1e-7, rel=1e-9)


def test_r2_of_one_sample_is_undefined():
    with pytest.raises(MetricUndefined, match="at least two"):
        value("r2", rows_of(target=[1.0], prediction=[2.0]))


# --------------------------------------------------------------------------- text


# The official SQuAD v2.0 evaluation functions, verbatim in behaviour (the reference).
def _squad_normalize(s):
    def remove_articles(text):
        return re.sub(re.compile(r"\b(a|an|the)\b", re.UNICODE), " ", text)

    def white_space_fix(text):
        return " ".join(text.split())

    def remove_punc(text):
        exclude = set(string.punctuation)
        return "".join(ch for ch in text if ch not in exclude)

    return white_space_fix(remove_articles(remove_punc(s.lower())))


def _squad_tokens(s):
    return _squad_normalize(s).split() if s else []


def _squad_exact(gold, pred):
    return int(_squad_normalize(gold) == _squad_normalize(pred))


def _squad_f1(gold, pred):
    gold_toks, pred_toks = _squad_tokens(gold), _squad_tokens(pred)
    common = Counter(gold_toks) & Counter(pred_toks)
    num_same = sum(common.values())
    if len(gold_toks) == 0 or len(pred_toks) == 0:
        return int(gold_toks == pred_toks)
    if num_same == 0:
        return 0
    precision = 1.0 * num_same / len(pred_toks)
    recall = 1.0 * num_same / len(gold_toks)
    return (2 * precision * recall) / (precision + recall)


TEXT_CASES = [
    ("The Eiffel Tower", ["Eiffel Tower", "the eiffel tower!"]),
    ("in 1889", ["1889"]),
    ("", [""]),
    ("", ["Paris"]),
    ("Paris", [""]),
    ("a an the", ["the"]),
    ("Denver Broncos won", ["Denver Broncos", "Broncos"]),
    ("  spaced   out  ", ["spaced out"]),
    ("café, naïve", ["Café naïve"]),
    ("x y x y", ["x x y"]),
]


def test_text_metrics_match_the_squad_script():
    preds = [p for p, _ in TEXT_CASES]
    refs = [r for _, r in TEXT_CASES]
    rows = rows_of(prediction=preds, reference=refs)
    em = [max(_squad_exact(g, p) for g in r) for p, r in TEXT_CASES]
    f1 = [max(_squad_f1(g, p) for g in r) for p, r in TEXT_CASES]
    assert value("exact_match", rows, normalize="squad") == pytest.approx(np.mean(em), abs=TOL)
    assert value("token_f1", rows) == pytest.approx(np.mean(f1), abs=TOL)
    for (p, r), e, f in zip(TEXT_CASES, em, f1):
        one = rows_of(prediction=[p], reference=[r])
        assert value("exact_match", one, normalize="squad") == e
        assert value("token_f1", one) == f


def test_exact_match_defaults_to_no_normalisation():
    rows = rows_of(prediction=["Paris", "paris ", "Rome"], reference=["Paris", "Paris", "Rome"])
    assert value("exact_match", rows) == pytest.approx(2 / 3, abs=TOL)
    assert value("exact_match", rows, normalize=["lowercase", "whitespace"]) == 1.0
    assert value("exact_match", rows_of(prediction=[""], reference=[""])) == 1.0


@PROPERTY
@given(
    st.text(alphabet="ab The,.!  ", max_size=20),
    st.lists(st.text(alphabet="ab the,.! ", max_size=20), min_size=1, max_size=3),
)
def test_text_metrics_match_the_squad_script_property(pred, refs):
    rows = rows_of(prediction=[pred], reference=[refs])
    assert value("exact_match", rows, normalize="squad") == max(_squad_exact(g, pred) for g in refs)
    assert value("token_f1", rows) == pytest.approx(max(_squad_f1(g, pred) for g in refs), abs=TOL)


def _pass_at_k_exact(n, c, k):
    return 1 - Fraction(int(comb(n - c, k, exact=True)), int(comb(n, k, exact=True)))


@pytest.mark.parametrize("k", [1, 5, 10])
def test_pass_at_k_matches_the_exact_estimator(k):
    rng = random.Random(k)
    ns = [rng.randrange(k, 200) for _ in range(60)] + [k, k, 100]
    cs = [rng.randrange(0, n + 1) for n in ns[:-3]] + [0, k, 100]
    rows = rows_of(n=ns, c=cs)
    expected = sum(_pass_at_k_exact(n, c, k) for n, c in zip(ns, cs)) / len(ns)
    assert value("pass_at_k", rows, k=k) == pytest.approx(float(expected), abs=TOL)


@PROPERTY
@given(
    st.integers(1, 300).flatmap(
        lambda n: st.tuples(st.just(n), st.integers(0, n), st.integers(1, n))
    )
)
def test_pass_at_k_matches_the_exact_estimator_property(nck):
    n, c, k = nck
    got = value("pass_at_k", rows_of(n=[n], c=[c]), k=k)
    assert got == pytest.approx(float(_pass_at_k_exact(n, c, k)), abs=TOL)


def test_mean_matches_numpy():
    xs = [random.Random(4).uniform(-5, 5) for _ in range(100)]
    assert value("mean", rows_of(score=xs), field="score") == pytest.approx(np.mean(xs), abs=TOL)


# --------------------------------------------------------------------------- intervals


def test_percentile_is_numpys_linear_percentile():
    rng = random.Random(9)
    for n in (1, 2, 5, 100, 1001):
        xs = sorted(rng.random() for _ in range(n))
        for q in (0.0, 0.025, 0.05, 0.5, 0.95, 0.975, 1.0):
            assert _percentile(xs, q) == pytest.approx(np.percentile(xs, q * 100), abs=TOL)


EXAMPLES = {
    "accuracy": ({}, "labels"),
    "error_rate": ({}, "labels"),
    "balanced_accuracy": ({}, "labels"),
    "precision": ({"average": "macro"}, "labels"),
    "recall": ({"positive": 1}, "labels"),
    "f1": ({"average": "weighted"}, "labels"),
    "macro_f1": ({}, "labels"),
    "roc_auc": ({"positive": 1}, "scores"),
    "average_precision": ({"classes": [0, 1, 2]}, "probabilities"),
    "log_loss": ({"classes": [0, 1, 2]}, "probabilities"),
    "brier": ({"positive": 1}, "scores"),
    "ece": ({"positive": 1, "bins": 10}, "scores"),
    "mae": ({}, "regression"),
    "rmse": ({}, "regression"),
    "r2": ({}, "regression"),
    "exact_match": ({"normalize": "squad"}, "text"),
    "token_f1": ({}, "text"),
    "pass_at_k": ({"k": 3}, "passes"),
    "mean": ({"field": "score"}, "scores"),
}


def _example_rows(kind, n=120, seed=3):
    rng = random.Random(seed)
    if kind == "labels":
        y, p = _labels(n, 3, 0.7, seed)
        return rows_of(label=y, prediction=p)
    if kind == "scores":
        y, s = _scores(n, seed)
        return rows_of(label=y, score=s)
    if kind == "probabilities":
        y, probs = _probabilities(n, 3, seed)
        return rows_of(label=y, probabilities=probs)
    if kind == "regression":
        t = [rng.gauss(0, 1) for _ in range(n)]
        return rows_of(target=t, prediction=[v + rng.gauss(0, 0.5) for v in t])
    if kind == "text":
        words = ["the cat", "a dog", "Cat", "dog!", ""]
        return rows_of(
            prediction=[rng.choice(words) for _ in range(n)],
            reference=[[rng.choice(words)] for _ in range(n)],
        )
    ns = [rng.randrange(3, 20) for _ in range(n)]
    return rows_of(n=ns, c=[rng.randrange(0, m + 1) for m in ns])


def test_every_compute_has_an_example():
    assert set(EXAMPLES) == set(CATALOGUE)


@pytest.mark.parametrize("compute", sorted(EXAMPLES))
@pytest.mark.parametrize("method", ["bootstrap_percentile", "bootstrap_bca"])
def test_every_metric_has_a_deterministic_bootstrap_interval(compute, method):
    params, kind = EXAMPLES[compute]
    rows = _example_rows(kind)
    definition = {
        "name": compute,
        "compute": compute,
        "ci": {"method": method, "level": 0.9, "resamples": 200},
        **params,
    }
    a = compute_metric(definition, rows, seed=5)
    b = compute_metric(definition, list(rows), seed=5)
    assert a == b
    assert a.ci_low <= a.ci_high
    # the point estimate lies in (or next to) its interval
    width = a.ci_high - a.ci_low
    assert a.ci_low - width <= a.value <= a.ci_high + width


@pytest.mark.parametrize("compute", ["accuracy", "exact_match"])
def test_wilson_interval_for_proportions(compute):
    params, kind = EXAMPLES[compute]
    rows = _example_rows(kind)
    m = compute_metric(
        {"name": "m", "compute": compute, "ci": {"method": "wilson"}, **params}, rows, 0
    )
    n, k = len(rows), round(m.value * len(rows))
    z = 1.959963984540054
    centre = (k / n + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(k / n * (1 - k / n) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    assert m.ci_low == pytest.approx(centre - half, abs=1e-9)
    assert m.ci_high == pytest.approx(centre + half, abs=1e-9)


def test_resamples_without_a_value_are_left_out_and_counted():
    y = [1] * 3 + [0] * 57
    s = [random.Random(i).random() for i in range(60)]
    m = compute_metric(
        {
            "name": "auc",
            "compute": "roc_auc",
            "positive": 1,
            "ci": {"method": "bootstrap_percentile", "resamples": 300},
        },
        rows_of(label=y, score=s),
        seed=1,
    )
    assert 0 < m.undefined_resamples < 300
    assert m.as_dict()["ci"]["undefined_resamples"] == m.undefined_resamples
    assert m.ci_low is not None and m.ci_low <= m.ci_high
    # a metric that is always defined does not carry the key
    acc = compute_metric({"name": "a", "compute": "accuracy"}, _example_rows("labels"), 1)
    assert "undefined_resamples" not in acc.as_dict()["ci"]


def test_catalogue_metrics_resample_with_a_stream_of_the_whole_seed():
    rows = _example_rows("regression")
    definition = {"name": "root-mean-squared-error", "compute": "rmse", "ci": {"resamples": 200}}
    a = compute_metric(definition, rows, seed=5)
    b = compute_metric(definition, rows, seed=6)
    assert (a.ci_low, a.ci_high) != (b.ci_low, b.ci_high)


def test_pre_catalogue_metrics_keep_their_stream_even_where_it_ignores_the_seed():
    # int.from_bytes("seed:name") % 2**63 keeps the last 8 bytes: for a name of 8 bytes
    # or more the seed has no effect. Old images compute so, so the runner must too.
    rows = _example_rows("labels")
    definition = {"name": "accuracy", "compute": "accuracy", "ci": {"resamples": 200}}
    assert compute_metric(definition, rows, 5) == compute_metric(definition, rows, 6)


_DETERMINISM_SCRIPT = """
import json, random, sys
sys.path.insert(0, sys.argv[1])
from runner.shared.metrics import compute_metric
rng = random.Random(1)
names = ["cat", "dog", "bird", "fish", "ant"]
rows = []
for i in range(150):
    label = rng.choice(names)
    probs = [rng.random() for _ in names]
    total = sum(probs)
    rows.append({"id": str(i), "label": label,
                 "prediction": label if rng.random() < 0.6 else rng.choice(names),
                 "score": rng.random(), "probabilities": {n: p / total for n, p in zip(names, probs)}})
defs = [
    {"compute": "f1", "average": "macro"}, {"compute": "f1", "average": "weighted"},
    {"compute": "balanced_accuracy"}, {"compute": "macro_f1"},
    {"compute": "precision", "positive": "dog"},
    {"compute": "roc_auc", "classes": names}, {"compute": "average_precision", "classes": names},
    {"compute": "log_loss", "classes": names}, {"compute": "brier", "classes": names},
    {"compute": "ece", "classes": names, "bins": 7},
    {"compute": "accuracy", "confusion_matrix": True},
]
out = [compute_metric({"name": f"m{i}", "ci": {"method": "bootstrap_bca", "resamples": 150},
                       **d}, rows, seed=3).as_dict() for i, d in enumerate(defs)]
print(json.dumps(out, sort_keys=True))
"""


def test_metrics_are_bit_identical_across_processes_and_hash_seeds():
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = str(Path(__file__).resolve().parents[2])
    outputs = {
        subprocess.run(
            [sys.executable, "-c", _DETERMINISM_SCRIPT, root],
            env={**os.environ, "PYTHONHASHSEED": hash_seed},
            capture_output=True, text=True, check=True,
        ).stdout
        for hash_seed in ("0", "1", "4242")
    }
    assert len(outputs) == 1

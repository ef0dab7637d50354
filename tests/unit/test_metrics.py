import json
import random

import pytest
from sklearn.metrics import accuracy_score, f1_score

from runner.shared.metrics import SampleFormatError, compute_metric, threshold_verdicts
from runner.shared.sample_file import read_samples

pytestmark = pytest.mark.unit


def _samples(n=300, seed=3, acc=0.8, classes=5):
    rng = random.Random(seed)
    out = []
    for i in range(n):
        label = rng.randrange(classes)
        pred = label if rng.random() < acc else rng.randrange(classes)
        out.append({"id": str(i), "label": label, "prediction": pred, "score": rng.random()})
    return out


def test_accuracy_and_macro_f1_match_sklearn():
    s = _samples()
    y = [x["label"] for x in s]
    p = [x["prediction"] for x in s]
    acc = compute_metric({"name": "a", "compute": "accuracy"}, s, seed=1)
    f1 = compute_metric({"name": "f", "compute": "macro_f1"}, s, seed=1)
    assert acc.value == pytest.approx(accuracy_score(y, p), abs=1e-12)
    assert f1.value == pytest.approx(f1_score(y, p, average="macro"), abs=1e-12)


def test_bootstrap_ci_is_deterministic_and_brackets_the_value():
    s = _samples()
    d = {"name": "a", "compute": "accuracy", "ci": {"method": "bootstrap_percentile",
                                                   "level": 0.95, "resamples": 500}}
    a = compute_metric(d, s, seed=7)
    b = compute_metric(d, s, seed=7)
    c = compute_metric(d, s, seed=8)
    assert (a.ci_low, a.ci_high) == (b.ci_low, b.ci_high)
    assert (a.ci_low, a.ci_high) != (c.ci_low, c.ci_high)
    assert a.ci_low < a.value < a.ci_high
    assert 0.03 < a.ci_high - a.ci_low < 0.15


def test_bca_interval_is_close_to_percentile_for_a_symmetric_case():
    s = _samples(n=200)
    base = {"name": "a", "compute": "accuracy"}
    pct = compute_metric({**base, "ci": {"method": "bootstrap_percentile", "resamples": 400}}, s, 1)
    bca = compute_metric({**base, "ci": {"method": "bootstrap_bca", "resamples": 400}}, s, 1)
    assert abs(pct.ci_low - bca.ci_low) < 0.03 and abs(pct.ci_high - bca.ci_high) < 0.03


def test_wilson_interval_known_value():
    # 81 of 100: Wilson 95% interval ≈ [0.7222, 0.8749]
    s = [{"id": str(i), "label": 1, "prediction": 1 if i < 81 else 0} for i in range(100)]
    m = compute_metric({"name": "a", "compute": "accuracy", "ci": {"method": "wilson"}}, s, 0)
    assert m.ci_low == pytest.approx(0.7222, abs=1e-3)
    assert m.ci_high == pytest.approx(0.8749, abs=1e-3)


def test_mean_metric():
    s = [{"id": str(i), "score": v} for i, v in enumerate([1.0, 2.0, 3.0])]
    m = compute_metric({"name": "m", "compute": "mean", "field": "score",
                        "ci": {"method": "none"}}, s, 0)
    assert m.value == 2.0 and m.ci_low is None


def test_read_samples_rejects_duplicates_and_missing_fields(tmp_path):
    defs = [{"name": "a", "compute": "accuracy"}]
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"id": "1", "label": 1, "prediction": 1}) + "\n"
                    + json.dumps({"id": "1", "label": 1, "prediction": 0}) + "\n")
    with pytest.raises(SampleFormatError, match="duplicate sample id"):
        read_samples(path, defs)
    path.write_text(json.dumps({"id": "1", "label": 1}) + "\n")
    with pytest.raises(SampleFormatError, match="missing field"):
        read_samples(path, defs)
    path.write_text("not json\n")
    with pytest.raises(SampleFormatError, match="line 1"):
        read_samples(path, defs)
    path.write_text("")
    with pytest.raises(SampleFormatError, match="no samples"):
        read_samples(path, defs)


def test_threshold_verdicts_respect_direction():
    defs = [{"name": "acc", "threshold": 0.9, "direction": "higher_is_better"},
            {"name": "err", "threshold": 0.1, "direction": "lower_is_better"},
            {"name": "free", "threshold": None}]
    v = threshold_verdicts(defs, {"acc": 0.91, "err": 0.2, "free": 3.0})
    assert v["acc"]["passed"] is True
    assert v["err"]["passed"] is False
    assert v["free"]["passed"] is None


@pytest.mark.parametrize("n", [0, 1, 2, 7, 450, 1001])
def test_resample_draws_what_choices_draws_bit_for_bit(n):
    # the runner recomputes CIs that older images drew with rng.choices: same indices,
    # same stream position after every resample
    from runner.shared.resampling import resample

    records = [("r", i, i * 0.1) for i in range(n)]
    for seed in (0, 1, 1234, 2**63 - 1):
        ours, theirs = random.Random(seed), random.Random(seed)
        for _ in range(20):
            assert resample(ours, records) == theirs.choices(records, k=n)
        assert ours.getstate() == theirs.getstate()

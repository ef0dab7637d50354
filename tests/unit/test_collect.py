import json
import os

import pytest

from runner.backends.collect import collect_results, recompute_metrics
from runner.shared.metrics import compute_metrics

pytestmark = pytest.mark.unit

DEFS = [{"name": "accuracy", "compute": "accuracy",
         "ci": {"method": "bootstrap_percentile", "level": 0.95, "resamples": 200}}]


def _results(tmp_path, tweak=None):
    res = tmp_path / "results"
    res.mkdir()
    rows = [{"id": str(i), "label": i % 3, "prediction": (i % 3) if i % 4 else 0}
            for i in range(60)]
    (res / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    metrics = [m.as_dict() for m in compute_metrics(DEFS, rows, seed=5)]
    if tweak:
        tweak(metrics)
    (res / "metrics.json").write_text(json.dumps({"seed": 5, "metrics": metrics}))
    return res


def test_recompute_accepts_honest_metrics(tmp_path):
    check = recompute_metrics(_results(tmp_path), DEFS, seed=5)
    assert check.problems == []
    assert check.metrics[0]["name"] == "accuracy"


def test_recompute_refuses_inflated_aggregate(tmp_path):
    def inflate(metrics):
        metrics[0]["value"] += 0.01

    check = recompute_metrics(_results(tmp_path, inflate), DEFS, seed=5)
    assert any("accuracy value" in p and "container reported" in p for p in check.problems)


def test_recompute_refuses_narrowed_ci(tmp_path):
    def narrow(metrics):
        metrics[0]["ci"]["low"] += 0.02

    check = recompute_metrics(_results(tmp_path, narrow), DEFS, seed=5)
    assert any("ci.low" in p for p in check.problems)


def test_an_agent_that_reports_point_values_only_is_checked_on_its_values(tmp_path):
    # today's agent leaves the interval to the runner: ci.method "none", no bounds
    def point_only(metrics):
        metrics[0]["ci"] = {"low": None, "high": None, "method": "none", "level": 0.95,
                            "resamples": 0}

    check = recompute_metrics(_results(tmp_path, point_only), DEFS, seed=5)
    assert check.problems == []
    assert check.metrics[0]["ci"]["method"] == "bootstrap_percentile"  # the runner's
    assert check.metrics[0]["ci"]["low"] is not None

    def point_only_inflated(metrics):
        point_only(metrics)
        metrics[0]["value"] += 0.01

    (tmp_path / "b").mkdir()
    check = recompute_metrics(_results(tmp_path / "b", point_only_inflated), DEFS, seed=5)
    assert any("accuracy value" in p and "container reported" in p for p in check.problems)


def test_recompute_refuses_undeclared_metric(tmp_path):
    def extra(metrics):
        metrics.append({"name": "bonus", "value": 1.0, "ci": {}})

    check = recompute_metrics(_results(tmp_path, extra), DEFS, seed=5)
    assert any("bonus" in p for p in check.problems)


def test_recompute_without_per_sample_file(tmp_path):
    res = _results(tmp_path)
    (res / "predictions.jsonl").unlink()
    check = recompute_metrics(res, DEFS, seed=5)
    assert check.problems and "missing" in check.problems[0]


def test_collect_copies_files_and_refuses_links(tmp_path):
    src = tmp_path / "src"
    (src / "logs").mkdir(parents=True)
    (src / "a.txt").write_text("a")
    (src / "logs" / "b.txt").write_text("b")
    os.symlink("/etc/shadow", src / "evil")
    os.symlink("/etc", src / "logs" / "dir-link")
    os.mkfifo(src / "fifo")
    out = collect_results(src, tmp_path / "dest")
    assert sorted(out.files) == ["a.txt", "logs/b.txt"]
    assert (tmp_path / "dest" / "logs" / "b.txt").read_text() == "b"
    assert not (tmp_path / "dest" / "evil").exists()
    joined = " ".join(out.problems)
    assert "'evil': is a symlink" in joined
    assert "'logs/dir-link': is a symlink" in joined
    assert "'fifo': not a regular file" in joined


CATALOGUE_DEFS = [
    {"name": "f1", "compute": "f1", "average": "macro", "confusion_matrix": True,
     "ci": {"method": "bootstrap_bca", "level": 0.9, "resamples": 200}},
    {"name": "auc", "compute": "roc_auc", "positive": 1, "fields": {"score": "p"},
     "ci": {"method": "bootstrap_percentile", "level": 0.95, "resamples": 200}},
]


def _catalogue_results(tmp_path, rows, tweak=None):
    res = tmp_path / "results"
    res.mkdir()
    (res / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    metrics = [m.as_dict() for m in compute_metrics(CATALOGUE_DEFS, rows, seed=5)]
    if tweak:
        tweak(metrics)
    (res / "metrics.json").write_text(json.dumps({"seed": 5, "metrics": metrics}))
    return res


def _binary_rows(n=80):
    return [{"id": str(i), "label": i % 2, "prediction": (i % 2) if i % 5 else 1 - i % 2,
             "p": ((i * 37) % 100) / 100} for i in range(n)]


def test_recompute_accepts_catalogue_metrics_and_their_confusion_matrix(tmp_path):
    check = recompute_metrics(_catalogue_results(tmp_path, _binary_rows()), CATALOGUE_DEFS, 5)
    assert check.problems == []
    assert check.metrics[0]["confusion_matrix"]["labels"] == [0, 1]
    assert sum(map(sum, check.metrics[0]["confusion_matrix"]["counts"])) == 80


def test_recompute_refuses_a_doctored_confusion_matrix(tmp_path):
    def doctor(metrics):
        metrics[0]["confusion_matrix"]["counts"][0][0] += 1

    check = recompute_metrics(_catalogue_results(tmp_path, _binary_rows(), doctor),
                              CATALOGUE_DEFS, 5)
    assert any("f1 confusion_matrix" in p for p in check.problems)


def test_recompute_reports_a_metric_the_samples_cannot_define(tmp_path):
    rows = [{**r, "label": 1} for r in _binary_rows()]
    res = tmp_path / "results"
    res.mkdir()
    (res / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    check = recompute_metrics(res, CATALOGUE_DEFS, 5)
    assert check.metrics == []
    assert "metric auc: not defined here" in check.problems[0]
    assert "none is negative" in check.problems[0]

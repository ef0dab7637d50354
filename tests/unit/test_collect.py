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

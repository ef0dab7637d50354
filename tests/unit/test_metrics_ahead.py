"""The recomputation begun while the container winds down stands only for the same bytes."""

import json
import threading
from dataclasses import replace

import pytest

from runner.backends.collect import recompute_metrics
from runner.backends.metrics_ahead import MetricsAhead

pytestmark = pytest.mark.unit

DEFS = [
    {"name": "accuracy", "compute": "accuracy",
     "ci": {"method": "bootstrap_percentile", "level": 0.95, "resamples": 300}},
    {"name": "macro-f1", "compute": "macro_f1",
     "ci": {"method": "bootstrap_percentile", "level": 0.95, "resamples": 300}},
]
ROWS = [{"id": str(i), "label": i % 3, "prediction": (i % 3) if i % 4 else 0} for i in range(80)]


def _results(tmp_path, rows=ROWS):
    res = tmp_path / "results"
    (res / "logs").mkdir(parents=True, exist_ok=True)
    (res / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return res


def _ended(res):
    event = {"event": "evaluation_end", "returncode": 0, "source": "agent"}
    (res / "logs" / "events.jsonl").write_text(json.dumps(event, sort_keys=True) + "\n")


def _ahead(res, plan=(DEFS, 5)):
    return MetricsAhead(res, lambda: plan, poll_s=0.01).start()


def _wait_for(ahead):
    for _ in range(500):
        if ahead._result is not None:
            break
        threading.Event().wait(0.01)
    return ahead.result()


def test_the_metrics_are_computed_once_the_evaluation_has_ended(tmp_path):
    res = _results(tmp_path)
    ahead = _ahead(res)
    threading.Event().wait(0.1)
    assert ahead._result is None  # not before the agent says the evaluation ended
    _ended(res)
    recomputed = _wait_for(ahead)
    assert recomputed is not None
    plain = recompute_metrics(res, DEFS, 5)
    with_ahead = recompute_metrics(res, DEFS, 5, ahead=recomputed)
    assert with_ahead.metrics == plain.metrics  # bit for bit, every value and bound
    assert with_ahead.problems == plain.problems


def test_nothing_is_computed_before_there_is_a_plan(tmp_path):
    res = _results(tmp_path)
    _ended(res)
    ahead = _ahead(res, plan=None)
    threading.Event().wait(0.1)
    assert ahead.result() is None


def test_a_result_stands_only_for_the_bytes_it_was_computed_from(tmp_path):
    res = _results(tmp_path)
    _ended(res)
    recomputed = _wait_for(_ahead(res))
    assert recomputed is not None
    # a forged result for these very bytes is taken (so the check below can fail) …
    forged = replace(recomputed, metrics=[{**m, "value": 0.5} for m in recomputed.metrics])
    assert recompute_metrics(res, DEFS, 5, ahead=forged).metrics[0]["value"] == 0.5
    # … and ignored once the file changed after it was read, or under another seed
    rows = [{**r, "prediction": r["label"]} for r in ROWS]
    _results(tmp_path, rows)
    changed = recompute_metrics(res, DEFS, 5, ahead=forged)
    assert changed.metrics == recompute_metrics(res, DEFS, 5).metrics
    assert changed.metrics[0]["value"] == 1.0
    assert recompute_metrics(res, DEFS, 6, ahead=forged).metrics[0]["value"] != 0.5


def test_unusable_outputs_leave_the_recomputation_to_the_collected_file(tmp_path):
    res = _results(tmp_path)
    (res / "predictions.jsonl").write_text("not json\n")
    _ended(res)
    ahead = _ahead(res)
    threading.Event().wait(0.2)
    assert ahead.result() is None
    check = recompute_metrics(res, DEFS, 5, ahead=None)
    assert check.problems and "unusable" in check.problems[0]


def test_a_collected_file_that_cannot_be_read_is_recomputed_and_reported(tmp_path):
    res = _results(tmp_path)
    _ended(res)
    recomputed = _wait_for(_ahead(res))
    assert recomputed is not None
    (res / "predictions.jsonl").unlink()
    (res / "predictions.jsonl").symlink_to(tmp_path / "elsewhere.jsonl")
    assert not recomputed.fits(res / "predictions.jsonl", DEFS, 5)
    check = recompute_metrics(res, DEFS, 5, ahead=recomputed)
    assert check.metrics == [] and check.problems

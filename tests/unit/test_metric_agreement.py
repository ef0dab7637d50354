"""The agent's metrics and the runner's recomputation agree, and a partial output says so.

The real agent code runs in-process (its rootfs walk and environment capture stubbed), the
evaluation is a tiny Python command writing the per-sample file, and the runner's halves
(recompute, judge) read what it left, as after a sandboxed run.
"""

import json
import sys
from pathlib import Path

import pytest

import runner.agent.__main__ as agent
from runner.backends.collect import recompute_available, recompute_metrics
from runner.model.outcome import Outcome
from runner.model.plan import BackendResult, RunPlan
from runner.model.spec_metrics import MetricSpec
from runner.shared.protocol import AgentExit
from runner.workflows.judge import judge, judge_metrics, judge_partial, read_container_report

pytestmark = pytest.mark.unit

ROOTFS = "sha256:" + "b" * 64
METRICS = [
    MetricSpec(name="acc", compute="accuracy", threshold=0.5),
    MetricSpec(name="f1-1", compute="f1", positive=1, confusion_matrix=True,
               ci={"method": "bootstrap_bca", "resamples": 200}),
    MetricSpec(name="auc", compute="roc_auc", positive=1, fields={"score": "p"}),
    MetricSpec(name="ece", compute="ece", positive=1, bins=10, fields={"score": "p"}),
    MetricSpec(name="ll", compute="log_loss", classes=[0, 1, 2], ci={"resamples": 200}),
    MetricSpec(name="rmse", compute="rmse", fields={"target": "y", "prediction": "yhat"}),
    MetricSpec(name="em", compute="exact_match", normalize="squad", ci={"method": "wilson"}),
    MetricSpec(name="pass-2", compute="pass_at_k", k=2),
]


def _rows(n=90, drop=()):
    rows = []
    for i in range(n):
        label = i % 3 if i % 2 else 1
        p = ((i * 41) % 100) / 100
        third = [0.2, 0.5, 0.3] if i % 4 else [0.6, 0.2, 0.2]
        row = {"id": f"s{i}", "label": label, "prediction": label if i % 5 else 0, "p": p,
               "probabilities": third, "y": i / 10, "yhat": i / 10 + (i % 7) / 20,
               "reference": ["The answer", "answer"], "n": 5, "c": i % 6 if i % 6 < 5 else 5}
        row["prediction_text"] = "answer" if i % 3 else "no"
        for key in drop:
            row.pop(key, None)
        rows.append(row)
    return rows


def _plan(tmp_path, rows):
    source = tmp_path / "outputs.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    copy = "import os, shutil, sys; shutil.copy(sys.argv[1], os.environ['EVALRUN_OUTPUT'])"
    definitions = [m.definition() for m in METRICS]
    # exact match reads the text prediction under its own name
    definitions[6]["fields"] = {"prediction": "prediction_text"}
    return RunPlan(
        run_id="r-1", attempt=0, image_ref="127.0.0.1:5000/evalrun/x@sha256:" + "a" * 64,
        expected_rootfs_digest=ROOTFS, runtime="runc",
        command=[sys.executable, "-c", copy, str(source)], params={}, seed=7,
        metrics=definitions, expect={}, inputs=[], timeout_s=60, cpus=1.0, memory_mib=256,
        pids=64, spec_digest="sha256:" + "c" * 64, lock_digest="sha256:" + "d" * 64,
        spec_name="x",
    )


def _run_agent(tmp_path, monkeypatch, rows):
    monkeypatch.setattr(agent, "rootfs_digest", lambda root: (ROOTFS, 1))
    # the full check runs in the agent's usage module (no digest table here)
    monkeypatch.setattr("runner.agent.usage.rootfs_digest", lambda root: (ROOTFS, 1))
    monkeypatch.setattr(agent, "capture_environment", lambda ref: {"gpu": {"visible": False}})
    plan = _plan(tmp_path, rows)
    results = tmp_path / "results"
    results.mkdir()
    code = agent.run_plan(plan.agent_plan(), results)
    return plan, results, code


def _result(code):
    return BackendResult(backend="test", exit_code=int(code), image_digest_confirmed=True,
                         runtime="runc")


def test_runner_recomputes_the_agents_catalogue_metrics_exactly(tmp_path, monkeypatch):
    plan, results, code = _run_agent(tmp_path, monkeypatch, _rows())
    assert code == AgentExit.OK, (results / "summary.json").read_text()
    check = recompute_metrics(results, plan.metrics, plan.seed)
    assert check.problems == []
    by = {m["name"]: m for m in check.metrics}
    assert set(by) == {m.name for m in METRICS}
    assert by["f1-1"]["confusion_matrix"]["labels"] == [0, 1, 2]
    judged = judge_metrics(plan, _result(code), read_container_report(results), check)
    assert judged.outcome is Outcome.PASSED


def test_missing_fields_fail_the_run_but_keep_what_could_be_computed(tmp_path, monkeypatch):
    rows = _rows()
    for r in rows[3:]:
        r.pop("p")
    plan, results, code = _run_agent(tmp_path, monkeypatch, rows)
    assert code == AgentExit.EVAL_OUTPUT
    report = read_container_report(results)
    assert report.summary["outcome"] == "bad_output"
    first = judge(plan, _result(code), [], report)
    assert first is not None and first.outcome is Outcome.BAD_OUTPUT
    judged = judge_partial(first, recompute_available(results, plan.metrics, plan.seed))
    assert judged.outcome is Outcome.BAD_OUTPUT
    assert judged.reason == report.summary["reason"]  # agent and runner word it alike
    assert judged.reason.startswith("per-sample output unusable for 2 of 8 metrics (auc: "
                                    "predictions.jsonl line 4: missing field(s) ['p']; ece: ")
    assert judged.reason.endswith("computed: acc, f1-1, ll, rmse, em, pass-2")
    assert [m.name for m in judged.facts.metrics] == ["acc", "f1-1", "ll", "rmse", "em", "pass-2"]


def test_a_wrongly_shaped_field_sets_only_its_metric_aside(tmp_path, monkeypatch):
    rows = _rows()
    rows[10]["probabilities"] = [0.5, 0.5]
    plan, results, code = _run_agent(tmp_path, monkeypatch, rows)
    check = recompute_available(results, plan.metrics, plan.seed)
    assert check.problems == []
    assert list(check.unusable) == ["ll"]
    assert "line 11: field 'probabilities': expected probabilities for the classes" in (
        check.unusable["ll"]
    )
    assert len(check.metrics) == 7


def test_a_container_inventing_a_partial_metric_is_an_integrity_failure(tmp_path, monkeypatch):
    rows = _rows()
    for r in rows:
        r.pop("p")
    plan, results, code = _run_agent(tmp_path, monkeypatch, rows)
    reported = json.loads((results / "metrics.json").read_text())
    reported["metrics"].append({"name": "auc", "value": 0.99, "ci": {}})
    reported["metrics"][0]["value"] = 1.0
    (results / "metrics.json").write_text(json.dumps(reported))
    first = judge(plan, _result(code), [], read_container_report(results))
    judged = judge_partial(first, recompute_available(results, plan.metrics, plan.seed))
    assert judged.outcome is Outcome.INTEGRITY_FAILURE
    assert "metric acc value: container reported 1.0" in judged.reason
    assert "metric auc: reported by the container, but the per-sample outputs cannot give it" in (
        judged.reason
    )


def test_outputs_no_metric_can_use_keep_the_agents_verdict(tmp_path, monkeypatch):
    rows = _rows()
    rows[5].pop("id")
    plan, results, code = _run_agent(tmp_path, monkeypatch, rows)
    first = judge(plan, _result(code), [], read_container_report(results))
    assert first is not None and "line 6: missing field(s) ['id'" in first.reason
    assert judge_partial(first, recompute_available(results, plan.metrics, plan.seed)) is first


def test_the_report_shows_a_requested_confusion_matrix(tmp_path, monkeypatch):
    from runner.model.predicate import MetricResult
    from runner.render.markdown import MAX_MATRIX_CLASSES, confusion_lines

    plan, results, _ = _run_agent(tmp_path, monkeypatch, _rows())
    check = recompute_metrics(results, plan.metrics, plan.seed)
    lines = confusion_lines([MetricResult.model_validate(m) for m in check.metrics])
    assert "Confusion matrix of f1-1 (rows: true label, columns: predicted):" in lines
    assert "| true \\ predicted | 0 | 1 | 2 |" in lines
    rows = [line for line in lines if line.startswith(("| 0 |", "| 1 |", "| 2 |"))]
    assert sum(int(c) for r in rows for c in r.strip("| ").split(" | ")[1:]) == 90
    many = MetricResult.model_validate({"name": "big", "confusion_matrix": {
        "labels": list(range(MAX_MATRIX_CLASSES + 1)),
        "counts": [[0] * (MAX_MATRIX_CLASSES + 1)] * (MAX_MATRIX_CLASSES + 1)}})
    assert confusion_lines([many])[-1] == "21 classes: see `confusion_matrix` in the predicate."

"""evalrun diff: changes grouped by lineage, metric deltas, tolerance and CI overlap."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from history_fixtures import predicate, store_run

from runner.cli.main import main
from runner.model.predicate import MetricResult, RunPredicate
from runner.workflows.diff import diff_runs as _diff_runs
from runner.workflows.diff import format_diff, judge_metric, overall_verdict
from runner.workflows.rerun import judge_reproduction as _judge_reproduction
from runner.bundle.signing import generate_keypair, load_signer
from runner.bundle.store import Store

pytestmark = pytest.mark.unit


def metric(value, low=None, high=None):
    data = {"name": "accuracy", "value": value}
    if low is not None:
        data["ci"] = {"low": low, "high": high}
    return MetricResult.model_validate(data)


# the workflows take typed predicates; these tests build them as dicts
def diff_runs(a: dict, b: dict, **kwargs):
    return _diff_runs(RunPredicate.model_validate(a), RunPredicate.model_validate(b), **kwargs)


def judge_reproduction(a: dict, b: dict, tolerance):
    return _judge_reproduction(
        RunPredicate.model_validate(a), RunPredicate.model_validate(b), tolerance
    )


def test_identical_runs_differ_in_nothing() -> None:
    d = diff_runs(predicate(), predicate(run_id="r-other"))
    assert d.changes == ()
    assert [m.verdict for m in d.metrics] == ["identical", "identical"]
    assert all(m.delta == 0 for m in d.metrics)


def test_seed_change_is_config_and_shows_metric_deltas() -> None:
    b = predicate(**{"seeds.seed": 99})
    b["metrics"][0]["value"] = 0.93
    b["metrics"][0]["ci"].update(low=0.91, high=0.95)
    d = diff_runs(predicate(), b)
    assert [(c.group, c.field, c.a, c.b) for c in d.changes] == [("config", "seeds.seed", 1234, 99)]
    acc = d.metrics[0]
    assert acc.delta == pytest.approx(0.93 - 0.9244444444444444)
    assert acc.ci_overlap is True
    assert acc.verdict == "within_ci"
    text = format_diff(d)
    assert "config:\n  seeds.seed: 1234 → 99" in text
    assert "environment: same" in text and "+0.0056" in text


def test_changes_are_grouped_by_lineage() -> None:
    b = predicate(
        **{
            "image.ref": "127.0.0.1:5000/evalrun/x@sha256:" + "0" * 64,
            "source.commit": "3" * 40,
            "model.sha256": "4" * 64,
            "params": {"batch": 64, "extra": True},
            "environment.packages": [{"name": "numpy", "version": "2.3.0"},
                                     {"name": "torch", "version": "2.5.0"}],
            "environment.gpu": {"visible": True, "gpus": [{"name": "H100"}],
                                "driver_version": "550.1"},
        }
    )
    b["datasets"][0]["sha256"] = "5" * 64
    b["datasets"][0]["split"] = "validation"
    b["metrics"][1]["threshold"] = 0.95
    d = diff_runs(predicate(), b)
    fields = {g: [c.field for c in d.group(g)] for g in ("environment", "code", "data", "config")}
    assert fields["environment"] == [
        "image.ref",
        "environment.gpu.driver_version",
        "environment.gpu.gpus",
        "packages.numpy",
        "packages.torch",
    ]
    assert fields["code"] == ["source.commit"]
    assert fields["data"] == [
        "model.sha256",
        "datasets.digits-test.sha256",
        "datasets.digits-test.split",
    ]
    assert fields["config"] == ["params.batch", "params.extra", "metrics.macro-f1.threshold"]
    as_json = d.as_dict()
    assert as_json["changes"]["environment"][3] == {"field": "packages.numpy", "a": "2.2.6",
                                                   "b": "2.3.0"}


def test_tolerance_and_ci_overlap_are_judged_separately() -> None:
    m = judge_metric("acc", metric(0.90, 0.88, 0.92), metric(0.95, 0.93, 0.97), tolerance=0.01)
    assert m.exceeds_tolerance is True and m.ci_overlap is False and m.verdict == "changed"
    m = judge_metric("acc", metric(0.90, 0.88, 0.92), metric(0.905, 0.89, 0.92), tolerance=0.01)
    assert m.exceeds_tolerance is False and m.verdict == "within_tolerance"
    m = judge_metric("acc", metric(0.90, 0.88, 0.92), metric(0.91, 0.89, 0.93))
    assert m.tolerance is None and m.exceeds_tolerance is None and m.verdict == "within_ci"
    m = judge_metric("acc", metric(0.90), None)
    assert m.verdict == "missing" and m.delta is None


def test_overall_verdict_is_the_worst_metric() -> None:
    good = judge_metric("a", metric(0.9), metric(0.9))
    drift = judge_metric("b", metric(0.9, 0.89, 0.91), metric(0.8))
    assert overall_verdict([good]) == "identical"
    assert overall_verdict([good, drift]) == "changed"
    assert overall_verdict([]) == "missing"


def test_reproduction_verdicts() -> None:
    same = judge_reproduction(predicate(), predicate(), None)
    assert same.verdict == "identical" and same.reason is None
    moved = predicate()
    moved["metrics"][0]["value"] = 0.5
    changed = judge_reproduction(predicate(), moved, None)
    assert changed.verdict == "changed" and "accuracy" in (changed.reason or "")
    failed = judge_reproduction(predicate(), predicate(metrics=[], outcome="timeout"), None)
    assert failed.verdict == "failed" and "timeout" in (failed.reason or "")


def test_cli_diff_of_two_stored_runs(tmp_path: Path, monkeypatch, capsys) -> None:
    home = tmp_path / "home"
    monkeypatch.setenv("EVALRUN_HOME", str(home))
    (home / "keys").mkdir(parents=True)
    generate_keypair(home / "keys" / "evalrun.key", home / "keys" / "evalrun.pub")
    signer = load_signer(home / "keys" / "evalrun.key")
    store = Store(home)
    store_run(store, signer, predicate(run_id="r-aaaaaaaaaaaaaaaaaaaaaaaa"))
    b = predicate(run_id="r-bbbbbbbbbbbbbbbbbbbbbbbb", **{"seeds.seed": 5})
    b["metrics"][0]["value"] = 0.8
    store_run(store, signer, b)
    # b's gating accuracy dropped below a's CI by more than the tolerance: the gate fails
    assert main(["diff", "r-aaaaaaaa", "r-bbbbbbbb", "--tolerance", "0.01", "--json"]) == 6
    out = json.loads(capsys.readouterr().out)
    assert out["changes"]["config"] == [{"field": "seeds.seed", "a": 1234, "b": 5}]
    assert out["metrics"][0]["exceeds_tolerance"] is True
    assert out["metrics"][0]["verdict"] == "changed"
    assert out["regressed"] == ["accuracy"] and out["exit_code"] == 6
    # the other way round it is an improvement: exit 0
    assert main(["diff", "r-bbbbbbbb", "r-aaaaaaaa", "--json"]) == 0

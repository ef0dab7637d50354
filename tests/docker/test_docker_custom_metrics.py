"""Custom metrics end to end: recomputed by the runner in a separate gVisor sandbox of the
pinned image, never taken from the evaluation, sealed with the file and image digests."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import yaml
from conftest import EXAMPLE, predicate_of

from runner.backends.collect import MetricCheck
from runner.backends.custom_metric import CustomMetricSandbox
from runner.errors import IntegrityError
from runner.workflows.custom_metrics import custom_jobs, with_custom_metrics
from runner.workflows.run import load_locked, make_plan

pytestmark = pytest.mark.docker

COST_METRICS = yaml.safe_load((EXAMPLE / "eval-cost.yaml").read_text())["metrics"]


def _example_function():
    """The example's metric, loaded here only to check the sandbox's number (test code)."""
    spec = importlib.util.spec_from_file_location(
        "cost", EXAMPLE / "metrics" / "cost_weighted_error.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.cost_weighted_error


def _samples(bundle: Path) -> list[dict]:
    lines = (bundle / "results" / "predictions.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def test_custom_metric_is_recomputed_in_a_sandbox_and_sealed(vcli, variant):
    spec_path = variant(metrics=COST_METRICS)
    code, out = vcli.json("run", str(spec_path))
    assert code == 0, out
    bundle = Path(out["bundle"])
    pred = predicate_of(bundle)
    assert pred["outcome"] == "passed", pred.get("reason")
    metric = {m["name"]: m for m in pred["metrics"]}["cost-weighted-error"]
    expected = _example_function()(_samples(bundle))
    assert metric["value"] == pytest.approx(expected, abs=1e-12)
    assert metric["ci"]["low"] <= metric["value"] <= metric["ci"]["high"]
    assert metric["ci"]["resamples"] == 1000 and metric["direction"] == "lower_is_better"
    lock = json.loads((spec_path.parent / "eval.lock.json").read_text())
    assert metric["custom"]["file_sha256"] == lock["custom_metrics"][0]["digest"]
    assert metric["custom"]["function"] == "cost_weighted_error"
    assert metric["custom"]["recomputed_in"] == {
        "image": pred["image"]["digest"],
        "runtime": "runsc",
        "network": "none",
    }
    # the bundle keeps the code the number came from
    carried = bundle / "custom_metrics" / "metrics" / "cost_weighted_error.py"
    assert carried.read_bytes() == (EXAMPLE / "metrics" / "cost_weighted_error.py").read_bytes()
    # a re-run from the bundle alone (its metric file travels in it) reproduces the value
    # and the interval: the runner controls the resampling
    code, again = vcli.json("rerun", out["run_id"], "--inputs", str(spec_path.parent))
    assert code == 0 and again["verdict"] == "identical", again
    metric_again = {m["name"]: m for m in predicate_of(Path(again["bundle"]))["metrics"]}
    assert metric_again["cost-weighted-error"]["ci"] == metric["ci"]


def test_a_tampered_reported_value_is_overridden_by_the_recompute(variant, tmp_path):
    spec_path = variant(metrics=COST_METRICS)
    spec, lock = load_locked(spec_path)
    plan = make_plan(spec, lock, [], 0)
    jobs = custom_jobs(spec, spec_path, lock)
    results = tmp_path / "results"
    results.mkdir()
    samples = [
        {"id": f"s{i}", "label": i % 10, "prediction": (i % 10) if i % 4 else (i + 3) % 10}
        for i in range(200)
    ]
    (results / "predictions.jsonl").write_text("".join(json.dumps(s) + "\n" for s in samples))
    # what a compromised container claims: a perfect score
    (results / "metrics.json").write_text(
        json.dumps({"metrics": [{"name": "cost-weighted-error", "value": 0.0}]})
    )
    check = with_custom_metrics(MetricCheck([], []), results, plan, jobs, CustomMetricSandbox())
    (metric,) = check.metrics
    assert metric["value"] == pytest.approx(_example_function()(samples), abs=1e-12)
    assert metric["value"] > 0.2
    assert metric["custom"]["container_reported"] == 0.0
    assert metric["custom"]["overridden"] is True


def test_a_metric_returning_no_number_fails_the_run_with_exit_3(vcli, variant):
    spec_path = variant(
        lock=False,
        metrics=[
            {"name": "accuracy", "compute": "accuracy"},
            {
                "name": "broken",
                "compute": "custom",
                "custom": {"file": "metrics/broken.py", "function": "broken"},
                "ci": {"method": "none"},
            },
        ],
    )
    # the function tries to reach the network and write its mount; only when both fail
    # does it get as far as returning its (wrong) type
    (spec_path.parent / "metrics" / "broken.py").write_text(
        "import socket\n"
        "def broken(samples):\n"
        "    try:\n"
        "        socket.create_connection(('127.0.0.1', 5000), timeout=2)\n"
        "        reached = 'network'\n"
        "    except OSError:\n"
        "        reached = 'no network'\n"
        "    try:\n"
        "        open('/evalrun-metric/x', 'w')\n"
        "        wrote = 'writable'\n"
        "    except OSError:\n"
        "        wrote = 'read-only'\n"
        "    if (reached, wrote) != ('no network', 'read-only'):\n"
        "        raise RuntimeError(reached + ', ' + wrote)\n"
        "    return 'isolated'\n"
    )
    assert vcli("lock", str(spec_path)).returncode == 0
    code, out = vcli.json("run", str(spec_path))
    assert code == 3, out
    pred = predicate_of(Path(out["bundle"]))
    assert pred["outcome"] == "integrity_failure"
    assert "custom metric broken could not be recomputed" in pred["reason"]
    assert "returned str, expected a finite number" in pred["reason"]

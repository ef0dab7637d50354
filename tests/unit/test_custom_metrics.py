"""Custom metrics, the plumbing: spec and lock checks, the sandbox policy, and how the
runner checks what the recompute sandbox reports (the sandbox itself: tests/docker)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from runner.backends.collect import recompute_metrics
from runner.backends.custom_metric import (
    CustomMetricJob,
    CustomMetricSandbox,
    recompute_policy,
    resample_seed,
    result_from_driver,
)
from runner.build.custom_metrics import custom_metric_records
from runner.cli.main import main
from runner.errors import EnvironmentMismatch, IntegrityError, SpecError
from runner.model.spec import load_spec
from runner.shared import custom_metric as driver

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "digits"
COST = {
    "name": "cost",
    "compute": "custom",
    "custom": {"file": "metrics/cost.py", "function": "cost"},
    "direction": "lower_is_better",
}
METRIC_CODE = (
    "def cost(samples):\n"
    "    return sum(s['label'] != s['prediction'] for s in samples) / len(samples)\n"
)


def _spec(tmp_path: Path, *metrics: dict, code: str | None = METRIC_CODE) -> Path:
    data = yaml.safe_load((EXAMPLE / "eval.yaml").read_text())
    data["metrics"] = list(metrics)
    path = tmp_path / "eval.yaml"
    path.write_text(yaml.safe_dump(data))
    if code is not None:
        (tmp_path / "metrics").mkdir(exist_ok=True)
        (tmp_path / "metrics" / "cost.py").write_text(code)
    return path


def _problems(tmp_path: Path, metric: dict) -> str:
    with pytest.raises(SpecError) as exc:
        load_spec(_spec(tmp_path, metric))
    return json.dumps(exc.value.problems)


# --------------------------------------------------------------------------- spec


def test_the_example_spec_with_a_custom_metric_validates():
    spec = load_spec(EXAMPLE / "eval-cost.yaml")
    custom = [m for m in spec.metrics if m.custom is not None]
    assert [m.definition()["custom"] for m in custom] == [
        {"file": "metrics/cost_weighted_error.py", "function": "cost_weighted_error"}
    ]
    (record,) = custom_metric_records(spec, EXAMPLE / "eval-cost.yaml")
    assert record.digest.startswith("sha256:") and record.name == "cost-weighted-error"


def test_catalogue_metrics_are_defined_as_before():
    spec = load_spec(EXAMPLE / "eval.yaml")
    assert all("custom" not in m.definition() for m in spec.metrics)


@pytest.mark.parametrize(
    ("metric", "says"),
    [
        ({"name": "c", "compute": "custom"}, "compute: custom needs 'custom:"),
        ({**COST, "compute": "accuracy"}, "'custom' needs compute: custom"),
        ({**COST, "positive": 1}, "do(es) not apply to compute: custom"),
        ({**COST, "custom": {"file": "/etc/cost.py", "function": "f"}}, "relative path"),
        ({**COST, "custom": {"file": "../cost.py", "function": "f"}}, "relative path"),
        ({**COST, "custom": {"file": "cost.txt", "function": "f"}}, "Python file"),
        ({**COST, "custom": {"file": "c.py", "function": "not a name"}}, "function"),
        ({**COST, "ci": {"method": "bootstrap_bca"}}, "not available for compute: custom"),
    ],
)
def test_bad_custom_metric_declarations_are_refused(tmp_path, metric, says):
    assert says in _problems(tmp_path, metric)


@pytest.mark.parametrize(
    ("code", "says"),
    [
        (None, "metrics/cost.py not found"),
        ("def other(samples):\n    return 0\n", "defines no function 'cost' (found: ['other'])"),
        ("def cost(samples:\n", "is not valid Python"),
        ("cost = lambda samples: 0\n", "defines no function 'cost'"),
    ],
)
def test_the_metric_file_is_checked_without_running_it(tmp_path, code, says):
    path = _spec(tmp_path, COST, code=code)
    with pytest.raises(SpecError) as exc:
        custom_metric_records(load_spec(path), path)
    assert exc.value.exit_code == 2
    (where, problem), = exc.value.problems
    assert where == "metrics[0].custom" and says in problem


def test_the_metric_file_is_never_imported_on_the_host(tmp_path):
    marker = tmp_path / "ran"
    path = _spec(tmp_path, COST, code=f"open({str(marker)!r}, 'w')\n" + METRIC_CODE)
    custom_metric_records(load_spec(path), path)
    assert not marker.exists()


def test_validate_names_the_missing_function_with_exit_2(tmp_path, capsys):
    path = _spec(tmp_path, COST, code="def other(samples):\n    return 0\n")
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert "metrics[0].custom" in err and "defines no function 'cost'" in err


# --------------------------------------------------------------------------- the sandbox


def test_the_recompute_sandbox_is_gvisor_without_network_and_sees_two_files(tmp_path):
    policy = recompute_policy(
        "127.0.0.1:5000/evalrun/x@sha256:" + "a" * 64,
        run_id="r-1",
        index=0,
        mount_dir=tmp_path,
        args={"function": "cost", "seed": 1, "resamples": 10},
        memory_mib=512,
        cpus=1.0,
        pids=64,
    )
    options = policy.engine_options()
    assert options["runtime"] == "runsc" and options["network_mode"] == "none"
    assert options["read_only"] is True and options["cap_drop"] == ["ALL"]
    assert options["security_opt"] == ["no-new-privileges"]
    assert options["user"] == "65532:65532" and options["tmpfs"] == {}
    assert options["entrypoint"][:4] == ["python3", "-I", "-B", "-c"]
    assert [(m.target, m.read_only) for m in policy.mounts] == [(driver.MOUNT, True)]
    with pytest.raises(ValueError):
        recompute_policy(
            "127.0.0.1:5000/evalrun/x:latest",
            run_id="r-1",
            index=0,
            mount_dir=tmp_path,
            args={},
            memory_mib=512,
            cpus=1.0,
            pids=64,
        )


def test_no_docker_engine_refuses_custom_metrics_with_exit_4(monkeypatch):
    monkeypatch.setenv("DOCKER_HOST", "unix:///nonexistent/docker.sock")
    with pytest.raises(EnvironmentMismatch) as exc:
        CustomMetricSandbox().preflight()
    assert exc.value.exit_code == 4
    assert "custom metrics" in exc.value.message and "gVisor" in exc.value.message


# --------------------------------------------------------------------------- the driver


def _job(tmp_path: Path, resamples: int = 200) -> CustomMetricJob:
    definition = {**COST, "ci": {"method": "bootstrap_percentile", "level": 0.9,
                                 "resamples": resamples}}
    return CustomMetricJob(definition, tmp_path / "cost.py", "sha256:" + "c" * 64)


def _drive(tmp_path: Path, samples: list[dict], code: str, stream: int, resamples: int) -> dict:
    (tmp_path / "predictions.jsonl").write_text("".join(json.dumps(s) + "\n" for s in samples))
    (tmp_path / "cost.py").write_text(code)
    args = {"function": "cost", "seed": stream, "resamples": resamples}
    return driver.compute(args, str(tmp_path / "predictions.jsonl"), str(tmp_path / "cost.py"))


SAMPLES = [{"id": i, "label": i % 3, "prediction": i % 3 if i % 5 else 0} for i in range(60)]


def test_the_runner_checks_the_resamples_and_computes_the_interval(tmp_path):
    stream = resample_seed(1234, "cost")
    reply = _drive(tmp_path, SAMPLES, METRIC_CODE, stream, 200)
    out = result_from_driver(_job(tmp_path), reply, stream=stream, n=60, image_digest="sha256:i")
    errors = sum(s["label"] != s["prediction"] for s in SAMPLES)
    assert out["value"] == errors / 60
    assert out["ci"]["method"] == "bootstrap_percentile" and out["ci"]["resamples"] == 200
    assert out["ci"]["low"] < out["value"] < out["ci"]["high"]
    assert out["custom"]["file_sha256"] == "sha256:" + "c" * 64
    assert out["custom"]["recomputed_in"]["image"] == "sha256:i"
    # resamples drawn from another seed are refused: the runner controls the resampling
    with pytest.raises(IntegrityError, match="not the ones the runner drew"):
        result_from_driver(_job(tmp_path), reply, stream=stream + 1, n=60, image_digest="x")
    with pytest.raises(IntegrityError, match="did not compute what the runner asked"):
        result_from_driver(_job(tmp_path), reply, stream=stream, n=61, image_digest="x")


@pytest.mark.parametrize(
    ("value", "says"),
    [("'0.5'", "returned str"), ("True", "returned bool"), ("float('nan')", "returned nan"),
     ("None", "returned NoneType")],
)
def test_a_value_that_is_not_a_finite_number_is_refused(tmp_path, value, says):
    stream = resample_seed(1, "cost")
    with pytest.raises(ValueError, match=says):
        _drive(tmp_path, SAMPLES, f"def cost(samples):\n    return {value}\n", stream, 10)
    # and a reply carrying one (a driver that did not check) is refused by the runner
    reply = {"value": "0.5", "n": 60, "resamples": [], "indices_sha256": ""}
    with pytest.raises(IntegrityError, match="returned str"):
        result_from_driver(_job(tmp_path, 10), reply, stream=stream, n=60, image_digest="x")


def test_the_driver_reports_what_the_function_raised(tmp_path):
    reply = {"error": "ZeroDivisionError: division by zero"}
    with pytest.raises(IntegrityError, match="could not be recomputed in the sandbox: Zero"):
        result_from_driver(_job(tmp_path), reply, stream=1, n=60, image_digest="x")


def test_resamples_without_a_value_are_left_out_of_the_interval(tmp_path):
    stream = resample_seed(7, "cost")
    code = (
        "def cost(samples):\n"
        "    hits = [s for s in samples if s['label'] == 0]\n"
        "    return sum(s['prediction'] == 0 for s in hits) / len(hits)\n"
    )
    few = SAMPLES[:4]
    reply = _drive(tmp_path, few, code, stream, 100)
    out = result_from_driver(_job(tmp_path, 100), reply, stream=stream, n=4, image_digest="x")
    assert 0 < out["ci"]["undefined_resamples"] < 100


# --------------------------------------------------------------------------- the container's number


def test_a_number_the_container_reports_for_a_custom_metric_is_not_compared(tmp_path):
    (tmp_path / "predictions.jsonl").write_text(
        "".join(json.dumps({"id": i, "label": 1, "prediction": 1}) + "\n" for i in range(5))
    )
    acc = {"name": "accuracy", "compute": "accuracy", "ci": {"method": "none"}}
    (tmp_path / "metrics.json").write_text(json.dumps({"metrics": [
        {"name": "accuracy", "value": 1.0, "ci": {"low": None, "high": None}},
        {"name": "cost", "value": 0.0},
    ]}))
    assert recompute_metrics(tmp_path, [acc], 1).problems == [
        "metric cost: reported by the container but not declared in the spec"
    ]
    assert recompute_metrics(tmp_path, [acc], 1, overridden=["cost"]).problems == []


def test_reports_say_where_a_custom_metric_came_from():
    from history_fixtures import predicate

    from runner.model.predicate import parse_predicate
    from runner.render.markdown import metric_table, render_markdown

    data = predicate()
    data["metrics"].append({
        "name": "cost", "compute": "custom", "value": 0.1, "n": 450,
        "direction": "lower_is_better",
        "custom": {"file": "metrics/cost.py", "function": "cost",
                   "file_sha256": "sha256:" + "c" * 64,
                   "recomputed_in": {"image": "sha256:" + "d" * 64, "runtime": "runsc",
                                     "network": "none"},
                   "container_reported": 0.0, "overridden": True},
    })
    p = parse_predicate(data)
    expected = (
        "custom metric cost: cost() in metrics/cost.py (sha256 sha256:" + "c" * 64 + "), "
        "recomputed by the runner in a runsc sandbox of image sha256:" + "d" * 64
        + ", network none; the container reported 0.0 (not used)"
    )
    assert expected in metric_table(p.metrics)
    assert "custom metric cost: cost() in metrics/cost.py" in render_markdown(p)


def test_a_metric_file_changed_since_the_lock_refuses_the_run_with_exit_3(tmp_path):
    from types import SimpleNamespace

    from runner.errors import DigestMismatch
    from runner.model.lock import LockedCustomMetric
    from runner.workflows.custom_metrics import custom_jobs

    path = _spec(tmp_path, COST)
    spec = load_spec(path)
    (record,) = custom_metric_records(spec, path)
    lock = SimpleNamespace(custom_metrics=[record])
    (job,) = custom_jobs(spec, path, lock)
    assert job.file_digest == record.digest and job.definition["custom"]["function"] == "cost"
    (tmp_path / "metrics" / "cost.py").write_text(METRIC_CODE + "# changed\n")
    with pytest.raises(DigestMismatch) as exc:
        custom_jobs(spec, path, lock)
    assert exc.value.exit_code == 3 and "custom metric cost" in exc.value.message
    unlocked = SimpleNamespace(custom_metrics=[])
    with pytest.raises(SpecError, match="not in the lock"):
        custom_jobs(spec, path, unlocked)
    assert isinstance(record, LockedCustomMetric)


def test_diff_shows_a_custom_metric_whose_code_changed():
    from history_fixtures import predicate

    from runner.model.predicate import parse_predicate
    from runner.workflows.diff import diff_runs

    def run(digest: str | None) -> object:
        data = predicate()
        metric = {"name": "cost", "compute": "custom", "value": 0.1, "n": 450}
        if digest is not None:
            metric["custom"] = {"file": "m.py", "function": "cost", "file_sha256": digest}
        data["metrics"].append(metric)
        return parse_predicate(data)

    d = diff_runs(run("sha256:" + "1" * 64), run("sha256:" + "2" * 64))
    assert [c.field for c in d.changes] == ["metrics.cost.custom.file_sha256"]
    # a metric that is custom in one run only differs too (and does not break the diff)
    assert "metrics.cost.custom.function" in [c.field for c in diff_runs(run(None), run("x")).changes]

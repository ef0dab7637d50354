"""The typed predicates: parsed by kind, faithful to what was signed, never a traceback."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from history_fixtures import predicate, store_run

from runner.backends.collect import MetricCheck
from runner.bundle.index import History
from runner.bundle.reader import read_predicate
from runner.bundle.signing import generate_keypair, load_signer
from runner.bundle.store import Store
from runner.cli.main import main
from runner.errors import IntegrityError
from runner.model.outcome import Outcome
from runner.model.plan import BackendResult, RunPlan
from runner.model.predicate import (
    AuditPredicate,
    RunPredicate,
    RunSetPredicate,
    parse_predicate,
)
from runner.render.markdown import render_markdown
from runner.workflows.judge import ContainerReport, judge, judge_metrics

pytestmark = pytest.mark.unit


def test_kind_picks_the_model_and_absent_means_run() -> None:
    assert isinstance(parse_predicate({"run_id": "r-1"}), RunPredicate)
    assert isinstance(parse_predicate({"run_id": "r-1", "kind": "run"}), RunPredicate)
    assert isinstance(parse_predicate({"run_id": "rs-1", "kind": "run_set"}), RunSetPredicate)
    assert isinstance(parse_predicate({"run_id": "a-1", "kind": "audit"}), AuditPredicate)


def test_to_json_gives_back_exactly_what_was_read() -> None:
    data = predicate(future_field={"nested": [1, 2.0, True, None]})
    data["metrics"][0]["value"] = 1  # an int stays an int
    data["metrics"][0]["new_metric_key"] = "kept"
    parsed = parse_predicate(data)
    assert parsed.to_json() == data
    assert json.dumps(parsed.to_json(), sort_keys=True) == json.dumps(data, sort_keys=True)


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({"run_id": "r-1", "metrics": [{"name": "a", "value": "high"}]}, "metrics.0.value"),
        ({"run_id": "r-1", "metrics": [{"name": "a", "value": True}]}, "metrics.0.value"),
        ({"run_id": "r-1", "outcome": "failed"}, "outcome"),
        ({"run_id": "r-1", "outcome": {"status": "passed"}}, "outcome"),
        ({"run_id": "r-1", "spec": "digits"}, "spec"),
        ({"run_id": "r-1", "datasets": [{"name": 3}]}, "datasets.0.name"),
        ({"run_id": "r-1", "kind": "sweep"}, "kind"),
        ({"run_id": "r-1", "kind": 7}, "kind"),
        ({"kind": "audit", "runs": []}, "run_id"),
        ({"run_id": "rs-1", "kind": "run_set", "members": [{"outcome": "?"}]}, "members.0.outcome"),
    ],
)
def test_a_predicate_that_does_not_fit_is_an_integrity_error_naming_the_field(
    data: dict, field: str
) -> None:
    with pytest.raises(IntegrityError) as exc:
        parse_predicate(data)
    assert exc.value.exit_code == 3
    assert exc.value.fields["field"] == field
    assert field in exc.value.message


def test_not_an_object_is_an_integrity_error() -> None:
    for data in ([], "run", None, 3):
        with pytest.raises(IntegrityError):
            parse_predicate(data)


def test_container_evidence_of_any_shape_never_makes_a_bundle_unreadable() -> None:
    odd = predicate(
        environment={"os": "not a mapping", "gpu": {"visible": True, "gpus": [1, {"name": 2}]}},
        preflight={"rootfs": ["?"]},
        evaluation="whatever",
        **{"image.rootfs_found": {"error": "unreadable"}, "seeds.determinism": [1]},
    )
    parsed = parse_predicate(odd)
    assert isinstance(parsed, RunPredicate)
    assert parsed.to_json() == odd
    report = render_markdown(parsed)
    assert "- OS: None; kernel None" in report and "- GPU: 2; driver None" in report


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "home"
    monkeypatch.setenv("EVALRUN_HOME", str(home))
    (home / "keys").mkdir(parents=True)
    generate_keypair(home / "keys" / "evalrun.key", home / "keys" / "evalrun.pub", "ed25519")
    return home


def test_a_signed_bundle_with_unknown_keys_reads_indexes_and_renders(home: Path, capsys) -> None:
    signer = load_signer(home / "keys" / "evalrun.key")
    data = predicate(run_id="r-" + "f" * 24, written_by_a_newer_evalrun={"x": 1})
    data["image"]["new_fact"] = "kept"
    stored = store_run(Store(home), signer, data)
    assert read_predicate(stored.path).to_json() == data
    assert [r.run_id for r in History(Store(home)).query()] == ["r-" + "f" * 24]
    assert main(["runs", "show", stored.run_id, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["predicate"] == data
    assert main(["report", stored.run_id, "--format", "md"]) == 0


def test_a_signed_bundle_that_does_not_fit_is_unreadable_not_a_traceback(
    home: Path, capsys
) -> None:
    signer = load_signer(home / "keys" / "evalrun.key")
    good = store_run(Store(home), signer, predicate(run_id="r-" + "a" * 24))
    bad = store_run(Store(home), signer, predicate(run_id="r-" + "b" * 24, outcome="won"))
    report = History(Store(home)).sync()
    assert report.unreadable == (bad.digest,) and report.total == 1
    assert main(["report", str(good.path), "--format", "md"]) == 0
    capsys.readouterr()
    assert main(["report", str(bad.path), "--format", "md", "--json"]) == 3
    assert "outcome" in capsys.readouterr().out


# --------------------------------------------------------------------------- judging


def _plan() -> RunPlan:
    return RunPlan(
        run_id="r-1",
        attempt=0,
        image_ref="127.0.0.1:5000/evalrun/x@sha256:" + "a" * 64,
        expected_rootfs_digest="sha256:" + "b" * 64,
        runtime="runc",
        command=["true"],
        params={},
        seed=1,
        metrics=[{"name": "acc", "compute": "accuracy", "threshold": 0.9}],
        expect={},
        inputs=[],
        timeout_s=60,
        cpus=1.0,
        memory_mib=256,
        pids=64,
        spec_digest="sha256:" + "c" * 64,
        lock_digest="sha256:" + "d" * 64,
        spec_name="x",
    )


def _result(**changes: object) -> BackendResult:
    fields: dict = {"backend": "test", "exit_code": 0, "image_digest_confirmed": True,
                    "runtime": "runc"}
    return BackendResult(**{**fields, **changes})


def test_judging_a_clean_run_leaves_it_to_the_metrics() -> None:
    report = ContainerReport(summary={"outcome": "completed"})
    assert judge(_plan(), _result(), [], report) is None
    check = MetricCheck([{"name": "acc", "value": 0.8, "n": 10}], [])
    judged = judge_metrics(_plan(), _result(), report, check)
    assert judged.outcome is Outcome.THRESHOLDS_FAILED
    assert judged.reason == "metrics below threshold: acc"
    assert judged.facts.verdicts["acc"].passed is False


def test_judging_trusts_no_outcome_or_reason_the_agent_invents() -> None:
    report = ContainerReport(
        summary={"outcome": "passed", "reason": {"not": "text"}},
        stderr_tail=("Traceback", "ValueError: boom"),
    )
    judged = judge(_plan(), _result(exit_code=17), [], report)
    assert judged is not None and judged.outcome is Outcome.EVALUATION_FAILED
    assert judged.reason == "agent exited 17: ValueError: boom"
    assert judged.stderr_tail == ("Traceback", "ValueError: boom")
    collected = judge(_plan(), _result(), ["results/x: a symlink"], report)
    assert collected is not None and collected.outcome is Outcome.INTEGRITY_FAILURE


def test_an_oom_killed_sandbox_is_out_of_memory_whatever_it_could_not_write() -> None:
    # gVisor: the whole sandbox was killed, so nothing was collected and no digest confirmed
    killed = _result(
        exit_code=137,
        image_digest_confirmed=False,
        details={"termination_reason": "OOMKilled", "pod": "p-1"},
    )
    judged = judge(_plan(), killed, ["the agent ended without holding them"], ContainerReport())
    assert judged is not None and judged.outcome is Outcome.OUT_OF_MEMORY
    assert judged.reason is not None and "pod p-1" in judged.reason and "256 MiB" in judged.reason
    assert Outcome.OUT_OF_MEMORY.exit_code == 6
    # runc: the agent lived on, saw its evaluation killed, and Docker says OOMKilled
    report = ContainerReport(
        summary={"outcome": "evaluation_failed", "evaluation": {"peak_rss_kib": 262144}}
    )
    docker = judge(_plan(), _result(exit_code=21, details={"oom_killed": True}), [], report)
    assert docker is not None and docker.outcome is Outcome.OUT_OF_MEMORY
    assert docker.reason is not None and "256 MiB" in docker.reason


def test_a_gvisor_pod_killed_before_reporting_is_out_of_memory_inferred() -> None:
    gvisor = _plan().model_copy(update={"runtime": "gvisor"})
    details = {"termination_reason": "Error", "container_exit_code": 128, "pod": "p-1"}
    killed = _result(backend="kubernetes", exit_code=128, image_digest_confirmed=False,
                     details=details)
    judged = judge(gvisor, killed, ["not collected"], ContainerReport())
    assert judged is not None and judged.outcome is Outcome.OUT_OF_MEMORY
    assert judged.reason is not None and "inferred" in judged.reason and "256 MiB" in judged.reason
    # not when the pod was evicted, nor under runc (where the kubelet would have said so)
    evicted = killed.model_copy(
        update={"details": {**details, "disruptions": [{"pod": "p-1", "reason": "x"}]}}
    )
    assert judge(gvisor, evicted, ["not collected"], ContainerReport()).outcome is not (
        Outcome.OUT_OF_MEMORY
    )
    assert judge(_plan(), killed, ["x"], ContainerReport()).outcome is Outcome.INTEGRITY_FAILURE


def test_a_job_past_its_deadline_is_a_timeout_naming_it() -> None:
    ended = _result(
        exit_code=None,
        timed_out=True,
        image_digest_confirmed=False,
        details={"job_condition": "DeadlineExceeded", "active_deadline_s": 20},
    )
    judged = judge(_plan(), ended, ["the Job has no pod to collect from"], ContainerReport())
    assert judged is not None and judged.outcome is Outcome.TIMEOUT
    assert judged.reason is not None
    assert "DeadlineExceeded" in judged.reason and "20 s" in judged.reason


def test_an_interrupted_run_names_the_signal_and_the_deleted_job() -> None:
    stopped = _result(
        exit_code=None,
        interrupted=True,
        details={"interrupted_by": "SIGTERM", "deleted_job": "evalrun-r-1", "namespace": "ev"},
    )
    judged = judge(_plan(), stopped, [], ContainerReport())
    assert judged is not None and judged.outcome is Outcome.INTERRUPTED
    assert judged.reason == (
        "interrupted by SIGTERM (the job running evalrun was cancelled); "
        "Job evalrun-r-1 in namespace ev was deleted"
    )
    ctrl_c = judge(_plan(), _result(exit_code=None, interrupted=True), [], ContainerReport())
    assert ctrl_c is not None and ctrl_c.reason == "interrupted by the user (Ctrl-C)"


def test_backend_details_are_recorded_as_the_json_they_sign_as() -> None:
    from inprocess_backend import SOURCE

    from runner.workflows.judge import Judgement
    from runner.workflows.run import build_run_predicate, load_locked

    spec, lock = load_locked(SOURCE / "eval.yaml")
    built = build_run_predicate(
        spec,
        lock,
        run_id="r-1",
        attempt=0,
        result=_result(details={"security_opt": ("no-new-privileges",), "oom_killed": False}),
        judgement=Judgement(Outcome.INFRASTRUCTURE_FAILURE, "daemon down"),
        report=ContainerReport(),
        started="2026-11-29T12:00:00.000+00:00",
        backend="test",
    )
    signed = built.to_json()
    assert signed["sandbox"]["details"] == {
        "security_opt": ["no-new-privileges"],
        "oom_killed": False,
    }
    assert signed["outcome"] == "infrastructure_failure" and signed["exit_code"] == 5
    assert "kind" not in signed  # a run predicate is written without a kind, as always
    assert parse_predicate(signed).to_json() == signed

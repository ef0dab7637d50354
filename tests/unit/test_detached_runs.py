"""The logic of runs under CI control (run --detach, status, wait, logs, cancel), no cluster.

The real thing (a Job detached, followed, waited for by two runners, cancelled) is in
tests/k8s/test_k8s_detached_runs.py.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from runner._internal.settings import Settings
from runner.backends.kubernetes import job_gone
from runner.backends.kubernetes_control import EvaluationLines
from runner.backends.manifests import CANCEL_ANNOTATION
from runner.bundle.store import Store
from runner.cli.main import build_parser, main
from runner.cli.runs import _overrides
from runner.errors import InfrastructureError, InputError, RunCancelled
from runner.model.outcome import Outcome, worst_exit_code
from runner.shared.protocol import encode_frame, ready_line
from runner.workflows.detached import ClusterOverrides, backend_for_record
from runner.workflows.detached_record import DetachedRecord, DetachedRun, check_run_id
from runner.workflows.run import Journal

pytestmark = pytest.mark.unit

RUN = "r-0123456789abcdef01234567"


def _record(**changes: object) -> DetachedRecord:
    data: dict[str, object] = {
        "run_id": RUN,
        "attempt": 0,
        "backend": "kubernetes",
        "job": f"evalrun-{RUN}",
        "kubeconfig": "/ci/kubeconfig",
        "context": "ci",
        "namespace": "evals",
        "started": "2026-11-30T05:00:00.000+00:00",
        "submitted": "2026-11-30T05:00:05.000+00:00",
        "run_provenance": {},
    }
    return DetachedRecord.model_validate(data | changes)


def test_a_cancelled_run_exits_130_and_a_plain_run_starts_a_new_attempt() -> None:
    assert Outcome.CANCELLED.exit_code == 130
    assert Outcome.CANCELLED.retryable  # `evalrun run` after a cancel starts attempt 1
    assert not Outcome.CANCELLED.has_metrics
    assert worst_exit_code([6, Outcome.CANCELLED.exit_code]) == 130


@pytest.mark.parametrize("text", ["../../etc", "r-0123", "R-0123456789ABCDEF01234567", ""])
def test_run_ids_are_checked_before_any_path_is_made(text: str) -> None:
    with pytest.raises(InputError) as err:
        check_run_id(text)
    assert err.value.exit_code == 2
    assert check_run_id(RUN) == RUN


def test_the_cluster_flags_of_a_later_command_win_over_the_record() -> None:
    record = _record()
    kept = backend_for_record(record, ClusterOverrides()).target
    assert (kept.kubeconfig, kept.context, kept.namespace) == ("/ci/kubeconfig", "ci", "evals")
    for argv in (
        ["--kubeconfig", "/b/kc", "--context", "c2", "-n", "other", "wait", RUN],
        ["wait", RUN, "--kubeconfig", "/b/kc", "--context", "c2", "-n", "other"],
        ["status", RUN, "--kubeconfig", "/b/kc", "--context", "c2", "--namespace", "other"],
        ["--kubeconfig", "/b/kc", "cancel", RUN, "--context", "c2", "-n", "other"],
    ):
        target = backend_for_record(record, _overrides(build_parser().parse_args(argv))).target
        assert (target.kubeconfig, target.context, target.namespace) == ("/b/kc", "c2", "other")


def test_the_record_of_a_detached_run_is_written_once(tmp_path: Path) -> None:
    settings = Settings(home=tmp_path / "home")
    files = tmp_path / "files"
    files.mkdir()
    (files / "spec.yaml").write_text("kind: Evaluation\n")
    detached = DetachedRun(settings, RUN)
    assert not detached.exists()
    plan = _plan()
    journal = Journal(RUN)
    journal.emit("run_start", attempt=0)
    assert detached.write(_record(), plan, files, journal) is True
    assert detached.write(_record(job="another"), plan, files, journal) is False
    assert detached.record().job == f"evalrun-{RUN}"  # the first writer's record stays
    assert detached.plan() == plan
    assert [r["event"] for r in detached.journal().records] == ["run_start"]
    assert (detached.files / "spec.yaml").read_text() == "kind: Evaluation\n"
    assert not detached.cancel_requested
    detached.request_cancel()
    detached.request_cancel()
    assert detached.cancel_requested
    detached.remove()
    assert not detached.exists() and list((tmp_path / "home" / "detached").iterdir()) == []


def _plan():  # type: ignore[no-untyped-def]
    from runner.model.plan import RunPlan

    return RunPlan(
        run_id=RUN,
        attempt=0,
        image_ref="127.0.0.1:5000/evalrun/x@sha256:" + "a" * 64,
        expected_rootfs_digest="sha256:" + "b" * 64,
        runtime="gvisor",
        command=["python3", "/app/evaluate.py"],
        params={},
        seed=1,
        metrics=[],
        expect={},
        inputs=[],
        timeout_s=60,
        cpus=1,
        memory_mib=512,
        pids=128,
        spec_digest="sha256:" + "c" * 64,
        lock_digest="sha256:" + "d" * 64,
        spec_name="t",
    )


def _written(tmp_path: Path) -> tuple[Settings, DetachedRun]:
    settings = Settings(home=tmp_path / "home")
    files = tmp_path / "files"
    files.mkdir(exist_ok=True)
    detached = DetachedRun(settings, RUN)
    detached.write(_record(), _plan(), files, Journal(RUN))
    return settings, detached


def test_one_runner_holds_a_run_and_another_gives_up_at_its_timeout(tmp_path: Path) -> None:
    settings, detached = _written(tmp_path)
    store = Store(settings.home)
    with detached.exclusive(store, None) as first:
        assert first is True
        t0 = time.monotonic()
        with detached.exclusive(store, 0.6) as second:
            assert second is False
        assert 0.5 <= time.monotonic() - t0 < 5
    with detached.exclusive(store, 0.0) as again:
        assert again is True  # released when the holder is done


def test_a_runner_waiting_for_the_lock_stops_once_the_holder_has_sealed(
    tmp_path: Path,
) -> None:
    settings, detached = _written(tmp_path)
    sealed = threading.Event()
    store = SimpleNamespace(find_run=lambda run_id: "sealed" if sealed.is_set() else None)
    with detached.exclusive(store, None) as first:  # type: ignore[arg-type]
        assert first
        threading.Timer(0.3, sealed.set).start()
        t0 = time.monotonic()
        with detached.exclusive(store, None) as second:  # type: ignore[arg-type]
            assert second is False
        assert time.monotonic() - t0 < 5


def _job(annotations: dict[str, str] | None) -> SimpleNamespace:
    return SimpleNamespace(metadata=SimpleNamespace(annotations=annotations))


def test_a_job_gone_with_the_cancel_annotation_was_cancelled_else_it_was_lost() -> None:
    err = job_gone(
        "evalrun-x", _job({CANCEL_ANNOTATION: "2026-11-30T05:00:00"}), cancel_requested=False
    )
    assert isinstance(err, RunCancelled) and err.exit_code == 130
    assert "2026-11-30T05:00:00" in err.message
    asked = job_gone("evalrun-x", None, cancel_requested=True)
    assert isinstance(asked, RunCancelled)
    lost = job_gone("evalrun-x", _job({"other": "x"}), cancel_requested=False)
    assert isinstance(lost, InfrastructureError) and lost.exit_code == 5
    assert "evalrun-x" in lost.message


def test_the_live_log_hides_the_agents_protocol_lines_and_their_separators() -> None:
    got: list[str] = []
    lines = EvaluationLines(got.append)
    log = (
        "loading model\n\nscored 450 samples\n"
        + encode_frame(b"not really a tar")
        + "\n"
        + ready_line(0)
        + "\n"
        + "agent: results acknowledged by the runner; exiting 0\npartial"
    ).encode()
    for i in range(0, len(log), 7):  # arriving in pieces
        lines.feed(log[i : i + 7])
    assert lines.hide.ready.is_set()
    lines.close()
    assert got == [
        "loading model",
        "",
        "scored 450 samples",
        "agent: results acknowledged by the runner; exiting 0",
        "partial",
    ]


@pytest.mark.parametrize("command", ["status", "wait", "logs", "cancel"])
def test_a_run_unknown_to_the_store_is_one_line_and_exit_2(
    command: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("EVALRUN_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("EVALRUN_KEY", "env:NO_SUCH_KEY_VARIABLE")
    assert main([command, RUN]) == 2
    err = capsys.readouterr().err
    assert err.startswith("evalrun: error:") and "Traceback" not in err
    assert RUN in err  # the run is looked up before any key is needed
    assert main(["--json", command, "not-a-run"]) == 2
    out = json.loads(capsys.readouterr().out)
    assert out["exit_code"] == 2 and out["error"] == "bad_input"


def test_status_of_an_unknown_run_names_the_store(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("EVALRUN_HOME", str(tmp_path / "home"))
    assert main(["status", RUN, "--json"]) == 2
    out = json.loads(capsys.readouterr().out)
    assert RUN in out["message"] and str(tmp_path / "home") in out["message"]


def test_detach_on_the_docker_backend_is_refused_with_exit_2_saying_why(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("EVALRUN_HOME", str(tmp_path / "home"))
    assert main(["--json", "run", str(tmp_path / "eval.yaml"), "--detach"]) == 2
    out = json.loads(capsys.readouterr().out)
    assert "--backend kubernetes" in out["message"] and "wall-clock" in out["hint"]


@pytest.fixture
def sealed_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """A store holding two sealed runs (passed; infrastructure failure) and its key pair."""
    import shutil
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from inprocess_backend import BUNDLES, KEY, PUBLIC_KEY

    home = tmp_path / "home"
    monkeypatch.setenv("EVALRUN_HOME", str(home))
    (home / "keys").mkdir(parents=True)
    shutil.copy(PUBLIC_KEY, home / "keys" / "evalrun.pub")
    shutil.copy(KEY, home / "keys" / "evalrun.key")
    store = Store(home)
    ids = {}
    for name in ("run", "run-infrastructure-failure"):
        with store.staging_dir() as stage:
            shutil.copytree(BUNDLES / name, stage / "bundle")
            ids[name] = store.put(stage / "bundle").run_id
    return ids


def test_a_sealed_run_answers_every_command_from_the_store(
    sealed_home: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    run = sealed_home["run"]
    assert main(["status", run, "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["state"] == "sealed" and status["exit_code"] == 0
    # wait exits with the run's own code, whatever it is, and returns the stored bundle
    assert main(["--json", "wait", run]) == 0
    waited = json.loads(capsys.readouterr().out)
    assert waited["reused"] is True and waited["bundle_digest"] == status["bundle_digest"]
    failed = sealed_home["run-infrastructure-failure"]
    assert main(["--json", "wait", failed]) == 5
    assert json.loads(capsys.readouterr().out)["outcome"] == "infrastructure_failure"
    # cancel of a run that has ended changes nothing, and says so
    assert main(["--json", "cancel", run]) == 0
    cancelled = json.loads(capsys.readouterr().out)
    assert cancelled["cancelled_now"] is False and cancelled["outcome"] == "passed"
    assert cancelled["bundle_digest"] == status["bundle_digest"]
    # logs: the evaluation's own output, read from the verified bundle
    assert main(["--json", "logs", run]) == 0
    logs = json.loads(capsys.readouterr().out)
    assert logs["source"] == "bundle" and logs["verified"].startswith("valid")
    assert isinstance(logs["stdout"], str) and isinstance(logs["stderr"], str)


def test_logs_of_a_tampered_bundle_exit_3(
    sealed_home: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    run = sealed_home["run"]
    bundle = Store(Path(__import__("os").environ["EVALRUN_HOME"])).find_run(run)
    assert bundle is not None
    stderr_file = bundle.path / "results" / "logs" / "evaluation.stderr"
    bundle.path.chmod(0o755)
    (bundle.path / "results").chmod(0o755)
    (bundle.path / "results" / "logs").chmod(0o755)
    stderr_file.chmod(0o644)
    stderr_file.write_text("not what the evaluation wrote\n")
    assert main(["logs", run]) == 3
    assert "Traceback" not in capsys.readouterr().err


class _SubmitOnly:
    """Stands in for the cluster's side of ``run --detach`` (the real one: tests/k8s)."""

    name = "kubernetes"
    pulls_inputs = True  # as the Kubernetes backend: nodes pull published inputs

    def __init__(self, tmp: Path, refuse: Exception | None = None) -> None:
        from runner.backends.kubernetes import ClusterTarget

        self.target = ClusterTarget(kubeconfig="kc.yaml", namespace="evals")
        self.namespace = "evals"
        self.grace = {"unschedulable": 30.0}
        self.ttl_after_finished_s = 60
        self.refuse = refuse
        self.submitted: list[str] = []

    def preflight(self, plan: object) -> None:
        if self.refuse is not None:
            raise self.refuse

    def submit(self, plan: object) -> str:
        run_id = plan.run_id  # type: ignore[attr-defined]
        self.submitted.append(run_id)
        return f"evalrun-{run_id}"


def test_detach_submits_once_records_the_run_and_rerun_starts_a_new_attempt(
    tmp_path: Path,
) -> None:
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from inprocess_backend import KEY, SOURCE

    from runner.bundle.signing import load_signer
    from runner.workflows.detached import start_detached

    settings = Settings(home=tmp_path / "home", cache=tmp_path / "cache")
    signer = load_signer(KEY)
    backend = _SubmitOnly(tmp_path)
    spec = SOURCE / "eval.yaml"
    first = start_detached(spec, backend, signer, settings)  # type: ignore[arg-type]
    assert first.state == "submitted" and first.exit_code == 0
    record = DetachedRun(settings, first.run_id).record()
    assert record.job == f"evalrun-{first.run_id}" and record.namespace == "evals"
    assert record.kubeconfig is not None and Path(record.kubeconfig).is_absolute()
    assert (DetachedRun(settings, first.run_id).files / "spec.yaml").is_file()
    again = start_detached(spec, backend, signer, settings)  # type: ignore[arg-type]
    assert again.state == "already submitted" and again.run_id == first.run_id
    assert backend.submitted == [first.run_id]
    new = start_detached(spec, backend, signer, settings, rerun=True)  # type: ignore[arg-type]
    assert new.state == "submitted" and new.run_id != first.run_id
    assert backend.submitted == [first.run_id, new.run_id]


def test_a_run_refused_before_submission_is_sealed_and_exits_as_the_blocking_run(
    tmp_path: Path,
) -> None:
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from inprocess_backend import KEY, PUBLIC_KEY, SOURCE

    from runner.bundle.signing import load_signer, load_verifier
    from runner.bundle.verify import verify_bundle
    from runner.errors import EnvironmentMismatch
    from runner.workflows.detached import start_detached

    settings = Settings(home=tmp_path / "home", cache=tmp_path / "cache")
    backend = _SubmitOnly(tmp_path, refuse=EnvironmentMismatch("no gVisor RuntimeClass"))
    done = start_detached(SOURCE / "eval.yaml", backend, load_signer(KEY), settings)  # type: ignore[arg-type]
    assert done.state == "sealed" and done.exit_code == 4 and backend.submitted == []
    assert done.sealed is not None and done.sealed.outcome is Outcome.ENVIRONMENT_MISMATCH
    verify_bundle(done.sealed.bundle.path, load_verifier(PUBLIC_KEY))
    assert not DetachedRun(settings, done.run_id).exists()

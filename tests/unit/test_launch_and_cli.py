import json
import subprocess
import sys
from pathlib import Path

import pytest

from runner.cli.main import main
from runner.errors import InfrastructureError, TransientInfrastructureError
from runner.workflows.run import run_id_for
from runner._internal.retry import call_with_retries, transient_policy

pytestmark = pytest.mark.unit
ROOT = Path(__file__).resolve().parents[2]


def test_run_id_is_derived_from_lock_digest_and_attempt():
    a = run_id_for("sha256:" + "1" * 64, 0)
    assert a == run_id_for("sha256:" + "1" * 64, 0)
    assert a != run_id_for("sha256:" + "1" * 64, 1)
    assert a != run_id_for("sha256:" + "2" * 64, 0)
    assert a.startswith("r-") and len(a) == 26


def test_transient_errors_are_retried_then_become_permanent():
    sleeps = []
    calls = []

    def flaky():
        calls.append(1)
        raise TransientInfrastructureError("connection refused")

    with pytest.raises(InfrastructureError) as exc:
        call_with_retries(flaky, what="probe",
                          policy=transient_policy(attempts=3, sleep=sleeps.append))
    assert len(calls) == 3 and len(sleeps) == 2
    assert not isinstance(exc.value, TransientInfrastructureError)
    assert exc.value.exit_code == 5


def test_permanent_errors_are_not_retried():
    calls = []

    def broken():
        calls.append(1)
        raise InfrastructureError("forbidden")

    with pytest.raises(InfrastructureError):
        call_with_retries(broken, what="probe", policy=transient_policy(sleep=lambda s: None))
    assert len(calls) == 1


def test_validate_json_error_output(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("EVALRUN_HOME", str(tmp_path / "home"))
    bad = tmp_path / "eval.yaml"
    bad.write_text("apiVersion: evalrun/v1\nkind: Evaluation\nbogus: 1\n")
    code = main(["validate", str(bad), "--json"])
    assert code == 2
    out = json.loads(capsys.readouterr().out)
    assert out["error"] == "invalid_spec"
    fields = {p["field"] for p in out["problems"]}
    assert "bogus" in fields and "metadata" in fields


def test_logs_are_json_lines_with_stable_schema(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("EVALRUN_HOME", str(tmp_path / "home"))
    main(["validate", str(tmp_path / "missing.yaml")])
    lines = (tmp_path / "home" / "logs" / "evalrun.jsonl").read_text().splitlines()
    record = json.loads(lines[-1])
    assert {"ts", "level", "event", "run_id", "logger", "message"} <= record.keys()
    assert record["level"] == "error"


def test_keys_generate_refuses_to_overwrite(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("EVALRUN_HOME", str(tmp_path / "home"))
    key = tmp_path / "k.key"
    assert main(["keys", "generate", "--out", str(key)]) == 0
    assert (tmp_path / "k.pub").exists()
    assert main(["keys", "generate", "--out", str(key)]) == 2


def test_console_script_help_runs():
    out = subprocess.run([sys.executable, "-m", "runner.cli", "--help"], capture_output=True,
                         text=True, check=True, cwd=ROOT)
    assert "verify" in out.stdout and "run" in out.stdout


def test_changed_preprocessing_code_is_an_integrity_failure():
    from runner.errors import DigestMismatch
    from runner.workflows.run import _check_preprocessing
    from runner.model.lock import LockedPreprocessing

    class _Lock:
        preprocessing = [LockedPreprocessing(name="scale", code="prep.py",
                                             code_digest="sha256:" + "a" * 64, kind="file")]

    same = [{"name": "scale", "code": "prep.py", "code_digest": "sha256:" + "a" * 64}]
    _check_preprocessing(same, _Lock())  # type: ignore[arg-type]
    changed = [{"name": "scale", "code": "prep.py", "code_digest": "sha256:" + "b" * 64}]
    with pytest.raises(DigestMismatch) as exc:
        _check_preprocessing(changed, _Lock())  # type: ignore[arg-type]
    assert exc.value.exit_code == 3 and "scale" in exc.value.message

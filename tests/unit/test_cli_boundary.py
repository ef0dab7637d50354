"""The CLI boundary: every exception ends in an exit code and a one-line message.

Intentional errors map to their exit codes; a bug (any other exception) ends in
exit 1 with one line naming the log file, which holds the traceback; Ctrl-C is 130.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest

from runner.cli.main import main
from runner.errors import EnvironmentMismatch

pytestmark = pytest.mark.unit


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.setenv("EVALRUN_HOME", str(tmp_path / "home"))
    yield tmp_path / "home"
    logging.getLogger().handlers.clear()  # main() installs a file handler on the root logger


def _raise_from_validate(monkeypatch: pytest.MonkeyPatch, exc: BaseException) -> None:
    def load_spec(path: Path) -> Any:
        raise exc

    monkeypatch.setattr("runner.model.spec.load_spec", load_spec)


def _log_lines(home: Path) -> list[dict[str, Any]]:
    text = (home / "logs" / "evalrun.jsonl").read_text()
    return [json.loads(line) for line in text.splitlines()]


def test_unexpected_exception_exits_1_with_one_line_and_the_traceback_in_the_log(
    home: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _raise_from_validate(monkeypatch, ValueError("boom\nsecond line"))
    assert main(["validate", "eval.yaml"]) == 1
    out, err = capsys.readouterr()
    log_file = home / "logs" / "evalrun.jsonl"
    assert out == ""
    assert err == (
        f"evalrun: internal error: ValueError: boom second line (traceback in {log_file})\n"
    )
    (record,) = [r for r in _log_lines(home) if r["event"] == "internal_error"]
    assert record["level"] == "error"
    assert record["message"] == "ValueError: boom second line"
    assert record["traceback"].startswith("Traceback (most recent call last):")
    assert "in load_spec" in record["traceback"] and "ValueError: boom" in record["traceback"]


def test_unexpected_exception_under_json_is_a_json_error_object(
    home: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _raise_from_validate(monkeypatch, KeyError("spec_digest"))
    assert main(["validate", "eval.yaml", "--json"]) == 1
    out, err = capsys.readouterr()
    assert err == ""
    assert json.loads(out) == {
        "error": "internal",
        "exit_code": 1,
        "message": "KeyError: 'spec_digest'",
        "log": str(home / "logs" / "evalrun.jsonl"),
    }
    assert any(r["event"] == "internal_error" for r in _log_lines(home))


def test_unexpected_exception_without_a_log_file_puts_the_traceback_on_stderr(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    blocked = tmp_path / "home"
    blocked.mkdir()
    (blocked / "logs").write_text("a file where the log directory should be")
    monkeypatch.setenv("EVALRUN_HOME", str(blocked))
    _raise_from_validate(monkeypatch, RuntimeError("no log"))
    try:
        assert main(["validate", "eval.yaml"]) == 1
    finally:
        logging.getLogger().handlers.clear()
    err = capsys.readouterr().err
    assert "Traceback (most recent call last):" in err
    assert err.endswith("evalrun: internal error: RuntimeError: no log (traceback in stderr)\n")


def test_keyboard_interrupt_exits_130(
    home: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _raise_from_validate(monkeypatch, KeyboardInterrupt())
    assert main(["validate", "eval.yaml"]) == 130
    assert capsys.readouterr().err == (
        "evalrun: interrupted (Ctrl-C); nothing was left half-written\n"
    )


def test_sigterm_stops_a_command_as_ctrl_c_does(
    home: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import os
    import signal

    def terminated(path: Path) -> Any:
        os.kill(os.getpid(), signal.SIGTERM)  # a CI runner cancelling the job
        raise AssertionError("SIGTERM did not stop the command")

    monkeypatch.setattr("runner.model.spec.load_spec", terminated)
    before = signal.getsignal(signal.SIGTERM)
    assert main(["validate", "eval.yaml"]) == 130
    assert capsys.readouterr().err == (
        "evalrun: interrupted (SIGTERM); nothing was left half-written\n"
    )
    assert signal.getsignal(signal.SIGTERM) == before  # the handler is evalrun's only inside


def test_intentional_errors_keep_their_exit_code_and_message(
    home: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _raise_from_validate(monkeypatch, EnvironmentMismatch("no GPU", expected="H100"))
    assert main(["validate", "eval.yaml"]) == 4
    assert capsys.readouterr().err == "evalrun: error: no GPU\n  expected: H100\n"
    _raise_from_validate(monkeypatch, EnvironmentMismatch("no GPU", expected="H100"))
    assert main(["validate", "eval.yaml", "--json"]) == 4
    assert json.loads(capsys.readouterr().out) == {
        "error": "environment_mismatch",
        "exit_code": 4,
        "message": "no GPU",
        "expected": "H100",
    }

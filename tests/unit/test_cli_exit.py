"""The ``evalrun`` program exits without the interpreter's teardown, losing nothing.

``console_main`` (the console script and ``python -m runner.cli``) skips the module
teardown after the command; the exit code, everything printed and every log line must
still come out, and exit handlers must still run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]


def _evalrun(home: Path, *args: str, code: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "EVALRUN_HOME": str(home), "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-c", code, *args] if code else [
        sys.executable, "-m", "runner.cli", *args]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)


def test_a_failing_command_keeps_its_exit_code_message_and_log_line(tmp_path: Path) -> None:
    result = _evalrun(tmp_path / "home", "validate", str(tmp_path / "missing.yaml"))
    assert result.returncode == 2
    assert "spec file not found" in result.stderr
    lines = (tmp_path / "home" / "logs" / "evalrun.jsonl").read_text().splitlines()
    assert json.loads(lines[-1])["event"] == "error"


def test_everything_printed_reaches_a_pipe(tmp_path: Path) -> None:
    result = _evalrun(tmp_path / "home", "schema")
    assert result.returncode == 0, result.stderr
    checked_in = json.loads((ROOT / "runner" / "schema" / "evaluation-v1.json").read_text())
    assert json.loads(result.stdout) == checked_in


def test_exit_handlers_and_other_threads_finish_before_the_exit(tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    code = (
        "import atexit, sys, threading, time\n"
        "from pathlib import Path\n"
        "from runner.cli import console_main\n"
        f"marker = Path({str(marker)!r})\n"
        "def late():\n"
        "    time.sleep(0.3)\n"
        "    with marker.open('a') as fh: fh.write('thread\\n')\n"
        "threading.Thread(target=late).start()\n"
        "atexit.register(lambda: marker.open('a').write('atexit\\n'))\n"
        "sys.stdout.write('buffered, no newline')\n"
        "sys.argv = ['evalrun', 'validate', 'missing.yaml']\n"
        "console_main()\n"
    )
    result = _evalrun(tmp_path / "home", code=code)
    assert result.returncode == 2
    assert result.stdout == "buffered, no newline"
    # the thread finished first, then the exit handler ran (and its file was closed)
    assert marker.read_text() == "thread\natexit\n"


def test_a_profiled_run_still_writes_its_profile(tmp_path: Path) -> None:
    out = tmp_path / "profile.out"
    env = {**os.environ, "EVALRUN_HOME": str(tmp_path / "home"), "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, "-m", "cProfile", "-o", str(out), "-m", "runner.cli", "schema"],
        env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert out.stat().st_size > 0


def test_an_executor_left_open_does_not_hold_the_exit(tmp_path: Path) -> None:
    # its idle worker waits for the threading exit hook, as in Python's own exit
    code = (
        "import sys\n"
        "from concurrent.futures import ThreadPoolExecutor\n"
        "from runner.cli import console_main\n"
        "pool = ThreadPoolExecutor(2)\n"
        "pool.submit(print, 'worked').result()\n"
        "sys.argv = ['evalrun', 'validate', 'missing.yaml']\n"
        "console_main()\n"
    )
    result = _evalrun(tmp_path / "home", code=code)  # a hang is a TimeoutExpired
    assert result.returncode == 2
    assert result.stdout == "worked\n"


@pytest.mark.parametrize(
    ("variable", "value", "says"),
    [
        ("EVALRUN_HOME", "~no-such-user-here/evalrun", "$EVALRUN_HOME cannot be used"),
        ("EVALRUN_CACHE", "~no-such-user-here/cache", "$EVALRUN_CACHE cannot be used"),
        ("EVALRUN_HOME", "/proc/1/no-store-here", "evalrun cannot use /proc/1/no-store-here"),
    ],
)
def test_a_store_or_cache_the_environment_names_but_evalrun_cannot_use_is_one_line(
    tmp_path: Path, variable: str, value: str, says: str
) -> None:
    env = {**os.environ, "EVALRUN_HOME": str(tmp_path / "home"), "PYTHONPATH": str(ROOT),
           variable: value}
    for args in (["runs", "ls"], ["run", str(tmp_path / "eval.yaml"), "--rerun"]):
        result = subprocess.run([sys.executable, "-m", "runner.entry", *args, "--json"], env=env,
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 2, result.stderr
        error = json.loads(result.stdout)
        assert "Traceback" not in result.stderr
        if args[0] == "runs" or "~" in value:  # (a run asks for its signing key there first)
            assert says in error["message"] and error["variable"] == variable, error
    # on the terminal: said once (no log file to write: nothing else prints it again)
    result = subprocess.run([sys.executable, "-m", "runner.entry", "runs", "ls"], env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stderr.count(says) == 1, result.stderr


def test_a_reader_that_closes_the_output_early_ends_it_quietly(tmp_path: Path) -> None:
    # `evalrun runs ls | head -1`: what no one reads any more is not an error to report
    env = {**os.environ, "EVALRUN_HOME": str(tmp_path / "home"), "PYTHONPATH": str(ROOT)}
    for args in (["runs", "ls", "--json"], ["schema"]):
        proc = subprocess.Popen([sys.executable, "-m", "runner.entry", *args], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert proc.stdout is not None and proc.stderr is not None
        proc.stdout.close()  # the reader is gone before the first line
        stderr = proc.stderr.read().decode()
        assert proc.wait(timeout=120) == 1
        assert "Traceback" not in stderr and "internal error" not in stderr, stderr
    log = (tmp_path / "home" / "logs" / "evalrun.jsonl").read_text().splitlines()
    assert json.loads(log[-1])["event"] == "output_closed"

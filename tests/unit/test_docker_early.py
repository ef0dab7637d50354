"""The Docker helper forked at the start of `evalrun run` (runner.adapters.docker_early).

Its messages, its errors as the caller's own, and its lifetime: stopped at once when it
made nothing, reaped always. The docker tier runs every `evalrun run` through it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from runner.adapters.docker_early import (
    EarlyEngine,
    _Helper,
    _read,
    _rebuilt,
    _write,
)
from runner.errors import DockerAPIError, InfrastructureError, TransientDockerError

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]


def test_messages_cross_the_pipe_whole_and_its_end_reads_none():
    r, w = os.pipe()
    _write(w, ("create", "img@sha256:" + "0" * 64, ["run"], [("/t", "/s", True)], {"a": 1}))
    _write(w, ("start",))
    os.close(w)
    assert _read(r) == ("create", "img@sha256:" + "0" * 64, ["run"], [("/t", "/s", True)], {"a": 1})
    assert _read(r) == ("start",)
    assert _read(r) is None
    os.close(r)


def test_a_cut_message_is_an_error_not_a_hang():
    r, w = os.pipe()
    os.write(w, (1000).to_bytes(4, "big") + b"short")
    os.close(w)
    with pytest.raises(EOFError):
        _read(r)
    os.close(r)


def test_the_helpers_error_is_raised_as_the_callers_own():
    helper = _Helper()
    helper.failure = TransientDockerError(
        "connect to Docker engine: Docker engine unreachable: x",
        operation="connect to Docker engine",
        hint="start the engine",
    )
    status, payload = helper.handle(("runtimes",))
    assert status == "error"
    exc = _rebuilt(*payload)
    assert type(exc) is TransientDockerError and exc.exit_code == 5
    assert exc.message == "connect to Docker engine: Docker engine unreachable: x"
    assert exc.hint == "start the engine"
    assert exc.operation == "connect to Docker engine" and exc.fields == helper.failure.fields
    assert exc.diagnostics() == helper.failure.diagnostics()


def _engine_with_reply(reply: object) -> EarlyEngine:
    requests_r, requests_w = os.pipe()
    replies_r, replies_w = os.pipe()
    _write(replies_w, reply)
    os.close(replies_w)
    engine = EarlyEngine(os.getpid(), requests_w, replies_r)
    engine._closed = True  # nothing to reap: it is this process
    os.close(requests_r)
    return engine


def test_an_unexpected_failure_of_the_helper_is_an_internal_error():
    engine = _engine_with_reply(("crash", "Traceback ...\nKeyError: 'x'"))
    with pytest.raises(RuntimeError, match="Docker helper process failed: Traceback"):
        engine.receive()


def test_a_refusal_keeps_its_class_status_and_exit_code():
    engine = _engine_with_reply(
        ("error", (DockerAPIError, ("create container: refused",), {
            "message": "create container: refused", "hint": None,
            "fields": {"operation": "create container", "status": 400},
        }))
    )
    with pytest.raises(DockerAPIError) as caught:
        engine.receive()
    assert caught.value.exit_code == 5 and caught.value.fields["status"] == 400


def test_a_helper_gone_without_an_answer_is_an_infrastructure_error():
    r, w = os.pipe()
    os.close(w)
    engine = EarlyEngine(os.getpid(), os.open(os.devnull, os.O_WRONLY), r)
    engine._closed = True
    with pytest.raises(InfrastructureError, match="ended without an answer"):
        engine.receive()


def test_no_helper_is_forked_while_other_threads_run():
    stop = threading.Event()
    thread = threading.Thread(target=stop.wait)
    thread.start()
    try:
        assert EarlyEngine.fork() is None
    finally:
        stop.set()
        thread.join()


def _in_fresh_process(code: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT), **env},
    )


def test_an_unreachable_engine_comes_back_as_the_callers_error_and_the_helper_is_reaped():
    proc = _in_fresh_process(
        """
        import os
        from runner.adapters.docker_early import EarlyEngine
        from runner.errors import EvalrunError
        engine = EarlyEngine.fork()
        try:
            engine.ask("runtimes")
        except EvalrunError as exc:  # as connect() raises it here, after its retries
            print("raised", exc.exit_code, "make host-up" in exc.diagnostics())
        engine.close()
        try:
            os.waitpid(engine.pid, os.WNOHANG)
        except ChildProcessError:
            print("reaped")
        """,
        {"DOCKER_HOST": "unix:///nonexistent/docker.sock"},
    )
    assert proc.stdout.split("\n")[:2] == ["raised 5 True", "reaped"], proc.stderr


def test_a_helper_that_made_nothing_is_stopped_at_once(tmp_path):
    # an engine that accepts and never answers: the helper waits in its connect
    proc = _in_fresh_process(
        f"""
        import socket, time, os
        server = socket.socket(socket.AF_UNIX)
        server.bind({str(tmp_path / "mute.sock")!r})
        server.listen(8)
        from runner.adapters.docker_early import EarlyEngine
        engine = EarlyEngine.fork()
        time.sleep(0.5)
        t0 = time.monotonic()
        engine.close()
        print("closed in", round(time.monotonic() - t0, 2))
        try:
            os.waitpid(engine.pid, os.WNOHANG)
        except ChildProcessError:
            print("reaped")
        """,
        {"DOCKER_HOST": f"unix://{tmp_path / 'mute.sock'}"},
    )
    lines = proc.stdout.split("\n")
    assert lines[1] == "reaped", proc.stderr
    assert float(lines[0].split()[-1]) < 1.0


def test_without_a_request_the_helper_ends_with_this_process(tmp_path):
    # the CLI leaves through os._exit: the helper sees its pipe close and ends by itself
    marker = tmp_path / "helper.pid"
    proc = _in_fresh_process(
        f"""
        import os
        from runner.adapters.docker_early import EarlyEngine
        engine = EarlyEngine.fork()
        open({str(marker)!r}, "w").write(str(engine.pid))
        os._exit(0)
        """,
        {"DOCKER_HOST": "unix:///nonexistent/docker.sock"},
    )
    assert proc.returncode == 0, proc.stderr
    pid = int(marker.read_text())

    def gone() -> bool:  # ended: no process, or one only its new parent has yet to reap
        status = Path(f"/proc/{pid}/status")
        try:
            return "State:\tZ" in status.read_text()
        except FileNotFoundError:
            return True

    deadline = time.monotonic() + 30
    while not gone() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert gone()


def test_threads_asking_at_once_each_get_their_own_answer():
    # a run set's members preflight on threads: one request and its answer at a time
    proc = _in_fresh_process(
        """
        import threading
        from runner.adapters.docker_early import EarlyEngine
        from runner.errors import EvalrunError
        engine = EarlyEngine.fork()
        answers = []
        def ask():
            try:
                engine.ask("runtimes")
            except EvalrunError as exc:
                answers.append(exc.exit_code)
            except Exception as exc:
                answers.append(repr(exc))
        threads = [threading.Thread(target=ask) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        engine.close()
        print(sorted(answers))
        """,
        {"DOCKER_HOST": "unix:///nonexistent/docker.sock"},
    )
    assert proc.stdout.strip() == "[5, 5, 5, 5]", proc.stderr

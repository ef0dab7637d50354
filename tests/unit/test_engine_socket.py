"""The engine's API on its unix socket (runner.adapters.engine_socket), against a stand-in
engine: requests as the Docker backend makes them, errors as the SDK path names them."""

from __future__ import annotations

import json
import socketserver
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import pytest

from runner.adapters.engine_socket import DEFAULT_SOCKET, EngineSocket
from runner.errors import (
    DockerAPIError,
    DockerImageNotFound,
    InfrastructureError,
    TransientDockerError,
)

pytestmark = pytest.mark.unit


@pytest.fixture
def no_wait(monkeypatch: pytest.MonkeyPatch) -> None:
    """The retries as the runner makes them, without their waits."""
    from runner._internal import retry

    def immediate(fn: Any, *, what: str) -> Any:
        return retry.call_with_retries(
            fn, what=what, policy=retry.transient_policy(sleep=lambda _s: None)
        )

    monkeypatch.setattr("runner.adapters.engine_socket.call_with_retries", immediate)


class _Engine(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True

    def __init__(self, path: str, answers: dict[tuple[str, str], tuple[int, Any]]) -> None:
        self.answers = answers
        self.seen: list[tuple[str, str, Any]] = []
        super().__init__(path, _Handler)


class _Handler(BaseHTTPRequestHandler):
    server: _Engine

    def _answer(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = json.loads(self.rfile.read(length)) if length else None
        self.server.seen.append((self.command, self.path, body))
        status, payload = self.server.answers.get(
            (self.command, self.path.split("?")[0]), (404, {"message": "page not found"})
        )
        if callable(payload):
            payload(self)
            return
        if isinstance(payload, bytes):  # a multiplexed stream, as attach and logs send it
            data = payload
        else:
            data = b"" if payload is None else json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = do_DELETE = _answer

    def log_message(self, *args: Any) -> None:
        pass

    def address_string(self) -> str:  # a unix socket has no host
        return "engine"


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[tuple[_Engine, EngineSocket]]:
    path = str(tmp_path / "docker.sock")
    server = _Engine(path, {})
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server, EngineSocket(path, timeout=5)
    server.shutdown()
    server.server_close()


def test_from_the_environment_only_a_unix_socket(tmp_path: Path) -> None:
    default = EngineSocket.from_environment({})
    assert default is not None and default.path == DEFAULT_SOCKET
    named = EngineSocket.from_environment({"DOCKER_HOST": f"unix://{tmp_path}/d.sock"})
    assert named is not None and named.path == f"{tmp_path}/d.sock"
    # tcp, ssh, TLS: the SDK does everything
    assert EngineSocket.from_environment({"DOCKER_HOST": "tcp://10.0.0.1:2376"}) is None
    assert EngineSocket.from_environment({"DOCKER_HOST": "ssh://me@host"}) is None


def test_what_a_run_asks_before_its_start(engine) -> None:
    server, socket = engine
    ref = "127.0.0.1:5000/evalrun/x@sha256:" + "a" * 64
    server.answers.update(
        {
            ("GET", "/info"): (200, {"Runtimes": {"runc": {}, "runsc": {}}}),
            ("GET", "/images/127.0.0.1%3A5000%2Fevalrun%2Fx%40sha256%3A" + "a" * 64 + "/json"): (
                200,
                {"Id": "sha256:" + "b" * 64},
            ),
            ("DELETE", "/containers/evalrun-r-1"): (204, None),
            ("POST", "/containers/create"): (201, {"Id": "c" * 64, "Warnings": []}),
            ("POST", "/containers/" + "c" * 64 + "/start"): (204, None),
        }
    )
    assert socket.runtimes() == {"runc", "runsc"}
    assert socket.image_id(ref) == "sha256:" + "b" * 64
    assert socket.remove("evalrun-r-1") is True
    assert socket.create("evalrun-r-1", {"Image": ref, "Cmd": ["run"]}) == "c" * 64
    socket.start("c" * 64)
    created = [s for s in server.seen if s[0] == "POST" and "create" in s[1]]
    assert created == [("POST", "/containers/create?name=evalrun-r-1", {"Image": ref, "Cmd": ["run"]})]


def test_errors_are_named_as_on_the_sdk_path(engine) -> None:
    server, socket = engine
    server.answers.update(
        {
            ("GET", "/images/gone/json"): (404, {"message": "No such image: gone"}),
            ("DELETE", "/containers/none"): (404, {"message": "No such container: none"}),
            ("POST", "/containers/create"): (409, {"message": "Conflict. The name is in use"}),
            ("POST", "/containers/x/start"): (500, {"message": "OCI runtime create failed"}),
        }
    )
    with pytest.raises(DockerImageNotFound, match="inspect gone: image not found: No such image"):
        socket.image_id("gone")
    assert socket.remove("none") is False  # nothing to remove is no error
    with pytest.raises(DockerAPIError, match=r"create container: Docker engine refused \(409\)"):
        socket.create("n", {})
    # a start is never retried: the engine's error as it came
    with pytest.raises(TransientDockerError, match="start container: Docker engine error 500"):
        socket.start("x")
    assert sum(1 for s in server.seen if s[1] == "/containers/x/start") == 1


def test_an_engine_that_keeps_failing_is_retried_then_given_up(engine, no_wait) -> None:
    server, socket = engine
    server.answers[("GET", "/info")] = (503, {"message": "busy"})
    with pytest.raises(InfrastructureError, match="docker info: still failing after retries"):
        socket.runtimes()
    assert sum(1 for s in server.seen if s[1] == "/info") == 4


def test_no_engine_is_unreachable_with_the_hint(tmp_path: Path, no_wait) -> None:
    socket = EngineSocket(str(tmp_path / "none.sock"), timeout=1)
    with pytest.raises(InfrastructureError) as caught:
        socket.runtimes()
    assert "Docker engine unreachable: FileNotFoundError" in caught.value.message
    assert "make host-up" in (caught.value.hint or "")
    with pytest.raises(TransientDockerError, match="start container: Docker engine unreachable"):
        socket.start("x")


def _frame(stream: int, data: bytes) -> bytes:
    return bytes([stream, 0, 0, 0]) + len(data).to_bytes(4, "big") + data


def test_the_output_stream_is_demultiplexed_as_it_comes(engine) -> None:
    server, socket = engine
    stream = _frame(1, b"loading\nstep 1") + _frame(2, b"warning\n") + _frame(1, b"/2\n")
    server.answers[("POST", "/containers/c/attach")] = (200, stream)
    server.answers[("GET", "/containers/c/logs")] = (200, stream + _frame(2, b"end"))
    assert list(socket.attach("c")) == [(1, b"loading\nstep 1"), (2, b"warning\n"), (1, b"/2\n")]
    assert socket.logs("c", 200) == "loading\nstep 1warning\n/2\nend"
    # a stream cut inside a frame ends it: what came whole is kept
    server.answers[("POST", "/containers/c/attach")] = (200, _frame(1, b"whole") + b"\x01\x00")
    assert list(socket.attach("c")) == [(1, b"whole")]
    attach = [s for s in server.seen if s[1].startswith("/containers/c/attach")][0]
    assert "logs=1" in attach[1] and "stream=1" in attach[1]


def test_wait_gives_the_exit_status_or_times_out(engine) -> None:
    import time as clock

    server, socket = engine
    server.answers[("POST", "/containers/done/wait")] = (200, {"StatusCode": 3})
    server.answers[("GET", "/containers/done/json")] = (200, {"State": {"Status": "exited"}})
    assert socket.wait("done", timeout=5) == 3
    assert socket.inspect("done")["State"]["Status"] == "exited"

    def never(handler: BaseHTTPRequestHandler) -> None:
        clock.sleep(2)  # longer than the wait is given

    server.answers[("POST", "/containers/slow/wait")] = (200, never)
    with pytest.raises(
        TransientDockerError, match="wait for container: Docker engine unreachable: TimeoutError"
    ):
        socket.wait("slow", timeout=0.3)

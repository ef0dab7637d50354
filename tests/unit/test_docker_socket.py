"""The sandbox started ahead through the engine's socket, before the Docker SDK is loaded
(runner.adapters.docker_socket, the helper in docker_early).

The request is the SDK's to the byte (compared with what docker-py posts); the socket is
the one docker-py's ``from_env`` would use, or none; any answer but the expected one is
refused and leaves nothing behind. The docker tier compares the two containers on the
real engine.
"""

from __future__ import annotations

import contextlib
import json
import socketserver
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import docker
import pytest
from docker.utils import parse_bytes

from runner.adapters import docker_early
from runner.adapters.docker_ahead import Ahead
from runner.adapters.docker_early import _Helper
from runner.adapters.docker_engine import create_container
from runner.adapters.docker_socket import (
    EngineRefused,
    EngineSocket,
    _bytes,
    create_body,
    socket_path,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "fuzz"))
from seeds import sandbox_request  # the fuzz targets' shared samples

pytestmark = pytest.mark.unit

IMAGE = "127.0.0.1:5000/evalrun/t@sha256:" + "a" * 64
LOCK = "sha256:" + "1" * 64


class _Posted(Exception):
    pass


def _sdk_body(image: str, command: list[str], mounts: list, options: dict) -> tuple[dict, dict]:
    """What docker-py posts for ``create_container`` (its JSON and query), never sent."""
    client = docker.DockerClient(base_url="unix:///nonexistent.sock", version="1.41")
    seen: dict[str, Any] = {}

    def post(url: str, data: Any = None, params: Any = None, **_: Any) -> None:
        seen.update(url=url, body=json.loads(data), params=params)
        raise _Posted

    client.api._post = post  # type: ignore[method-assign]
    with pytest.raises(_Posted):
        create_container(client, image, command, mounts, options)
    assert seen["url"].endswith("/v1.41/containers/create")
    return seen["body"], seen["params"]


@pytest.mark.parametrize(
    "change",
    [
        {},
        {"runtime": "runc"},
        {"mem_limit": "1g", "memswap_limit": "1g"},
        {"mem_limit": "2048M", "memswap_limit": 2147483648},
        {"labels": {}, "pids_limit": 4096, "nano_cpus": 250_000_000},
        {"tmpfs": {"/tmp": "rw,size=64m", "/run": "rw"}},
    ],
)
def test_the_request_is_the_one_the_sdk_posts(change: dict):
    request = sandbox_request(IMAGE, LOCK, 3, **change)
    command = [*request.command, "--plan-wait", "300"]
    mounts = [(t, s or "/tmp/x", ro) for t, s, ro in request.mounts]
    body, params = _sdk_body(IMAGE, command, mounts, dict(request.options))
    assert create_body(IMAGE, command, mounts, request.options) == body
    assert params == {"name": request.options["name"]}


def test_what_it_does_not_translate_goes_the_sdks_way():
    options = dict(sandbox_request(IMAGE, LOCK, 0).options)
    assert create_body(IMAGE, ["x"], [], {**options, "environment": {"A": "1"}}) is None
    assert create_body(IMAGE, ["x"], [], {**options, "mem_limit": "1.5g"}) is None
    assert create_body(IMAGE, ["x"], [], {**options, "name": None}) is None
    assert create_body(IMAGE, ["x"], [], options) is not None


@pytest.mark.parametrize("value", ["512m", "512M", "1g", "64k", "100b", "100", "0", 4096])
def test_sizes_are_read_as_the_sdk_reads_them(value: Any):
    assert _bytes(value) == parse_bytes(value)


@pytest.mark.parametrize("value", ["1.5g", "12x", "", "m", "-1m", None, 1.5, True])
def test_sizes_in_other_forms_are_not_read(value: Any):
    assert _bytes(value) is None


def test_the_sdk_settles_on_the_engines_own_api_version(monkeypatch):
    """The socket's requests name no version, so the engine answers in its own: the one
    docker-py's ``from_env`` asks the engine for before its first call (its default,
    1.45, an engine of the 20.10 series refuses)."""
    monkeypatch.setattr(docker.api.client.APIClient, "_retrieve_server_version",
                        lambda self: "1.41")
    monkeypatch.setenv("DOCKER_HOST", "unix:///nonexistent.sock")
    assert docker.from_env().api._version == "1.41"


@pytest.mark.parametrize(
    ("environ", "path"),
    [
        ({}, "/var/run/docker.sock"),
        ({"DOCKER_HOST": "unix:///run/user/0/docker.sock"}, "/run/user/0/docker.sock"),
        ({"DOCKER_HOST": ""}, "/var/run/docker.sock"),
        ({"DOCKER_HOST": "tcp://127.0.0.1:2376"}, None),
        ({"DOCKER_HOST": "ssh://me@host"}, None),
        ({"DOCKER_HOST": "unix://relative.sock"}, None),
        ({"DOCKER_HOST": "unix:///var/run/docker.sock", "DOCKER_TLS_VERIFY": "1"}, None),
    ],
)
def test_the_socket_is_the_one_docker_py_would_use(environ: dict, path: str | None):
    assert socket_path(environ) == path


class _Engine(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    """An HTTP server on a Unix socket answering as told: (status, body) per method+path."""

    daemon_threads = True

    def __init__(self, path: str, answers: dict[str, tuple[int, bytes]]) -> None:
        self.answers = answers
        self.seen: list[tuple[str, str, Any]] = []
        super().__init__(path, _Handler)


class _Handler(BaseHTTPRequestHandler):
    server: _Engine

    def _answer(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = json.loads(self.rfile.read(length)) if length else None
        self.server.seen.append((self.command, self.path, body))
        key = f"{self.command} {self.path.split('?')[0]}"
        status, payload = self.server.answers.get(key, (404, b'{"message": "no such"}'))
        self.send_response(status)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            self.wfile.write(payload)  # a client that refused the answer has gone

    do_GET = do_POST = do_DELETE = _answer

    def address_string(self) -> str:
        return "unix"

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[_Engine]:
    server = _Engine(str(tmp_path / "engine.sock"), {})
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def test_create_start_and_remove_are_the_engine_apis_calls(engine: _Engine):
    engine.answers.update({
        "POST /containers/create": (201, b'{"Id": "c0ffee", "Warnings": []}'),
        "POST /containers/c0ffee/start": (204, b""),
        "DELETE /containers/c0ffee": (204, b""),
    })
    socket = EngineSocket(engine.server_address)  # type: ignore[arg-type]
    assert socket.create("evalrun-r 1", {"Image": IMAGE}) == "c0ffee"
    socket.start("c0ffee")
    socket.remove("c0ffee")
    assert engine.seen == [
        ("POST", "/containers/create?name=evalrun-r%201", {"Image": IMAGE}),
        ("POST", "/containers/c0ffee/start", None),
        ("DELETE", "/containers/c0ffee?force=1", None),
    ]


@pytest.mark.parametrize(
    "answer",
    [
        (409, b'{"message": "Conflict. The container name is already in use"}'),
        (400, b'{"message": "unknown or invalid runtime name: runsc"}'),
        (201, b"not json"),
        (201, b'{"Warnings": []}'),
        (201, b'["c0ffee"]'),
        (500, b""),
    ],
)
def test_any_other_answer_is_refused(engine: _Engine, answer: tuple[int, bytes]):
    engine.answers["POST /containers/create"] = answer
    with pytest.raises(EngineRefused):
        EngineSocket(engine.server_address).create("n", {})  # type: ignore[arg-type]


def test_no_engine_at_the_socket_is_refused(tmp_path: Path):
    with pytest.raises(EngineRefused):
        EngineSocket(str(tmp_path / "none.sock")).create("n", {})


def _ahead() -> Ahead:
    request = sandbox_request(IMAGE, LOCK, 3, plan=None, results=None)
    return Ahead(request, request.options["labels"]["org.evalrun.run-id"])


def _folders(tmp_path: Path) -> list[Path]:
    return sorted(tmp_path.glob("evalrun-*"))


@pytest.fixture
def helper(engine: _Engine, tmp_path: Path, monkeypatch) -> _Helper:
    monkeypatch.setenv("DOCKER_HOST", f"unix://{engine.server_address}")
    monkeypatch.setattr(docker_early.tempfile, "tempdir", str(tmp_path))
    monkeypatch.setattr(docker_early.os, "chown", lambda *a: None)
    return _Helper()


def test_the_helper_starts_the_sandbox_on_the_socket_before_it_loads_the_sdk(
    helper: _Helper, engine: _Engine, tmp_path: Path
):
    engine.answers.update({
        "POST /containers/create": (201, b'{"Id": "c0ffee"}'),
        "POST /containers/c0ffee/start": (204, b""),
    })
    helper.start_ahead_on_socket(_ahead())
    assert helper.ahead is not None and helper.ahead.container_id == "c0ffee"
    (_, path, body), _start = engine.seen
    assert path.startswith("/containers/create?name=evalrun-r-")
    assert body["Cmd"][-2:] == ["--plan-wait", "300"]
    mounts = {m["Target"]: m["Source"] for m in body["HostConfig"]["Mounts"]}
    assert mounts["/evalrun/plan"] == str(helper.ahead.plan_dir)
    assert mounts["/evalrun/results"] == str(helper.ahead.results_dir)
    # the SDK could not connect: the sandbox is removed through the socket
    engine.answers["DELETE /containers/c0ffee"] = (204, b"")
    helper.failure = RuntimeError("no engine")
    helper.connected_ahead()
    assert helper.ahead is None
    assert engine.seen[-1][:2] == ("DELETE", "/containers/c0ffee?force=1")
    assert _folders(tmp_path) == []


def test_a_refused_start_leaves_no_container_and_no_folders(
    helper: _Helper, engine: _Engine, tmp_path: Path
):
    engine.answers.update({
        "POST /containers/create": (201, b'{"Id": "c0ffee"}'),
        "POST /containers/c0ffee/start": (500, b'{"message": "OCI runtime create failed"}'),
        "DELETE /containers/c0ffee": (204, b""),
    })
    helper.start_ahead_on_socket(_ahead())
    assert helper.ahead is None
    assert engine.seen[-1][:2] == ("DELETE", "/containers/c0ffee?force=1")
    assert _folders(tmp_path) == []


def test_a_refused_create_leaves_it_to_the_sdks_way(
    helper: _Helper, engine: _Engine, tmp_path: Path
):
    engine.answers["POST /containers/create"] = (409, b'{"message": "Conflict"}')
    helper.start_ahead_on_socket(_ahead())
    assert helper.ahead is None and helper.socket is None
    assert [call[0] for call in engine.seen] == ["POST"]  # nothing else asked
    assert _folders(tmp_path) == []


def test_an_answer_nested_past_what_json_reads_is_refused(engine: _Engine):
    engine.answers["POST /containers/create"] = (201, b"[" * 100_000 + b"]" * 100_000)
    with pytest.raises(EngineRefused):
        EngineSocket(engine.server_address).create("n", {})  # type: ignore[arg-type]


def _started_on_socket(helper: _Helper, engine: _Engine) -> None:
    engine.answers.update({
        "POST /containers/create": (201, b'{"Id": "c0ffee"}'),
        "POST /containers/c0ffee/start": (204, b""),
        "GET /containers/c0ffee/json": (200, b'{"State": {"Status": "running"}}'),
        f"GET /images/{IMAGE.replace('@', '%40')}/json": (200, b'{"Id": "sha256:1d"}'),
        "GET /info": (200, b'{"Runtimes": {"runc": {}, "runsc": {}}}'),
        "DELETE /containers/c0ffee": (204, b""),
    })
    helper.start_ahead_on_socket(_ahead())
    assert helper.socket is not None and helper.ahead is not None


def _create(request: Any) -> tuple[str, Any]:
    return ("create", request.image, list(request.command),
            [list(m) for m in request.mounts], request.options)


def _no_sdk(helper: _Helper, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Where the helper would load the SDK: recorded, and refused (its failure)."""
    loaded: list[str] = []

    def connect() -> None:
        loaded.append("connect")
        helper.failure = RuntimeError("the SDK was loaded")

    monkeypatch.setattr(helper, "connect", connect)
    return loaded


def test_the_sandbox_started_on_the_socket_is_handed_over_without_the_sdk(
    helper: _Helper, engine: _Engine, monkeypatch: pytest.MonkeyPatch
):
    _started_on_socket(helper, engine)
    loaded = _no_sdk(helper, monkeypatch)
    asked_before = len(engine.seen)
    ahead = _ahead()
    # the run asks what the SDK's way would have answered, in its order
    assert helper.handle(("has_runtime", "runsc")) == ("ok", True)  # it runs on it
    assert helper.handle(("image", IMAGE)) == ("ok", "sha256:1d")
    status, made = helper.handle(_create(ahead.request))
    assert status == "ok" and made.ahead == "adopted" and made.container_id == "c0ffee"
    assert made.plan_dir == helper.ahead.plan_dir
    assert helper.handle(("start",)) == ("ok", None)
    assert loaded == []
    assert [call[:2] for call in engine.seen[asked_before:]] == [
        ("GET", f"/images/{IMAGE.replace('@', '%40')}/json"),
        ("GET", "/containers/c0ffee/json"),
    ]
    helper.abandon()  # handed over and started: the runner's now
    assert engine.seen[-1][:2] == ("GET", "/containers/c0ffee/json")


def test_another_runtime_is_asked_of_the_engine(
    helper: _Helper, engine: _Engine, monkeypatch: pytest.MonkeyPatch
):
    _started_on_socket(helper, engine)
    loaded = _no_sdk(helper, monkeypatch)
    assert helper.handle(("has_runtime", "runc")) == ("ok", True)
    assert helper.handle(("has_runtime", "kata")) == ("ok", False)
    assert helper.handle(("runtimes",)) == ("ok", ["runc", "runsc"])
    assert engine.seen[-1][:2] == ("GET", "/info") and loaded == []


@pytest.mark.parametrize(
    ("answers", "request_"),
    [
        # the image is not there: the SDK's way pulls it
        ({f"GET /images/{IMAGE.replace('@', '%40')}/json": (404, b"{}")}, ("image", IMAGE)),
        # the engine's answer is not one this reads
        ({"GET /info": (200, b'{"Runtimes": []}')}, ("runtimes",)),
        ({f"GET /images/{IMAGE.replace('@', '%40')}/json": (200, b"{}")}, ("image", IMAGE)),
        # the sandbox no longer waits, or its state cannot be read
        ({"GET /containers/c0ffee/json": (200, b'{"State": {"Status": "exited"}}')},
         _create(_ahead().request)),
        ({"GET /containers/c0ffee/json": (404, b"{}")}, _create(_ahead().request)),
    ],
    ids=["image-missing", "runtimes-unread", "image-unread", "exited", "gone"],
)
def test_whatever_the_socket_cannot_answer_goes_the_sdks_way(
    helper: _Helper, engine: _Engine, monkeypatch: pytest.MonkeyPatch, answers, request_
):
    _started_on_socket(helper, engine)
    engine.answers.update(answers)
    loaded = _no_sdk(helper, monkeypatch)
    status, payload = helper.handle(request_)
    assert loaded == ["connect"]
    # the SDK could not connect here: its error, and the sandbox ahead removed
    assert status == "crash" and "the SDK was loaded" in payload
    assert helper.ahead is None
    assert engine.seen[-1][:2] == ("DELETE", "/containers/c0ffee?force=1")


def test_another_request_than_the_sandboxs_goes_the_sdks_way(
    helper: _Helper, engine: _Engine, monkeypatch: pytest.MonkeyPatch
):
    _started_on_socket(helper, engine)
    loaded = _no_sdk(helper, monkeypatch)
    other = sandbox_request(IMAGE, LOCK, 4, plan=None, results=None)  # the next attempt
    status, _ = helper.handle(_create(other))
    assert status == "crash" and loaded == ["connect"]


def test_a_sandbox_handed_over_but_never_started_is_removed_on_the_socket(
    helper: _Helper, engine: _Engine, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
):
    _started_on_socket(helper, engine)
    loaded = _no_sdk(helper, monkeypatch)
    _, made = helper.handle(_create(_ahead().request))
    assert made.ahead == "adopted"
    helper.abandon()  # the runner stopped before it asked for the start
    assert engine.seen[-1][:2] == ("DELETE", "/containers/c0ffee?force=1")
    assert _folders(tmp_path) == [] and loaded == []

"""Fuzz target: the Docker engine's answers to the helper's socket requests, read before
the SDK is loaded (runner.adapters.docker_socket: the runtimes, an image's ID, a
container's state, a created container's id).

The input is the engine's whole HTTP answer (status line, headers, body), served on a
socket pair to the same ``http.client`` connection the helper uses. Property: each read
ends in the value it promises (a set of runtime names, an image ID or None, a state, an
id) or in ``EngineRefused`` — on which the helper goes the SDK's way — never in another
exception and never hanging.
"""

from __future__ import annotations

import http.client
import socket

from runner.adapters.docker_socket import EngineRefused, EngineSocket

NAME = "engine"
_ANSWER = {"bytes": b""}


class _Served(http.client.HTTPConnection):
    """A connection whose peer is a socket pair holding the input as the engine's answer."""

    engine: socket.socket | None = None

    def connect(self) -> None:
        ours, self.engine = socket.socketpair()
        self.engine.sendall(_ANSWER["bytes"])
        # the answer, then the end of the stream; the request is still taken in
        self.engine.shutdown(socket.SHUT_WR)
        ours.settimeout(self.timeout)
        self.sock = ours

    def close(self) -> None:
        super().close()
        if self.engine is not None:
            self.engine.close()
            self.engine = None


class _Engine(EngineSocket):
    def _connection(self) -> http.client.HTTPConnection:
        return _Served("localhost", timeout=self.timeout)


_ENGINE = _Engine("/nonexistent/engine.sock", timeout=5.0)
_IMAGE = "127.0.0.1:5000/evalrun/fuzz@sha256:" + "c" * 64


def _answer(status: str, body: bytes) -> bytes:
    return (
        f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body


def seeds() -> dict[str, bytes]:
    return {
        "info": _answer("200 OK", b'{"Runtimes": {"runc": {"path": "runc"}, "runsc": {}}}'),
        "image": _answer("200 OK", b'{"Id": "sha256:' + b"d" * 64 + b'", "RepoTags": []}'),
        "state": _answer("200 OK", b'{"Id": "c0ffee", "State": {"Status": "running"}}'),
        "created": _answer("201 Created", b'{"Id": "c0ffee", "Warnings": []}'),
        "missing": _answer("404 Not Found", b'{"message": "No such image"}'),
        "chunked": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        b'13\r\n{"Runtimes": {"a":1\r\n1\r\n}\r\n1\r\n}\r\n0\r\n\r\n',
    }


def test_one_input(data: bytes) -> None:
    _ANSWER["bytes"] = data[: 1 << 16]  # what a socket pair holds without a reader
    reads = (
        lambda: _ENGINE.runtimes(),
        lambda: _ENGINE.image_id(_IMAGE),
        lambda: _ENGINE.status("c0ffee"),
        lambda: _ENGINE.create("evalrun-r-fuzz", {"Image": _IMAGE}),
    )
    for index, read in enumerate(reads):
        try:
            found = read()
        except EngineRefused:
            continue
        if index == 0:
            assert isinstance(found, set) and all(isinstance(n, str) for n in found), found
        elif index == 1:
            assert found is None or (isinstance(found, str) and found), found
        else:
            assert isinstance(found, str) and (index == 2 or found), found

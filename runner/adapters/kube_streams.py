"""Exec into a pod and follow its log, through the Kubernetes API.

Exec (:func:`exec_in_pod`): binary websocket frames, demultiplexed as they arrive;
log following (:class:`PodLogFollower`). API errors are translated by
:mod:`runner.adapters.kubernetes`.
"""

from __future__ import annotations

import ast
import contextlib
import json
import logging
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from kubernetes import client as k8s
from kubernetes.client.rest import ApiException
from kubernetes.stream import stream as k8s_stream
from websocket import ABNF, WebSocketException

# The watch logged under this name before it moved here; log consumers filter on it.
from runner.adapters.kubernetes import UNREACHABLE_HINT, _classify, translated
from runner.errors import (
    EvalrunError,
    TransientKubernetesError,
)

# Logged under the backend's name, as before the split; log consumers filter on it.
log = logging.getLogger("evalrun.backend.kubernetes")


# --------------------------------------------------------------------------- exec stream

# The API server's exec channels (v4/v5.channel.k8s.io): one byte before each frame's data.
_STDOUT, _STDERR, _STATUS, _CLOSE = 1, 2, 3, 255
_STDERR_KEEP = 64 * 1024
_HANDSHAKE_RE = re.compile(r"Handshake status (\d{3})")


@dataclass(frozen=True)
class ExecOutcome:
    """How a command run through the exec stream ended."""

    exit_code: int | None  # None: the API server reported a failure that is not an exit code
    stderr: str
    message: str = ""
    stdout_bytes: int = 0


def _exec_status(raw: bytes) -> tuple[int | None, str]:
    """Exit code and message from the status channel's ``Status`` object."""
    try:
        status = json.loads(raw.decode("utf-8", "replace"))
    except ValueError:
        return None, f"unreadable exec status {raw[:200]!r}"
    if not isinstance(status, dict):
        return None, "unreadable exec status"
    if status.get("status") == "Success":
        return 0, ""
    message = str(status.get("message") or status.get("reason") or "exec failed")
    for cause in (status.get("details") or {}).get("causes") or []:
        if isinstance(cause, dict) and cause.get("reason") == "ExitCode":
            with contextlib.suppress(TypeError, ValueError):
                return int(str(cause.get("message"))), message
    return None, message


def read_exec_frames(
    recv: Callable[[], tuple[int, bytes]],
    stdout: Callable[[bytes], None],
    *,
    what: str,
    namespace: str | None = None,
    name: str | None = None,
) -> ExecOutcome:
    """Demultiplex exec frames from ``recv`` (opcode, data) until the status arrives.

    Stdout bytes go to ``stdout`` as they arrive; stderr is kept (bounded). A stream
    that ends, or breaks, before the API server's status is a transient error: the
    command's outcome is unknown, the caller may retry.
    """
    err = bytearray()
    received = 0
    while True:
        try:
            opcode, data = recv()
        except (WebSocketException, OSError) as exc:
            raise TransientKubernetesError(
                f"{what}: exec stream cut after {received} bytes ({exc.__class__.__name__})",
                namespace=namespace,
                name=name,
            ) from exc
        if opcode == ABNF.OPCODE_CLOSE:
            raise TransientKubernetesError(
                f"{what}: exec stream closed after {received} bytes without a status",
                namespace=namespace,
                name=name,
            )
        if opcode not in (ABNF.OPCODE_BINARY, ABNF.OPCODE_TEXT) or not data:
            continue
        channel, payload = data[0], data[1:]
        if channel == _STDOUT:
            received += len(payload)
            stdout(payload)
        elif channel == _STDERR:
            err += payload[: max(0, _STDERR_KEEP - len(err))]
        elif channel == _STATUS:
            code, message = _exec_status(payload)
            return ExecOutcome(code, err.decode("utf-8", "replace"), message, received)


def exec_in_pod(
    api: k8s.ApiClient,
    namespace: str,
    pod: str,
    container: str,
    command: list[str],
    *,
    stdout: Callable[[bytes], None],
    idle_timeout_s: float = 120.0,
) -> ExecOutcome:
    """Run ``command`` in a running container through the API server's exec stream.

    Stdout arrives as binary websocket frames and goes to ``stdout`` as it comes;
    a refused or failed exec is translated like any API error (403: the runner
    lacks ``pods/exec``; 404: the pod is gone); a stream that breaks or idles for
    ``idle_timeout_s`` is a transient error.
    """
    what = f"exec {' '.join(command[-1:])} in pod {pod}"
    # The stream helper swaps the client's transport while it runs: never share one.
    own = k8s.ApiClient(api.configuration)
    try:
        try:
            ws = k8s_stream(
                k8s.CoreV1Api(own).connect_get_namespaced_pod_exec,
                pod,
                namespace,
                container=container,
                command=command,
                stdin=False,
                stdout=True,
                stderr=True,
                tty=False,
                binary=True,
                _preload_content=False,
            )
        except ApiException as exc:
            text = str(exc.reason or "")
            match = _HANDSHAKE_RE.search(text)
            if match is None:
                raise TransientKubernetesError(
                    f"{what}: API server unreachable: {text[:200]}",
                    namespace=namespace,
                    name=pod,
                    hint=UNREACHABLE_HINT,
                ) from exc
            status = int(match[1])
            cls, tail = _classify(status, _handshake_message(text))
            raise cls(f"{what}: {tail}", namespace=namespace, name=pod, status=status) from exc
        try:
            ws.sock.settimeout(idle_timeout_s)
            return read_exec_frames(
                lambda: _frame(ws.sock), stdout, what=what, namespace=namespace, name=pod
            )
        finally:
            with contextlib.suppress(Exception):
                ws.close()
    finally:
        own.close()


def _handshake_message(text: str) -> str:
    """The API server's ``Status`` message from a refused websocket handshake's text.

    websocket-client words it ``Handshake status 403 Forbidden -+-+- {headers} -+-+- b'{…}'``.
    """
    body = text.rsplit("-+-+-", 1)[-1].strip()
    with contextlib.suppress(ValueError, SyntaxError):
        if body.startswith(("b'", 'b"')):
            body = ast.literal_eval(body).decode("utf-8", "replace")
        status = json.loads(body)
        if isinstance(status, dict) and status.get("message"):
            return str(status["message"])
    return text[:300]


def _frame(sock: Any) -> tuple[int, bytes]:
    opcode, frame = sock.recv_data_frame(True)
    return int(opcode), bytes(frame.data)


# --------------------------------------------------------------------------- pod logs

LOG_QUIET_S = 600


class PodLogFollower:
    """Follows one container's log from its start, in a thread, as raw bytes.

    ``on_data`` gets the log's bytes as they arrive. When the stream ends while
    ``still_running()`` says the container runs (an API server restart), it
    reconnects and skips the bytes already delivered. :attr:`done` is set when
    the log has ended for good or :meth:`stop` was called; :attr:`error` says why
    the last attempt failed, if it did.
    """

    def __init__(
        self,
        api: k8s.ApiClient,
        namespace: str,
        pod: str,
        container: str,
        on_data: Callable[[bytes], None],
        *,
        still_running: Callable[[], bool] = lambda: False,
        max_reconnects: int = 30,
    ) -> None:
        self.namespace, self.pod, self.container = namespace, pod, container
        self._core = k8s.CoreV1Api(api)
        self._on_data = on_data
        self._still_running = still_running
        self._max_reconnects = max_reconnects
        self._stop = threading.Event()
        self._response: Any = None
        self.delivered = 0
        self.error: str | None = None
        self.done = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True, name=f"log-{pod}")

    def start(self) -> PodLogFollower:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        response = self._response
        if response is not None:
            # shut the socket down first: close() alone waits for the reading thread, which
            # a live log (a pod still running) never releases
            with contextlib.suppress(Exception):
                response.shutdown()
            with contextlib.suppress(Exception):
                response.close()

    def _loop(self) -> None:
        reconnects, backoff = 0, 0.5
        try:
            while not self._stop.is_set():
                before = self.delivered
                try:
                    self._follow_once()
                    self.error = None
                except EvalrunError as exc:
                    self.error = exc.message
                except Exception as exc:  # a body read cut by stop() or a restart
                    self.error = f"log stream broke: {exc.__class__.__name__}"
                if self._stop.is_set() or not self._still_running():
                    return
                if self.delivered > before:  # only attempts that brought nothing count
                    reconnects, backoff = 0, 0.5
                reconnects += 1
                if reconnects > self._max_reconnects:
                    return
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 5.0)
        finally:
            self.done.set()

    def _follow_once(self) -> None:
        skip = self.delivered
        with translated("follow pod log", namespace=self.namespace, name=self.pod):
            self._response = self._core.read_namespaced_pod_log(
                self.pod,
                self.namespace,
                container=self.container,
                follow=True,
                _preload_content=False,
                # (connect, read): a log quiet this long is re-followed, skipping what came
                _request_timeout=(30, LOG_QUIET_S),
            )
        try:
            for chunk in self._response.stream(64 * 1024, decode_content=True):
                if skip >= len(chunk):
                    skip -= len(chunk)
                    continue
                chunk, skip = chunk[skip:], 0
                self.delivered += len(chunk)
                self._on_data(chunk)
        finally:
            with contextlib.suppress(Exception):
                self._response.release_conn()
            self._response = None

"""Holding a finished pod until the runner has its results (Kubernetes, ``collect: exec``).

The pod has no network and no credentials, so nothing inside it can push results
anywhere. Instead, once the evaluation is over and every result file is written,
``run`` listens on a Unix socket (:data:`HOLD_SOCKET`), prints the ready line and
waits, at most ``hold_s`` seconds. The runner then execs, through the API server,

* ``emit-results``: the results directory as one raw stream (tar inside the
  chunked, checksummed stream of :mod:`runner.shared.protocol`) on stdout; it
  refuses unless the agent is holding, so results are never read half-written;
* ``ack``: tells the holding agent the results are collected; the agent answers
  with its exit code and exits with it.

A runner that disconnects simply execs again; a hold that expires ends the agent
with its real exit code all the same (the runner then reports the results lost).
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import IO, TYPE_CHECKING, Any

from runner.shared.protocol import ACK_RE, HOLD_SOCKET, StreamWriter, ready_line

if TYPE_CHECKING:
    import socket  # imported where it is used: only pods hold (see results_out.prepare)

# A request or answer on the hold socket is one short line.
_LINE_MAX = 256
_CLIENT_TIMEOUT_S = 10.0


def socket_path() -> str:
    """Where the holding agent listens (``$EVALRUN_AGENT_SOCKET`` overrides, for tests)."""
    return os.environ.get("EVALRUN_AGENT_SOCKET") or HOLD_SOCKET


class _Stop(Exception):
    """SIGTERM while holding: the pod is being deleted."""


def _on_term(signum: int, frame: FrameType | None) -> None:
    raise _Stop


def _read_line(conn: socket.socket) -> str:
    data = b""
    while b"\n" not in data and len(data) < _LINE_MAX:
        chunk = conn.recv(_LINE_MAX)
        if not chunk:
            break
        data += chunk
    return data.split(b"\n", 1)[0].decode("ascii", "replace").strip()


def hold(
    run_id: str,
    exit_code: int,
    hold_s: int,
    *,
    out: IO[str] | None = None,
    notes: IO[str] | None = None,
) -> int:
    """Serve the hold socket until ``ack <run_id>`` arrives or ``hold_s`` passes; returns
    ``exit_code`` either way (the agent's real exit code, whatever the runner does)."""
    import socket

    out = out or sys.stdout
    notes = notes or sys.stderr
    path = socket_path()
    with contextlib.suppress(FileNotFoundError):
        Path(path).unlink()
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    previous = signal.signal(signal.SIGTERM, _on_term)
    deadline = time.monotonic() + hold_s
    how = f"hold expired after {hold_s} s without acknowledgement; results not collected"
    try:
        server.bind(path)
        server.listen(8)
        out.write("\n" + ready_line(exit_code) + "\n")
        out.flush()
        while (remaining := deadline - time.monotonic()) > 0:
            server.settimeout(remaining)
            try:
                conn, _ = server.accept()
            except TimeoutError:
                break
            with conn:
                conn.settimeout(_CLIENT_TIMEOUT_S)
                try:
                    request = _read_line(conn)
                    if request == "status":
                        conn.sendall(f"holding exit={exit_code}\n".encode())
                    elif request == f"ack {run_id}":
                        conn.sendall(f"ok exit={exit_code}\n".encode())
                        how = "results acknowledged by the runner"
                        # let `ack` read the answer and end before this container does
                        with contextlib.suppress(OSError):
                            conn.recv(1)
                        break
                    else:
                        conn.sendall(b"error unknown request\n")
                except OSError:
                    continue
    except _Stop:
        how = "terminated while holding; results not acknowledged"
    finally:
        signal.signal(signal.SIGTERM, previous)
        server.close()
        with contextlib.suppress(OSError):
            Path(path).unlink()
    print(f"agent: {how}; exiting {exit_code}", file=notes, flush=True)
    return exit_code


def _ask(request: str) -> str:
    """One request to the holding agent; its answer, or OSError if none is holding."""
    import socket

    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.settimeout(_CLIENT_TIMEOUT_S)
        conn.connect(socket_path())
        conn.sendall(request.encode() + b"\n")
        return _read_line(conn)


def is_holding() -> bool:
    """True when an agent in this container holds its finished results."""
    try:
        return _ask("status").startswith("holding ")
    except OSError:
        return False


def emit_stream(
    results: Path, write_tar: Callable[[Path, Any], None], sink: IO[bytes]
) -> tuple[str, int]:
    """Write the results directory as one results stream to ``sink``; (sha256, size)."""
    writer = StreamWriter(sink)
    write_tar(results, writer)
    return writer.close()


def acknowledge(run_id: str) -> int:
    """Tell the holding agent its results are collected; returns the exit code it ends with.

    Raises OSError when no agent holds, ValueError on an unexpected answer.
    """
    answer = _ask(f"ack {run_id}")
    match = ACK_RE.fullmatch(answer)
    if match is None:
        raise ValueError(f"unexpected answer from the holding agent: {answer!r}")
    return int(match[1])

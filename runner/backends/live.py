"""The evaluation's output, live: each line the container prints, as it prints it.

Backends follow the container's output (Docker: its attach stream; Kubernetes: the
pod log) and hand every line to a :class:`LineRelay`, which logs it as an
``evaluation_output`` event (the JSON-lines log: ``--log-json`` and the log file)
and passes it to the sink the caller chose (the CLI prints it). Deep code never
prints; the files the agent keeps (``logs/evaluation.stdout``/``.stderr``) stay the
record that is signed.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger("evalrun.output")

# Longer lines are passed on in pieces of this many bytes.
MAX_LINE_BYTES = 16 * 1024


@dataclass(frozen=True)
class OutputLine:
    """One line of the container's output."""

    run_id: str
    stream: str  # "stdout" or "stderr" (Docker), "log" (Kubernetes: both, interleaved)
    text: str


OutputSink = Callable[[OutputLine], None]


class LineRelay:
    """Splits a container's output into lines; logs each one and hands it to ``sink``.

    Thread-safe: one relay may be fed from several threads (one per stream).
    ``tail`` keeps the last ``keep`` lines for the backend's result. ``intercept``
    sees each line first and may take it (protocol lines the agent prints).
    """

    def __init__(
        self,
        run_id: str,
        sink: OutputSink | None = None,
        *,
        keep: int = 200,
        intercept: Callable[[str], bool] | None = None,
    ) -> None:
        self.run_id = run_id
        self._sink = sink
        self._intercept = intercept
        self._pending: dict[str, bytes] = {}
        self._lock = threading.Lock()
        self.tail: deque[str] = deque(maxlen=keep)
        self.lines = 0

    def line(self, stream: str, text: str) -> None:
        """Relay one complete line (without its newline), unless ``intercept`` takes it."""
        if self._intercept is not None and self._intercept(text):
            return
        with self._lock:
            self.lines += 1
            self.tail.append(text)
        log.info(
            "evaluation output",
            extra={
                "event": "evaluation_output",
                "run_id": self.run_id,
                "stream": stream,
                "line": text,
            },
        )
        if self._sink is not None:
            self._sink(OutputLine(self.run_id, stream, text))

    def feed(self, stream: str, data: bytes) -> None:
        """Relay the complete lines in ``data``; keep a partial last line for later."""
        with self._lock:
            pending = self._pending.get(stream, b"") + data
            lines: list[bytes] = []
            while True:
                cut = pending.find(b"\n")
                if cut < 0 and len(pending) < MAX_LINE_BYTES:
                    break
                end = cut if 0 <= cut < MAX_LINE_BYTES else MAX_LINE_BYTES
                lines.append(pending[:end])
                pending = pending[end + (1 if end == cut else 0) :]
            self._pending[stream] = pending
        for raw in lines:
            self.line(stream, _text(raw))

    def close(self) -> None:
        """Relay what is left of unfinished lines."""
        with self._lock:
            pending, self._pending = self._pending, {}
        for stream, raw in pending.items():
            if raw:
                self.line(stream, _text(raw))


def _text(raw: bytes) -> str:
    return raw.decode("utf-8", "replace").rstrip("\r")

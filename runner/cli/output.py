"""How the CLI speaks: progress lines, ``--json`` objects, and JSON-lines logs.

Human output goes to the terminal (progress on stderr, results on stdout);
``--json`` prints one structured summary object on stdout instead. Structured
JSON-lines logs (``ts``, ``level``, ``event``, ``run_id``, …) always go to the
log file, and to stderr with ``--log-json``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any, TextIO

from runner._internal.sanitize import terminal_text
from runner._internal.settings import Settings

# What a command is given to report progress with (a Terminal, or any callable in tests).
Term = Callable[[str], None]

_RESERVED = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


class JsonLinesFormatter(logging.Formatter):
    """Stable schema: ts, level, event, run_id, logger, message, then the extra fields."""

    def format(self, record: logging.LogRecord) -> str:
        # the fixed fields, then whatever the caller passed as ``extra`` (rendered with str)
        data: dict[str, object] = {
            "ts": round(record.created, 6),
            "level": record.levelname.lower(),
            "event": getattr(record, "event", record.getMessage()),
            "run_id": getattr(record, "run_id", None),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _RESERVED and key not in data:
                data[key] = value
        return json.dumps(data, default=str, sort_keys=True)


class _LogFileHandler(logging.FileHandler):
    """The log file; a line that cannot be written (a full disk) is dropped, never a
    traceback on the user's terminal."""

    def handleError(self, record: logging.LogRecord) -> None:
        return


def configure_logging(settings: Settings, log_json: bool, verbose: bool) -> None:
    root = logging.getLogger()
    root.handlers.clear()
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    try:
        settings.log_file.parent.mkdir(parents=True, exist_ok=True)
        file_handler = _LogFileHandler(settings.log_file, encoding="utf-8")
        file_handler.setFormatter(JsonLinesFormatter())
        root.addHandler(file_handler)
    except OSError:
        pass
    if log_json:
        stream = logging.StreamHandler(sys.stderr)
        stream.setFormatter(JsonLinesFormatter())
        root.addHandler(stream)
    if not root.handlers:
        # no log file (its folder cannot be made): logging's last resort would print each
        # error a second time, unformatted, next to the one line the command prints
        root.addHandler(logging.NullHandler())
    for noisy in ("urllib3", "docker", "kubernetes"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


class Terminal:
    """Progress lines on stderr with elapsed time; silent in --json mode."""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet
        self.t0 = time.monotonic()

    def __call__(self, message: str) -> None:
        if not self.quiet:
            print(f"[{time.monotonic() - self.t0:6.1f}s] {message}", file=sys.stderr, flush=True)


# Lists up to this long are printed indented; longer ones one element per line.
_INDENTED_ITEMS = 100


def emit_json(data: Any) -> None:
    """Print ``data`` as the one ``--json`` object on stdout.

    A long list (``runs ls --json`` of a large store) is written one element per line,
    each compact: still one JSON document, made by the C encoder (an indented one is
    made in Python, ~40 s for 100,000 runs)."""
    if isinstance(data, list) and len(data) > _INDENTED_ITEMS:
        items = (json.dumps(item, sort_keys=True, default=str) for item in data)
        print("[\n" + ",\n".join(items) + "\n]")
        return
    print(json.dumps(data, indent=2, sort_keys=True, default=str))


class SafeStream:
    """A text stream that shows every control character but newline and tab as a visible
    escape (:func:`~runner._internal.sanitize.terminal_text`) before it reaches the real
    stream: no escape sequence, carriage return or bidi control from a bundle, a registry
    or a container ever reaches the terminal, whichever command printed it."""

    def __init__(self, raw: TextIO) -> None:
        self.raw = raw

    def write(self, text: str) -> int:
        self.raw.write(terminal_text(text))
        return len(text)

    def writelines(self, lines: Iterator[str]) -> None:
        for line in lines:
            self.write(line)

    def flush(self) -> None:
        self.raw.flush()

    def isatty(self) -> bool:
        return self.raw.isatty()

    def fileno(self) -> int:
        return self.raw.fileno()

    @property
    def encoding(self) -> str:
        return getattr(self.raw, "encoding", "utf-8")

    def __getattr__(self, name: str) -> Any:
        return getattr(self.raw, name)


@contextlib.contextmanager
def safe_streams() -> Iterator[None]:
    """Route ``sys.stdout`` and ``sys.stderr`` through :class:`SafeStream` for the block."""
    stdout, stderr = sys.stdout, sys.stderr
    sys.stdout = SafeStream(stdout)
    sys.stderr = SafeStream(stderr)
    try:
        yield
    finally:
        sys.stdout, sys.stderr = stdout, stderr

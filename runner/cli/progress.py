"""Progress bars for large transfers (inputs fetched, hashed, published), on stderr.

Deep code never prints: it takes a ``transfer(what)`` factory and calls the
``(done_bytes, total_bytes)`` callback it returns. :class:`TransferBars` is the CLI's
factory: on a terminal it redraws one line per transfer; elsewhere (CI logs) it prints
a line when a large transfer starts and when it ends. Small transfers show nothing.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable
from typing import TextIO

MIB = 1 << 20
GIB = 1 << 30
BAR_WIDTH = 24


def human_bytes(n: float) -> str:
    """``12.3 MiB``, ``1.50 GiB``."""
    if n >= GIB:
        return f"{n / GIB:.2f} GiB"
    if n >= MIB:
        return f"{n / MIB:.1f} MiB"
    return f"{int(n)} B"


class _Bar:
    def __init__(self, owner: TransferBars, what: str) -> None:
        self.owner = owner
        self.what = what
        self.started = owner.clock()
        self.last_draw = 0.0
        self.announced = False
        self.finished = False
        self.lock = threading.Lock()

    def __call__(self, done: int, total: int | None) -> None:
        if total is None or total < self.owner.min_bytes:
            return
        with self.lock:
            now = self.owner.clock()
            if self.finished and done < total:
                self.finished = False  # the total grew (hashed, now copying): a new line
            if self.finished:
                return
            complete = done >= total
            if self.owner.tty:
                if complete or now - self.last_draw >= self.owner.interval:
                    self.last_draw = now
                    self._draw(done, total, now, end="\n" if complete else "")
            elif not self.announced:
                self.owner.write(f"  {self.what}: {human_bytes(total)}\n")
            if complete:
                self.finished = True
                if not self.owner.tty:
                    seconds = max(now - self.started, 1e-6)
                    self.owner.write(
                        f"  {self.what}: {human_bytes(total)} in {seconds:.1f} s "
                        f"({human_bytes(total / seconds)}/s)\n"
                    )
            self.announced = True

    def _draw(self, done: int, total: int, now: float, *, end: str) -> None:
        share = min(1.0, done / total) if total else 1.0
        filled = int(share * BAR_WIDTH)
        rate = done / max(now - self.started, 1e-6)
        line = (
            f"\r  {self.what} [{'#' * filled}{'.' * (BAR_WIDTH - filled)}] {share:4.0%} "
            f"{human_bytes(done)}/{human_bytes(total)} {human_bytes(rate)}/s"
        )
        self.owner.write(line + "\x1b[K" + end)


class TransferBars:
    """``transfer(what)`` → a ``(done, total)`` callback drawing a bar, or None when quiet."""

    def __init__(
        self,
        *,
        quiet: bool = False,
        stream: TextIO | None = None,
        min_bytes: int = 32 * MIB,
        interval: float = 0.2,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.quiet = quiet
        self.stream = stream or sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.min_bytes = min_bytes
        self.interval = interval
        self.clock = clock
        self._lock = threading.Lock()

    def write(self, text: str) -> None:
        with self._lock:
            self.stream.write(text)
            self.stream.flush()

    def __call__(self, what: str) -> Callable[[int, int | None], None] | None:
        return None if self.quiet else _Bar(self, what)

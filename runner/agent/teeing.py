"""Running the evaluation command with its output both kept in the results and streamed
live, under a timeout; pipes a leftover child holds open are cut, never waited for."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO

# process may keep them open; its output is then cut, never waited for).
_DRAIN_S = 5.0


def _tee(source: IO[bytes], keep: IO[bytes], live: IO[bytes]) -> None:
    """Copy ``source`` to the file ``keep`` and, as it arrives, to the agent's own ``live``."""
    try:
        while chunk := source.read1(64 * 1024):  # type: ignore[attr-defined]
            keep.write(chunk)
            live.write(chunk)
            live.flush()
    except (OSError, ValueError):
        pass  # the file was closed after the drain time, or the live stream is gone


def run_teed(command: list[str], env: dict[str, str], logs: Path, timeout_s: int) -> int | None:
    """Run the evaluation; its stdout/stderr go to ``logs/evaluation.{stdout,stderr}`` and,
    live, to the agent's own stdout/stderr (the container log the runner follows).

    Returns the exit code, or None when it ran past ``timeout_s`` (then it is killed).
    """
    with (
        (logs / "evaluation.stdout").open("wb") as out,
        (logs / "evaluation.stderr").open("wb") as err,
    ):
        proc = subprocess.Popen(
            command,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
        )
        assert proc.stdout is not None and proc.stderr is not None
        pumps = [
            threading.Thread(target=_tee, args=(proc.stdout, out, sys.stdout.buffer), daemon=True),
            threading.Thread(target=_tee, args=(proc.stderr, err, sys.stderr.buffer), daemon=True),
        ]
        for pump in pumps:
            pump.start()
        rc: int | None = _wait(proc, timeout_s)
        drain_until = time.monotonic() + _DRAIN_S
        for pump in pumps:
            pump.join(max(0.0, drain_until - time.monotonic()))
    return rc


def _wait(proc: subprocess.Popen[bytes], timeout_s: float) -> int | None:
    """``proc``'s exit code, as soon as it exits; None when it ran past ``timeout_s`` (it is
    killed then).

    ``Popen.wait(timeout=…)`` polls: it sleeps up to 50 ms between looks, so the agent
    learnt of the evaluation's end ~25 ms late on average, in every run. A blocking wait
    returns at once; a timer kills the process at the deadline (a process that ended by
    itself at that moment keeps its own exit code)."""
    expired = threading.Event()

    def expire() -> None:
        expired.set()
        proc.kill()  # a no-op once the process has been waited for

    timer = threading.Timer(timeout_s, expire)
    timer.daemon = True
    timer.start()
    try:
        rc = proc.wait()
    finally:
        timer.cancel()
    return None if expired.is_set() and rc == -signal.SIGKILL else rc

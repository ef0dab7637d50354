"""How a run ends when it does not end well: thresholds missed, interrupted, cancelled,
or still running when ``wait`` gave up."""

from __future__ import annotations

from collections.abc import Mapping

from runner.errors.root import EvalrunError, Problem


class ThresholdsFailed(EvalrunError):
    """The evaluation ran and its metrics missed their thresholds (exit 6)."""

    exit_code = 6
    kind = "thresholds_failed"
    listing_key = "failed"

    def __init__(self, message: str, *, failed: Mapping[str, str]) -> None:
        super().__init__(message)
        self.failed = dict(failed)
        self.listing = tuple(
            Problem(f"{k}: {v}", {"metric": k, "reason": v}) for k, v in self.failed.items()
        )


class Interrupted(EvalrunError):
    """The user interrupted a run (Ctrl-C); state was cleaned up (exit 130)."""

    exit_code = 130
    kind = "interrupted"


class RunCancelled(EvalrunError):
    """The run was cancelled (``evalrun cancel``) before it ended; it is sealed so (exit 130)."""

    exit_code = 130
    kind = "cancelled"


class StillRunning(EvalrunError):
    """``evalrun wait --timeout`` gave up while the run goes on; nothing was sealed (exit 124,
    as timeout(1) has it)."""

    exit_code = 124
    kind = "still_running"


class StopRequested(KeyboardInterrupt):
    """A signal asked evalrun to stop (SIGTERM, as a CI runner cancels a job).

    Raised by the CLI's signal handler in the main thread; a ``KeyboardInterrupt``, so
    every path that cleans up after Ctrl-C cleans up after it the same way.
    """

    def __init__(self, signal_name: str) -> None:
        super().__init__(signal_name)
        self.signal_name = signal_name


def interrupted_reason(signal_name: str | None) -> str:
    """What an interrupted run's bundle says stopped it."""
    if signal_name and signal_name != "SIGINT":
        return f"interrupted by {signal_name} (the job running evalrun was cancelled)"
    return "interrupted by the user (Ctrl-C)"

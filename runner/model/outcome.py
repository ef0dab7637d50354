"""How a run, run set or audit ended, and the one table from outcome to exit code.

Every place that turns an outcome into a process exit code, or picks the worst
of several exit codes, uses this module (see DESIGN.md, "Exit codes").
"""

from __future__ import annotations

from collections.abc import Iterable
from enum import StrEnum


class Outcome(StrEnum):
    """The signed verdict of a run (``predicate.outcome``); it owns its exit code."""

    PASSED = "passed"
    COMPLETED = "completed"  # ran, no thresholds declared
    THRESHOLDS_FAILED = "thresholds_failed"
    EVALUATION_FAILED = "evaluation_failed"
    TIMEOUT = "timeout"
    OUT_OF_MEMORY = "out_of_memory"  # the evaluation exceeded its declared memory limit
    BAD_OUTPUT = "bad_output"
    INTEGRITY_FAILURE = "integrity_failure"
    ENVIRONMENT_MISMATCH = "environment_mismatch"
    INFRASTRUCTURE_FAILURE = "infrastructure_failure"
    INTERRUPTED = "interrupted"
    CANCELLED = "cancelled"  # stopped on purpose by ``evalrun cancel``
    AGENT_ERROR = "agent_error"

    @property
    def exit_code(self) -> int:
        return _EXIT[self]

    @property
    def retryable(self) -> bool:
        """The run never got to evaluate: a plain ``evalrun run`` tries again."""
        return self in (Outcome.INFRASTRUCTURE_FAILURE, Outcome.INTERRUPTED, Outcome.CANCELLED)

    @property
    def has_metrics(self) -> bool:
        """The evaluation ran to the end, so its metrics can be ranked or audited."""
        return self in (Outcome.PASSED, Outcome.COMPLETED, Outcome.THRESHOLDS_FAILED)

    @classmethod
    def parse(cls, value: object) -> Outcome | None:
        """The outcome named by ``value``, or None for anything else (old or odd bundles)."""
        try:
            return cls(value) if isinstance(value, str) else None
        except ValueError:
            return None


_EXIT: dict[Outcome, int] = {
    Outcome.PASSED: 0,
    Outcome.COMPLETED: 0,
    Outcome.THRESHOLDS_FAILED: 6,
    Outcome.EVALUATION_FAILED: 6,
    Outcome.TIMEOUT: 6,
    Outcome.OUT_OF_MEMORY: 6,
    Outcome.BAD_OUTPUT: 6,
    Outcome.INTEGRITY_FAILURE: 3,
    Outcome.ENVIRONMENT_MISMATCH: 4,
    Outcome.INFRASTRUCTURE_FAILURE: 5,
    Outcome.INTERRUPTED: 130,
    Outcome.CANCELLED: 130,
    Outcome.AGENT_ERROR: 1,
}

# Most severe first: a tampered artifact outranks a wrong environment, which outranks
# broken infrastructure, an internal error, bad input, an interruption and, last, an
# evaluation that ran and missed its thresholds.
SEVERITY: tuple[int, ...] = (3, 4, 5, 1, 2, 130, 6, 0)


def exit_code_of(outcome: object) -> int:
    """The exit code of an outcome string; an unknown outcome is an internal error (1)."""
    parsed = Outcome.parse(outcome)
    return parsed.exit_code if parsed is not None else 1


def worst_exit_code(codes: Iterable[int]) -> int:
    """The most severe of several exit codes (0 when there are none)."""
    seen = set(codes)
    return next((c for c in SEVERITY if c in seen), max(seen, default=0))

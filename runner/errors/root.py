"""The root of the error tree and one class per exit code (see DESIGN.md).

How an error renders is one mechanism, here in :class:`EvalrunError`: the message, its
fields, the items it lists (:class:`Problem`), and a hint. Subclasses only declare what
they carry.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar


@dataclass(frozen=True)
class Problem:
    """One item an error lists: a line for people and a JSON-safe record for machines.

    ``text`` may span several lines; continuation lines carry their own indentation.
    """

    text: str
    record: object


class EvalrunError(Exception):
    """Root of every intentional evalrun failure."""

    exit_code: ClassVar[int] = 1
    kind: ClassVar[str] = "internal"
    listing_key: ClassVar[str | None] = None
    """Key of the listed problems in :meth:`as_dict`; None: ``problems``, only when any."""
    stated_fields: ClassVar[frozenset[str]] = frozenset()
    """Fields the message already states: kept in :meth:`as_dict`, not repeated by diagnostics."""

    listing: tuple[Problem, ...] = ()
    """What the error lists (failed checks, offending fields); subclasses fill it in."""

    def __init__(self, message: str, *, hint: str | None = None, **fields: object) -> None:
        # the message is one line, whatever text (an SDK's, a bundle's) went into it
        if "\n" in message or "\r" in message:
            message = message.replace("\r", "\\r").replace("\n", "\\n")
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.fields: dict[str, object] = {k: v for k, v in fields.items() if v is not None}

    def diagnostics(self) -> str:
        """A human explanation: the message, the facts, what is listed, and what to do next."""
        lines = [self.message]
        lines.extend(
            f"  {key}: {value}"
            for key, value in self.fields.items()
            if key not in self.stated_fields and not self._states(value)
        )
        lines.extend(f"  - {problem.text}" for problem in self.listing)
        if self.hint:
            lines.append(f"hint: {self.hint}")
        return "\n".join(lines)

    def _states(self, value: object) -> bool:
        # a long value the message already quotes (a file path, a digest) is not repeated
        text = str(value)
        return len(text) >= 8 and text in self.message

    def as_dict(self) -> dict[str, object]:
        """A JSON-safe description for ``--json`` output and log lines."""
        data: dict[str, object] = {
            "error": self.kind,
            "exit_code": self.exit_code,
            "message": self.message,
            **{k: str(v) for k, v in self.fields.items()},
        }
        if self.listing or self.listing_key:
            data[self.listing_key or "problems"] = [p.record for p in self.listing]
        if self.hint:
            data["hint"] = self.hint
        return data


# --------------------------------------------------------------------------- by exit code


class InputError(EvalrunError):
    """Bad input or usage: a spec, lock, flag or file the user must fix (exit 2)."""

    exit_code = 2
    kind = "bad_input"


class IntegrityError(EvalrunError):
    """A digest, signature or content check failed (exit 3)."""

    exit_code = 3
    kind = "integrity"


class EnvironmentMismatch(EvalrunError):
    """The sandbox, driver, GPU or policy is not what the spec demands (exit 4)."""

    exit_code = 4
    kind = "environment_mismatch"


class InfrastructureError(EvalrunError):
    """A daemon, registry or cluster failed after bounded retries (exit 5)."""

    exit_code = 5
    kind = "infrastructure"


class StoreFull(InfrastructureError):
    """The store's filesystem ran out of space (or quota) while a bundle was written."""

    kind = "store_full"


class TransientInfrastructureError(InfrastructureError):
    """An infrastructure failure worth retrying (connection refused, 5xx, timeouts)."""

    kind = "infrastructure_transient"

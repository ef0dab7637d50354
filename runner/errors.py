"""The evalrun error tree.

Every error the runner raises on purpose derives from :class:`EvalrunError`.
Each subclass maps to one process exit code (see DESIGN.md) and carries the
fields a user needs to act on it. Deep code raises these; only ``cli.py``
prints them and exits.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar


class EvalrunError(Exception):
    """Root of every intentional evalrun failure."""

    exit_code: ClassVar[int] = 1
    kind: ClassVar[str] = "internal"

    def __init__(self, message: str, *, hint: str | None = None, **fields: object) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.fields: dict[str, object] = {k: v for k, v in fields.items() if v is not None}

    def diagnostics(self) -> str:
        """A human explanation: the message, the facts, and what to do next."""
        lines = [self.message]
        for key, value in self.fields.items():
            lines.append(f"  {key}: {value}")
        if self.hint:
            lines.append(f"hint: {self.hint}")
        return "\n".join(lines)

    def as_dict(self) -> dict[str, object]:
        """A JSON-safe description for ``--json`` output and log lines."""
        return {
            "error": self.kind,
            "exit_code": self.exit_code,
            "message": self.message,
            **{k: str(v) for k, v in self.fields.items()},
            **({"hint": self.hint} if self.hint else {}),
        }


class InputError(EvalrunError):
    """Bad input or usage: a spec, lock, flag or file the user must fix (exit 2)."""

    exit_code = 2
    kind = "bad_input"


class SpecError(InputError):
    """A spec or lock file does not satisfy its schema.

    ``problems`` lists each offending field as ``(location, message)``.
    """

    kind = "invalid_spec"

    def __init__(
        self,
        message: str,
        *,
        file: str | None = None,
        problems: list[tuple[str, str]] | None = None,
        hint: str | None = None,
    ) -> None:
        super().__init__(message, hint=hint, file=file)
        self.problems = problems or []

    def diagnostics(self) -> str:
        lines = [self.message]
        if "file" in self.fields:
            lines.append(f"  file: {self.fields['file']}")
        for loc, msg in self.problems:
            lines.append(f"  - {loc}: {msg}")
        if self.hint:
            lines.append(f"hint: {self.hint}")
        return "\n".join(lines)

    def as_dict(self) -> dict[str, object]:
        data = super().as_dict()
        data["problems"] = [{"field": loc, "message": msg} for loc, msg in self.problems]
        return data


class IntegrityError(EvalrunError):
    """A digest, signature or content check failed (exit 3)."""

    exit_code = 3
    kind = "integrity"


class DigestMismatch(IntegrityError):
    """An artifact's content does not hash to the digest it was pinned to."""

    def __init__(
        self,
        what: str,
        *,
        expected: str,
        found: str,
        path: str | None = None,
        hint: str | None = None,
    ) -> None:
        super().__init__(
            f"{what}: digest mismatch", hint=hint, path=path, expected=expected, found=found
        )
        self.expected = expected
        self.found = found


class VerificationFailed(IntegrityError):
    """A bundle failed verification; ``problems`` names every check that failed."""

    kind = "verification_failed"

    def __init__(self, message: str, *, problems: list[str], bundle: str | None = None) -> None:
        super().__init__(message, bundle=bundle)
        self.problems = problems

    def diagnostics(self) -> str:
        lines = [self.message]
        if "bundle" in self.fields:
            lines.append(f"  bundle: {self.fields['bundle']}")
        lines.extend(f"  - {p}" for p in self.problems)
        return "\n".join(lines)

    def as_dict(self) -> dict[str, object]:
        data = super().as_dict()
        data["problems"] = list(self.problems)
        return data


class UnsafeBundleEntry(IntegrityError):
    """A bundle (or the content it is built from) holds an entry the runner refuses.

    Symlinks, hard links, devices, FIFOs, sockets, and paths that are absolute or
    contain ``..``: following any of them could read or write outside the bundle.
    """

    kind = "unsafe_bundle_entry"

    def __init__(self, message: str, *, path: str, reason: str, root: str | None = None) -> None:
        super().__init__(message, path=path, reason=reason, root=root)
        self.path = path
        self.reason = reason


class EnvironmentMismatch(EvalrunError):
    """The sandbox, driver, GPU or policy is not what the spec demands (exit 4)."""

    exit_code = 4
    kind = "environment_mismatch"


class InfrastructureError(EvalrunError):
    """A daemon, registry or cluster failed after bounded retries (exit 5)."""

    exit_code = 5
    kind = "infrastructure"


class TransientInfrastructureError(InfrastructureError):
    """An infrastructure failure worth retrying (connection refused, 5xx, timeouts)."""

    kind = "infrastructure_transient"


class ThresholdsFailed(EvalrunError):
    """The evaluation ran and its metrics missed their thresholds (exit 6)."""

    exit_code = 6
    kind = "thresholds_failed"

    def __init__(self, message: str, *, failed: Mapping[str, str]) -> None:
        super().__init__(message)
        self.failed = dict(failed)

    def diagnostics(self) -> str:
        lines = [self.message, *(f"  - {k}: {v}" for k, v in self.failed.items())]
        return "\n".join(lines)


class Interrupted(EvalrunError):
    """The user interrupted a run (Ctrl-C); state was cleaned up (exit 130)."""

    exit_code = 130
    kind = "interrupted"

"""Bad input (exit 2): specs, files, bundles asked for, comparisons, signing keys."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol

from runner.errors.root import InputError, Problem


class SpecError(InputError):
    """A spec or lock file does not satisfy its schema.

    ``problems`` lists each offending field as ``(location, message)``.
    """

    kind = "invalid_spec"
    listing_key = "problems"

    def __init__(
        self,
        message: str,
        *,
        file: str | None = None,
        problems: Sequence[tuple[str, str]] | None = None,
        hint: str | None = None,
    ) -> None:
        super().__init__(message, hint=hint, file=file)
        self.file = file
        self.problems = list(problems or [])
        self.listing = tuple(
            Problem(f"{loc}: {msg}", {"field": loc, "message": msg}) for loc, msg in self.problems
        )


class RefusedFile(InputError):
    """A file that is there but not one to read: a directory, FIFO or device, larger than
    the reader's bound, or unreadable (exit 2). ``reason`` fits a one-line message."""

    kind = "refused_file"

    def __init__(self, reason: str, *, file: str | None = None) -> None:
        super().__init__(reason, file=file)
        self.reason = reason


class BundleNotFound(InputError):
    """No stored bundle has the requested digest (or matches the requested run)."""

    kind = "bundle_not_found"

    def __init__(self, message: str, *, digest: str | None = None, hint: str | None = None) -> None:
        super().__init__(message, hint=hint, digest=digest)
        self.digest = digest


class ComparisonDifference(Protocol):
    """What :class:`NotComparable` needs of one differing field (see workflows.compare)."""

    @property
    def field(self) -> str: ...

    @property
    def variants(self) -> Sequence[tuple[str, Sequence[str]]]: ...

    def as_dict(self) -> Mapping[str, object]: ...


class NotComparable(InputError):
    """The runs of a group differ in fields that make a ranking unfair (exit 2)."""

    kind = "not_comparable"
    listing_key = "differences"
    stated_fields = frozenset({"group"})

    def __init__(self, group: str, differences: Sequence[ComparisonDifference]) -> None:
        names = ", ".join(d.field for d in differences)
        super().__init__(
            f"the runs of comparison group {group!r} are not comparable: {names} differ",
            group=group,
            hint="make the runs comparable, or name each field you accept to differ with "
            + " ".join(f"--allow {d.field}" for d in differences),
        )
        self.group = group
        self.differences = list(differences)
        self.listing = tuple(
            Problem(
                f"{d.field}:"
                + "".join(f"\n      {', '.join(runs)}: {value}" for value, runs in d.variants),
                d.as_dict(),
            )
            for d in self.differences
        )


class SigningKeyRequired(InputError):
    """No signing key was given, and evalrun will not create one here (CI, or no terminal).

    ``reason`` says why this is not an interactive session; the message names every way
    to provide a key.
    """

    kind = "signing_key_required"
    stated_fields = frozenset({"reason"})

    def __init__(self, message: str, *, reason: str, default_key: str) -> None:
        super().__init__(message, reason=reason, default_key=default_key)
        self.reason = reason
        self.default_key = default_key

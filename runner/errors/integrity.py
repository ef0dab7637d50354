"""Integrity errors (exit 3): digests, verification, unsafe entries, the store, inputs
and images that no longer resolve."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from runner.errors.root import IntegrityError, Problem


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
        self.path = path


class VerificationFailed(IntegrityError):
    """A bundle failed verification; ``problems`` names every check that failed."""

    kind = "verification_failed"
    listing_key = "problems"

    def __init__(self, message: str, *, problems: Sequence[str], bundle: str | None = None) -> None:
        super().__init__(message, bundle=bundle)
        self.problems = list(problems)
        self.bundle = bundle
        self.listing = tuple(Problem(p, p) for p in self.problems)


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
        self.root = root


class StoreConflict(IntegrityError):
    """A run id is already indexed to a different bundle; the index is write-once."""

    kind = "store_conflict"

    def __init__(
        self,
        message: str,
        *,
        run_id: str,
        expected: str | None = None,
        found: str | None = None,
        hint: str | None = None,
    ) -> None:
        super().__init__(message, hint=hint, run_id=run_id, expected=expected, found=found)
        self.run_id = run_id
        self.expected = expected
        self.found = found


class WantedInputLike(Protocol):
    """What :class:`InputsUnavailable` shows of one pinned input (see workflows.rerun)."""

    @property
    def role(self) -> str: ...

    @property
    def name(self) -> str: ...

    @property
    def path(self) -> str: ...

    @property
    def sha256(self) -> str: ...

    @property
    def label(self) -> str: ...


class UnresolvedInputLike(Protocol):
    """One pinned input that no longer resolves, and why."""

    @property
    def wanted(self) -> WantedInputLike: ...

    @property
    def reason(self) -> str: ...

    def as_dict(self) -> dict[str, str]: ...


class InputsUnavailable(IntegrityError):
    """Inputs of the original run that no longer resolve to their pinned digests (exit 3)."""

    kind = "inputs_unavailable"
    listing_key = "missing"
    stated_fields = frozenset({"run_id"})

    def __init__(self, run_id: str, missing: Sequence[UnresolvedInputLike]) -> None:
        super().__init__(
            f"cannot re-run {run_id}: {len(missing)} input(s) no longer resolve to the "
            "pinned digest; nothing was started",
            run_id=run_id,
            hint="pass --inputs DIR where the original files are (matched by sha256)",
        )
        self.run_id = run_id
        self.missing = list(missing)
        self.listing = tuple(
            Problem(
                f"{m.wanted.label}: {m.reason}",
                {
                    "role": m.wanted.role,
                    "name": m.wanted.name,
                    "path": m.wanted.path,
                    "sha256": m.wanted.sha256,
                    "reason": m.reason,
                },
            )
            for m in self.missing
        )


class ImageUnavailable(IntegrityError):
    """The pinned image digest is no longer in its registry (exit 3)."""

    kind = "image_unavailable"

    def __init__(self, message: str, *, image: str, hint: str | None = None) -> None:
        super().__init__(message, hint=hint, image=image)
        self.image = image

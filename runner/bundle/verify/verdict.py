"""The verdict: :func:`verify_bundle` runs every check and returns a :class:`VerifiedBundle`.

A bundle is valid only if every check in :data:`~runner.bundle.verify.checks.CHECKS`
compared something and found no problem; otherwise VerificationFailed lists each
problem once. :meth:`VerifiedBundle.read_file` re-checks every later read of a payload
file against the signed manifest.
"""

from __future__ import annotations

import hashlib
import tarfile
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from runner._internal.files import RefusedFile
from runner._internal.sanitize import one_line
from runner.bundle.contents import read_bundle_file
from runner.bundle.metadata import (
    MANIFEST_NAME,
    ManifestFile,
    Statement,
)
from runner.bundle.signing import (
    TrustedKeys,
)
from runner.bundle.verify.checks import CHECKS, envelope_keyids
from runner.bundle.verify.facts import gather, sha256_hex
from runner.errors import InputError, IntegrityError, VerificationFailed


class CheckReport(BaseModel):
    """The outcome of one verification check."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    checked: int
    problems: tuple[str, ...]

    @property
    def passed(self) -> bool:
        """True only if the check compared at least one thing and found no problem."""
        return self.checked > 0 and not self.problems


class VerifiedBundle(BaseModel):
    """A bundle that passed every check: what it is, who signed it, what was checked."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    path: Path
    run_id: str
    bundle_digest: str
    manifest_digest: str
    keyid: str
    file_count: int
    total_size: int
    statement: Statement
    checks: tuple[CheckReport, ...]
    files: tuple[ManifestFile, ...] = ()

    def read_file(self, name: str, *, max_bytes: int) -> bytes:
        """The bytes of payload file ``name``, exactly as signed.

        Read again through the one link-free, bounded bundle reader and checked
        against the signed manifest's sha256, so a file swapped after verification
        is never used: IntegrityError (exit 3). FileNotFoundError when the manifest
        lists no such file; RefusedFile when it is larger than ``max_bytes``.
        """
        entry = next((f for f in self.files if f.path == name), None)
        if entry is None:
            raise FileNotFoundError(name)
        if entry.size > max_bytes:
            raise RefusedFile(f"{name} is {entry.size} bytes; the limit is {max_bytes}")
        data = read_bundle_file(self.path, name, max_bytes=max_bytes)
        if hashlib.sha256(data).hexdigest() != entry.sha256:
            raise IntegrityError(
                f"{name} changed after the bundle was verified; it is not used",
                path=str(self.path),
                expected=entry.sha256,
            )
        return data


def verify_bundle(
    path: Path, verifier: TrustedKeys, *, workers: int | None = None
) -> VerifiedBundle:
    """Verify the bundle at ``path`` (a directory or an uncompressed ``.tar``) offline.

    ``verifier`` is the one trusted public key, or a keyring whose key the
    envelope's keyid selects (an unknown keyid is a problem naming it).
    Returns a VerifiedBundle only if every check in :data:`CHECKS` compared
    something and found no problem. Otherwise raises VerificationFailed whose
    ``problems`` name each mismatch (file, expected vs found sha256, extra or
    missing file, payloadType, key ids, subjects, run ids, unsafe entries).
    A missing path or a file that is not a tar raises InputError.
    """
    try:
        present = path.exists()
    except (OSError, ValueError):  # a name the system refuses (too long, NUL)
        present = False
    if not present:
        raise InputError("bundle not found", file=one_line(path, limit=200))
    try:
        facts = gather(path, workers, verifier)
    except (OSError, tarfile.TarError, EOFError) as exc:
        # an unreadable or truncated bundle cannot be vouched for
        raise VerificationFailed(
            "bundle could not be read",
            problems=[f"cannot read {exc.filename or path}: {exc.strerror or exc}"]
            if isinstance(exc, OSError)
            else [f"corrupt tar: {exc}"],
            bundle=str(path),
        ) from exc
    reports: list[CheckReport] = []
    for name, check in CHECKS:
        checked, found = check(facts, verifier)
        reports.append(CheckReport(name=name, checked=checked, problems=tuple(found)))
    # one missing file can be the cause named by two checks; say it once
    problems = list(dict.fromkeys(p for r in reports for p in r.problems))
    if not problems:
        # a check can only pass by checking something; one that was skipped because
        # another failed adds nothing to the problems that other check names
        problems.extend(
            f"{r.name}: compared nothing" for r in reports if r.checked == 0 and not r.problems
        )
    if problems or not all(r.passed for r in reports):
        raise VerificationFailed(
            f"bundle failed verification ({len(problems)} problem{'s' * (len(problems) != 1)})",
            problems=problems,
            bundle=str(path),
        )
    assert facts.statement is not None and facts.manifest is not None and facts.payload
    assert facts.envelope is not None  # the signature check passed: one signature, trusted
    return VerifiedBundle(
        path=path,
        run_id=facts.statement.run_id,
        bundle_digest="sha256:" + sha256_hex(facts.payload),
        manifest_digest="sha256:" + sha256_hex(facts.raw[MANIFEST_NAME]),
        keyid=envelope_keyids(facts)[0],
        file_count=len(facts.manifest.files),
        total_size=sum(f.size for f in facts.manifest.files),
        statement=facts.statement,
        checks=tuple(reports),
        files=facts.manifest.files,
    )

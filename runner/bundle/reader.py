"""The one bundle reader: a bundle's statement, parsed once into the predicate models.

Every consumer (history index, reports, diff, compare, rerun, audit, run sets, OCI
artifacts, CLI) takes a :data:`~runner.model.predicate.Predicate` from here, not a
dict.

A command that acts on a bundle opens it with :func:`open_bundle`, which verifies it
first (every check of :func:`runner.bundle.verify.verify_bundle`) and hands back an
:class:`OpenedBundle`: the predicate of the statement that was verified, and
:meth:`OpenedBundle.read_file`, which returns a payload file only as its signed bytes.
Nothing is read again by path afterwards. Not verifying has to be asked for by name
(:data:`UNVERIFIED`, the CLI's ``--no-verify``), and the result says so in every
line it shows. :func:`read_predicate` (no verification) is for the run index, a cache.
"""

from __future__ import annotations

import hashlib
import os
import stat
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Final, TypeVar

from runner._internal.files import RefusedFile
from runner._internal.sanitize import exception_text
from runner.bundle.contents import read_bundle_file
from runner.bundle.metadata import METADATA_MAX_BYTES, STATEMENT_NAME, Statement, load_json_strict
from runner.bundle.signing import TrustedKeys
from runner.bundle.verify import VerifiedBundle, verify_bundle
from runner.errors import InputError, IntegrityError
from runner.model.predicate import (
    AuditPredicate,
    Predicate,
    RunPredicate,
    RunSetPredicate,
    parse_predicate,
)

P = TypeVar("P", RunPredicate, RunSetPredicate, AuditPredicate)
_KIND_NAMES: dict[type[Predicate], str] = {
    RunPredicate: "run",
    RunSetPredicate: "run_set",
    AuditPredicate: "audit",
}


def _read_statement_bytes(path: Path) -> bytes:
    # never through a link, and never more than a statement the runner could have written
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise OSError(f"{path.name} is not a regular file")
        if st.st_size > METADATA_MAX_BYTES:
            raise OSError(f"{path.name} is larger than {METADATA_MAX_BYTES} bytes")
        chunks: list[bytes] = []
        while chunk := os.read(fd, 1 << 20):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def read_statement(bundle: Path) -> Statement:
    """The in-toto Statement of the bundle directory ``bundle`` (not verified).

    Raises IntegrityError naming the bundle when it is missing, unreadable or not a
    Statement.
    """
    try:
        data = load_json_strict(_read_statement_bytes(bundle / STATEMENT_NAME))
        return Statement.model_validate(data)
    except (OSError, ValueError) as exc:
        raise IntegrityError(f"unreadable bundle: {exception_text(exc)}", path=str(bundle)) from exc


def predicate_of(statement: Statement) -> Predicate:
    """The typed predicate of a statement (IntegrityError naming a field that does not fit)."""
    return parse_predicate(statement.predicate)


def read_predicate(bundle: Path) -> Predicate:
    """The typed predicate of the bundle directory ``bundle`` (not verified).

    Raises IntegrityError for an unreadable bundle or a predicate that does not fit.
    """
    try:
        return predicate_of(read_statement(bundle))
    except IntegrityError as exc:
        exc.fields.setdefault("path", str(bundle))
        raise


def expect_kind(predicate: Predicate, kind: type[P], bundle: Path | str) -> P:
    """``predicate`` as a ``kind``; InputError (exit 2) when the bundle holds another kind."""
    if not isinstance(predicate, kind):
        raise InputError(
            f"bundle {predicate.run_id} holds a {predicate.kind} predicate, "
            f"not a {_KIND_NAMES[kind]}",
            bundle=str(bundle),
        )
    return predicate


class Unverified:
    """The explicit choice not to verify a bundle before reading it (``--no-verify``)."""

    def __repr__(self) -> str:
        return "UNVERIFIED"


UNVERIFIED: Final = Unverified()
Trust = TrustedKeys | Unverified
NOT_VERIFIED_TEXT = "NOT VERIFIED (--no-verify): nothing shown from this bundle is vouched for"


@dataclass(frozen=True)
class OpenedBundle:
    """A bundle a command acts on: verified (unless :data:`UNVERIFIED` was asked for),
    its statement and predicate parsed once from the verified bytes."""

    path: Path
    digest: str
    statement: Statement
    predicate: Predicate
    verified: VerifiedBundle | None

    @property
    def verification(self) -> str:
        """One line saying whether, and by whom, the bundle was verified."""
        vb = self.verified
        if vb is None:
            return NOT_VERIFIED_TEXT
        return f"valid: signed by keyid {vb.keyid}, {vb.file_count} files, every hash matches"

    def read_file(self, name: str, *, max_bytes: int) -> bytes:
        """The bytes of payload file ``name``: the signed bytes (checked against the
        verified manifest), or, unverified, the file as found — either way a regular
        file at a safe path, no link followed, at most ``max_bytes``.

        FileNotFoundError when there is no such file; RefusedFile when larger than
        ``max_bytes``; IntegrityError (exit 3) for a link, a special file, or bytes that
        are not the signed ones.
        """
        if self.verified is not None:
            return self.verified.read_file(name, max_bytes=max_bytes)
        return read_bundle_file(self.path, name, max_bytes=max_bytes)

    def read_optional(self, name: str, *, max_bytes: int) -> bytes | None:
        """:meth:`read_file`, or None when the bundle has no such file or it is too large
        to show (a link or a file that is not the signed one still fails)."""
        try:
            return self.read_file(name, max_bytes=max_bytes)
        except (FileNotFoundError, RefusedFile):
            return None


def open_bundle(path: Path, trust: Trust) -> OpenedBundle:
    """Verify the bundle (directory or ``.tar``) at ``path`` with ``trust`` and open it.

    ``trust`` is the key or keyring the bundle must be signed by, or :data:`UNVERIFIED`.
    Raises VerificationFailed (exit 3) when it does not verify, IntegrityError when its
    predicate does not fit the model, InputError when nothing is at ``path``.
    """
    if isinstance(trust, Unverified):
        try:
            raw = read_bundle_file(path, STATEMENT_NAME, max_bytes=METADATA_MAX_BYTES)
            statement = Statement.model_validate(load_json_strict(raw))
        except FileNotFoundError as exc:
            raise IntegrityError(f"not a bundle: no {STATEMENT_NAME}", path=str(path)) from exc
        except (OSError, RefusedFile, ValueError, tarfile.TarError) as exc:
            raise IntegrityError(
                f"unreadable bundle: {exception_text(exc)}", path=str(path)
            ) from exc
        predicate = _predicate_at(statement, path)
        digest = "sha256:" + hashlib.sha256(raw).hexdigest()
        return OpenedBundle(path, digest, statement, predicate, None)
    verified = verify_bundle(path, trust)
    predicate = _predicate_at(verified.statement, path)
    return OpenedBundle(path, verified.bundle_digest, verified.statement, predicate, verified)


def _predicate_at(statement: Statement, path: Path) -> Predicate:
    try:
        return predicate_of(statement)
    except IntegrityError as exc:
        exc.fields.setdefault("path", str(path))
        raise


__all__ = [
    "NOT_VERIFIED_TEXT",
    "UNVERIFIED",
    "OpenedBundle",
    "Trust",
    "Unverified",
    "expect_kind",
    "open_bundle",
    "predicate_of",
    "read_predicate",
    "read_statement",
]

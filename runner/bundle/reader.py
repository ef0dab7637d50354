"""The one bundle reader: a bundle's statement, parsed once into the predicate models.

Every consumer (history index, reports, diff, compare, rerun, audit, run sets, OCI
artifacts, CLI) takes a :data:`~runner.model.predicate.Predicate` from here, not a
dict. Reading does not verify the signature: a command that acts on a bundle
verifies it (:func:`runner.bundle.verify.verify_bundle`) and then parses the
statement it verified with :func:`predicate_of`.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import TypeVar

from runner.bundle.metadata import METADATA_MAX_BYTES, STATEMENT_NAME, Statement, load_json_strict
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
        raise IntegrityError(f"unreadable bundle: {exc}", path=str(bundle)) from exc


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


__all__ = ["expect_kind", "predicate_of", "read_predicate", "read_statement"]

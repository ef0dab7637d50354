"""Finding the bundle a command acts on: a bundle directory, a bundle ``.tar``, or a stored run."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from runner.bundle.archive import extract_bundle_tar
from runner.bundle.index import History
from runner.bundle.metadata import STATEMENT_NAME
from runner.bundle.store import Store
from runner.errors import InputError


@dataclass(frozen=True)
class LocatedBundle:
    """A bundle directory to act on, and where it came from."""

    path: Path
    digest: str | None
    source: str


def _statement_digest(bundle: Path) -> str | None:
    """The bundle digest (sha256 of statement.json), or None if it cannot be read."""
    try:
        return "sha256:" + hashlib.sha256((bundle / STATEMENT_NAME).read_bytes()).hexdigest()
    except OSError:
        return None


def locate_bundle(ref: str, store: Store, scratch: Path | None = None) -> LocatedBundle:
    """Find the bundle named by ``ref``: a bundle directory or ``.tar``, or a run in the store.

    A ``.tar`` is extracted (safely) under ``scratch``. Registry references are
    handled by :mod:`runner.bundle.oci_artifacts`, not here.
    """
    path = Path(ref).expanduser()
    if path.is_dir():
        return LocatedBundle(path=path, digest=_statement_digest(path), source=f"directory {path}")
    if path.is_file():
        if scratch is None:
            raise InputError("a bundle .tar needs a scratch directory to be read", file=str(path))
        dest = scratch / "bundle"
        extract_bundle_tar(path, dest)
        return LocatedBundle(path=dest, digest=_statement_digest(dest), source=f"tar {path}")
    record = History(store).lookup(ref)
    return LocatedBundle(path=record.path, digest=record.bundle_digest, source="store")

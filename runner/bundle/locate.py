"""Finding the bundle a command acts on: a bundle directory, a bundle ``.tar``, or a stored run.

Locating reads nothing of the bundle: the command then opens it with
:func:`runner.bundle.reader.open_bundle`, which verifies it first.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from runner._internal.sanitize import one_line
from runner.bundle.archive import extract_bundle_tar
from runner.bundle.index import History
from runner.bundle.store import Store
from runner.errors import InputError
from runner.shared.tarformat import MAX_COMPONENT_BYTES, MAX_NAME_BYTES

# No run id, digest, path or registry reference evalrun accepts is longer.
MAX_REFERENCE_CHARS = MAX_NAME_BYTES


@dataclass(frozen=True)
class LocatedBundle:
    """A bundle directory or tar to act on, and where it came from."""

    path: Path
    source: str


def check_reference(ref: str) -> None:
    """InputError (exit 2, one line) for a reference no bundle can have: too long, a path
    component longer than the system allows, or a NUL."""
    if len(ref) > MAX_REFERENCE_CHARS:
        raise InputError(
            f"reference {one_line(ref, limit=40)} is {len(ref)} characters long; "
            f"no run id, digest, path or registry reference is longer than {MAX_REFERENCE_CHARS}"
        )
    if "\0" in ref:
        raise InputError(f"reference {one_line(ref, limit=40)} contains a NUL character")
    if any(
        len(part.encode("utf-8", "surrogateescape")) > MAX_COMPONENT_BYTES
        for part in ref.split("/")
    ):
        raise InputError(
            f"reference {one_line(ref, limit=40)} has a path component longer than "
            f"{MAX_COMPONENT_BYTES} bytes"
        )


def _kind(path: Path) -> str | None:
    """ "dir", "file" or None for what is at ``path`` (nothing, or a name the system refuses)."""
    try:
        if path.is_dir():
            return "dir"
        if path.is_file():
            return "file"
    except (OSError, ValueError):
        pass
    return None


def locate_bundle(ref: str, store: Store, scratch: Path | None = None) -> LocatedBundle:
    """Find the bundle named by ``ref``: a bundle directory or ``.tar``, or a run in the store.

    A ``.tar`` is extracted (safely) under ``scratch``. Registry references are
    handled by :mod:`runner.bundle.oci_artifacts`, not here.
    """
    check_reference(ref)
    path = Path(ref).expanduser()
    kind = _kind(path)
    if kind == "dir":
        return LocatedBundle(path=path, source=f"directory {path}")
    if kind == "file":
        if scratch is None:
            raise InputError("a bundle .tar needs a scratch directory to be read", file=str(path))
        dest = scratch / "bundle"
        extract_bundle_tar(path, dest)
        return LocatedBundle(path=dest, source=f"tar {path}")
    record = History(store).lookup(ref)
    return LocatedBundle(path=record.path, source="store")

"""Where a bundle store keeps what, and how a bundle digest is spelled: the part of
:mod:`runner.bundle.store` the run index needs, without the store's models, so that
``evalrun runs ls`` imports neither pydantic nor the signing code."""

from __future__ import annotations

import re
from pathlib import Path

from runner.errors import InputError

_DIGEST = re.compile(r"^(?:sha256[:-])?([0-9a-f]{64})$")


class StorePaths:
    """The folders of the store rooted at ``root`` (:class:`~runner.bundle.store.Store`
    adds what reads and writes them)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.bundles_dir = root / "bundles"
        self.runs_dir = root / "runs"
        self.tmp_dir = root / "tmp"


def parse_digest(digest: str) -> str:
    """Return the sha256 hex of ``digest`` given as ``sha256:<hex>``, ``sha256-<hex>`` or hex."""
    match = _DIGEST.match(digest.strip())
    if not match:
        raise InputError(
            f"not a bundle digest: {digest!r}", hint="expected sha256:<64 lowercase hex>"
        )
    return match.group(1)


__all__ = ["StorePaths", "parse_digest"]

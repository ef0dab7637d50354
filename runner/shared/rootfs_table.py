"""The rootfs digest table: its format, where images carry it, how it binds to the digest.

Standard library only (the agent imports it inside the image; the build writes the
table into images). A table is one line per filesystem entry, sorted by path (see
``runner.agent.rootfs``); the rootfs digest is the sha256 of :data:`ROOTFS_SCHEME`, a
newline, and the table, so a table whose hash is the locked digest is the image's.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from typing import NamedTuple

ROOTFS_SCHEME = "evalrun-rootfs/v1"
# Added to evalrun-built images after the measurement; under /evalrun, so not in the digest.
TABLE_PATH = "/evalrun/image/rootfs.table"
# A table larger than this is not read (several million entries).
MAX_TABLE_BYTES = 1 << 30


def table_digest(lines: Iterable[bytes]) -> str:
    """The rootfs digest of table ``lines`` (each ending in a newline)."""
    h = hashlib.sha256(f"{ROOTFS_SCHEME}\n".encode())
    for line in lines:
        h.update(line)
    return "sha256:" + h.hexdigest()


class TableEntry(NamedTuple):
    """One line of a digest table: what the path must be."""

    kind: str  # f (file), d (directory), l (link), o (other)
    mode: str
    owner: str
    size: int = -1
    sha256: str = ""
    target: str = ""


def parse_table(data: bytes) -> dict[str, TableEntry]:
    """Path → entry for every line of a digest table; ValueError on a line it cannot read."""
    table: dict[str, TableEntry] = {}
    for number, raw in enumerate(data.split(b"\n")[:-1], start=1):
        line = raw.decode("utf-8", "surrogateescape")
        kind, _, rest = line.partition(" ")
        try:
            if kind == "f":
                path, mode, owner, size, digest = rest.rsplit(" ", 4)
                table[path] = TableEntry("f", mode, owner, int(size), digest)
            elif kind == "l":
                head, target = rest.split(" -> ", 1)
                path, mode, owner = head.rsplit(" ", 2)
                table[path] = TableEntry("l", mode, owner, target=target)
            elif kind in ("d", "o"):
                path, mode, owner = rest.split(" ", 3)[:3] if kind == "o" else rest.rsplit(" ", 2)
                table[path] = TableEntry(kind, mode, owner)
            elif kind == "unreadable-dir":
                table[rest] = TableEntry("u", "", "")
            else:
                raise ValueError(f"unknown entry type {kind!r}")
        except ValueError as exc:
            raise ValueError(f"digest table line {number}: {exc}") from exc
    return table

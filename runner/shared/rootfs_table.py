"""The rootfs digest table: its format, where images carry it, how it binds to the digest.

Standard library only (the agent imports it inside the image; the build writes the
table into images). A table is one line per filesystem entry, sorted by path (see
``runner.agent.rootfs``); the rootfs digest is the sha256 of :data:`ROOTFS_SCHEME`, a
newline, and the table, so a table whose hash is the locked digest is the image's.
"""

from __future__ import annotations

import bisect
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
        path, entry = parse_line(raw, number)
        table[path] = entry
    return table


def parse_line(raw: bytes, number: int) -> tuple[str, TableEntry]:
    """The path and entry of table line ``number`` (``raw``, without its newline);
    ValueError when it cannot be read."""
    line = raw.decode("utf-8", "surrogateescape")
    kind, _, rest = line.partition(" ")
    try:
        if kind == "f":
            path, mode, owner, size, digest = rest.rsplit(" ", 4)
            return path, TableEntry("f", mode, owner, int(size), digest)
        if kind == "l":
            head, target = rest.split(" -> ", 1)
            path, mode, owner = head.rsplit(" ", 2)
            return path, TableEntry("l", mode, owner, target=target)
        if kind in ("d", "o"):
            path, mode, owner = rest.split(" ", 3)[:3] if kind == "o" else rest.rsplit(" ", 2)
            return path, TableEntry(kind, mode, owner)
        if kind == "unreadable-dir":
            return rest, TableEntry("u", "", "")
        raise ValueError(f"unknown entry type {kind!r}")
    except ValueError as exc:
        raise ValueError(f"digest table line {number}: {exc}") from exc


class TableIndex:
    """A digest table's entries by path, each line read only when its path is asked for.

    A ``used`` check looks up a few hundred paths (the files a run used, and the folders
    and links on their way) in a table of every file of the image: parsing all of its
    lines into entries took 20 to 27 ms of the run's one CPU for the digits image's 9,949
    (a CUDA image has tens of thousands), against ~4 ms for this index. The builder sorts
    the lines by their second word (``runner.agent.rootfs``: the path, up to a space in
    it), so a path's line is found by bisection on that word, among the lines sharing it
    (the last of a path's lines counts, as in :func:`parse_table`). A table not in that
    order (one written otherwise; the builder's order of undecodable names differs from
    their bytes' order) is parsed whole (:func:`parse_table`), as is one with a line that
    has no second word: lookups give the same answers either way. ValueError, at
    construction or on a lookup, for a line that cannot be read. The table's bytes are
    those the digest was checked on: a line no lookup reaches is not read, and needs not
    be, to bind the table to the digest.
    """

    __slots__ = ("_keys", "_lines", "_parsed")

    def __init__(self, data: bytes) -> None:
        lines = data.split(b"\n")
        lines.pop()  # what follows the last newline is not a line (as parse_table reads it)
        self._lines = lines
        self._parsed: dict[str, TableEntry] | None = None
        try:
            keys = [line.split(b" ", 2)[1] for line in lines]
        except IndexError:
            keys = []
        if len(keys) != len(lines) or keys != sorted(keys):
            self._parsed = parse_table(data)
            keys = []
        self._keys = keys

    def __len__(self) -> int:
        return len(self._lines)

    def get(self, path: str) -> TableEntry | None:
        """The entry for ``path``, or None when the table has no line for it."""
        if self._parsed is not None:
            return self._parsed.get(path)
        first = path.encode("utf-8", "surrogateescape").split(b" ", 1)[0]
        index = bisect.bisect_left(self._keys, first)
        entry = None
        while index < len(self._keys) and self._keys[index] == first:
            found, line_entry = parse_line(self._lines[index], index + 1)
            if found == path:
                entry = line_entry  # the last line of a path, as parse_table keeps it
            index += 1
        return entry


# What the checks look paths up in: a whole parsed table, or its index.
Table = dict[str, TableEntry] | TableIndex

"""Fuzz target: a digest table read two ways, whole (``parse_table``) and by bisection on
its lines (``TableIndex``, what the agent's ``used`` check looks paths up in).

The input is the table's bytes. Property: wherever the whole table parses, the index gives
the same entry (or none) for each of its paths and for paths next to them; where it does
not, the index raises the same ``ValueError`` (at its construction, or on a lookup) and
nothing else. The table an agent reads is bound to the locked digest first; this holds
the two readings together for any bytes.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from runner.shared.rootfs_table import TableIndex, parse_table

NAME = "table"
_NEAR = ("", "x", " ", "/", " x")


def test_one_input(data: bytes) -> None:
    try:
        whole = parse_table(data)
    except ValueError as exc:
        try:
            index = TableIndex(data)
        except ValueError as raised:
            assert str(raised) == str(exc)
            return
        # read line by line: looking up every line's own path meets the bad one
        for line in data.split(b"\n")[:-1]:
            words = line.split(b" ")
            for end in range(2, len(words) + 1):
                try:
                    index.get(b" ".join(words[1:end]).decode("utf-8", "surrogateescape"))
                except ValueError:
                    return
        raise AssertionError(f"parse_table refused the table ({exc}), the index did not")
    index = TableIndex(data)
    assert len(index) == data.count(b"\n")
    for path, entry in whole.items():
        assert index.get(path) == entry, path
        for suffix in _NEAR:
            assert index.get(path + suffix) == whole.get(path + suffix), path + suffix
    for absent in ("/", "/nope", "", " "):
        assert index.get(absent) == whole.get(absent)


def seeds() -> dict[str, bytes]:
    from runner.agent.rootfs import rootfs_table

    root = Path(tempfile.mkdtemp(prefix="evalrun-fuzz-table-", dir="/var/tmp"))
    (root / "app" / "a b").mkdir(parents=True)
    (root / "app" / "a.py").write_text("A = 1\n")
    (root / "app" / "a b" / "c").write_text("c\n")
    (root / "app" / "link").symlink_to("a.py")
    table = rootfs_table(str(root))
    for path in sorted(root.rglob("*"), reverse=True):
        path.unlink() if path.is_file() or path.is_symlink() else path.rmdir()
    os.rmdir(root)
    digest = b"0" * 64
    return {
        "built": table,
        "spaces": b"d / 0755 0:0\nf /a b 0644 0:0 1 " + digest + b"\nf /a 0644 0:0 2 " + digest + b"\n",
        "unsorted": b"f /b 0644 0:0 1 " + digest + b"\nf /a 0644 0:0 1 " + digest + b"\n",
        "bad-size": b"f /a 0644 0:0 many " + digest + b"\n",
        "links": b"l /bin 0777 0:0 -> usr/bin\nunreadable-dir /root\no /dev/x 0600 0:0 c\n",
    }

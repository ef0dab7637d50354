"""TableIndex: a digest table's entries by path, read line by line as they are asked for,
with the same answers as the whole table parsed (parse_table)."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

from runner.agent.rootfs import rootfs_table
from runner.shared.rootfs_table import TableEntry, TableIndex, parse_table

pytestmark = pytest.mark.unit


@pytest.fixture
def tree():
    # not under /tmp: /tmp is a runtime path the table leaves out
    root = Path(tempfile.mkdtemp(prefix="evalrun-index-", dir="/var/tmp"))
    (root / "app" / "with space" / "deeper").mkdir(parents=True)
    (root / "app" / "a.py").write_text("A = 1\n")
    (root / "app" / "a b.py").write_text("AB = 1\n")  # a path that shares its first word
    (root / "app" / "with space" / "deeper" / "x").write_text("x\n")
    (root / "app" / "link").symlink_to("a.py")
    (root / "app" / "café.txt").write_text("é\n")
    os.mkfifo(root / "app" / "pipe")
    yield root
    shutil.rmtree(root)


def _asked(table: dict[str, TableEntry]) -> list[str]:
    """Every path of the table, and names next to them that it does not have."""
    missing = ["/", "/nope", "/app/a", "/app/a b", "/app/a.p", "/app/with", "/app/zzz", "/a"]
    return [*table, *(p + "x" for p in table), *missing]


def test_the_index_answers_as_the_parsed_table(tree):
    data = rootfs_table(str(tree))
    table = parse_table(data)
    index = TableIndex(data)
    assert len(index) == len(table) == data.count(b"\n")
    assert index._parsed is None  # the builder's order: looked up, not parsed
    for path in _asked(table):
        assert index.get(path) == table.get(path), path
    assert index.get("/app/a b.py") == table["/app/a b.py"]
    assert index.get("/app/link") == TableEntry("l", "0777", "0:0", target="a.py")


def test_a_table_in_another_order_is_parsed_whole_with_the_same_answers(tree):
    data = rootfs_table(str(tree))
    lines = data.splitlines(keepends=True)
    shuffled = b"".join(reversed(lines))
    index = TableIndex(shuffled)
    assert index._parsed is not None
    table = parse_table(data)
    for path in _asked(table):
        assert index.get(path) == table.get(path), path


def test_a_name_that_is_not_utf8_is_found_either_way():
    # the builder orders decoded names: bytes 0x80-0xff after surrogateescape sort apart
    # from their byte order, so such a table may be parsed whole; the answers are the same
    lines = [
        b"d / 0755 0:0\n",
        b"f /a\xff 0644 0:0 1 " + b"0" * 64 + b"\n",
        b"f /a\xe2\x82\xac 0644 0:0 2 " + b"1" * 64 + b"\n",
    ]
    for order in (lines, [lines[0], lines[2], lines[1]]):
        data = b"".join(order)
        index, table = TableIndex(data), parse_table(data)
        for path in [*table, "/a", "/b"]:
            assert index.get(path) == table.get(path)
        assert index.get(b"/a\xff".decode("utf-8", "surrogateescape")).size == 1


def test_a_path_listed_twice_gives_its_last_line_as_the_parsed_table_does():
    data = b"f /a 0644 0:0 1 " + b"0" * 64 + b"\nf /a 0600 0:0 2 " + b"1" * 64 + b"\n"
    assert TableIndex(data).get("/a") == parse_table(data)["/a"]
    assert TableIndex(data).get("/a").size == 2


def test_a_line_is_read_only_when_its_path_is_asked_for():
    data = b"f /a 0644 0:0 1 " + b"0" * 64 + b"\nf /b 0644 0:0 notanumber x\n"
    index = TableIndex(data)
    assert index.get("/a").size == 1
    with pytest.raises(ValueError, match="digest table line 2"):
        index.get("/b")
    with pytest.raises(ValueError, match="digest table line 2"):
        parse_table(data)


@pytest.mark.parametrize("data", [b"", b"\n", b"f\n", b"d / 0755 0:0\nf\n", b"what /x\n"])
def test_empty_and_unreadable_tables(data):
    try:
        parsed: dict[str, TableEntry] | None = parse_table(data)
    except ValueError as exc:
        with pytest.raises(ValueError) as raised:
            TableIndex(data).get("/x")
        assert str(raised.value) == str(exc)
        return
    index = TableIndex(data)
    assert parsed is not None and index.get("/x") == parsed.get("/x")
    assert len(index) == data.count(b"\n")


def test_what_follows_the_last_newline_is_not_a_line():
    data = b"d / 0755 0:0\nf /a 0644 0:0 1 " + b"0" * 64
    assert TableIndex(data).get("/a") is None and "/a" not in parse_table(data)
    assert len(TableIndex(data)) == 1

"""The one strict tar reader/writer and its path rules (bundles, results frames, image layers)."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest

from runner._internal import image_contents, oci
from runner._internal.tar import MemberRules, layer_name, scan_members, write_tree_tar
from runner.errors import IntegrityError, UnsafeBundleEntry
from runner.shared.tarformat import (
    MAX_DEPTH,
    file_header,
    member_name_reason,
    path_structure_reason,
    unsafe_path_reason,
)

pytestmark = pytest.mark.unit


def _tar(*members: tuple[tarfile.TarInfo, bytes | None]) -> tarfile.TarFile:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    buf.seek(0)
    return tarfile.open(fileobj=buf, mode="r:")


def _file(name: str, data: bytes = b"x") -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    return info, data


@pytest.mark.parametrize(
    ("path", "structure", "portable"),
    [
        ("a/b.txt", None, None),
        ("", "empty path", "empty path"),
        ("/etc/passwd", "absolute path", "absolute path"),
        ("a/../../b", "path contains '..'", "path contains '..'"),
        ("a//b", "path has an empty or '.' component", "path has an empty or '.' component"),
        ("a/./b", "path has an empty or '.' component", "path has an empty or '.' component"),
        ("system-systemd\\x2dfsck.slice", None, "path contains a backslash"),
        ("tab\there", None, "path contains a control character"),
        ("nul\0here", "path contains a NUL character", "path contains a control character"),
    ],
)
def test_one_rule_two_tiers(path: str, structure: str | None, portable: str | None) -> None:
    assert path_structure_reason(path) == structure
    assert unsafe_path_reason(path) == portable


def test_member_names_are_bounded_in_length_and_depth() -> None:
    assert member_name_reason("a/" * MAX_DEPTH + "f", portable=True) is None
    assert "deeper than" in str(member_name_reason("a/" * (MAX_DEPTH + 1) + "f", portable=True))
    assert "255 bytes" in str(member_name_reason("x" * 256, portable=False))
    assert "4096 bytes" in str(member_name_reason("/".join(["y" * 200] * 21), portable=False))


def test_scan_stops_at_the_member_bound() -> None:
    tar = _tar(*(_file(f"f{i}") for i in range(5)))
    members, problems = scan_members(tar, MemberRules(max_members=3))
    assert [m.path for m in members] == ["f0", "f1", "f2"]
    assert problems == ["more than 3 tar members; the rest were not read"]


def test_scan_refuses_sparse_and_oversized_files() -> None:
    sparse = tarfile.TarInfo("holes")
    sparse.type = tarfile.GNUTYPE_SPARSE
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        tar.addfile(sparse)
    buf.seek(0)
    with tarfile.open(fileobj=buf, mode="r:") as tar:
        _, problems = scan_members(tar, MemberRules(max_members=10))
    assert problems == ["tar member 'holes' is a sparse file; only plain files are read"]
    _, problems = scan_members(_tar(_file("big", b"12345")), MemberRules(10, max_file_bytes=4))
    assert problems == ["tar member 'big' is too large (5 bytes)"]


def test_the_tree_writer_refuses_what_the_reader_would_refuse(tmp_path: Path) -> None:
    root = tmp_path / "tree"
    root.mkdir()
    (root / "back\\slash").write_text("x")
    with pytest.raises(UnsafeBundleEntry, match="backslash"):
        write_tree_tar(root, tmp_path / "t.tar")
    assert not (tmp_path / "t.tar").exists()


def test_the_tree_writer_uses_the_shared_header(tmp_path: Path) -> None:
    root = tmp_path / "tree"
    (root / "d").mkdir(parents=True)
    (root / "d" / "f").write_bytes(b"data")
    write_tree_tar(root, tmp_path / "t.tar")
    with tarfile.open(tmp_path / "t.tar") as tar:
        (member,) = tar.getmembers()
    expected = file_header("d/f", 4)
    assert (member.name, member.size, member.mode, member.mtime, member.uid, member.uname) == (
        expected.name, expected.size, expected.mode, expected.mtime, expected.uid, expected.uname
    )


# --- image layers: links and devices are content, names still follow the rules ----------


def _layer(*members: tuple[tarfile.TarInfo, bytes | None]) -> io.BytesIO:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    buf.seek(0)
    return buf


def test_layer_names_keep_any_character_but_not_escapes() -> None:
    assert layer_name("./lib/systemd/system/system-systemd\\x2dfsck.slice") == (
        "lib/systemd/system/system-systemd\\x2dfsck.slice"
    )
    assert layer_name("./") == "" and layer_name(".") == "" and layer_name("usr/") == "usr"
    for bad in ("../etc/passwd", "/etc/passwd", "usr/../../x", "a//b"):
        with pytest.raises(IntegrityError):
            layer_name(bad)


@pytest.mark.parametrize("name", ["../outside", "/etc/cron.d/x", "usr/../../outside"])
def test_normalize_layer_refuses_an_escaping_member(tmp_path: Path, name: str) -> None:
    with pytest.raises(IntegrityError, match="image layer member"):
        oci.normalize_layer(_layer(_file(name)), tmp_path / "out.tar", 0)


def test_normalize_layer_refuses_an_escaping_hard_link(tmp_path: Path) -> None:
    link = tarfile.TarInfo("usr/bin/x")
    link.type = tarfile.LNKTYPE
    link.linkname = "../../etc/shadow"
    with pytest.raises(IntegrityError, match="hard link target"):
        oci.normalize_layer(_layer(_file("usr/bin/y"), (link, None)), tmp_path / "o.tar", 0)


def test_layer_index_still_lists_links_and_devices() -> None:
    sym = tarfile.TarInfo("bin/sh")
    sym.type, sym.linkname = tarfile.SYMTYPE, "/usr/bin/dash"
    dev = tarfile.TarInfo("dev/null")
    dev.type = tarfile.CHRTYPE
    index = image_contents.filesystem_index([_layer((sym, None), (dev, None))])
    assert (index["bin/sh"].kind, index["bin/sh"].sha256) == ("l", "/usr/bin/dash")
    assert index["dev/null"].kind == "c"

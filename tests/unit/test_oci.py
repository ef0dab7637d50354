"""Deterministic image assembly: normalized layers, timestamp-free config, diffs."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest

from runner._internal import image_contents, oci

pytestmark = pytest.mark.unit

EPOCH = 1735689600


def _tar(entries: list[dict], *, fmt: int = tarfile.PAX_FORMAT) -> io.BytesIO:
    """A layer tar from entry dicts: name, type, data, mode, mtime, uname, linkname, pax."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        for e in entries:
            info = tarfile.TarInfo(e["name"])
            info.type = e.get("type", tarfile.REGTYPE)
            info.mode = e.get("mode", 0o644)
            info.mtime = e.get("mtime", 1_800_000_000)
            info.uname = e.get("uname", "builder")
            info.gname = e.get("gname", "staff")
            info.uid = e.get("uid", 0)
            info.gid = e.get("gid", 0)
            info.linkname = e.get("linkname", "")
            info.pax_headers = e.get("pax", {})
            data = e.get("data")
            if data is not None:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            else:
                tar.addfile(info)
    buf.seek(0)
    return buf


TREE = [
    {"name": "usr", "type": tarfile.DIRTYPE, "mode": 0o755},
    {"name": "usr/lib", "type": tarfile.DIRTYPE, "mode": 0o755},
    {"name": "usr/lib/a.py", "data": b"print('a')\n"},
    {"name": "usr/lib/b.so", "data": b"\x7fELF", "mode": 0o755},
    {"name": "usr/lib/link", "type": tarfile.SYMTYPE, "linkname": "a.py"},
]


def _normalize(tmp_path: Path, entries: list[dict], name: str = "out.tar") -> oci.Blob:
    return oci.normalize_layer(_tar(entries), tmp_path / name, EPOCH)


def test_normalized_layer_ignores_order_mtimes_and_user_names(tmp_path):
    a = _normalize(tmp_path, TREE, "a.tar")
    shuffled = [dict(e, mtime=1_900_000_000 + i, uname="someone", gname="else") for i, e in
                enumerate(reversed(TREE))]
    shuffled[0]["pax"] = {"atime": "1.5", "ctime": "2.5", "comment": "noise"}
    b = _normalize(tmp_path, shuffled, "b.tar")
    assert a.digest == b.digest
    assert a.path.read_bytes() == b.path.read_bytes()
    assert a.media_type == oci.OCI_LAYER


def test_normalized_layer_headers_are_fixed(tmp_path):
    blob = _normalize(tmp_path, [dict(e, pax={"atime": "1.0"}) for e in TREE])
    with tarfile.open(blob.path) as tar:
        members = tar.getmembers()
    assert [m.name for m in members] == sorted(m.name for m in members)
    assert {m.mtime for m in members} == {EPOCH}
    assert {(m.uname, m.gname) for m in members} == {("", "")}
    assert all("atime" not in m.pax_headers and "ctime" not in m.pax_headers for m in members)


def test_normalized_layer_keeps_modes_owners_and_xattrs(tmp_path):
    blob = _normalize(tmp_path, [
        {"name": "etc/shadow", "data": b"x", "mode": 0o640, "gid": 42},
        {"name": "bin/ping", "data": b"y", "mode": 0o4755,
         "pax": {"SCHILY.xattr.security.capability": "\x01"}},
    ])
    with tarfile.open(blob.path) as tar:
        shadow, ping = tar.getmember("etc/shadow"), tar.getmember("bin/ping")
    assert (shadow.mode, shadow.gid) == (0o640, 42)
    assert ping.mode == 0o4755
    assert "SCHILY.xattr.security.capability" in ping.pax_headers


def test_content_change_changes_the_layer_digest(tmp_path):
    a = _normalize(tmp_path, TREE, "a.tar")
    changed = [dict(e, data=b"print('b')\n") if e["name"] == "usr/lib/a.py" else e for e in TREE]
    assert _normalize(tmp_path, changed, "b.tar").digest != a.digest
    chmod = [dict(e, mode=0o600) if e["name"] == "usr/lib/a.py" else e for e in TREE]
    assert _normalize(tmp_path, chmod, "c.tar").digest != a.digest


def test_hard_link_sorting_before_its_target_is_carried_by_the_smallest_path(tmp_path):
    # "a-link" sorts before "z-file": the output must still extract.
    blob = _normalize(tmp_path, [
        {"name": "z-file", "data": b"payload", "mode": 0o755},
        {"name": "a-link", "type": tarfile.LNKTYPE, "linkname": "z-file"},
    ])
    with tarfile.open(blob.path) as tar:
        first, second = tar.getmembers()
        assert (first.name, first.isreg(), first.size) == ("a-link", True, 7)
        assert (second.name, second.islnk(), second.linkname) == ("z-file", True, "a-link")
        # the filter argument exists from 3.11.4 (and in some distributions' 3.11 builds)
        trusted = {"filter": "fully_trusted"} if hasattr(tarfile, "fully_trusted_filter") else {}
        tar.extractall(tmp_path / "x", **trusted)
    assert (tmp_path / "x" / "z-file").read_bytes() == b"payload"
    assert (tmp_path / "x" / "z-file").stat().st_ino == (tmp_path / "x" / "a-link").stat().st_ino


def test_long_and_non_ascii_paths_survive(tmp_path):
    long = "usr/lib/python3/dist-packages/" + "x" * 120 + "/module.py"
    blob = _normalize(tmp_path, [{"name": long, "data": b"1"}, {"name": "data/héllo", "data": b"2"}])
    with tarfile.open(blob.path) as tar:
        assert sorted(tar.getnames()) == sorted([long, "data/héllo"])


def test_dot_slash_names_and_root_entry_are_cleaned(tmp_path):
    blob = _normalize(tmp_path, [
        {"name": "./", "type": tarfile.DIRTYPE},
        {"name": "./etc", "type": tarfile.DIRTYPE},
        {"name": "./etc/os-release", "data": b"ID=debian\n"},
    ])
    with tarfile.open(blob.path) as tar:
        assert tar.getnames() == ["etc", "etc/os-release"]


def test_empty_layer_is_detected(tmp_path):
    assert oci.empty_layer(_normalize(tmp_path, []).path)
    assert not oci.empty_layer(_normalize(tmp_path, TREE, "t.tar").path)


def test_config_has_no_wall_clock_and_keeps_only_runtime_fields(tmp_path):
    layer = _normalize(tmp_path, TREE)
    docker_config = {
        "Hostname": "b0c1d2", "Image": "sha256:" + "1" * 64, "Env": ["A=1"],
        "Entrypoint": ["python3"], "Cmd": ["run"], "User": "65532:65532",
        "WorkingDir": "/tmp", "Labels": {"x": "y"}, "OnBuild": None, "AttachStdin": False,
    }
    image = oci.assemble([layer], docker_config, EPOCH, ["layer one"])
    config = json.loads(image.config)
    assert config["created"] == "2025-01-01T00:00:00Z"
    assert [h["created"] for h in config["history"]] == ["2025-01-01T00:00:00Z"]
    assert set(config["config"]) == {"Env", "Entrypoint", "Cmd", "User", "WorkingDir", "Labels"}
    assert config["rootfs"] == {"type": "layers", "diff_ids": [layer.digest]}
    manifest = json.loads(image.manifest)
    assert manifest["mediaType"] == oci.OCI_MANIFEST
    assert manifest["config"]["digest"] == image.config_digest
    assert manifest["layers"] == [layer.descriptor()]
    again = oci.assemble([layer], dict(reversed(list(docker_config.items()))), EPOCH, ["layer one"])
    assert again.digest == image.digest
    assert oci.assemble([layer], docker_config, EPOCH + 1, ["layer one"]).digest != image.digest


def test_filesystem_index_applies_whiteouts_and_opaque_dirs():
    lower = _tar([*TREE, {"name": "opt/old/f", "data": b"1"}, {"name": "opt/keep", "data": b"k"}])
    upper = _tar([
        {"name": "usr/lib/.wh.b.so", "data": b""},
        {"name": "opt/old/.wh..wh..opq", "data": b""},
        {"name": "opt/old/new", "data": b"2"},
    ])
    index = image_contents.filesystem_index([lower, upper])
    assert "usr/lib/b.so" not in index
    assert "opt/old/f" not in index and "opt/old/new" in index
    assert "opt/keep" in index and index["usr/lib/link"].sha256 == "a.py"


def test_diff_names_the_changed_file_and_the_fields():
    a = image_contents.filesystem_index([_tar(TREE)])
    changed = [dict(e, data=b"other\n") if e["name"] == "usr/lib/a.py" else e for e in TREE]
    b = image_contents.filesystem_index([_tar([*changed, {"name": "usr/lib/new", "data": b""}])])
    diff = image_contents.diff_index(a, b)
    assert [(d["path"], d["change"]) for d in diff] == [
        ("/usr/lib/a.py", "changed"), ("/usr/lib/new", "added")]
    assert diff[0]["fields"] == ["sha256", "size"]
    assert image_contents.diff_index(a, a) == []


def test_diff_json_reports_leaf_fields():
    assert image_contents.diff_json({"config": {"Env": ["A=1"], "User": "0"}},
                         {"config": {"Env": ["A=2"], "User": "0", "Cmd": ["x"]}}) == [
        {"field": "config.Cmd", "expected": None, "found": ["x"]},
        {"field": "config.Env", "expected": ["A=1"], "found": ["A=2"]},
    ]


STATUS = """Package: bash
Status: install ok installed
Architecture: amd64
Version: 5.2.15-2+b13
Description: GNU Bourne Again SHell
 continuation line: not a field

Package: removed-thing
Status: deinstall ok config-files
Architecture: amd64
Version: 1.0

Package: debconf
Status: install ok installed
Architecture: all
Version: 1.5.82
"""


def test_dpkg_status_gives_installed_versions():
    assert image_contents.parse_dpkg_status(STATUS) == {"bash:amd64": "5.2.15-2+b13", "debconf": "1.5.82"}
    layer = _tar([{"name": "./var/lib/dpkg/status", "data": STATUS.encode()}])
    assert image_contents.dpkg_packages(layer) == {"bash:amd64": "5.2.15-2+b13", "debconf": "1.5.82"}


def test_package_drift_names_each_moved_package():
    assert image_contents.diff_packages({"bash": "1", "gone": "2"}, {"bash": "1.1", "new": "3"}) == [
        {"package": "bash", "expected": "1", "found": "1.1"},
        {"package": "gone", "expected": "2", "found": None},
        {"package": "new", "expected": None, "found": "3"},
    ]


def test_base_image_keeps_labels_small_and_packages_in_an_annotation(tmp_path):
    from runner.build.base_image import PACKAGES_ANNOTATION, BaseRecipe, assemble_base

    status = "\n\n".join(
        f"Package: pkg{i}\nStatus: install ok installed\nArchitecture: amd64\nVersion: 1.{i}"
        for i in range(400)
    )
    rootfs = tmp_path / "rootfs.tar"
    rootfs.write_bytes(_tar([{"name": "./var/lib/dpkg/status", "data": status.encode()}]).read())
    recipe = BaseRecipe(name="r", suite="bookworm", mirror="http://deb.debian.org/debian",
                        source_date_epoch=EPOCH)
    base = assemble_base(recipe, rootfs, tmp_path)
    labels = json.loads(base.image.config)["config"]["Labels"]
    # containerd copies image labels onto containers and refuses any over 4 KiB
    assert all(len(k) + len(v) < 4096 for k, v in labels.items())
    annotations = json.loads(base.image.manifest)["annotations"]
    assert json.loads(annotations[PACKAGES_ANNOTATION])["pkg399:amd64"] == "1.399"
    assert base.packages["pkg0:amd64"] == "1.0"
    again = assemble_base(recipe, rootfs, tmp_path / "again")
    assert again.image.digest == base.image.digest

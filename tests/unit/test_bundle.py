"""Building bundles: what is written, what is refused, and the deterministic tar form."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import socket
import stat
import tarfile
from pathlib import Path

import pytest
from bundle_fixtures import PAYLOAD, Keys, make_keys, write_payload

from runner._internal.tree import scan_tree
from runner.bundle.archive import extract_bundle_tar, write_bundle_tar
from runner.bundle.build import build_bundle
from runner.bundle.metadata import (
    ENVELOPE_NAME,
    MANIFEST_NAME,
    PAYLOAD_TYPE,
    SIGSTORE_BUNDLE_NAME,
    STATEMENT_NAME,
    BundleManifest,
    Statement,
)
from runner.bundle.signing import Signer, Verifier
from runner.bundle.verify import verify_bundle
from runner.errors import InputError, IntegrityError, UnsafeBundleEntry
from runner.shared.tarformat import unsafe_path_reason

pytestmark = pytest.mark.unit


def predicate(run_id: str = "run-a") -> dict[str, object]:
    return {
        "run_id": run_id,
        "outcome": "passed",
        "metrics": {"accuracy": {"value": 0.97, "ci": [0.95, 0.98]}},
        "seeds": [0, 1],
    }


@pytest.fixture
def keys(tmp_path: Path) -> Keys:
    return make_keys(tmp_path)


@pytest.fixture
def content(tmp_path: Path) -> Path:
    return write_payload(tmp_path / "content")


# --- what a bundle contains -------------------------------------------------------


def test_build_bundle_writes_payload_and_four_metadata_files(
    tmp_path: Path, content: Path, keys: tuple[Signer, Verifier]
) -> None:
    info = build_bundle(content, predicate(), keys[0], tmp_path / "b")
    files = {e.path for e in scan_tree(tmp_path / "b") if e.kind == "file"}
    assert files == set(PAYLOAD) | {
        MANIFEST_NAME,
        STATEMENT_NAME,
        ENVELOPE_NAME,
        SIGSTORE_BUNDLE_NAME,
    }
    for rel, data in PAYLOAD.items():
        assert (tmp_path / "b" / rel).read_bytes() == data
    assert info.run_id == "run-a"
    assert info.file_count == len(PAYLOAD)
    assert info.total_size == sum(len(d) for d in PAYLOAD.values())
    assert info.keyid == keys[0].keyid


def test_manifest_lists_every_file_sorted_with_sha256_and_size(
    tmp_path: Path, content: Path, keys: tuple[Signer, Verifier]
) -> None:
    build_bundle(content, predicate(), keys[0], tmp_path / "b")
    raw = json.loads((tmp_path / "b" / MANIFEST_NAME).read_bytes())
    assert raw["schema"] == "evalrun/bundle-manifest/v1"
    assert raw["run_id"] == "run-a"
    assert [f["path"] for f in raw["files"]] == sorted(PAYLOAD)
    for entry in raw["files"]:
        data = PAYLOAD[entry["path"]]
        assert entry == {
            "path": entry["path"],
            "sha256": hashlib.sha256(data).hexdigest(),
            "size": len(data),
        }
    BundleManifest.model_validate(raw)


def test_statement_is_in_toto_v1_over_every_file_and_the_manifest(
    tmp_path: Path, content: Path, keys: tuple[Signer, Verifier]
) -> None:
    info = build_bundle(content, predicate(), keys[0], tmp_path / "b")
    statement_bytes = (tmp_path / "b" / STATEMENT_NAME).read_bytes()
    raw = json.loads(statement_bytes)
    assert raw["_type"] == "https://in-toto.io/Statement/v1"
    assert raw["predicateType"] == "https://evalrun.dev/EvalRun/v1"
    assert raw["predicate"] == predicate()
    manifest_sha = hashlib.sha256((tmp_path / "b" / MANIFEST_NAME).read_bytes()).hexdigest()
    expected = {rel: hashlib.sha256(data).hexdigest() for rel, data in PAYLOAD.items()}
    expected[MANIFEST_NAME] = manifest_sha
    assert {s["name"]: s["digest"] for s in raw["subject"]} == {
        k: {"sha256": v} for k, v in expected.items()
    }
    assert info.bundle_digest == "sha256:" + hashlib.sha256(statement_bytes).hexdigest()
    assert info.manifest_digest == "sha256:" + manifest_sha
    Statement.model_validate(raw)


def test_envelope_signs_the_exact_statement_bytes(
    tmp_path: Path, content: Path, keys: tuple[Signer, Verifier]
) -> None:
    build_bundle(content, predicate(), keys[0], tmp_path / "b")
    envelope = json.loads((tmp_path / "b" / ENVELOPE_NAME).read_bytes())
    assert envelope["payloadType"] == PAYLOAD_TYPE
    assert base64.b64decode(envelope["payload"]) == (tmp_path / "b" / STATEMENT_NAME).read_bytes()
    assert envelope["signatures"][0]["keyid"] == keys[0].keyid


def test_build_in_place_and_by_copy_give_the_same_manifest(
    tmp_path: Path, keys: tuple[Signer, Verifier]
) -> None:
    copy_src = write_payload(tmp_path / "src")
    in_place = write_payload(tmp_path / "inplace")
    a = build_bundle(copy_src, predicate(), keys[0], tmp_path / "copied")
    b = build_bundle(in_place, predicate(), keys[0], in_place)
    assert a.manifest_digest == b.manifest_digest
    assert a.bundle_digest == b.bundle_digest  # ed25519 signatures are deterministic
    assert not (copy_src / MANIFEST_NAME).exists()  # the source is never modified
    verify_bundle(tmp_path / "copied", keys[1])
    verify_bundle(in_place, keys[1])


def test_build_bundle_accepts_empty_content(tmp_path: Path, keys: tuple[Signer, Verifier]) -> None:
    (tmp_path / "empty").mkdir()
    info = build_bundle(tmp_path / "empty", predicate(), keys[0], tmp_path / "b")
    assert info.file_count == 0
    assert verify_bundle(tmp_path / "b", keys[1]).file_count == 0


def test_build_bundle_handles_multi_mebibyte_files(
    tmp_path: Path, keys: tuple[Signer, Verifier]
) -> None:
    big = os.urandom(3 * (1 << 20) + 17)
    write_payload(tmp_path / "c", {"results/big.bin": big, "a": b"", "z/y/x": b"x"})
    build_bundle(tmp_path / "c", predicate(), keys[0], tmp_path / "b", workers=3)
    manifest = json.loads((tmp_path / "b" / MANIFEST_NAME).read_bytes())
    by_path = {f["path"]: f for f in manifest["files"]}
    assert by_path["results/big.bin"]["sha256"] == hashlib.sha256(big).hexdigest()
    assert by_path["a"]["sha256"] == hashlib.sha256(b"").hexdigest()
    assert verify_bundle(tmp_path / "b", keys[1], workers=1).total_size == len(big) + 1


# --- what build refuses -----------------------------------------------------------


def test_build_rejects_symlinked_file_naming_it(
    tmp_path: Path, content: Path, keys: tuple[Signer, Verifier]
) -> None:
    (tmp_path / "secret").write_text("host secret")
    (content / "results" / "leak.txt").symlink_to(tmp_path / "secret")
    with pytest.raises(UnsafeBundleEntry, match="symlink") as err:
        build_bundle(content, predicate(), keys[0], tmp_path / "b")
    assert err.value.fields["path"] == str(content / "results" / "leak.txt")
    assert err.value.exit_code == 3
    assert not (tmp_path / "b").exists()


def test_build_rejects_symlinked_directory(
    tmp_path: Path, content: Path, keys: tuple[Signer, Verifier]
) -> None:
    (tmp_path / "hostdir").mkdir()
    (tmp_path / "hostdir" / "x").write_text("x")
    (content / "results" / "more").symlink_to(tmp_path / "hostdir")
    with pytest.raises(UnsafeBundleEntry, match="symlink") as err:
        build_bundle(content, predicate(), keys[0], content)
    assert err.value.fields["path"] == str(content / "results" / "more")
    assert not (content / MANIFEST_NAME).exists()


def test_build_rejects_fifo_without_blocking(
    tmp_path: Path, content: Path, keys: tuple[Signer, Verifier]
) -> None:
    os.mkfifo(content / "results" / "pipe")
    with pytest.raises(UnsafeBundleEntry, match="not a regular file") as err:
        build_bundle(content, predicate(), keys[0], tmp_path / "b")
    assert err.value.fields["path"] == str(content / "results" / "pipe")


def test_build_rejects_socket(tmp_path: Path, content: Path, keys: tuple[Signer, Verifier]) -> None:
    sock = socket.socket(socket.AF_UNIX)
    try:
        sock.bind(str(content / "logs" / "s.sock"))
        with pytest.raises(UnsafeBundleEntry, match="not a regular file"):
            build_bundle(content, predicate(), keys[0], tmp_path / "b")
    finally:
        sock.close()


@pytest.mark.skipif(os.geteuid() != 0, reason="creating a device node needs root")
def test_build_rejects_device_node(
    tmp_path: Path, content: Path, keys: tuple[Signer, Verifier]
) -> None:
    os.mknod(content / "results" / "null", stat.S_IFCHR | 0o600, os.makedev(1, 3))
    with pytest.raises(UnsafeBundleEntry, match="not a regular file"):
        build_bundle(content, predicate(), keys[0], tmp_path / "b")


@pytest.mark.parametrize("name", ["new\nline", "back\\slash", "tab\there"])
def test_build_rejects_unsafe_file_names(
    tmp_path: Path, content: Path, keys: tuple[Signer, Verifier], name: str
) -> None:
    (content / "results" / name).write_text("x")
    with pytest.raises(UnsafeBundleEntry) as err:
        build_bundle(content, predicate(), keys[0], tmp_path / "b")
    assert name in str(err.value.fields["path"])


@pytest.mark.parametrize(
    "name", [MANIFEST_NAME, STATEMENT_NAME, ENVELOPE_NAME, SIGSTORE_BUNDLE_NAME]
)
def test_build_rejects_content_using_reserved_names(
    tmp_path: Path, content: Path, keys: tuple[Signer, Verifier], name: str
) -> None:
    (content / name).write_text("{}")
    with pytest.raises(InputError, match="reserved"):
        build_bundle(content, predicate(), keys[0], tmp_path / "b")


def test_build_refuses_to_rebuild_a_bundle_in_place(
    content: Path, keys: tuple[Signer, Verifier]
) -> None:
    build_bundle(content, predicate(), keys[0], content)
    with pytest.raises(InputError, match="reserved"):
        build_bundle(content, predicate(), keys[0], content)


def test_build_refuses_non_empty_destination(
    tmp_path: Path, content: Path, keys: tuple[Signer, Verifier]
) -> None:
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "x").write_text("x")
    with pytest.raises(InputError, match="not empty"):
        build_bundle(content, predicate(), keys[0], tmp_path / "b")
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == ["x"]


@pytest.mark.parametrize(
    "bad",
    [
        {"outcome": "passed"},
        {"run_id": ""},
        {"run_id": "../escape"},
        {"run_id": 7},
        {"run_id": "r", "when": object()},
        {"run_id": "r", "x": float("nan")},
    ],
    ids=["no-run-id", "empty", "path-like", "not-string", "not-json", "nan"],
)
def test_build_rejects_predicates_that_are_not_plain_json_with_run_id(
    tmp_path: Path, content: Path, keys: tuple[Signer, Verifier], bad: dict[str, object]
) -> None:
    with pytest.raises(InputError):
        build_bundle(content, bad, keys[0], tmp_path / "b")
    assert not (tmp_path / "b").exists()


def test_build_reports_missing_content_dir(tmp_path: Path, keys: tuple[Signer, Verifier]) -> None:
    with pytest.raises(InputError, match="not found") as err:
        build_bundle(tmp_path / "nope", predicate(), keys[0], tmp_path / "b")
    assert err.value.fields["file"] == str(tmp_path / "nope")


def test_failed_build_leaves_no_metadata_behind(
    content: Path, keys: tuple[Signer, Verifier], monkeypatch: pytest.MonkeyPatch
) -> None:
    import runner.bundle.build as bundle_module

    def boom(*args: object) -> dict[str, object]:
        raise KeyboardInterrupt

    monkeypatch.setattr(bundle_module, "sign_envelope", boom)
    with pytest.raises(KeyboardInterrupt):
        build_bundle(content, predicate(), keys[0], content)
    assert not (content / MANIFEST_NAME).exists()
    assert not (content / STATEMENT_NAME).exists()


@pytest.mark.parametrize(
    ("path", "reason"),
    [
        ("", "empty"),
        ("/etc/passwd", "absolute"),
        ("../x", ".."),
        ("a/../../x", ".."),
        ("a//b", "empty or '.'"),
        ("./a", "empty or '.'"),
        ("a/", "empty or '.'"),
        ("a\\b", "backslash"),
        ("a\x00b", "control"),
        ("ok/\udcff", "UTF-8"),
    ],
)
def test_unsafe_path_reason_names_the_problem(path: str, reason: str) -> None:
    found = unsafe_path_reason(path)
    assert found is not None and reason in found


def test_safe_paths_are_accepted() -> None:
    for path in ("a", "results/a.json", "d\u00e9j\u00e0/vu", "a..b", ".hidden/x"):
        assert unsafe_path_reason(path) is None


# --- tar form ----------------------------------------------------------------------


def test_bundle_tar_is_deterministic(tmp_path: Path, keys: tuple[Signer, Verifier]) -> None:
    a = write_payload(tmp_path / "a")
    b = write_payload(tmp_path / "b")
    os.utime(b / "report.md", (1, 1))
    (b / "results").chmod(0o700)
    build_bundle(a, predicate(), keys[0], a)
    build_bundle(b, predicate(), keys[0], b)
    write_bundle_tar(a, tmp_path / "a.tar")
    write_bundle_tar(b, tmp_path / "b.tar")
    assert (tmp_path / "a.tar").read_bytes() == (tmp_path / "b.tar").read_bytes()
    with tarfile.open(tmp_path / "a.tar") as tar:
        members = tar.getmembers()
    names = [m.name for m in members]
    assert names == sorted(names)
    assert all(m.isreg() for m in members)
    assert {(m.mtime, m.uid, m.gid, m.uname, m.gname, m.mode) for m in members} == {
        (0, 0, 0, "", "", 0o644)
    }


def test_bundle_tar_refuses_to_overwrite(
    tmp_path: Path, content: Path, keys: tuple[Signer, Verifier]
) -> None:
    build_bundle(content, predicate(), keys[0], content)
    (tmp_path / "t.tar").write_text("keep")
    with pytest.raises(InputError, match="exists"):
        write_bundle_tar(content, tmp_path / "t.tar")
    assert (tmp_path / "t.tar").read_text() == "keep"


def test_bundle_tar_refuses_symlinks(
    tmp_path: Path, content: Path, keys: tuple[Signer, Verifier]
) -> None:
    build_bundle(content, predicate(), keys[0], content)
    (content / "results" / "l").symlink_to("/etc/hostname")
    with pytest.raises(UnsafeBundleEntry, match="symlink"):
        write_bundle_tar(content, tmp_path / "t.tar")
    assert not (tmp_path / "t.tar").exists()


def test_extract_roundtrips_a_bundle_tar(
    tmp_path: Path, content: Path, keys: tuple[Signer, Verifier]
) -> None:
    info = build_bundle(content, predicate(), keys[0], content)
    write_bundle_tar(content, tmp_path / "t.tar")
    out = extract_bundle_tar(tmp_path / "t.tar", tmp_path / "out")
    assert verify_bundle(out, keys[1]).bundle_digest == info.bundle_digest
    assert verify_bundle(tmp_path / "t.tar", keys[1]).bundle_digest == info.bundle_digest
    for rel, data in PAYLOAD.items():
        assert (out / rel).read_bytes() == data


def _tar_with(tmp_path: Path, *members: tuple[tarfile.TarInfo, bytes | None]) -> Path:
    path = tmp_path / "evil.tar"
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


def _member(name: str, kind: bytes = tarfile.REGTYPE, data: bytes = b"", link: str = "") -> tuple:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = link
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    return info, (data if kind == tarfile.REGTYPE else None)


@pytest.mark.parametrize(
    ("member", "expected"),
    [
        (_member("../evil", data=b"x"), "'..'"),
        (_member("a/../../evil", data=b"x"), "'..'"),
        (_member("/etc/evil", data=b"x"), "absolute"),
        (_member("link", tarfile.SYMTYPE, link="/etc/passwd"), "symlink"),
        (_member("hard", tarfile.LNKTYPE, link="report.md"), "hard link"),
        (_member("dev", tarfile.CHRTYPE), "device"),
        (_member("fifo", tarfile.FIFOTYPE), "FIFO"),
    ],
    ids=["dotdot", "nested-dotdot", "absolute", "symlink", "hardlink", "chardev", "fifo"],
)
def test_extract_refuses_unsafe_members_and_writes_nothing(
    tmp_path: Path, member: tuple[tarfile.TarInfo, bytes | None], expected: str
) -> None:
    tar = _tar_with(tmp_path, _member("report.md", data=b"ok"), member)
    with pytest.raises(UnsafeBundleEntry, match=expected) as err:
        extract_bundle_tar(tar, tmp_path / "out")
    assert isinstance(err.value, IntegrityError)
    assert not (tmp_path / "out").exists()
    assert not (tmp_path / "evil").exists()


def test_extract_refuses_duplicate_members(tmp_path: Path) -> None:
    tar = _tar_with(tmp_path, _member("a", data=b"1"), _member("a", data=b"2"))
    with pytest.raises(UnsafeBundleEntry, match="more than once"):
        extract_bundle_tar(tar, tmp_path / "out")


def test_extract_refuses_file_used_as_directory(tmp_path: Path) -> None:
    tar = _tar_with(tmp_path, _member("a", data=b"1"), _member("a/b", data=b"2"))
    with pytest.raises(UnsafeBundleEntry, match="under the file"):
        extract_bundle_tar(tar, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_extract_ignores_tar_modes_and_owners(tmp_path: Path) -> None:
    info, data = _member("results/x", data=b"data")
    info.mode = 0o4777
    info.uid = 1234
    tar = _tar_with(tmp_path, (info, data))
    out = extract_bundle_tar(tar, tmp_path / "out")
    assert stat.S_IMODE((out / "results" / "x").stat().st_mode) == 0o644 & ~_umask()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_extract_reports_missing_or_non_tar_input(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="not found"):
        extract_bundle_tar(tmp_path / "missing.tar", tmp_path / "out")
    (tmp_path / "junk.tar").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(InputError):
        extract_bundle_tar(tmp_path / "junk.tar", tmp_path / "out")


def test_build_rejects_hard_linked_file(
    tmp_path: Path, content: Path, keys: tuple[Signer, Verifier]
) -> None:
    os.link(content / "report.md", tmp_path / "other-name")
    with pytest.raises(UnsafeBundleEntry, match="hard links") as err:
        build_bundle(content, predicate(), keys[0], content)
    assert err.value.fields["path"] == str(content / "report.md")


def test_build_rejects_absurdly_deep_nesting(
    tmp_path: Path, content: Path, keys: tuple[Signer, Verifier]
) -> None:
    deep = content.joinpath(*["d"] * 70)
    deep.mkdir(parents=True)
    (deep / "x").write_text("x")
    with pytest.raises(UnsafeBundleEntry, match="nested deeper"):
        build_bundle(content, predicate(), keys[0], tmp_path / "b")


def test_build_refuses_destination_inside_content(
    content: Path, keys: tuple[Signer, Verifier]
) -> None:
    with pytest.raises(InputError, match="inside the content"):
        build_bundle(content, predicate(), keys[0], content / "bundle")


def test_failed_copy_build_leaves_an_existing_empty_destination_empty(
    tmp_path: Path, content: Path, keys: tuple[Signer, Verifier], monkeypatch: pytest.MonkeyPatch
) -> None:
    import runner.bundle.build as bundle_module

    def boom(*args: object) -> dict[str, object]:
        raise RuntimeError("signing failed")

    (tmp_path / "b").mkdir()
    monkeypatch.setattr(bundle_module, "sign_envelope", boom)
    with pytest.raises(RuntimeError):
        build_bundle(content, predicate(), keys[0], tmp_path / "b")
    assert list((tmp_path / "b").iterdir()) == []
    with pytest.raises(RuntimeError):
        build_bundle(content, predicate(), keys[0], tmp_path / "new")
    assert not (tmp_path / "new").exists()

"""Offline bundle verification: valid bundles pass; every tamper case fails with a
problem that names exactly what does not match."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import shutil
import tarfile
from collections.abc import Callable
from pathlib import Path

import pytest
from bundle_fixtures import PAYLOAD, Keys, make_keys, seal_bundle

from runner.bundle.archive import write_bundle_tar
from runner.bundle.metadata import (
    ENVELOPE_NAME,
    MANIFEST_NAME,
    SIGSTORE_BUNDLE_NAME,
    STATEMENT_NAME,
)
from runner.bundle.signing import (
    ALGORITHMS,
    Algorithm,
    Signer,
    Verifier,
    sign_envelope,
    sigstore_bundle,
)
from runner.bundle.verify import CHECKS, VerifiedBundle, verify_bundle
from runner.errors import InputError, VerificationFailed

pytestmark = pytest.mark.unit

METADATA = [MANIFEST_NAME, STATEMENT_NAME, ENVELOPE_NAME]
# optional: bundles sealed before it existed have none
ALL_FILES = sorted(PAYLOAD) + METADATA + [SIGSTORE_BUNDLE_NAME]
SHA = "[0-9a-f]{64}"


def problems_of(path: Path, verifier: Verifier) -> list[str]:
    with pytest.raises(VerificationFailed) as err:
        verify_bundle(path, verifier)
    assert err.value.exit_code == 3
    assert err.value.problems
    return err.value.problems


def has(problems: list[str], pattern: str) -> bool:
    return any(re.search(pattern, p) for p in problems)


@pytest.fixture(params=ALGORITHMS)
def keys(request: pytest.FixtureRequest, tmp_path: Path) -> Keys:
    algorithm: Algorithm = request.param
    return make_keys(tmp_path, "k", algorithm)


@pytest.fixture
def ed_keys(tmp_path: Path) -> Keys:
    return make_keys(tmp_path, "e", "ed25519")


@pytest.fixture
def bundle(tmp_path: Path, keys: tuple[Signer, Verifier]) -> Path:
    return seal_bundle(tmp_path / "bundle", keys[0])


def flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def rewrite_json(path: Path, change: Callable[[dict[str, object]], None]) -> None:
    data = json.loads(path.read_bytes())
    change(data)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


# --- valid bundles -------------------------------------------------------------------


def test_valid_bundle_passes_every_check(bundle: Path, keys: tuple[Signer, Verifier]) -> None:
    result = verify_bundle(bundle, keys[1])
    assert isinstance(result, VerifiedBundle)
    assert [c.name for c in result.checks] == [name for name, _ in CHECKS]
    assert all(c.checked > 0 and not c.problems for c in result.checks)
    assert result.run_id == "run-a"
    assert result.keyid == keys[1].keyid
    assert result.file_count == len(PAYLOAD)
    statement_bytes = (bundle / STATEMENT_NAME).read_bytes()
    assert result.bundle_digest == "sha256:" + hashlib.sha256(statement_bytes).hexdigest()
    assert result.statement.predicate["outcome"] == "passed"


def test_valid_bundle_tar_passes(
    tmp_path: Path, bundle: Path, keys: tuple[Signer, Verifier]
) -> None:
    write_bundle_tar(bundle, tmp_path / "b.tar")
    assert verify_bundle(tmp_path / "b.tar", keys[1]).file_count == len(PAYLOAD)


def test_tar_made_with_dot_prefixes_passes(
    tmp_path: Path, bundle: Path, keys: tuple[Signer, Verifier]
) -> None:
    # what `tar -C bundle -cf b.tar .` produces
    with tarfile.open(tmp_path / "b.tar", "w") as tar:
        tar.add(bundle, arcname=".")
    assert verify_bundle(tmp_path / "b.tar", keys[1]).run_id == "run-a"


def test_verify_reports_missing_bundle_as_input_error(
    tmp_path: Path, keys: tuple[Signer, Verifier]
) -> None:
    with pytest.raises(InputError, match="not found"):
        verify_bundle(tmp_path / "nope", keys[1])
    (tmp_path / "junk.tar").write_bytes(b"junk" * 200)
    with pytest.raises(InputError):
        verify_bundle(tmp_path / "junk.tar", keys[1])


def test_empty_directory_fails_every_check(tmp_path: Path, keys: tuple[Signer, Verifier]) -> None:
    (tmp_path / "empty").mkdir()
    problems = problems_of(tmp_path / "empty", keys[1])
    for name in METADATA:
        assert has(problems, rf"{re.escape(name)}: missing")
    assert has(problems, "files not checked")


# --- flipped bytes -------------------------------------------------------------------

EXPECTED_FOR_FLIP = {
    **{rel: rf"file '{re.escape(rel)}': expected sha256 {SHA}, found {SHA}" for rel in PAYLOAD},
    MANIFEST_NAME: r"manifest\.json",
    STATEMENT_NAME: r"statement\.json differs from the payload signed in envelope\.dsse\.json",
    ENVELOPE_NAME: r"envelope\.dsse\.json|signature|payloadType|keyid",
    SIGSTORE_BUNDLE_NAME: r"envelope\.sigstore\.json (is not JSON|does not restate)",
}


@pytest.mark.parametrize("where", ["first", "middle", "last"])
@pytest.mark.parametrize("rel", ALL_FILES)
def test_verify_rejects_flipped_byte_in_any_file(
    bundle: Path, keys: tuple[Signer, Verifier], rel: str, where: str
) -> None:
    size = (bundle / rel).stat().st_size
    flip(bundle / rel, {"first": 0, "middle": size // 2, "last": size - 1}[where])
    problems = problems_of(bundle, keys[1])
    assert has(problems, EXPECTED_FOR_FLIP[rel]), problems


@pytest.mark.parametrize("rel", [*METADATA, SIGSTORE_BUNDLE_NAME])
def test_verify_rejects_every_single_byte_flip_in_metadata(
    tmp_path: Path, ed_keys: tuple[Signer, Verifier], rel: str
) -> None:
    # small payload keeps this exhaustive check fast
    bundle = seal_bundle(tmp_path / "b", ed_keys[0], files={"r.txt": b"x"})
    original = (bundle / rel).read_bytes()
    accepted = []
    for offset in range(len(original)):
        data = bytearray(original)
        data[offset] ^= 0x01
        (bundle / rel).write_bytes(bytes(data))
        try:
            verify_bundle(bundle, ed_keys[1], workers=1)
        except VerificationFailed:
            continue
        accepted.append(offset)
    (bundle / rel).write_bytes(original)
    verify_bundle(bundle, ed_keys[1])
    assert accepted == []


def test_verify_rejects_flipped_byte_inside_tar_member(
    tmp_path: Path, bundle: Path, keys: tuple[Signer, Verifier]
) -> None:
    write_bundle_tar(bundle, tmp_path / "b.tar")
    data = bytearray((tmp_path / "b.tar").read_bytes())
    offset = data.index(b"accuracy 0.97")
    data[offset] ^= 0x01
    (tmp_path / "b.tar").write_bytes(bytes(data))
    problems = problems_of(tmp_path / "b.tar", keys[1])
    assert has(problems, rf"file 'report\.md': expected sha256 {SHA}, found {SHA}")


# --- swapped, extra, missing files ---------------------------------------------------


def test_verify_rejects_swapped_files(bundle: Path, keys: tuple[Signer, Verifier]) -> None:
    a, b = bundle / "results" / "metrics.json", bundle / "report.md"
    data_a, data_b = a.read_bytes(), b.read_bytes()
    a.write_bytes(data_b)
    b.write_bytes(data_a)
    problems = problems_of(bundle, keys[1])
    # files of another size than signed are named without being hashed
    assert len(data_a) != len(data_b)
    assert f"file 'results/metrics.json': expected {len(data_a)} bytes, found {len(data_b)}" in (
        problems
    )
    assert f"file 'report.md': expected {len(data_b)} bytes, found {len(data_a)}" in problems


def test_verify_rejects_file_swapped_in_from_another_run(
    tmp_path: Path, bundle: Path, keys: tuple[Signer, Verifier]
) -> None:
    other = dict(PAYLOAD, **{"results/metrics.json": b'{"accuracy": {"value": 0.99}}\n'})
    b = seal_bundle(tmp_path / "other", keys[0], "run-b", other)
    shutil.copyfile(b / "results" / "metrics.json", bundle / "results" / "metrics.json")
    problems = problems_of(bundle, keys[1])
    assert has(
        problems,
        rf"file 'results/metrics\.json': expected (sha256 {SHA}, found {SHA}|\d+ bytes, found \d+)",
    )


@pytest.mark.parametrize("rel", ["results/extra.txt", "extra", ".hidden", "new/dir/file"])
def test_verify_rejects_extra_file(bundle: Path, keys: tuple[Signer, Verifier], rel: str) -> None:
    (bundle / rel).parent.mkdir(parents=True, exist_ok=True)
    (bundle / rel).write_bytes(b"")
    problems = problems_of(bundle, keys[1])
    assert problems == [f"extra file not in manifest: {rel!r}"]


@pytest.mark.parametrize("rel", sorted(PAYLOAD))
def test_verify_rejects_missing_payload_file(
    bundle: Path, keys: tuple[Signer, Verifier], rel: str
) -> None:
    (bundle / rel).unlink()
    assert problems_of(bundle, keys[1]) == [f"missing file {rel!r} (listed in manifest)"]


@pytest.mark.parametrize("rel", METADATA)
def test_verify_rejects_missing_metadata_file(
    bundle: Path, keys: tuple[Signer, Verifier], rel: str
) -> None:
    (bundle / rel).unlink()
    assert has(problems_of(bundle, keys[1]), rf"{re.escape(rel)}: missing")


def test_verify_rejects_file_and_manifest_edited_together(
    bundle: Path, keys: tuple[Signer, Verifier]
) -> None:
    (bundle / "report.md").write_bytes(b"# Report\n\naccuracy 0.99\n")
    new_sha = hashlib.sha256(b"# Report\n\naccuracy 0.99\n").hexdigest()

    def change(m: dict[str, object]) -> None:
        for f in m["files"]:  # type: ignore[attr-defined]
            if f["path"] == "report.md":
                f["sha256"], f["size"] = new_sha, 24

    rewrite_json(bundle / MANIFEST_NAME, change)
    problems = problems_of(bundle, keys[1])
    assert has(problems, rf"signed sha256 of 'manifest\.json' is {SHA}, manifest\.json has {SHA}")
    assert has(problems, rf"signed sha256 of 'report\.md' is {SHA}, manifest entry")


def test_verify_rejects_statement_edited_without_resigning(
    bundle: Path, keys: tuple[Signer, Verifier]
) -> None:
    rewrite_json(bundle / STATEMENT_NAME, lambda s: s["predicate"].update(outcome="failed"))  # type: ignore[attr-defined]
    assert has(problems_of(bundle, keys[1]), "statement.json differs from the payload signed")


# --- envelope: payloadType, keys, replays --------------------------------------------


def test_verify_rejects_changed_payload_type(bundle: Path, keys: tuple[Signer, Verifier]) -> None:
    rewrite_json(bundle / ENVELOPE_NAME, lambda e: e.update(payloadType="application/json"))
    problems = problems_of(bundle, keys[1])
    assert has(problems, "payloadType is 'application/json', expected 'application/vnd.in-toto")
    assert has(problems, f"signature by keyid {keys[1].keyid} is invalid")


def test_verify_rejects_wrong_key_naming_both_keyids(
    tmp_path: Path, bundle: Path, keys: tuple[Signer, Verifier]
) -> None:
    _, other = make_keys(tmp_path, "other", keys[1].algorithm)
    problems = problems_of(bundle, other)
    assert problems == [
        f"wrong key: expected a signature by keyid {other.keyid}, "
        f"envelope is signed by keyid {keys[0].keyid}"
    ]


def test_verify_rejects_bundle_resigned_by_another_key(
    tmp_path: Path, keys: tuple[Signer, Verifier]
) -> None:
    attacker, _ = make_keys(tmp_path, "attacker", "ecdsa-p256")
    tampered = dict(PAYLOAD, **{"report.md": b"# Report\n\naccuracy 0.99\n"})
    bundle = seal_bundle(tmp_path / "forged", attacker, files=tampered)
    assert has(
        problems_of(bundle, keys[1]), rf"wrong key: expected a signature by keyid {keys[1].keyid}"
    )


def test_verify_rejects_another_keys_signature_under_our_keyid(
    tmp_path: Path, bundle: Path, keys: tuple[Signer, Verifier]
) -> None:
    attacker, _ = make_keys(tmp_path, "attacker", keys[1].algorithm)
    payload = (bundle / STATEMENT_NAME).read_bytes()
    forged = sign_envelope(payload, "application/vnd.in-toto+json", attacker)
    forged["signatures"][0]["keyid"] = keys[1].keyid
    (bundle / ENVELOPE_NAME).write_text(json.dumps(forged))
    # a careful forger restates the forged envelope in the Sigstore bundle too
    (bundle / SIGSTORE_BUNDLE_NAME).write_text(json.dumps(sigstore_bundle(forged)))
    assert problems_of(bundle, keys[1]) == [
        f"signature by keyid {keys[1].keyid} is invalid "
        "(the signed payload, payloadType or signature was altered)"
    ]


def test_verify_rejects_extra_signature(
    tmp_path: Path, bundle: Path, keys: tuple[Signer, Verifier]
) -> None:
    envelope = json.loads((bundle / ENVELOPE_NAME).read_bytes())
    envelope["signatures"].append(dict(envelope["signatures"][0], keyid="f" * 64))
    (bundle / ENVELOPE_NAME).write_text(json.dumps(envelope))
    assert has(problems_of(bundle, keys[1]), "carries 2 signatures")


def test_verify_rejects_another_runs_envelope_replayed(
    tmp_path: Path, bundle: Path, keys: tuple[Signer, Verifier]
) -> None:
    other = seal_bundle(tmp_path / "other", keys[0], "run-b")
    for name in (ENVELOPE_NAME, STATEMENT_NAME):
        shutil.copyfile(other / name, bundle / name)
    problems = problems_of(bundle, keys[1])
    assert (
        "envelope of another run: the signed statement is for run 'run-b', "
        "this bundle's manifest is for run 'run-a'"
    ) in problems
    assert has(problems, r"signed sha256 of 'manifest\.json' is")
    assert not has(problems, "signature")  # the replayed signature itself is genuine


def test_verify_rejects_another_runs_envelope_alone(
    tmp_path: Path, bundle: Path, keys: tuple[Signer, Verifier]
) -> None:
    other = seal_bundle(tmp_path / "other", keys[0], "run-b")
    shutil.copyfile(other / ENVELOPE_NAME, bundle / ENVELOPE_NAME)
    problems = problems_of(bundle, keys[1])
    assert has(problems, "statement.json differs from the payload signed")
    assert has(problems, "envelope of another run")


def test_verify_rejects_replay_of_same_content_under_other_run_id(
    tmp_path: Path, bundle: Path, keys: tuple[Signer, Verifier]
) -> None:
    # identical files, other run: only the run id tells them apart
    other = seal_bundle(tmp_path / "other", keys[0], "run-b")
    for name in (ENVELOPE_NAME, STATEMENT_NAME):
        shutil.copyfile(other / name, bundle / name)
    problems = problems_of(bundle, keys[1])
    assert has(problems, "envelope of another run")


# --- unsafe paths and links ----------------------------------------------------------


def forge_signed(bundle: Path, signer: Signer, files: list[dict[str, object]]) -> None:
    """Write a manifest listing ``files`` and a statement/envelope signed by the real key."""
    manifest = {"schema": "evalrun/bundle-manifest/v1", "run_id": "run-a", "files": files}
    manifest_bytes = (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode()
    subjects = [{"name": f["path"], "digest": {"sha256": f["sha256"]}} for f in files]
    subjects.append(
        {"name": MANIFEST_NAME, "digest": {"sha256": hashlib.sha256(manifest_bytes).hexdigest()}}
    )
    statement = {
        "_type": "https://in-toto.io/Statement/v1",
        "subject": subjects,
        "predicateType": "https://evalrun.dev/EvalRun/v1",
        "predicate": {"run_id": "run-a"},
    }
    statement_bytes = (json.dumps(statement, indent=2, sort_keys=True) + "\n").encode()
    envelope = sign_envelope(statement_bytes, "application/vnd.in-toto+json", signer)
    (bundle / MANIFEST_NAME).write_bytes(manifest_bytes)
    (bundle / STATEMENT_NAME).write_bytes(statement_bytes)
    (bundle / ENVELOPE_NAME).write_text(json.dumps(envelope))


@pytest.mark.parametrize(
    ("evil_path", "reason"),
    [
        ("../outside.txt", "path contains '..'"),
        ("results/../../outside.txt", "path contains '..'"),
        ("/etc/hostname", "absolute path"),
    ],
)
def test_verify_rejects_signed_manifest_with_escaping_path(
    tmp_path: Path,
    bundle: Path,
    keys: tuple[Signer, Verifier],
    evil_path: str,
    reason: str,
) -> None:
    outside = tmp_path / "outside.txt"
    outside.write_bytes(b"outside")
    files = [
        {"path": evil_path, "sha256": hashlib.sha256(b"outside").hexdigest(), "size": 7},
        *(
            {"path": rel, "sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
            for rel, data in sorted(PAYLOAD.items())
        ),
    ]
    forge_signed(bundle, keys[0], files)
    problems = problems_of(bundle, keys[1])
    assert has(problems, rf"manifest\.json: files\.0\.path: .*{re.escape(reason)}"), problems


def test_verify_rejects_symlinked_payload_file_even_with_identical_content(
    tmp_path: Path, bundle: Path, keys: tuple[Signer, Verifier]
) -> None:
    target = tmp_path / "copy.json"
    shutil.copyfile(bundle / "results" / "metrics.json", target)
    (bundle / "results" / "metrics.json").unlink()
    (bundle / "results" / "metrics.json").symlink_to(target)
    problems = problems_of(bundle, keys[1])
    assert f"symlink 'results/metrics.json' -> '{target}': links are never followed" in problems
    assert "missing file 'results/metrics.json' (listed in manifest)" in problems


def test_verify_rejects_symlinked_directory(
    tmp_path: Path, bundle: Path, keys: tuple[Signer, Verifier]
) -> None:
    shutil.copytree(bundle / "results", tmp_path / "results-copy")
    shutil.rmtree(bundle / "results")
    (bundle / "results").symlink_to(tmp_path / "results-copy")
    problems = problems_of(bundle, keys[1])
    assert has(problems, r"symlink 'results' -> .*links are never followed")


@pytest.mark.parametrize("rel", METADATA)
def test_verify_rejects_symlinked_metadata(
    tmp_path: Path, bundle: Path, keys: tuple[Signer, Verifier], rel: str
) -> None:
    shutil.copyfile(bundle / rel, tmp_path / rel)
    (bundle / rel).unlink()
    (bundle / rel).symlink_to(tmp_path / rel)
    problems = problems_of(bundle, keys[1])
    assert has(problems, rf"symlink '{re.escape(rel)}'")
    assert has(problems, rf"{re.escape(rel)}: symlink")


def test_verify_rejects_fifo_in_bundle_without_blocking(
    bundle: Path, keys: tuple[Signer, Verifier]
) -> None:
    os.mkfifo(bundle / "results" / "pipe")
    assert has(problems_of(bundle, keys[1]), r"'results/pipe' is a device, FIFO or socket")


def test_verify_rejects_fifo_in_place_of_listed_file(
    bundle: Path, keys: tuple[Signer, Verifier]
) -> None:
    (bundle / "report.md").unlink()
    os.mkfifo(bundle / "report.md")
    problems = problems_of(bundle, keys[1])
    assert has(problems, r"'report\.md' is a device, FIFO or socket")
    assert "missing file 'report.md' (listed in manifest)" in problems


def _retar(
    bundle: Path, out: Path, extra: Callable[[tarfile.TarFile], None], skip: str | None = None
) -> Path:
    with tarfile.open(out, "w", format=tarfile.PAX_FORMAT) as tar:
        for path in sorted(p for p in bundle.rglob("*") if p.is_file()):
            rel = path.relative_to(bundle).as_posix()
            if rel != skip:
                tar.add(path, arcname=rel)
        extra(tar)
    return out


def _link_member(name: str, kind: bytes, target: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = target
    return info


@pytest.mark.parametrize(
    ("member", "expected"),
    [
        (_link_member("results/metrics.json", tarfile.SYMTYPE, "/etc/hostname"), "is a symlink"),
        (_link_member("results/metrics.json", tarfile.LNKTYPE, "report.md"), "is a hard link"),
        (_link_member("results/metrics.json", tarfile.CHRTYPE, ""), "is a device, FIFO"),
    ],
    ids=["symlink", "hardlink", "device"],
)
def test_verify_rejects_links_and_devices_in_tar(
    tmp_path: Path,
    bundle: Path,
    keys: tuple[Signer, Verifier],
    member: tarfile.TarInfo,
    expected: str,
) -> None:
    tar = _retar(bundle, tmp_path / "b.tar", lambda t: t.addfile(member), skip=member.name)
    problems = problems_of(tar, keys[1])
    assert has(problems, rf"tar member 'results/metrics\.json' {expected}")
    assert "missing file 'results/metrics.json' (listed in manifest)" in problems


@pytest.mark.parametrize(
    ("name", "expected"),
    [("../evil", "path contains '..'"), ("/abs/evil", "absolute path"), ("a/../../b", "'..'")],
)
def test_verify_rejects_unsafe_paths_in_tar(
    tmp_path: Path, bundle: Path, keys: tuple[Signer, Verifier], name: str, expected: str
) -> None:
    import io

    def add(tar: tarfile.TarFile) -> None:
        info = tarfile.TarInfo(name)
        info.size = 4
        tar.addfile(info, io.BytesIO(b"evil"))

    problems = problems_of(_retar(bundle, tmp_path / "b.tar", add), keys[1])
    assert has(problems, rf"tar member {re.escape(repr(name))}: .*{re.escape(expected)}")


def test_verify_rejects_duplicate_member_in_tar(
    tmp_path: Path, bundle: Path, keys: tuple[Signer, Verifier]
) -> None:
    problems = problems_of(
        _retar(bundle, tmp_path / "b.tar", lambda t: t.add(bundle / "report.md", "report.md")),
        keys[1],
    )
    assert has(problems, "tar member 'report.md' appears more than once")


def test_verify_rejects_non_canonical_base64_in_envelope(
    tmp_path: Path, ed_keys: tuple[Signer, Verifier]
) -> None:
    bundle = seal_bundle(tmp_path / "b", ed_keys[0])
    envelope = json.loads((bundle / ENVELOPE_NAME).read_bytes())
    sig = envelope["signatures"][0]["sig"]
    # 64 bytes: the last character before '==' carries 2 data bits and 4 unused bits
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    alt = sig[:-3] + alphabet[alphabet.index(sig[-3]) ^ 1] + sig[-2:]
    assert base64.b64decode(alt) == base64.b64decode(sig) and alt != sig
    envelope["signatures"][0]["sig"] = alt
    (bundle / ENVELOPE_NAME).write_text(json.dumps(envelope))
    assert has(problems_of(bundle, ed_keys[1]), "not canonical base64")


def test_verify_rejects_absurdly_deep_nesting(bundle: Path, keys: tuple[Signer, Verifier]) -> None:
    deep = bundle.joinpath(*["d"] * 70)
    deep.mkdir(parents=True)
    assert has(problems_of(bundle, keys[1]), "nested deeper than 64 levels")


def test_verify_accepts_hard_links_made_after_the_fact(
    tmp_path: Path, bundle: Path, keys: tuple[Signer, Verifier]
) -> None:
    # e.g. a deduplicating copy: the content is what is checked, and it is unchanged
    os.link(bundle / "report.md", tmp_path / "dedup")
    verify_bundle(bundle, keys[1])


def test_bundle_verifies_with_securesystemslib_and_plain_hashlib(
    tmp_path: Path, bundle: Path, keys: tuple[Signer, Verifier]
) -> None:
    # an independent verifier: securesystemslib checks the DSSE signature, hashlib the subjects
    from cryptography.hazmat.primitives import serialization
    from securesystemslib.dsse import Envelope
    from securesystemslib.signer import SSlibKey

    public = serialization.load_pem_public_key(keys[1].public_pem())
    key = SSlibKey.from_crypto(public, keys[1].keyid)  # type: ignore[arg-type]
    envelope = Envelope.from_dict(json.loads((bundle / ENVELOPE_NAME).read_bytes()))
    assert set(envelope.verify([key], 1)) == {keys[1].keyid}
    assert envelope.payload_type == "application/vnd.in-toto+json"
    statement = json.loads(envelope.payload)
    assert statement["_type"] == "https://in-toto.io/Statement/v1"
    for subject in statement["subject"]:
        data = (bundle / subject["name"]).read_bytes()
        assert subject["digest"] == {"sha256": hashlib.sha256(data).hexdigest()}
    on_disk = {p.relative_to(bundle).as_posix() for p in bundle.rglob("*") if p.is_file()}
    assert on_disk - {s["name"] for s in statement["subject"]} == {
        STATEMENT_NAME,
        ENVELOPE_NAME,
        SIGSTORE_BUNDLE_NAME,
    }


def test_verify_rejects_truncated_tar(
    tmp_path: Path, bundle: Path, keys: tuple[Signer, Verifier]
) -> None:
    write_bundle_tar(bundle, tmp_path / "b.tar")
    data = (tmp_path / "b.tar").read_bytes()
    (tmp_path / "b.tar").write_bytes(data[: len(data) // 2])
    problems_of(tmp_path / "b.tar", keys[1])


def test_verify_rejects_deeply_nested_json_without_crashing(
    bundle: Path, keys: tuple[Signer, Verifier]
) -> None:
    (bundle / MANIFEST_NAME).write_bytes(b"[" * 200_000 + b"]" * 200_000)
    assert has(problems_of(bundle, keys[1]), "nested too deeply")

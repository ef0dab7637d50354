"""Signing keys from every source, keyrings across a key rotation, URL-safe DSSE, the
Sigstore bundle beside the envelope, and the rule that evalrun never makes a key silently."""

from __future__ import annotations

import base64
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from bundle_fixtures import make_keys, seal_bundle

from runner.bundle.build import ENVELOPE_NAME, SIGSTORE_BUNDLE_NAME
from runner.bundle.keys import (
    DEFAULT_SECRET_FIELD,
    EnvKey,
    FileKey,
    InlineKey,
    KeyAccess,
    SecretKey,
    Session,
    StdinKey,
    TokenKey,
    describe_key,
    key_ref_from_env,
    load_keyring,
    load_signing_key,
    parse_key_ref,
    parse_pkcs11_uri,
    resolve_signing_key,
)
from runner.bundle.signing import (
    SIGSTORE_BUNDLE_MEDIA_TYPE,
    Keyring,
    b64_decode_canonical,
    generate_keypair,
    load_verifier,
    sign_envelope,
    sigstore_bundle,
    verify_envelope,
)
from runner.bundle.verify import verify_bundle
from runner.cli.main import main
from runner.errors import InputError, SigningKeyRequired, VerificationFailed

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
INTOTO = "application/vnd.in-toto+json"
INTERACTIVE = Session(ci=None, stdin_tty=True, stdout_tty=True)


@pytest.fixture
def pem_pair(tmp_path: Path) -> tuple[Path, Path, str]:
    info = generate_keypair(tmp_path / "k.key", tmp_path / "k.pub")
    return info.private_path, info.public_path, info.keyid


@pytest.fixture
def encrypted_pair(tmp_path: Path) -> tuple[Path, str]:
    info = generate_keypair(tmp_path / "e.key", tmp_path / "e.pub", password=b"s3cret")
    return info.private_path, info.keyid


def access(**environ: str) -> KeyAccess:
    return KeyAccess(environ=environ)


# --------------------------------------------------------------------------- references


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("-", StdinKey()),
        ("env:SIGNING_PEM", EnvKey("SIGNING_PEM")),
        ("k8s://evals/signer", SecretKey("evals", "signer", DEFAULT_SECRET_FIELD)),
        ("k8s://evals/signer/tls.key", SecretKey("evals", "signer", "tls.key")),
        ("keys/evalrun.key", FileKey(Path("keys/evalrun.key"))),
    ],
)
def test_key_references_parse_to_their_source(text: str, expected: object) -> None:
    assert parse_key_ref(text) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "empty key reference"),
        ("env:1BAD", "not an environment variable name"),
        ("k8s://evals", "expected k8s://NAMESPACE/NAME"),
        ("k8s://evals/a/b/c", "expected k8s://NAMESPACE/NAME"),
        ("k8s://Evals/x", "not a Kubernetes object name"),
        ("pkcs11:token=t", "names no key"),
        ("pkcs11:token=t;object=k;pin-value=1234", "pin-value is not accepted"),
        ("pkcs11:token=t;object=k?pin-source=file:/p", "pin-source is not accepted"),
        ("pkcs11:token=t;object=k;module-path=/m.so", "unsupported attribute 'module-path'"),
        ("pkcs11:token=t;object=k;x-vendor=1", "unsupported attribute 'x-vendor'"),
        ("pkcs11:token=t;object=k;object=j", "given twice"),
        ("pkcs11:token=t;object=k;type=cert", "names no key pair"),
        ("pkcs11:token=t;object", "is not NAME=VALUE"),
        ("pkcs11:token=t;slot-id=x;object=k", "slot-id must be a number"),
    ],
)
def test_bad_key_references_are_input_errors_saying_what_is_wrong(text: str, message: str) -> None:
    with pytest.raises(InputError, match=re.escape(message)) as err:
        parse_key_ref(text)
    assert err.value.exit_code == 2
    assert "1234" not in err.value.diagnostics()  # a PIN is never echoed


def test_pkcs11_uri_is_rfc7512_with_percent_encoded_values() -> None:
    uri = parse_pkcs11_uri(
        "pkcs11:model=SoftHSM%20v2;manufacturer=SoftHSM%20project;serial=fea0;"
        "token=ci%20signer;id=%01%a2;object=evalrun;type=private"
        "?module-path=/usr/lib/softhsm/libsofthsm2.so"
    )
    assert (uri.token, uri.model, uri.manufacturer, uri.serial) == (
        "ci signer",
        "SoftHSM v2",
        "SoftHSM project",
        "fea0",
    )
    assert uri.object == "evalrun" and uri.id == b"\x01\xa2"
    assert uri.module_path == "/usr/lib/softhsm/libsofthsm2.so"
    assert isinstance(parse_key_ref(uri.text), TokenKey)


def test_module_path_comes_from_the_uri_then_the_environment_then_softhsm() -> None:
    uri = parse_pkcs11_uri("pkcs11:token=t;object=k")
    assert access().module_path(uri) == "/usr/lib/softhsm/libsofthsm2.so"
    assert access(EVALRUN_PKCS11_MODULE="/opt/hsm.so").module_path(uri) == "/opt/hsm.so"
    with_path = parse_pkcs11_uri("pkcs11:token=t;object=k?module-path=/uri.so")
    assert access(EVALRUN_PKCS11_MODULE="/opt/hsm.so").module_path(with_path) == "/uri.so"


def test_evalrun_key_holds_a_pem_or_a_reference(pem_pair: tuple[Path, Path, str]) -> None:
    private, _, keyid = pem_pair
    pem = private.read_text()
    assert key_ref_from_env({}) is None
    inline = key_ref_from_env({"EVALRUN_KEY": pem})
    assert isinstance(inline, InlineKey) and str(inline) == "$EVALRUN_KEY"
    assert pem not in repr(inline)  # the secret stays out of reprs and logs
    assert load_signing_key(inline, access()).keyid == keyid
    assert key_ref_from_env({"EVALRUN_KEY": "env:OTHER"}) == EnvKey("OTHER")
    assert key_ref_from_env({"EVALRUN_KEY": str(private)}) == FileKey(private)


# --------------------------------------------------------------------------- PEM sources


def test_plain_pem_file_signs_and_its_public_key_verifies(
    pem_pair: tuple[Path, Path, str],
) -> None:
    private, public, keyid = pem_pair
    signer = load_signing_key(FileKey(private), access())
    assert (signer.keyid, signer.source) == (keyid, str(private))
    envelope = sign_envelope(b"payload", INTOTO, signer)
    assert verify_envelope(envelope, load_verifier(public), INTOTO) == b"payload"


def test_plain_pem_ignores_a_passphrase_variable_set_for_other_keys(
    pem_pair: tuple[Path, Path, str],
) -> None:
    private, _, keyid = pem_pair
    signer = load_signing_key(FileKey(private), access(EVALRUN_KEY_PASSPHRASE="unused"))
    assert signer.keyid == keyid


def test_encrypted_pem_is_unlocked_with_the_passphrase_from_the_environment(
    encrypted_pair: tuple[Path, str],
) -> None:
    private, keyid = encrypted_pair
    with pytest.raises(InputError, match=r"encrypted and \$EVALRUN_KEY_PASSPHRASE is not set"):
        load_signing_key(FileKey(private), access())
    with pytest.raises(InputError, match="wrong password") as err:
        load_signing_key(FileKey(private), access(EVALRUN_KEY_PASSPHRASE="nope"))
    assert "nope" not in err.value.diagnostics()
    signer = load_signing_key(FileKey(private), access(EVALRUN_KEY_PASSPHRASE="s3cret"))
    assert signer.keyid == keyid


def test_key_passphrase_env_names_another_variable(
    encrypted_pair: tuple[Path, str],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    private, keyid = encrypted_pair
    signer = load_signing_key(
        FileKey(private), KeyAccess(passphrase_env="CI_KEY_PW", environ={"CI_KEY_PW": "s3cret"})
    )
    assert signer.keyid == keyid
    monkeypatch.setenv("EVALRUN_HOME", str(private.parent / "home"))
    monkeypatch.setenv("CI_KEY_PW", "s3cret")
    assert main(["keys", "describe", str(private), "--key-passphrase-env", "CI_KEY_PW"]) == 0
    out = capsys.readouterr().out
    assert keyid in out and "encrypted   yes" in out and "PRIVATE" not in out


def test_env_source_reads_the_pem_from_the_named_variable(
    pem_pair: tuple[Path, Path, str],
) -> None:
    private, _, keyid = pem_pair
    signer = load_signing_key(
        parse_key_ref("env:CI_SIGNING_KEY"), access(CI_SIGNING_KEY=private.read_text())
    )
    assert (signer.keyid, signer.source) == (keyid, "env:CI_SIGNING_KEY")
    with pytest.raises(InputError, match=r"\$CI_SIGNING_KEY is not set or empty"):
        load_signing_key(parse_key_ref("env:CI_SIGNING_KEY"), access())


def test_env_source_can_be_encrypted_too(encrypted_pair: tuple[Path, str]) -> None:
    private, keyid = encrypted_pair
    found = load_signing_key(
        EnvKey("K"), access(K=private.read_text(), EVALRUN_KEY_PASSPHRASE="s3cret")
    )
    assert found.keyid == keyid


def test_stdin_source_reads_the_pem_from_standard_input(
    pem_pair: tuple[Path, Path, str],
) -> None:
    private, _, keyid = pem_pair
    found = load_signing_key(
        StdinKey(), KeyAccess(environ={}, stdin=io.BytesIO(private.read_bytes()))
    )
    assert (found.keyid, found.source) == (keyid, "-")


def test_stdin_source_refuses_a_terminal_and_an_oversized_input() -> None:
    class Terminal(io.BytesIO):
        def isatty(self) -> bool:
            return True

    with pytest.raises(InputError, match="standard input, which is a terminal"):
        load_signing_key(StdinKey(), KeyAccess(environ={}, stdin=Terminal(b"")))
    with pytest.raises(InputError, match="too large to be a PEM key"):
        load_signing_key(StdinKey(), KeyAccess(environ={}, stdin=io.BytesIO(b"x" * 70_000)))


def test_stdin_source_through_the_cli(pem_pair: tuple[Path, Path, str], tmp_path: Path) -> None:
    private, _, keyid = pem_pair
    env = {k: v for k, v in os.environ.items() if not k.startswith("EVALRUN_")}
    proc = subprocess.run(
        [sys.executable, "-m", "runner.cli", "keys", "describe", "-", "--json"],
        input=private.read_bytes(),
        capture_output=True,
        cwd=ROOT,
        env={**env, "EVALRUN_HOME": str(tmp_path / "home"), "PYTHONPATH": str(ROOT)},
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    described = json.loads(proc.stdout)
    assert described["keyid"] == keyid and described["source"] == "-"
    assert b"PRIVATE" not in proc.stdout


def test_a_public_key_is_refused_for_signing_from_any_source(
    pem_pair: tuple[Path, Path, str],
) -> None:
    _, public, _ = pem_pair
    with pytest.raises(InputError, match="this is a public key"):
        load_signing_key(EnvKey("PUB"), access(PUB=public.read_text()))


def test_describe_shows_keyid_algorithm_and_source_but_no_secret(
    pem_pair: tuple[Path, Path, str],
) -> None:
    private, public, keyid = pem_pair
    of_private = describe_key(FileKey(private), access())
    of_public = describe_key(FileKey(public), access())
    assert (of_private.keyid, of_private.algorithm, of_private.holds) == (
        keyid,
        "ecdsa-p256",
        "private key",
    )
    assert (of_public.keyid, of_public.holds, of_public.encrypted) == (keyid, "public key", None)
    assert "PRIVATE" not in of_private.model_dump_json()


def test_keys_list_shows_the_default_keys_and_evalrun_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("EVALRUN_HOME", str(tmp_path / "home"))
    assert main(["keys", "generate", "--json"]) == 0
    keyid = json.loads(capsys.readouterr().out)["keyid"]
    other = generate_keypair(tmp_path / "o.key", tmp_path / "o.pub", "ed25519")
    monkeypatch.setenv("EVALRUN_KEY", str(other.private_path))
    assert main(["keys", "list", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [(k["keyid"], k["holds"]) for k in listed["keys"]] == [
        (keyid, "private key"),
        (keyid, "public key"),
        (other.keyid, "private key"),
    ]
    assert listed["unreadable"] == []
    assert "PRIVATE" not in json.dumps(listed)


def test_keys_generate_if_absent_creates_once_then_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("EVALRUN_HOME", str(tmp_path / "home"))
    assert main(["keys", "generate", "--if-absent", "--json"]) == 0
    first = json.loads(capsys.readouterr().out)
    assert main(["keys", "generate", "--if-absent", "--json"]) == 0
    second = json.loads(capsys.readouterr().out)
    assert (first["created"], second["created"]) == (True, False)
    assert first["keyid"] == second["keyid"]
    assert main(["keys", "generate"]) == 2  # without --if-absent, still never overwrites


def test_keys_generate_encrypt_takes_the_passphrase_from_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("EVALRUN_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("EVALRUN_KEY_PASSPHRASE", raising=False)
    assert main(["keys", "generate", "--encrypt", "--out", str(tmp_path / "x.key")]) == 2
    monkeypatch.setenv("EVALRUN_KEY_PASSPHRASE", "pw")
    assert main(["keys", "generate", "--encrypt", "--out", str(tmp_path / "x.key")]) == 0
    assert b"ENCRYPTED PRIVATE KEY" in (tmp_path / "x.key").read_bytes()


def test_keys_public_key_exports_the_pem(
    pem_pair: tuple[Path, Path, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    private, public, _ = pem_pair
    monkeypatch.setenv("EVALRUN_HOME", str(tmp_path / "home"))
    assert main(["keys", "public-key", str(private), "--out", str(tmp_path / "exported.pub")]) == 0
    assert (tmp_path / "exported.pub").read_bytes() == public.read_bytes()
    assert main(["keys", "public-key", str(private), "--out", str(tmp_path / "exported.pub")]) == 2


# --------------------------------------------------------------------------- keyrings


@pytest.fixture
def rotation(tmp_path: Path) -> dict[str, object]:
    """A bundle signed by the old key and one signed by the new key (after a rotation)."""
    old = make_keys(tmp_path, "old", "ecdsa-p256")
    new = make_keys(tmp_path, "new", "ed25519")
    return {
        "old": old,
        "new": new,
        "before": seal_bundle(tmp_path / "before", old[0], "run-before"),
        "after": seal_bundle(tmp_path / "after", new[0], "run-after"),
    }


def test_a_keyring_directory_verifies_bundles_from_before_and_after_a_rotation(
    tmp_path: Path, rotation: dict
) -> None:
    ring = tmp_path / "trusted"
    ring.mkdir()
    (ring / "2025.pub").write_bytes((tmp_path / "old.pub").read_bytes())
    (ring / "2026.pem").write_bytes((tmp_path / "new.pub").read_bytes())
    (ring / "README").write_text("not a key; ignored")
    keyring = load_keyring(ring)
    assert set(keyring.keyids) == {rotation["old"][1].keyid, rotation["new"][1].keyid}
    assert verify_bundle(rotation["before"], keyring).keyid == rotation["old"][1].keyid
    assert verify_bundle(rotation["after"], keyring).keyid == rotation["new"][1].keyid


def test_a_keyring_file_of_concatenated_pems_works_the_same(tmp_path: Path, rotation: dict) -> None:
    ring = tmp_path / "trusted.pem"
    ring.write_bytes(
        b"# rotated 2026-01: both keys trusted\n"
        + (tmp_path / "old.pub").read_bytes()
        + b"\n# current\n"
        + (tmp_path / "new.pub").read_bytes()
    )
    keyring = load_keyring(ring)
    assert len(keyring.verifiers) == 2
    verify_bundle(rotation["before"], keyring)
    verify_bundle(rotation["after"], keyring)


def test_an_unknown_keyid_fails_verification_naming_it(tmp_path: Path, rotation: dict) -> None:
    only_new = load_keyring(tmp_path / "new.pub")
    with pytest.raises(VerificationFailed) as err:
        verify_bundle(rotation["before"], only_new)
    assert err.value.exit_code == 3
    old_keyid = rotation["old"][1].keyid
    assert any(f"unknown keyid {old_keyid}" in p for p in err.value.problems), err.value.problems


def test_cli_verify_takes_a_keyring_and_exits_3_on_an_unknown_keyid(
    tmp_path: Path,
    rotation: dict,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("EVALRUN_HOME", str(tmp_path / "home"))
    ring = tmp_path / "ring.pem"
    ring.write_bytes((tmp_path / "old.pub").read_bytes() + (tmp_path / "new.pub").read_bytes())
    assert main(["verify", str(rotation["before"]), "--keyring", str(ring), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["keyid"] == rotation["old"][1].keyid
    assert main(["verify", str(rotation["before"]), "--keyring", str(tmp_path / "new.pub")]) == 3
    assert f"unknown keyid {rotation['old'][1].keyid}" in capsys.readouterr().err
    # --key and --keyring together trust both
    args = ["verify", str(rotation["after"]), "--key", str(tmp_path / "new.pub")]
    assert main([*args, "--keyring", str(tmp_path / "old.pub")]) == 0
    assert main(["verify", str(rotation["after"])]) == 2  # no key at all: a usage error


def test_keyring_refuses_private_keys_other_blocks_and_emptiness(tmp_path: Path) -> None:
    info = generate_keypair(tmp_path / "k.key", tmp_path / "k.pub")
    bad = tmp_path / "bad.pem"
    bad.write_bytes(info.public_path.read_bytes() + info.private_path.read_bytes())
    with pytest.raises(InputError, match="PRIVATE KEY"):
        load_keyring(bad)
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="holds no public key"):
        load_keyring(tmp_path / "empty")
    with pytest.raises(InputError, match="keyring not found"):
        load_keyring(tmp_path / "missing")
    with pytest.raises(InputError, match="holds no public key"):
        Keyring.of([])


# --------------------------------------------------------------------------- URL-safe DSSE


def _urlsafe_envelope(signer: object) -> tuple[dict, bytes]:
    """An envelope whose payload and signature both use characters that differ in URL-safe."""
    for n in range(500):
        payload = bytes([0xFB, 0xFF, n % 256]) * 4  # '+' and '/' in standard base64
        envelope = sign_envelope(payload, INTOTO, signer)  # type: ignore[arg-type]
        sig = envelope["signatures"][0]["sig"]
        if set(sig) & set("+/"):
            return envelope, payload
    raise AssertionError("no signature with '+' or '/' in 500 tries")


def to_urlsafe(text: str) -> str:
    return text.replace("+", "-").replace("/", "_")


def test_urlsafe_payload_and_signature_verify(tmp_path: Path) -> None:
    signer, verifier = make_keys(tmp_path, "k", "ed25519")
    envelope, payload = _urlsafe_envelope(signer)
    envelope["payload"] = to_urlsafe(envelope["payload"])
    envelope["signatures"][0]["sig"] = to_urlsafe(envelope["signatures"][0]["sig"])
    assert "-" in envelope["payload"] or "_" in envelope["payload"]
    assert verify_envelope(envelope, verifier, INTOTO) == payload


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("-_8+", "mixes the standard and URL-safe alphabets"),
        ("-_9=", "not canonical"),  # a padding bit set: same bytes, other text
        ("-_8", "not valid base64"),  # padding is required, as in the DSSE reference
        ("+/8=\n", "not valid base64"),
    ],
)
def test_each_base64_text_has_one_canonical_decoding(text: str, why: str) -> None:
    assert b64_decode_canonical("-_8=") == b64_decode_canonical("+/8=") == b"\xfb\xff"
    with pytest.raises(ValueError, match=why):
        b64_decode_canonical(text)


def test_evalrun_verify_accepts_a_bundle_whose_envelope_is_urlsafe(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    signer, _ = make_keys(tmp_path, "k", "ecdsa-p256")
    for attempt in range(200):  # until the signature has a character URL-safe changes
        bundle = seal_bundle(tmp_path / f"b{attempt}", signer, f"run-{attempt}")
        envelope = json.loads((bundle / ENVELOPE_NAME).read_bytes())
        if set(envelope["signatures"][0]["sig"]) & set("+/"):
            break
    envelope["payload"] = to_urlsafe(envelope["payload"])
    envelope["signatures"][0]["sig"] = to_urlsafe(envelope["signatures"][0]["sig"])
    (bundle / ENVELOPE_NAME).write_text(json.dumps(envelope))
    monkeypatch.setenv("EVALRUN_HOME", str(tmp_path / "home"))
    assert main(["verify", str(bundle), "--key", str(tmp_path / "k.pub")]) == 0
    # but a signature in URL-safe base64 with a flipped padding bit is still refused
    sig = envelope["signatures"][0]["sig"]
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    pad = len(sig) - len(sig.rstrip("="))
    last = sig[-pad - 1]
    envelope["signatures"][0]["sig"] = (
        sig[: -pad - 1] + alphabet[alphabet.index(last) ^ 1] + "=" * pad
    )
    (bundle / ENVELOPE_NAME).write_text(json.dumps(envelope))
    assert main(["verify", str(bundle), "--key", str(tmp_path / "k.pub")]) == 3


# --------------------------------------------------------------------------- Sigstore bundle


def test_sigstore_bundle_restates_the_envelope_with_the_keyid_as_hint(tmp_path: Path) -> None:
    signer, _ = make_keys(tmp_path, "k", "ecdsa-p256")
    bundle = seal_bundle(tmp_path / "b", signer)
    envelope = json.loads((bundle / ENVELOPE_NAME).read_bytes())
    written = json.loads((bundle / SIGSTORE_BUNDLE_NAME).read_bytes())
    assert written == sigstore_bundle(envelope)
    assert written["mediaType"] == SIGSTORE_BUNDLE_MEDIA_TYPE
    assert written["mediaType"] == "application/vnd.dev.sigstore.bundle.v0.3+json"
    assert written["verificationMaterial"] == {
        "publicKey": {"hint": signer.keyid},
        "tlogEntries": [],
    }
    assert written["dsseEnvelope"] == {
        "payload": envelope["payload"],
        "payloadType": "application/vnd.in-toto+json",
        "signatures": [{"sig": envelope["signatures"][0]["sig"]}],
    }


def test_a_bundle_without_the_sigstore_file_still_verifies(tmp_path: Path) -> None:
    # bundles sealed before the Sigstore bundle existed have only envelope.dsse.json
    signer, verifier = make_keys(tmp_path, "k", "ed25519")
    bundle = seal_bundle(tmp_path / "old", signer)
    (bundle / SIGSTORE_BUNDLE_NAME).unlink()
    assert verify_bundle(bundle, verifier).keyid == signer.keyid


def test_a_sigstore_bundle_naming_another_key_or_signature_fails(tmp_path: Path) -> None:
    signer, verifier = make_keys(tmp_path, "k", "ed25519")
    other, _ = make_keys(tmp_path, "o", "ed25519")
    bundle = seal_bundle(tmp_path / "b", signer)
    written = json.loads((bundle / SIGSTORE_BUNDLE_NAME).read_bytes())
    written["verificationMaterial"]["publicKey"]["hint"] = other.keyid
    (bundle / SIGSTORE_BUNDLE_NAME).write_text(json.dumps(written))
    with pytest.raises(VerificationFailed) as err:
        verify_bundle(bundle, verifier)
    assert err.value.problems == [
        "envelope.sigstore.json does not restate envelope.dsse.json (verificationMaterial differs)"
    ]
    envelope = json.loads((bundle / ENVELOPE_NAME).read_bytes())
    resigned = sign_envelope(base64.b64decode(envelope["payload"]), INTOTO, other)
    (bundle / SIGSTORE_BUNDLE_NAME).write_text(json.dumps(sigstore_bundle(resigned)))
    with pytest.raises(VerificationFailed, match="bundle failed verification"):
        verify_bundle(bundle, verifier)


# --------------------------------------------------------------------------- no silent keys


def _evalrun(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("EVALRUN_") and k != "CI"}
    return subprocess.run(
        [sys.executable, "-m", "runner.cli", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
        env={**base, "EVALRUN_HOME": str(tmp_path / "home"), "PYTHONPATH": str(ROOT), **env},
        timeout=120,
        check=False,
    )


@pytest.mark.parametrize(
    ("env", "reason"),
    [
        ({"CI": "true"}, "CI=true is set"),
        ({"CI": "1"}, "CI=1 is set"),
        ({}, "standard input is not a terminal"),
        ({"CI": "false"}, "standard input is not a terminal"),
    ],
)
def test_without_a_person_at_a_terminal_run_never_creates_a_key(
    tmp_path: Path, env: dict[str, str], reason: str
) -> None:
    proc = _evalrun(tmp_path, "run", "examples/digits/eval.yaml", **env)
    assert proc.returncode == 2, proc.stderr
    message = proc.stderr
    assert f"evalrun never creates one when {reason}" in message
    for way in ("--key", "env:VAR", "pkcs11:", "k8s://", "$EVALRUN_KEY", "evalrun keys generate"):
        assert way in message
    assert "Traceback" not in message
    assert not (tmp_path / "home" / "keys").exists()


def test_the_refusal_is_one_json_error_under_json(tmp_path: Path) -> None:
    proc = _evalrun(tmp_path, "run", "examples/digits/eval.yaml", "--json", CI="true")
    assert proc.returncode == 2
    err = json.loads(proc.stdout)
    assert err["error"] == "signing_key_required" and err["reason"] == "CI=true is set"


def test_in_ci_an_explicit_key_or_evalrun_key_or_an_existing_default_is_used(
    tmp_path: Path, pem_pair: tuple[Path, Path, str]
) -> None:
    private, _, keyid = pem_pair
    ci = Session(ci="true", stdin_tty=False, stdout_tty=False)
    home_key = tmp_path / "home" / "keys" / "evalrun.key"

    def resolve(ref: str | None, **environ: str) -> str:
        return resolve_signing_key(
            ref,
            KeyAccess(environ=environ),
            default_private=home_key,
            default_public=home_key.with_suffix(".pub"),
            session=ci,
            announce=lambda _: pytest.fail("nothing may be announced"),
        ).keyid

    assert resolve(str(private)) == keyid
    assert resolve(None, EVALRUN_KEY=private.read_text()) == keyid
    assert resolve(None, EVALRUN_KEY="env:PEM", PEM=private.read_text()) == keyid
    with pytest.raises(SigningKeyRequired):
        resolve(None)
    home_key.parent.mkdir(parents=True)
    made = generate_keypair(home_key, home_key.with_suffix(".pub"))
    assert resolve(None) == made.keyid


def test_interactively_a_new_key_is_announced_loudly(tmp_path: Path) -> None:
    home_key = tmp_path / "home" / "keys" / "evalrun.key"
    said: list[str] = []
    signer = resolve_signing_key(
        None,
        KeyAccess(environ={}),
        default_private=home_key,
        default_public=home_key.with_suffix(".pub"),
        session=INTERACTIVE,
        announce=said.append,
    )
    (notice,) = said
    assert len(notice.splitlines()) >= 6
    assert "NEW SIGNING KEY" in notice
    assert str(home_key) in notice and str(home_key.with_suffix(".pub")) in notice
    assert signer.keyid in notice
    assert oct(home_key.stat().st_mode & 0o777) == "0o600"
    assert oct(home_key.parent.stat().st_mode & 0o777) == "0o700"


def test_cli_announces_a_new_key_on_stderr_even_under_json(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("EVALRUN_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("EVALRUN_KEY", raising=False)
    monkeypatch.setattr(Session, "current", classmethod(lambda cls, environ=None: INTERACTIVE))
    # the key is resolved before the spec is read: the missing spec fails afterwards
    assert main(["run", str(tmp_path / "missing.yaml"), "--json"]) == 2
    captured = capsys.readouterr()
    assert "CREATED A NEW SIGNING KEY" in captured.err
    assert str(tmp_path / "home" / "keys" / "evalrun.key") in captured.err
    assert "NEW SIGNING KEY" not in captured.out
    assert (tmp_path / "home" / "keys" / "evalrun.pub").exists()


def test_make_run_creates_the_default_key_explicitly_before_running() -> None:
    makefile = (ROOT / "Makefile").read_text()
    recipe = makefile.split("\nrun:", 1)[1].split("\n\n", 1)[0]
    lines = [line.strip() for line in recipe.splitlines()[1:]]
    assert lines[0] == "$(EVALRUN) keys generate --if-absent"
    assert lines.index("$(EVALRUN) keys generate --if-absent") < lines.index(
        "$(EVALRUN) run $(SPEC)"
    )


# --------------------------------------------------------------------------- run's self-check


def test_a_new_run_is_checked_with_the_key_that_signed_it(tmp_path: Path) -> None:
    from key_fixtures import locked_example

    spec = locked_example(tmp_path / "digits")
    key = generate_keypair(tmp_path / "a.key", tmp_path / "a.pub", "ed25519")
    proc = _evalrun(
        tmp_path,
        "run",
        str(spec),
        "--json",
        DOCKER_HOST=f"unix://{tmp_path}/no-docker.sock",  # the run fails, and is signed
        EVALRUN_KEY="env:CI_PEM",
        CI_PEM=key.private_path.read_text(),
        CI="true",
    )
    assert proc.returncode == 5, proc.stderr
    out = json.loads(proc.stdout)
    assert out["outcome"] == "infrastructure_failure" and out["reused"] is False
    assert out["verified"] == f"valid (7 checks, keyid {key.keyid[:16]}…)"


def test_a_stored_run_signed_by_an_earlier_key_is_named_not_failed(tmp_path: Path) -> None:
    from key_fixtures import locked_example

    from runner.bundle.build import build_bundle
    from runner.bundle.signing import load_signer
    from runner.bundle.store import Store
    from runner.model.lock import load_lock
    from runner.workflows.run import run_id_for

    spec = locked_example(tmp_path / "digits")
    old = generate_keypair(tmp_path / "old.key", tmp_path / "old.pub")
    new = generate_keypair(tmp_path / "new.key", tmp_path / "new.pub", "ed25519")
    run_id = run_id_for(load_lock(spec.with_name("eval.lock.json")).digest(), 0)
    store = Store(tmp_path / "home")
    with store.staging_dir() as stage:  # the run as it was sealed before the key rotation
        (stage / "report.md").write_text("# passed\n")
        predicate = {"run_id": run_id, "outcome": "passed", "metrics": []}
        build_bundle(stage, predicate, load_signer(old.private_path), stage)
        store.put(stage)

    def run(*args: str, **env: str) -> tuple[int, dict]:
        proc = _evalrun(tmp_path, "run", str(spec), "--json", *args, **env)
        return proc.returncode, json.loads(proc.stdout)

    code, out = run(EVALRUN_KEY=str(new.private_path))
    assert (code, out["reused"]) == (0, True)
    assert out["verified"].startswith("not checked: the existing run was signed by another key")
    code, out = run("--key", str(old.private_path))
    assert code == 0 and out["verified"].startswith("valid")
    code, out = run("--key", str(new.private_path), "--pub", str(old.public_path))
    assert code == 0 and out["verified"].startswith("valid")
    code, out = run("--key", str(new.private_path), "--pub", str(new.public_path))
    assert code == 3 and out["error"] == "verification_failed"

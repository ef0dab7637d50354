"""Keys and DSSE envelopes: generation, loading, signing, fail-closed verification,
and interoperability with an independent DSSE implementation (securesystemslib)."""

from __future__ import annotations

import base64
import hashlib
import json
import shutil
import stat
import subprocess
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from securesystemslib.dsse import Envelope
from securesystemslib.exceptions import VerificationError
from securesystemslib.signer import CryptoSigner, SSlibKey

from runner.errors import InputError, VerificationFailed
from runner.bundle.signing import (
    ALGORITHMS,
    Algorithm,
    Signer,
    generate_keypair,
    load_signer,
    load_verifier,
    pae,
    sign_envelope,
    verify_envelope,
)

pytestmark = pytest.mark.unit

INTOTO = "application/vnd.in-toto+json"


@pytest.fixture(params=ALGORITHMS)
def algorithm(request: pytest.FixtureRequest) -> Algorithm:
    return request.param  # type: ignore[no-any-return]


@pytest.fixture
def keypair(tmp_path: Path, algorithm: Algorithm) -> tuple[Path, Path]:
    private, public = tmp_path / "signing.key", tmp_path / "signing.pub"
    generate_keypair(private, public, algorithm)
    return private, public


# --- key generation -------------------------------------------------------------


def test_generate_keypair_writes_private_0600_and_public_0644(
    tmp_path: Path, algorithm: Algorithm
) -> None:
    info = generate_keypair(tmp_path / "k", tmp_path / "k.pub", algorithm)
    assert info.algorithm == algorithm
    assert stat.S_IMODE((tmp_path / "k").stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "k.pub").stat().st_mode) == 0o644
    assert (tmp_path / "k").read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    assert (tmp_path / "k.pub").read_bytes().startswith(b"-----BEGIN PUBLIC KEY-----")


def test_keyid_is_sha256_of_der_subject_public_key_info(
    keypair: tuple[Path, Path],
) -> None:
    private, public = keypair
    der = serialization.load_pem_public_key(public.read_bytes()).public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    expected = hashlib.sha256(der).hexdigest()
    assert load_signer(private).keyid == expected
    assert load_verifier(public).keyid == expected


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl CLI not installed")
def test_keyid_matches_openssl_der_digest(keypair: tuple[Path, Path]) -> None:
    _, public = keypair
    der = subprocess.run(
        ["openssl", "pkey", "-pubin", "-in", str(public), "-outform", "DER"],
        check=True,
        capture_output=True,
    ).stdout
    assert load_verifier(public).keyid == hashlib.sha256(der).hexdigest()


def test_generate_keypair_refuses_to_overwrite_existing_files(tmp_path: Path) -> None:
    (tmp_path / "k").write_text("precious")
    with pytest.raises(InputError) as err:
        generate_keypair(tmp_path / "k", tmp_path / "k.pub")
    assert err.value.fields["file"] == str(tmp_path / "k")
    assert (tmp_path / "k").read_text() == "precious"
    assert not (tmp_path / "k.pub").exists()

    (tmp_path / "other.pub").write_text("precious")
    with pytest.raises(InputError, match="overwrite"):
        generate_keypair(tmp_path / "new", tmp_path / "other.pub")
    assert not (tmp_path / "new").exists()
    assert (tmp_path / "other.pub").read_text() == "precious"


def test_generate_keypair_refuses_dangling_symlink_target(tmp_path: Path) -> None:
    (tmp_path / "k").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(InputError, match="overwrite"):
        generate_keypair(tmp_path / "k", tmp_path / "k.pub")
    assert not (tmp_path / "elsewhere").exists()


def test_generate_keypair_rejects_unknown_algorithm(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="rsa"):
        generate_keypair(tmp_path / "k", tmp_path / "k.pub", "rsa")  # type: ignore[arg-type]


def test_encrypted_private_key_needs_its_password(tmp_path: Path) -> None:
    generate_keypair(tmp_path / "k", tmp_path / "k.pub", password=b"s3cret")
    assert b"ENCRYPTED" in (tmp_path / "k").read_bytes()
    with pytest.raises(InputError) as err:
        load_signer(tmp_path / "k")
    assert err.value.fields["file"] == str(tmp_path / "k")
    with pytest.raises(InputError):
        load_signer(tmp_path / "k", password=b"wrong")
    signer = load_signer(tmp_path / "k", password=b"s3cret")
    assert signer.keyid == load_verifier(tmp_path / "k.pub").keyid


# --- loading keys: clear errors naming the file -----------------------------------


def test_load_signer_names_missing_file(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="not found") as err:
        load_signer(tmp_path / "nope.key")
    assert err.value.fields["file"] == str(tmp_path / "nope.key")
    assert err.value.exit_code == 2


def test_load_verifier_names_missing_file(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="not found") as err:
        load_verifier(tmp_path / "nope.pub")
    assert err.value.fields["file"] == str(tmp_path / "nope.pub")


def test_load_rejects_files_that_are_not_keys(tmp_path: Path) -> None:
    junk = tmp_path / "junk.pem"
    junk.write_text("hello\n")
    with pytest.raises(InputError, match="not a PEM private key") as err:
        load_signer(junk)
    assert err.value.fields["file"] == str(junk)
    with pytest.raises(InputError, match="not a PEM public key"):
        load_verifier(junk)
    with pytest.raises(InputError, match="not a regular file"):
        load_verifier(tmp_path)


def test_load_signer_rejects_a_public_key_and_verifier_a_private_key(
    keypair: tuple[Path, Path],
) -> None:
    private, public = keypair
    with pytest.raises(InputError, match="public key") as err:
        load_signer(public)
    assert err.value.fields["file"] == str(public)
    with pytest.raises(InputError, match="private key") as err:
        load_verifier(private)
    assert err.value.fields["file"] == str(private)


@pytest.mark.parametrize(
    "make_key",
    [
        lambda: rsa.generate_private_key(public_exponent=65537, key_size=2048),
        lambda: ec.generate_private_key(ec.SECP384R1()),
    ],
    ids=["rsa-2048", "ecdsa-p384"],
)
def test_load_rejects_unsupported_key_types(tmp_path: Path, make_key: object) -> None:
    key = make_key()  # type: ignore[operator]
    private = tmp_path / "other.key"
    public = tmp_path / "other.pub"
    private.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    public.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    with pytest.raises(InputError, match="unsupported") as err:
        load_signer(private)
    assert err.value.fields["file"] == str(private)
    with pytest.raises(InputError, match="unsupported"):
        load_verifier(public)


# --- DSSE ------------------------------------------------------------------------


def test_pae_matches_dsse_spec_example() -> None:
    # from the DSSE v1 protocol document
    assert (
        pae("http://example.com/HelloWorld", b"hello world")
        == b"DSSEv1 29 http://example.com/HelloWorld 11 hello world"
    )


def test_pae_counts_bytes_not_characters() -> None:
    assert pae("t\u00e9", b"\x00\xff") == b"DSSEv1 3 t\xc3\xa9 2 \x00\xff"


def test_sign_envelope_produces_standard_dsse_json(keypair: tuple[Path, Path]) -> None:
    private, _ = keypair
    signer = load_signer(private)
    envelope = sign_envelope(b'{"a": 1}', INTOTO, signer)
    assert set(envelope) == {"payload", "payloadType", "signatures"}
    assert base64.b64decode(envelope["payload"]) == b'{"a": 1}'
    assert envelope["payloadType"] == INTOTO
    assert [set(s) for s in envelope["signatures"]] == [{"keyid", "sig"}]
    assert envelope["signatures"][0]["keyid"] == signer.keyid
    json.dumps(envelope)  # plain JSON


def test_verify_envelope_returns_payload(keypair: tuple[Path, Path]) -> None:
    private, public = keypair
    envelope = sign_envelope(b"payload bytes", INTOTO, load_signer(private))
    assert verify_envelope(envelope, load_verifier(public), INTOTO) == b"payload bytes"


def test_ecdsa_signature_is_der_encoded(tmp_path: Path) -> None:
    generate_keypair(tmp_path / "k", tmp_path / "k.pub", "ecdsa-p256")
    envelope = sign_envelope(b"x", INTOTO, load_signer(tmp_path / "k"))
    sig = base64.b64decode(envelope["signatures"][0]["sig"])
    assert sig[0] == 0x30 and sig[1] == len(sig) - 2  # DER SEQUENCE of (r, s)


def test_verify_envelope_rejects_changed_payload_type(keypair: tuple[Path, Path]) -> None:
    private, public = keypair
    envelope = sign_envelope(b"p", INTOTO, load_signer(private))
    envelope["payloadType"] = "application/json"
    with pytest.raises(VerificationFailed) as err:
        verify_envelope(envelope, load_verifier(public), INTOTO)
    assert any(
        "payloadType is 'application/json', expected 'application/vnd.in-toto+json'" in p
        for p in err.value.problems
    )
    assert any("invalid" in p for p in err.value.problems)


def test_verify_envelope_rejects_payload_type_it_was_not_asked_for(
    keypair: tuple[Path, Path],
) -> None:
    private, public = keypair
    envelope = sign_envelope(b"p", "application/json", load_signer(private))
    with pytest.raises(VerificationFailed, match="did not verify"):
        verify_envelope(envelope, load_verifier(public), INTOTO)


def test_verify_envelope_rejects_altered_payload(keypair: tuple[Path, Path]) -> None:
    private, public = keypair
    envelope = sign_envelope(b"pay", INTOTO, load_signer(private))
    envelope["payload"] = base64.b64encode(b"pax").decode()
    with pytest.raises(VerificationFailed) as err:
        verify_envelope(envelope, load_verifier(public), INTOTO)
    assert any("is invalid" in p for p in err.value.problems)


def test_verify_envelope_names_expected_and_found_keyids_for_wrong_key(
    tmp_path: Path, algorithm: Algorithm
) -> None:
    generate_keypair(tmp_path / "a", tmp_path / "a.pub", algorithm)
    generate_keypair(tmp_path / "b", tmp_path / "b.pub", algorithm)
    signer = load_signer(tmp_path / "a")
    verifier = load_verifier(tmp_path / "b.pub")
    envelope = sign_envelope(b"p", INTOTO, signer)
    with pytest.raises(VerificationFailed) as err:
        verify_envelope(envelope, verifier, INTOTO)
    (problem,) = err.value.problems
    assert "wrong key" in problem
    assert verifier.keyid in problem and signer.keyid in problem


def test_verify_envelope_rejects_other_key_claiming_our_keyid(tmp_path: Path) -> None:
    generate_keypair(tmp_path / "a", tmp_path / "a.pub")
    generate_keypair(tmp_path / "b", tmp_path / "b.pub")
    verifier = load_verifier(tmp_path / "a.pub")
    envelope = sign_envelope(b"p", INTOTO, load_signer(tmp_path / "b"))
    envelope["signatures"][0]["keyid"] = verifier.keyid
    with pytest.raises(VerificationFailed, match="did not verify") as err:
        verify_envelope(envelope, verifier, INTOTO)
    assert any("is invalid" in p for p in err.value.problems)


@pytest.mark.parametrize(
    "mutate",
    [
        lambda e: e.pop("signatures"),
        lambda e: e.update(signatures=[]),
        lambda e: e.update(payload=e["payload"] + "!"),
        lambda e: e.update(payload=123),
        lambda e: e.update(extra="field"),
        lambda e: e["signatures"][0].update(sig="not base64!"),
        lambda e: e["signatures"][0].pop("keyid"),
    ],
    ids=[
        "no-signatures-key",
        "empty-signatures",
        "bad-base64",
        "payload-not-string",
        "unknown-field",
        "sig-not-base64",
        "no-keyid",
    ],
)
def test_verify_envelope_fails_closed_on_malformed_envelopes(
    keypair: tuple[Path, Path], mutate: object
) -> None:
    private, public = keypair
    envelope = sign_envelope(b"p", INTOTO, load_signer(private))
    mutate(envelope)  # type: ignore[operator]
    with pytest.raises(VerificationFailed) as err:
        verify_envelope(envelope, load_verifier(public), INTOTO)
    assert err.value.problems


def test_verify_envelope_rejects_non_canonical_base64(keypair: tuple[Path, Path]) -> None:
    private, public = keypair
    # one payload byte leaves 4 unused bits in the last base64 character
    envelope = sign_envelope(b"A", INTOTO, load_signer(private))
    assert envelope["payload"] == "QQ=="
    envelope["payload"] = "QR=="  # decodes to the same byte
    assert base64.b64decode("QR==") == b"A"
    with pytest.raises(VerificationFailed) as err:
        verify_envelope(envelope, load_verifier(public), INTOTO)
    assert any("canonical" in p for p in err.value.problems)


# --- interoperability with securesystemslib -----------------------------------------


def _sslib_key(public: Path, keyid: str) -> SSlibKey:
    return SSlibKey.from_crypto(serialization.load_pem_public_key(public.read_bytes()), keyid)


def test_our_envelope_verifies_with_securesystemslib(keypair: tuple[Path, Path]) -> None:
    private, public = keypair
    signer = load_signer(private)
    envelope = sign_envelope(b'{"_type": "x"}', INTOTO, signer)
    parsed = Envelope.from_dict(json.loads(json.dumps(envelope)))
    accepted = parsed.verify([_sslib_key(public, signer.keyid)], 1)
    assert set(accepted) == {signer.keyid}
    assert parsed.payload == b'{"_type": "x"}'
    assert parsed.payload_type == INTOTO


def test_securesystemslib_rejects_our_envelope_when_tampered(
    keypair: tuple[Path, Path],
) -> None:
    private, public = keypair
    signer = load_signer(private)
    envelope = sign_envelope(b"payload", INTOTO, signer)
    envelope["payloadType"] = "text/plain"
    parsed = Envelope.from_dict(envelope)
    with pytest.raises(VerificationError):
        parsed.verify([_sslib_key(public, signer.keyid)], 1)


def test_securesystemslib_envelope_verifies_with_ours(keypair: tuple[Path, Path]) -> None:
    private, public = keypair
    private_key = serialization.load_pem_private_key(private.read_bytes(), password=None)
    keyid = load_verifier(public).keyid
    sslib_signer = CryptoSigner(private_key, _sslib_key(public, keyid))  # type: ignore[arg-type]
    envelope = Envelope(payload=b"from sslib", payload_type=INTOTO, signatures={})
    envelope.sign(sslib_signer)
    assert verify_envelope(envelope.to_dict(), load_verifier(public), INTOTO) == b"from sslib"


def test_signer_and_verifier_roundtrip_through_cryptography_objects(
    keypair: tuple[Path, Path],
) -> None:
    private, public = keypair
    signer = load_signer(private)
    again = Signer.from_private_key(signer.private_key)
    assert again.keyid == signer.keyid == signer.verifier().keyid == load_verifier(public).keyid
    assert signer.verifier().verify(signer.sign(b"m"), b"m")
    assert not signer.verifier().verify(signer.sign(b"m"), b"n")

"""Signing keys and DSSE envelopes.

The runner signs on the host with a key that never enters a container. Keys are
PEM files made by :func:`generate_keypair` (ECDSA P-256 with SHA-256, or Ed25519);
a key's id is the sha256 hex of its DER SubjectPublicKeyInfo, so the same key has
the same id everywhere. Envelopes follow DSSE v1 (the format sigstore, in-toto
and securesystemslib verify): signatures are over ``PAE(payloadType, payload)``,
ECDSA signatures are DER-encoded.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, TypedDict

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from pydantic import BaseModel, ConfigDict, Field, StrictStr, ValidationError

from runner.errors import InputError, VerificationFailed

Algorithm = Literal["ecdsa-p256", "ed25519"]
ALGORITHMS: tuple[Algorithm, ...] = ("ecdsa-p256", "ed25519")

_PrivateKey = ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey
_PublicKey = ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey


class KeyInfo(BaseModel):
    """What :func:`generate_keypair` wrote: where, which algorithm, which key id."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    keyid: str = Field(description="sha256 hex of the DER SubjectPublicKeyInfo")
    algorithm: Algorithm
    private_path: Path
    public_path: Path


def keyid_of(public_key: _PublicKey) -> str:
    """Return the key id of ``public_key``: sha256 hex of its DER SubjectPublicKeyInfo."""
    der = public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(der).hexdigest()


def _algorithm_of(key: _PrivateKey | _PublicKey) -> Algorithm | None:
    if isinstance(key, ed25519.Ed25519PrivateKey | ed25519.Ed25519PublicKey):
        return "ed25519"
    if isinstance(key.curve, ec.SECP256R1):
        return "ecdsa-p256"
    return None


@dataclass(frozen=True)
class Verifier:
    """A public key that checks signatures. Build one with :func:`load_verifier`."""

    public_key: _PublicKey
    algorithm: Algorithm
    keyid: str

    @classmethod
    def from_public_key(cls, public_key: _PublicKey) -> Verifier:
        """Wrap a `cryptography` public key; raises InputError for unsupported key types."""
        algorithm = _algorithm_of(public_key)
        if algorithm is None:
            raise InputError(
                "unsupported public key type", hint=f"use one of: {', '.join(ALGORITHMS)}"
            )
        return cls(public_key=public_key, algorithm=algorithm, keyid=keyid_of(public_key))

    def verify(self, signature: bytes, data: bytes) -> bool:
        """Return True only if ``signature`` is a valid signature of ``data`` by this key."""
        try:
            if isinstance(self.public_key, ed25519.Ed25519PublicKey):
                self.public_key.verify(signature, data)
            else:
                self.public_key.verify(signature, data, ec.ECDSA(hashes.SHA256()))
        except (InvalidSignature, ValueError):
            return False
        return True

    def public_pem(self) -> bytes:
        """The SubjectPublicKeyInfo PEM of this key."""
        return self.public_key.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )


@dataclass(frozen=True)
class Signer:
    """A private key that signs. Build one with :func:`load_signer`."""

    private_key: _PrivateKey
    algorithm: Algorithm
    keyid: str

    @classmethod
    def from_private_key(cls, private_key: _PrivateKey) -> Signer:
        """Wrap a `cryptography` private key; raises InputError for unsupported key types."""
        algorithm = _algorithm_of(private_key)
        if algorithm is None:
            raise InputError(
                "unsupported private key type", hint=f"use one of: {', '.join(ALGORITHMS)}"
            )
        return cls(
            private_key=private_key,
            algorithm=algorithm,
            keyid=keyid_of(private_key.public_key()),
        )

    def sign(self, data: bytes) -> bytes:
        """Sign ``data``: raw 64-byte Ed25519, or DER-encoded ECDSA P-256/SHA-256."""
        if isinstance(self.private_key, ed25519.Ed25519PrivateKey):
            return self.private_key.sign(data)
        return self.private_key.sign(data, ec.ECDSA(hashes.SHA256()))

    def verifier(self) -> Verifier:
        """The matching public-key verifier."""
        return Verifier.from_public_key(self.private_key.public_key())


def _new_private_key(algorithm: Algorithm) -> _PrivateKey:
    if algorithm == "ed25519":
        return ed25519.Ed25519PrivateKey.generate()
    return ec.generate_private_key(ec.SECP256R1())


def _write_new_file(path: Path, data: bytes, mode: int) -> None:
    # O_EXCL: never overwrite, even if the file appears between our check and now.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    try:
        os.fchmod(fd, mode)  # the umask must not widen or narrow what we promise
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def generate_keypair(
    private_path: Path,
    public_path: Path,
    algorithm: Algorithm = "ecdsa-p256",
    *,
    password: bytes | None = None,
) -> KeyInfo:
    """Create a new key pair and write it as PEM files.

    The private key is PKCS#8 (encrypted when ``password`` is given) with mode
    0600; the public key is a SubjectPublicKeyInfo PEM with mode 0644. Existing
    files are never overwritten: if either path exists, InputError names it and
    nothing is written. If writing the public key fails, the private key is removed.
    """
    if algorithm not in ALGORITHMS:
        raise InputError(
            f"unknown key algorithm {algorithm!r}", hint=f"use one of: {', '.join(ALGORITHMS)}"
        )
    if private_path == public_path:
        raise InputError("private and public key paths must differ", file=str(private_path))
    for path in (private_path, public_path):
        if path.exists() or path.is_symlink():
            raise InputError(
                "refusing to overwrite an existing key file",
                file=str(path),
                hint="choose another path or remove the file yourself",
            )
        if not path.parent.is_dir():
            raise InputError("directory for key file does not exist", file=str(path))

    private_key = _new_private_key(algorithm)
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(password)
        if password
        else serialization.NoEncryption()
    )
    private_pem = private_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption
    )
    verifier = Verifier.from_public_key(private_key.public_key())
    try:
        _write_new_file(private_path, private_pem, 0o600)
    except FileExistsError as exc:
        raise InputError(
            "refusing to overwrite an existing key file", file=str(private_path)
        ) from exc
    try:
        _write_new_file(public_path, verifier.public_pem(), 0o644)
    except BaseException as exc:
        private_path.unlink(missing_ok=True)
        if isinstance(exc, FileExistsError):
            raise InputError(
                "refusing to overwrite an existing key file", file=str(public_path)
            ) from exc
        raise
    return KeyInfo(
        keyid=verifier.keyid,
        algorithm=algorithm,
        private_path=private_path,
        public_path=public_path,
    )


def _read_key_file(path: Path, what: str) -> bytes:
    try:
        st = path.stat()
    except FileNotFoundError as exc:
        raise InputError(f"{what} not found", file=str(path)) from exc
    except OSError as exc:
        raise InputError(f"cannot read {what}: {exc.strerror}", file=str(path)) from exc
    if not stat.S_ISREG(st.st_mode):
        raise InputError(f"{what} is not a regular file", file=str(path))
    if st.st_size > 64 * 1024:
        raise InputError(f"{what} is too large to be a PEM key", file=str(path))
    try:
        return path.read_bytes()
    except OSError as exc:
        raise InputError(f"cannot read {what}: {exc.strerror}", file=str(path)) from exc


def load_signer(path: Path, *, password: bytes | None = None) -> Signer:
    """Load a PEM private key (ECDSA P-256 or Ed25519) for signing.

    Raises InputError naming ``path`` if it is missing, not a PEM private key
    (a public key is called out as such), encrypted without a password, or of
    an unsupported type.
    """
    data = _read_key_file(path, "signing key")
    if b"PUBLIC KEY-----" in data and b"PRIVATE KEY-----" not in data:
        raise InputError(
            "this is a public key; signing needs the private key",
            file=str(path),
            hint="pass the private key file made by `evalrun keys generate`",
        )
    try:
        key = serialization.load_pem_private_key(data, password=password)
    except TypeError as exc:
        # cryptography: password missing for an encrypted key, or given for a plain one
        raise InputError(
            f"cannot load signing key: {exc}",
            file=str(path),
            hint="set or unset the key password",
        ) from exc
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise InputError(
            "not a PEM private key (or wrong password)",
            file=str(path),
            hint="expected a PKCS#8 PEM made by `evalrun keys generate`",
        ) from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey) or (
        _algorithm_of(key) is None
    ):
        raise InputError(
            f"unsupported signing key type {type(key).__name__}",
            file=str(path),
            hint=f"use one of: {', '.join(ALGORITHMS)}",
        )
    return Signer.from_private_key(key)


def load_verifier(path: Path) -> Verifier:
    """Load a PEM public key (ECDSA P-256 or Ed25519) for verification.

    Raises InputError naming ``path`` if it is missing, not a PEM public key
    (a private key is refused: verification never needs one), or of an
    unsupported type.
    """
    data = _read_key_file(path, "public key")
    if b"PRIVATE KEY-----" in data:
        raise InputError(
            "this is a private key; verification takes the public key",
            file=str(path),
            hint="pass the .pub file written by `evalrun keys generate`",
        )
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise InputError(
            "not a PEM public key",
            file=str(path),
            hint="expected a SubjectPublicKeyInfo PEM ('-----BEGIN PUBLIC KEY-----')",
        ) from exc
    if not isinstance(key, ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey) or (
        _algorithm_of(key) is None
    ):
        raise InputError(
            f"unsupported public key type {type(key).__name__}",
            file=str(path),
            hint=f"use one of: {', '.join(ALGORITHMS)}",
        )
    return Verifier.from_public_key(key)


# --- DSSE -------------------------------------------------------------------


def pae(payload_type: str, payload: bytes) -> bytes:
    """DSSE v1 Pre-Authentication Encoding: the exact bytes that get signed."""
    type_bytes = payload_type.encode("utf-8")
    return b"DSSEv1 %d %b %d %b" % (len(type_bytes), type_bytes, len(payload), payload)


def b64_encode(data: bytes) -> str:
    """Standard (not URL-safe) padded base64, as DSSE writes it."""
    return base64.b64encode(data).decode("ascii")


def b64_decode_canonical(text: str) -> bytes:
    """Decode standard padded base64, refusing any text that is not its canonical encoding.

    Canonical only: otherwise a changed padding bit would alter the envelope's
    bytes without altering what they decode to.
    """
    try:
        data = base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError) as exc:
        raise ValueError("not valid base64") from exc
    if base64.b64encode(data).decode("ascii") != text:
        raise ValueError("not canonical base64")
    return data


class SignatureJson(TypedDict):
    keyid: str
    sig: str


class EnvelopeJson(TypedDict):
    """A DSSE envelope as standard JSON: base64 payload, its type, the signatures."""

    payload: str
    payloadType: str
    signatures: list[SignatureJson]


class DsseSignature(BaseModel):
    """One DSSE signature: the signer's key id and the base64 signature."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    keyid: StrictStr
    sig: StrictStr


class DsseEnvelope(BaseModel):
    """A DSSE envelope as it appears on disk (payload and signatures base64)."""

    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)

    payload: StrictStr
    payload_type: StrictStr = Field(alias="payloadType")
    signatures: tuple[DsseSignature, ...]

    def to_json_dict(self) -> EnvelopeJson:
        """The standard DSSE JSON object."""
        return {
            "payload": self.payload,
            "payloadType": self.payload_type,
            "signatures": [{"keyid": s.keyid, "sig": s.sig} for s in self.signatures],
        }


def sign_envelope(payload: bytes, payload_type: str, signer: Signer) -> EnvelopeJson:
    """Sign ``payload`` and return a standard DSSE JSON object with one signature.

    The result is ``{"payload": b64, "payloadType": ..., "signatures": [{"keyid", "sig"}]}``
    with ``keyid`` the signer's key id and ``sig`` the base64 signature over
    ``pae(payload_type, payload)``.
    """
    signature = signer.sign(pae(payload_type, payload))
    envelope = DsseEnvelope(
        payload=b64_encode(payload),
        payload_type=payload_type,
        signatures=(DsseSignature(keyid=signer.keyid, sig=b64_encode(signature)),),
    )
    return envelope.to_json_dict()


def envelope_problems(
    envelope: Mapping[str, object], verifier: Verifier, expected_payload_type: str
) -> tuple[bytes | None, list[str]]:
    """Check a DSSE envelope; return (payload, []) if it verifies, else (None, problems).

    It verifies only if it is well-formed, its payloadType is exactly
    ``expected_payload_type``, and a signature whose keyid is the verifier's key
    id is a valid signature by that key over the PAE. Each problem says what
    did not hold (for a wrong key: the key id expected and the ones found).
    """
    try:
        parsed = DsseEnvelope.model_validate(dict(envelope))
    except ValidationError as exc:
        return None, [
            f"envelope: {'.'.join(str(p) for p in err['loc']) or '(root)'}: {err['msg']}"
            for err in exc.errors()
        ]
    problems: list[str] = []
    try:
        payload = b64_decode_canonical(parsed.payload)
    except ValueError as exc:
        return None, [f"envelope: payload is {exc}"]
    if parsed.payload_type != expected_payload_type:
        problems.append(
            f"envelope: payloadType is {parsed.payload_type!r}, expected {expected_payload_type!r}"
        )
    if not parsed.signatures:
        problems.append("envelope: has no signatures")
        return None, problems

    message = pae(parsed.payload_type, payload)
    found_keyids: list[str] = []
    verified = False
    for index, signature in enumerate(parsed.signatures):
        found_keyids.append(signature.keyid)
        if signature.keyid != verifier.keyid:
            continue
        try:
            raw = b64_decode_canonical(signature.sig)
        except ValueError as exc:
            problems.append(f"envelope: signatures[{index}].sig is {exc}")
            continue
        if verifier.verify(raw, message):
            verified = True
        else:
            problems.append(
                f"signature by keyid {verifier.keyid} is invalid "
                "(the signed payload, payloadType or signature was altered)"
            )
    if verifier.keyid not in found_keyids:
        problems.append(
            f"wrong key: expected a signature by keyid {verifier.keyid}, "
            f"envelope is signed by keyid {', '.join(found_keyids)}"
        )
    if problems or not verified:
        if not problems:
            problems.append(f"no valid signature by keyid {verifier.keyid}")
        return None, problems
    return payload, []


def verify_envelope(
    envelope: Mapping[str, object], verifier: Verifier, expected_payload_type: str
) -> bytes:
    """Verify a DSSE envelope and return its payload bytes.

    Fails closed: raises VerificationFailed listing every problem unless the
    envelope is well-formed, carries exactly ``expected_payload_type``, and has a
    valid signature by ``verifier``'s key (matched by key id).
    """
    payload, problems = envelope_problems(envelope, verifier, expected_payload_type)
    if payload is None or problems:
        raise VerificationFailed("DSSE envelope did not verify", problems=problems)
    return payload


__all__ = [
    "ALGORITHMS",
    "Algorithm",
    "DsseEnvelope",
    "DsseSignature",
    "EnvelopeJson",
    "KeyInfo",
    "Signer",
    "Verifier",
    "b64_decode_canonical",
    "b64_encode",
    "envelope_problems",
    "generate_keypair",
    "keyid_of",
    "load_signer",
    "load_verifier",
    "pae",
    "sign_envelope",
    "verify_envelope",
]

"""Signing keys and DSSE envelopes.

The runner signs on the host with a key that never enters a container. Keys are
PEM files made by :func:`generate_keypair` (ECDSA P-256 with SHA-256, or Ed25519)
or keys held in a PKCS#11 token (:mod:`runner.bundle.keys`); a key's id is the
sha256 hex of its DER SubjectPublicKeyInfo, so the same key has the same id
everywhere. Envelopes follow DSSE v1 (the format sigstore, in-toto and
securesystemslib verify): signatures are over ``PAE(payloadType, payload)``,
ECDSA signatures are DER-encoded. Verification trusts one key (:class:`Verifier`)
or several (:class:`Keyring`); the envelope's keyid selects which.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypedDict

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from pydantic import BaseModel, ConfigDict, Field, StrictStr, ValidationError

from runner._internal.files import RefusedFile, read_regular_file
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

    def select(self, keyid: str) -> Verifier | None:
        """This verifier if ``keyid`` is its key id, else None (the :class:`Keyring` interface)."""
        return self if keyid == self.keyid else None


@dataclass(frozen=True)
class Keyring:
    """Several trusted public keys: a signature's keyid selects the one that checks it.

    Verifying with a keyring accepts a bundle signed by any of its keys (so bundles
    signed before a key rotation still verify) and names an unknown keyid as such.
    Build one with :func:`runner.bundle.keys.load_keyring` or :meth:`of`.
    """

    verifiers: tuple[Verifier, ...]
    source: str = "keyring"

    @classmethod
    def of(cls, verifiers: Iterable[Verifier], source: str = "keyring") -> Keyring:
        """A keyring of ``verifiers`` (duplicates by keyid kept once); at least one key."""
        unique = tuple({v.keyid: v for v in verifiers}.values())
        if not unique:
            raise InputError("the keyring holds no public key", file=source)
        return cls(verifiers=unique, source=source)

    @property
    def keyids(self) -> tuple[str, ...]:
        """The key ids of every trusted key, in keyring order."""
        return tuple(v.keyid for v in self.verifiers)

    def select(self, keyid: str) -> Verifier | None:
        """The trusted key with this key id, or None."""
        return next((v for v in self.verifiers if v.keyid == keyid), None)


TrustedKeys = Verifier | Keyring
"""What verification accepts: one public key, or a keyring."""


@dataclass(frozen=True)
class Signer(ABC):
    """Signs for one key, wherever the private key lives (memory or a PKCS#11 token).

    Build one with :func:`load_signer` (a PEM file) or
    :func:`runner.bundle.keys.load_signing_key` (any key source).
    """

    public_key: _PublicKey
    algorithm: Algorithm
    keyid: str
    source: str
    """Where the key came from, for people (a path, ``env:VAR``, ``pkcs11:…``); never a secret."""

    @abstractmethod
    def sign(self, data: bytes) -> bytes:
        """Sign ``data``: raw 64-byte Ed25519, or DER-encoded ECDSA P-256/SHA-256."""

    def verifier(self) -> Verifier:
        """The matching public-key verifier."""
        return Verifier.from_public_key(self.public_key)

    @classmethod
    def from_private_key(cls, private_key: _PrivateKey, *, source: str = "memory") -> Signer:
        """Wrap a `cryptography` private key; raises InputError for unsupported key types."""
        algorithm = _algorithm_of(private_key)
        if algorithm is None:
            raise InputError(
                "unsupported private key type", hint=f"use one of: {', '.join(ALGORITHMS)}"
            )
        return PrivateKeySigner(
            public_key=private_key.public_key(),
            algorithm=algorithm,
            keyid=keyid_of(private_key.public_key()),
            source=source,
            private_key=private_key,
        )


@dataclass(frozen=True)
class PrivateKeySigner(Signer):
    """A signer whose private key is in this process's memory (loaded from PEM)."""

    private_key: _PrivateKey = field(repr=False)

    def sign(self, data: bytes) -> bytes:
        """Sign ``data``: raw 64-byte Ed25519, or DER-encoded ECDSA P-256/SHA-256."""
        if isinstance(self.private_key, ed25519.Ed25519PrivateKey):
            return self.private_key.sign(data)
        return self.private_key.sign(data, ec.ECDSA(hashes.SHA256()))


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


def read_key_file(path: Path, what: str) -> bytes:
    """The bytes of key file ``path`` (a regular file of at most 64 KiB); InputError names it."""
    try:
        return read_regular_file(path, max_bytes=64 * 1024)
    except FileNotFoundError as exc:
        raise InputError(f"{what} not found", file=str(path)) from exc
    except RefusedFile as exc:
        if "limit" in exc.reason or "larger" in exc.reason:
            raise InputError(f"{what} is too large to be a PEM key", file=str(path)) from exc
        if "regular file" in exc.reason:
            raise InputError(f"{what} is not a regular file", file=str(path)) from exc
        raise InputError(f"cannot read {what}: {exc.reason}", file=str(path)) from exc


def load_signer(path: Path, *, password: bytes | None = None) -> Signer:
    """Load a PEM private key (ECDSA P-256 or Ed25519) for signing.

    Raises InputError naming ``path`` if it is missing, not a PEM private key
    (a public key is called out as such), encrypted without a password, or of
    an unsupported type.
    """
    return signer_from_pem(read_key_file(path, "signing key"), source=str(path), password=password)


def signer_from_pem(
    data: bytes, *, source: str, password: bytes | None = None, password_hint: str | None = None
) -> Signer:
    """A signer for the PEM private key ``data`` read from ``source`` (named in errors).

    Raises InputError if ``data`` is not a PEM private key (a public key is called
    out as such), is encrypted and ``password`` is missing or wrong, is not
    encrypted but a password was given, or is of an unsupported type.
    ``password_hint`` says how to supply the password.
    """
    if b"PUBLIC KEY-----" in data and b"PRIVATE KEY-----" not in data:
        raise InputError(
            "this is a public key; signing needs the private key",
            file=source,
            hint="pass the private key file made by `evalrun keys generate`",
        )
    try:
        key = serialization.load_pem_private_key(data, password=password)
    except TypeError as exc:
        # cryptography: password missing for an encrypted key, or given for a plain one
        raise InputError(
            f"cannot load signing key: {exc}",
            file=source,
            hint=password_hint or "set or unset the key password",
        ) from exc
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise InputError(
            "not a PEM private key (or wrong password)",
            file=source,
            hint=password_hint or "expected a PKCS#8 PEM made by `evalrun keys generate`",
        ) from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey) or (
        _algorithm_of(key) is None
    ):
        raise InputError(
            f"unsupported signing key type {type(key).__name__}",
            file=source,
            hint=f"use one of: {', '.join(ALGORITHMS)}",
        )
    return Signer.from_private_key(key, source=source)


def pem_is_encrypted(data: bytes) -> bool:
    """True if ``data`` is an encrypted PEM private key (PKCS#8 or legacy OpenSSL)."""
    return b"-----BEGIN ENCRYPTED PRIVATE KEY-----" in data or b"Proc-Type: 4,ENCRYPTED" in data


def load_verifier(path: Path) -> Verifier:
    """Load a PEM public key (ECDSA P-256 or Ed25519) for verification.

    Raises InputError naming ``path`` if it is missing, not a PEM public key
    (a private key is refused: verification never needs one), or of an
    unsupported type.
    """
    return verifier_from_pem(read_key_file(path, "public key"), source=str(path))


def verifier_from_pem(data: bytes, *, source: str) -> Verifier:
    """A verifier for the one PEM public key ``data`` read from ``source`` (named in errors).

    Raises InputError if ``data`` holds a private key (verification never needs
    one), is not a PEM public key, or is of an unsupported type.
    """
    if b"PRIVATE KEY-----" in data:
        raise InputError(
            "this is a private key; verification takes the public key",
            file=source,
            hint="pass the .pub file written by `evalrun keys generate`",
        )
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise InputError(
            "not a PEM public key",
            file=source,
            hint="expected a SubjectPublicKeyInfo PEM ('-----BEGIN PUBLIC KEY-----')",
        ) from exc
    if not isinstance(key, ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey) or (
        _algorithm_of(key) is None
    ):
        raise InputError(
            f"unsupported public key type {type(key).__name__}",
            file=source,
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
    """Decode padded base64, standard or URL-safe (DSSE allows both), canonical text only.

    One alphabet per text (``+/`` or ``-_``, never both), padded, and exactly the
    encoding of what it decodes to: otherwise a changed padding bit would alter
    the envelope's bytes without altering what they decode to.
    """
    urlsafe = "-" in text or "_" in text
    if urlsafe and ("+" in text or "/" in text):
        raise ValueError("not valid base64 (mixes the standard and URL-safe alphabets)")
    try:
        raw = text.encode("ascii")
        if urlsafe:
            data = base64.b64decode(raw, altchars=b"-_", validate=True)
        else:
            data = base64.b64decode(raw, validate=True)
    except (binascii.Error, UnicodeEncodeError) as exc:
        raise ValueError("not valid base64") from exc
    canonical = base64.urlsafe_b64encode(data) if urlsafe else base64.b64encode(data)
    if canonical.decode("ascii") != text:
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


@dataclass(frozen=True)
class EnvelopeCheck:
    """What checking a DSSE envelope found: the payload and signer if it verified, else why not."""

    payload: bytes | None
    keyid: str | None
    problems: tuple[str, ...]


def check_envelope(
    envelope: Mapping[str, object], trusted: TrustedKeys, expected_payload_type: str
) -> EnvelopeCheck:
    """Check a DSSE envelope against one trusted key or a keyring.

    It verifies only if it is well-formed, its payloadType is exactly
    ``expected_payload_type``, and a signature whose keyid selects a trusted key
    is a valid signature by that key over the PAE. Each problem says what did
    not hold: for a single key, the key id expected and the ones found; for a
    keyring, each unknown keyid.
    """
    try:
        parsed = DsseEnvelope.model_validate(dict(envelope))
    except ValidationError as exc:
        return EnvelopeCheck(
            None,
            None,
            tuple(
                f"envelope: {'.'.join(str(p) for p in err['loc']) or '(root)'}: {err['msg']}"
                for err in exc.errors()
            ),
        )
    problems: list[str] = []
    try:
        payload = b64_decode_canonical(parsed.payload)
    except ValueError as exc:
        return EnvelopeCheck(None, None, (f"envelope: payload is {exc}",))
    if parsed.payload_type != expected_payload_type:
        problems.append(
            f"envelope: payloadType is {parsed.payload_type!r}, expected {expected_payload_type!r}"
        )
    if not parsed.signatures:
        problems.append("envelope: has no signatures")
        return EnvelopeCheck(None, None, tuple(problems))

    message = pae(parsed.payload_type, payload)
    found_keyids: list[str] = []
    verified_by: str | None = None
    for index, signature in enumerate(parsed.signatures):
        found_keyids.append(signature.keyid)
        verifier = trusted.select(signature.keyid)
        if verifier is None:
            continue
        try:
            raw = b64_decode_canonical(signature.sig)
        except ValueError as exc:
            problems.append(f"envelope: signatures[{index}].sig is {exc}")
            continue
        if verifier.verify(raw, message):
            verified_by = verified_by or verifier.keyid
        else:
            problems.append(
                f"signature by keyid {verifier.keyid} is invalid "
                "(the signed payload, payloadType or signature was altered)"
            )
    if not any(trusted.select(k) for k in found_keyids):
        if isinstance(trusted, Keyring):
            problems.extend(
                f"unknown keyid {k}: not in the keyring {trusted.source} "
                f"({len(trusted.verifiers)} trusted key{'s' * (len(trusted.verifiers) != 1)})"
                for k in dict.fromkeys(found_keyids)
            )
        else:
            problems.append(
                f"wrong key: expected a signature by keyid {trusted.keyid}, "
                f"envelope is signed by keyid {', '.join(found_keyids)}"
            )
    if problems or verified_by is None:
        if not problems:
            problems.append("no valid signature by a trusted key")
        return EnvelopeCheck(None, None, tuple(problems))
    return EnvelopeCheck(payload, verified_by, ())


def envelope_problems(
    envelope: Mapping[str, Any], trusted: TrustedKeys, expected_payload_type: str
) -> tuple[bytes | None, list[str]]:
    """Check a DSSE envelope; return (payload, []) if it verifies, else (None, problems).

    See :func:`check_envelope` for what is checked.
    """
    found = check_envelope(envelope, trusted, expected_payload_type)
    return found.payload, list(found.problems)


def verify_envelope(
    envelope: Mapping[str, object], verifier: TrustedKeys, expected_payload_type: str
) -> bytes:
    """Verify a DSSE envelope and return its payload bytes.

    Fails closed: raises VerificationFailed listing every problem unless the
    envelope is well-formed, carries exactly ``expected_payload_type``, and has a
    valid signature by a trusted key (matched by key id).
    """
    payload, problems = envelope_problems(envelope, verifier, expected_payload_type)
    if payload is None or problems:
        raise VerificationFailed("DSSE envelope did not verify", problems=problems)
    return payload


# --- Sigstore bundle ------------------------------------------------------------------

SIGSTORE_BUNDLE_MEDIA_TYPE = "application/vnd.dev.sigstore.bundle.v0.3+json"


def sigstore_bundle(envelope: Mapping[str, Any]) -> dict[str, Any]:
    """The DSSE ``envelope`` restated as a Sigstore bundle (protobuf-specs JSON, v0.3).

    The bundle carries the same payload, payloadType and signature, and names the
    signing key by its keyid in ``verificationMaterial.publicKey.hint`` only: the
    signature itself carries no keyid there, because sigstore-go's DSSE check skips
    a signature whose keyid is not its own fingerprint of the key. It has no
    transparency-log entries, so verifiers that expect them must be told to skip
    the log (cosign: ``--insecure-ignore-tlog=true``). Raises ValueError if the
    envelope is not well-formed or does not carry exactly one signature.
    """
    try:
        parsed = DsseEnvelope.model_validate(dict(envelope))
    except ValidationError as exc:
        raise ValueError(f"not a DSSE envelope: {exc.error_count()} problem(s)") from exc
    if len(parsed.signatures) != 1:
        raise ValueError(f"expected exactly one signature, found {len(parsed.signatures)}")
    return {
        "mediaType": SIGSTORE_BUNDLE_MEDIA_TYPE,
        "verificationMaterial": {
            "publicKey": {"hint": parsed.signatures[0].keyid},
            "tlogEntries": [],
        },
        "dsseEnvelope": {
            "payload": parsed.payload,
            "payloadType": parsed.payload_type,
            "signatures": [{"sig": parsed.signatures[0].sig}],
        },
    }


__all__ = [
    "ALGORITHMS",
    "SIGSTORE_BUNDLE_MEDIA_TYPE",
    "Algorithm",
    "DsseEnvelope",
    "DsseSignature",
    "EnvelopeCheck",
    "EnvelopeJson",
    "KeyInfo",
    "Keyring",
    "PrivateKeySigner",
    "Signer",
    "TrustedKeys",
    "Verifier",
    "b64_decode_canonical",
    "b64_encode",
    "check_envelope",
    "envelope_problems",
    "generate_keypair",
    "keyid_of",
    "load_signer",
    "load_verifier",
    "pae",
    "pem_is_encrypted",
    "read_key_file",
    "sign_envelope",
    "signer_from_pem",
    "sigstore_bundle",
    "verifier_from_pem",
    "verify_envelope",
]

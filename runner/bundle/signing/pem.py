"""PEM key files: generating a key pair, reading private and public keys.

:func:`generate_keypair` writes a new PKCS#8 private key (mode 0600, never overwriting)
and its SubjectPublicKeyInfo public key; :func:`load_signer`/:func:`signer_from_pem`
and :func:`load_verifier`/:func:`verifier_from_pem` read them back, bounded and with one
InputError naming the file for anything that is not a supported key.
"""

from __future__ import annotations

import os
from pathlib import Path

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from pydantic import BaseModel, ConfigDict, Field

from runner._internal.files import RefusedFile, read_regular_file
from runner.bundle.signing.signer import (
    ALGORITHMS,
    Algorithm,
    PrivateKey,
    Signer,
    Verifier,
    algorithm_of,
)
from runner.errors import InputError


class KeyInfo(BaseModel):
    """What :func:`generate_keypair` wrote: where, which algorithm, which key id."""

    model_config = ConfigDict(frozen=True, extra="forbid", defer_build=True)

    keyid: str = Field(description="sha256 hex of the DER SubjectPublicKeyInfo")
    algorithm: Algorithm
    private_path: Path
    public_path: Path


def _new_private_key(algorithm: Algorithm) -> PrivateKey:
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
        algorithm_of(key) is None
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
        algorithm_of(key) is None
    ):
        raise InputError(
            f"unsupported public key type {type(key).__name__}",
            file=source,
            hint=f"use one of: {', '.join(ALGORITHMS)}",
        )
    return Verifier.from_public_key(key)

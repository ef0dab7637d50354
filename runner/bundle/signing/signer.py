"""Signers and verifiers: one key's signing and checking, and the keys verification trusts.

A key's id is the sha256 hex of its DER SubjectPublicKeyInfo (:func:`keyid_of`), so the
same key has the same id everywhere. A :class:`Signer` signs wherever its private key
lives (memory: :class:`PrivateKeySigner`; a PKCS#11 token: ``runner.bundle.keys``);
verification trusts one key (:class:`Verifier`) or several (:class:`Keyring`). Both
algorithms, ECDSA P-256 with SHA-256 (DER signatures) and Ed25519, are handled here.
"""

from __future__ import annotations

import functools
import hashlib
from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from runner.errors import InputError

Algorithm = Literal["ecdsa-p256", "ed25519"]
ALGORITHMS: tuple[Algorithm, ...] = ("ecdsa-p256", "ed25519")

PrivateKey = ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey
PublicKey = ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey


def keyid_of(public_key: PublicKey) -> str:
    """Return the key id of ``public_key``: sha256 hex of its DER SubjectPublicKeyInfo."""
    der = public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(der).hexdigest()


def algorithm_of(key: PrivateKey | PublicKey) -> Algorithm | None:
    if isinstance(key, ed25519.Ed25519PrivateKey | ed25519.Ed25519PublicKey):
        return "ed25519"
    if isinstance(key.curve, ec.SECP256R1):
        return "ecdsa-p256"
    return None


@dataclass(frozen=True)
class Verifier:
    """A public key that checks signatures. Build one with :func:`load_verifier`."""

    public_key: PublicKey
    algorithm: Algorithm
    keyid: str

    @classmethod
    def from_public_key(cls, public_key: PublicKey) -> Verifier:
        """Wrap a `cryptography` public key; raises InputError for unsupported key types."""
        algorithm = algorithm_of(public_key)
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
                self.public_key.verify(signature, data, _ecdsa_sha256())
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

    public_key: PublicKey
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
    def from_private_key(cls, private_key: PrivateKey, *, source: str = "memory") -> Signer:
        """Wrap a `cryptography` private key; raises InputError for unsupported key types."""
        algorithm = algorithm_of(private_key)
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


@functools.cache
def _ecdsa_sha256() -> ec.ECDSA:
    """ECDSA with SHA-256, made once: making it loads cryptography's OpenSSL backend."""
    return ec.ECDSA(hashes.SHA256())


@dataclass(frozen=True)
class PrivateKeySigner(Signer):
    """A signer whose private key is in this process's memory (loaded from PEM)."""

    private_key: PrivateKey = field(repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.private_key, ed25519.Ed25519PrivateKey):
            _ecdsa_sha256()  # loads OpenSSL's backend now, not at the end of a run (~5 ms)

    def sign(self, data: bytes) -> bytes:
        """Sign ``data``: raw 64-byte Ed25519, or DER-encoded ECDSA P-256/SHA-256."""
        if isinstance(self.private_key, ed25519.Ed25519PrivateKey):
            return self.private_key.sign(data)
        return self.private_key.sign(data, _ecdsa_sha256())

"""Signing with a key pair held in a PKCS#11 token: the key never leaves the token.

A token key signs there: ECDSA P-256 with CKM_ECDSA over the SHA-256 digest (the raw
``r || s`` the token returns is re-encoded as DER), Ed25519 with CKM_EDDSA. The token
itself is reached through :mod:`runner.adapters.pkcs11_token`; this module turns a
``pkcs11:`` reference into its query, reads and checks the token's public key, and
builds the :class:`TokenSigner`.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from runner.bundle.keys.refs import KeyAccess, Pkcs11Uri, TokenKey
from runner.bundle.signing import Algorithm, Signer, keyid_of
from runner.errors import InputError, TokenRefused

if TYPE_CHECKING:
    from runner.adapters.pkcs11_token import TokenKeyQuery, TokenPublicKey

# CKA_EC_PARAMS of the curves evalrun signs with (DER of the OID, or the curve's name)
_P256_PARAMS = bytes.fromhex("06082a8648ce3d030107")
_ED25519_PARAMS = (bytes.fromhex("06032b6570"), b"\x13\x0cedwards25519")


@dataclass(frozen=True)
class TokenSigner(Signer):
    """A signer whose private key stays in a PKCS#11 token; each signature is made there."""

    query: TokenKeyQuery
    pin: str = field(repr=False)

    def sign(self, data: bytes) -> bytes:
        """ECDSA P-256 over SHA-256 (DER-encoded), or Ed25519, computed in the token."""
        from runner.adapters.pkcs11_token import sign_in_token

        if self.algorithm == "ed25519":
            return sign_in_token(self.query, self.pin, "EDDSA", data)
        raw = sign_in_token(self.query, self.pin, "ECDSA", hashlib.sha256(data).digest())
        if len(raw) != 64:
            raise TokenRefused(
                f"the token returned a {len(raw)}-byte ECDSA signature; P-256 gives 64",
                module=self.query.module,
                key_object=self.query.object_text(),
            )
        return encode_dss_signature(
            int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:], "big")
        )


def token_query(uri: Pkcs11Uri, access: KeyAccess) -> TokenKeyQuery:
    try:
        from runner.adapters.pkcs11_token import TokenKeyQuery
    except ImportError as exc:
        raise InputError(
            "pkcs11: keys need the python-pkcs11 package, which is not installed",
            hint="pip install python-pkcs11 (an evalrun dependency)",
        ) from exc
    return TokenKeyQuery(
        module=access.module_path(uri),
        token_label=uri.token,
        token_serial=uri.serial,
        token_manufacturer=uri.manufacturer,
        token_model=uri.model,
        slot_id=uri.slot_id,
        object_label=uri.object,
        object_id=uri.id,
    )


def _unwrap_point(point: bytes, size: int) -> bytes:
    # CKA_EC_POINT is a DER OCTET STRING around the point; a few tokens give it bare
    if len(point) == size + 2 and point[0] == 0x04 and point[1] == size:
        return point[2:]
    if len(point) == size:
        return point
    raise ValueError(f"an EC point of {len(point)} bytes is not a {size}-byte point")


def token_public_key(
    facts: TokenPublicKey, query: TokenKeyQuery
) -> tuple[ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey, Algorithm]:
    try:
        if facts.kind == "ec" and facts.ec_params == _P256_PARAMS:
            point = _unwrap_point(facts.ec_point, 65)
            return ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), point), "ecdsa-p256"
        if facts.kind == "ec_edwards" and facts.ec_params in _ED25519_PARAMS:
            raw = _unwrap_point(facts.ec_point, 32)
            return ed25519.Ed25519PublicKey.from_public_bytes(raw), "ed25519"
    except ValueError as exc:
        raise TokenRefused(
            f"the token's public key is malformed: {exc}",
            module=query.module,
            key_object=query.object_text(),
        ) from exc
    raise TokenRefused(
        "the token key is neither ECDSA P-256 nor Ed25519",
        module=query.module,
        token=facts.token_label,
        key_object=query.object_text(),
        hint="generate an EC key on curve secp256r1 (P-256) in the token",
    )


def token_signer(ref: TokenKey, access: KeyAccess) -> Signer:
    from runner.adapters.pkcs11_token import read_public_key

    query = token_query(ref.uri, access)
    pin = access.environ.get(access.pin_env)
    if not pin:
        raise TokenRefused(
            f"signing with a PKCS#11 key needs the token's PIN, and ${access.pin_env} is not set",
            module=query.module,
            token=query.token_text(),
            key_object=query.object_text(),
            hint=f"put the user PIN in ${access.pin_env}, or name the variable with --pin-env",
        )
    facts = read_public_key(query, pin)
    public_key, algorithm = token_public_key(facts, query)
    needed = "EDDSA" if algorithm == "ed25519" else "ECDSA"
    if needed not in facts.mechanisms:
        raise TokenRefused(
            f"the token holds an {algorithm} key but cannot sign with CKM_{needed}",
            module=query.module,
            token=facts.token_label,
            key_object=query.object_text(),
            hint="use an ECDSA P-256 key (CKM_ECDSA)",
        )
    return TokenSigner(
        public_key=public_key,
        algorithm=algorithm,
        keyid=keyid_of(public_key),
        source=ref.uri.text,
        query=query,
        pin=pin,
    )

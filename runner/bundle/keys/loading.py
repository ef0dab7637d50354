"""Loading and describing the key a reference names: a PEM from anywhere, or a token key.

:func:`load_signing_key` gives the :class:`~runner.bundle.signing.Signer` for a
:data:`~runner.bundle.keys.refs.KeyRef`: a PEM read (bounded) from a file, a variable,
standard input or a Kubernetes Secret and unlocked with the passphrase variable, or a
PKCS#11 token key (:mod:`runner.bundle.keys.token`). :func:`describe_key` and
:func:`list_token_keys` say what a key is without showing secret material.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict

from runner.bundle.keys.refs import (
    EnvKey,
    FileKey,
    InlineKey,
    KeyAccess,
    KeyRef,
    Pkcs11Uri,
    SecretKey,
    StdinKey,
    TokenKey,
    parse_pkcs11_uri,
)
from runner.bundle.keys.token import token_public_key, token_query, token_signer
from runner.bundle.signing import (
    Algorithm,
    Signer,
    Verifier,
    pem_is_encrypted,
    read_key_file,
    signer_from_pem,
    verifier_from_pem,
)
from runner.errors import InputError, TokenRefused

if TYPE_CHECKING:
    from runner.adapters.pkcs11_token import TokenKeyQuery, TokenPublicKey

PEM_MAX_BYTES = 64 * 1024


def _bounded(data: bytes, source: str) -> bytes:
    if len(data) > PEM_MAX_BYTES:
        raise InputError("too large to be a PEM key", file=source)
    return data


def _read_pem(ref: KeyRef, access: KeyAccess) -> bytes:
    """The PEM bytes of a non-token key reference."""
    if isinstance(ref, FileKey):
        return read_key_file(ref.path, "key")
    if isinstance(ref, InlineKey):
        return _bounded(ref.pem, str(ref))
    if isinstance(ref, EnvKey):
        value = access.environ.get(ref.var, "")
        if not value.strip():
            raise InputError(
                f"--key env:{ref.var}: ${ref.var} is not set or empty",
                hint=f"put the PEM key in ${ref.var}",
            )
        return _bounded(value.encode("utf-8"), str(ref))
    if isinstance(ref, StdinKey):
        stream = access.stdin if access.stdin is not None else sys.stdin.buffer
        if stream.isatty():
            raise InputError(
                "--key - reads the PEM key from standard input, which is a terminal",
                hint="pipe the key in: evalrun … --key - < KEY.pem",
            )
        return _bounded(stream.read(PEM_MAX_BYTES + 1), "standard input")
    if isinstance(ref, SecretKey):
        return _read_secret(ref, access)
    raise InputError(f"{ref} is a token key, not a PEM key")


def _read_secret(ref: SecretKey, access: KeyAccess) -> bytes:
    from runner.adapters.kubernetes import ClusterTarget, read_secret_data
    from runner.errors import APINotFound

    try:
        data = read_secret_data(
            ClusterTarget(access.kubeconfig, access.kube_context), ref.namespace, ref.name
        )
    except APINotFound as exc:
        raise InputError(
            f"--key {ref}: Secret {ref.namespace}/{ref.name} not found",
            hint="check the namespace, name and kubeconfig context",
        ) from exc
    if ref.field not in data:
        fields = ", ".join(sorted(data)) or "none"
        raise InputError(
            f"--key {ref}: Secret {ref.namespace}/{ref.name} has no field {ref.field!r}",
            hint=f"its fields: {fields}; name one with k8s://NAMESPACE/NAME/FIELD",
        )
    return _bounded(data[ref.field], str(ref))


def _pem_signer(data: bytes, source: str, access: KeyAccess) -> Signer:
    password = None
    if pem_is_encrypted(data):
        value = access.environ.get(access.passphrase_env)
        if not value:
            raise InputError(
                f"the signing key is encrypted and ${access.passphrase_env} is not set",
                file=source,
                hint=f"put its passphrase in ${access.passphrase_env}, or name the variable "
                "that holds it with --key-passphrase-env",
            )
        password = value.encode("utf-8")
    return signer_from_pem(
        data,
        source=source,
        password=password,
        password_hint=f"check the passphrase in ${access.passphrase_env}",
    )


def load_signing_key(ref: KeyRef, access: KeyAccess | None = None) -> Signer:
    """The signer for ``ref``: a PEM from a file, a variable, stdin or a Secret, or a token key.

    Raises InputError (exit 2) naming the source if the key is missing, is not a
    private key, is encrypted and the passphrase variable is unset or wrong, or
    is of an unsupported type; token problems are TokenRefused (exit 2) or
    TokenFailure (exit 5). For a token key, the PIN is checked and the private
    key object looked up before this returns.
    """
    access = access or KeyAccess()
    if isinstance(ref, TokenKey):
        return token_signer(ref, access)
    return _pem_signer(_read_pem(ref, access), str(ref), access)


class TokenFacts(BaseModel):
    """Where a token key lives: token and key object, public facts only."""

    model_config = ConfigDict(frozen=True, extra="forbid", defer_build=True)

    token: str
    serial: str
    manufacturer: str
    model: str
    object: str | None
    id: str | None
    """The CKA_ID, hex."""
    mechanisms: tuple[str, ...]


class KeyDescription(BaseModel):
    """What ``evalrun keys describe`` shows of a key: never secret material."""

    model_config = ConfigDict(frozen=True, extra="forbid", defer_build=True)

    keyid: str
    algorithm: Algorithm
    source: str
    holds: Literal["private key", "public key", "key pair in a token"]
    encrypted: bool | None = None
    token: TokenFacts | None = None
    public_pem: str


def _described(
    verifier: Verifier,
    source: str,
    holds: Literal["private key", "public key", "key pair in a token"],
    **extra: object,
) -> KeyDescription:
    return KeyDescription(
        keyid=verifier.keyid,
        algorithm=verifier.algorithm,
        source=source,
        holds=holds,
        public_pem=verifier.public_pem().decode("ascii"),
        **extra,
    )


def _token_description(facts: TokenPublicKey, query: TokenKeyQuery, source: str) -> KeyDescription:
    public_key, _ = token_public_key(facts, query)
    return _described(
        Verifier.from_public_key(public_key),
        source,
        "key pair in a token",
        token=TokenFacts(
            token=facts.token_label,
            serial=facts.token_serial,
            manufacturer=facts.token_manufacturer,
            model=facts.token_model,
            object=facts.object_label,
            id=facts.object_id.hex() if facts.object_id else None,
            mechanisms=tuple(sorted(facts.mechanisms)),
        ),
    )


def describe_key(ref: KeyRef, access: KeyAccess | None = None) -> KeyDescription:
    """Describe the key ``ref`` names: keyid, algorithm, source; for a token, label and id.

    A PEM may hold a private or a public key (an encrypted private key needs its
    passphrase, as for signing). A token key is read from its public key object:
    no PIN is needed unless the token hides public objects.
    """
    access = access or KeyAccess()
    if isinstance(ref, TokenKey):
        from runner.adapters.pkcs11_token import read_public_key

        query = token_query(ref.uri, access)
        facts = read_public_key(query, access.environ.get(access.pin_env) or None)
        return _token_description(facts, query, ref.uri.text)
    data = _read_pem(ref, access)
    if b"PRIVATE KEY-----" not in data:
        return _described(verifier_from_pem(data, source=str(ref)), str(ref), "public key")
    signer = _pem_signer(data, str(ref), access)
    return _described(signer.verifier(), str(ref), "private key", encrypted=pem_is_encrypted(data))


def list_token_keys(uri: Pkcs11Uri | str, access: KeyAccess | None = None) -> list[KeyDescription]:
    """Every EC P-256 and Ed25519 key pair in the token ``uri`` names (object filters optional)."""
    from runner.adapters.pkcs11_token import list_public_keys

    access = access or KeyAccess()
    if isinstance(uri, str):
        uri = parse_pkcs11_uri(uri, names_key=False)
    query = token_query(uri, access)
    found = list_public_keys(query, access.environ.get(access.pin_env) or None)
    out = []
    for facts in found:
        named = ";".join(
            p
            for p in (
                f"token={facts.token_label}",
                f"object={facts.object_label}" if facts.object_label else "",
                f"id={_pct(facts.object_id)}" if facts.object_id else "",
            )
            if p
        )
        try:
            out.append(_token_description(facts, query, f"pkcs11:{named}"))
        except TokenRefused:
            continue  # a key on another curve: not one evalrun can sign with
    return out


def _pct(data: bytes) -> str:
    return "".join(f"%{b:02x}" for b in data)

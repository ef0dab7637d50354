"""Where signing keys come from, which keys verification trusts, and what a key is.

A *key reference* names a signing key the way ``--key`` (or ``$EVALRUN_KEY``) does:

============================  =======================================================
``PATH``                      a PEM private key file (PKCS#8, optionally encrypted)
``env:VAR``                   the PEM itself, in environment variable ``VAR``
``-``                         the PEM, read from standard input
``k8s://NS/NAME[/FIELD]``     field ``FIELD`` (default ``evalrun.key``) of Secret NS/NAME
``pkcs11:token=…;object=…``   a key pair in a PKCS#11 token (RFC 7512 URI)
============================  =======================================================

An encrypted PEM is unlocked with the passphrase in ``$EVALRUN_KEY_PASSPHRASE`` (or
the variable ``--key-passphrase-env`` names). A token key is used with the PIN in
``$EVALRUN_PKCS11_PIN`` (or ``--pin-env``); its module is the URI's ``module-path``,
else ``$EVALRUN_PKCS11_MODULE``, else Debian's SoftHSM. A token key never leaves the
token: it signs there (ECDSA P-256 with CKM_ECDSA over the SHA-256 digest, the raw
``r || s`` re-encoded as DER; Ed25519 with CKM_EDDSA).

Verification trusts one public key or a *keyring*: a directory of ``*.pub``/``*.pem``
files, or one file of concatenated ``PUBLIC KEY`` PEM blocks.

And the rule for the default key: evalrun creates one on the fly only in an
interactive session, announcing it loudly; in CI or without a terminal it refuses
(:class:`~runner.errors.SigningKeyRequired`) and says how to provide one.
"""

from __future__ import annotations

import hashlib
import os
import re
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Literal
from urllib.parse import unquote, unquote_to_bytes

from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from pydantic import BaseModel, ConfigDict

from runner._internal.files import RefusedFile, read_regular_file
from runner.bundle.signing import (
    Algorithm,
    Keyring,
    Signer,
    Verifier,
    generate_keypair,
    keyid_of,
    pem_is_encrypted,
    read_key_file,
    signer_from_pem,
    verifier_from_pem,
)
from runner.errors import InputError, SigningKeyRequired, TokenRefused

if TYPE_CHECKING:
    from runner.adapters.pkcs11_token import TokenKeyQuery, TokenPublicKey

KEY_ENV = "EVALRUN_KEY"
PASSPHRASE_ENV = "EVALRUN_KEY_PASSPHRASE"  # noqa: S105 (the variable's name)
PIN_ENV = "EVALRUN_PKCS11_PIN"
MODULE_ENV = "EVALRUN_PKCS11_MODULE"
DEFAULT_PKCS11_MODULE = "/usr/lib/softhsm/libsofthsm2.so"
DEFAULT_SECRET_FIELD = "evalrun.key"  # noqa: S105 (a Secret field's name)

PEM_MAX_BYTES = 64 * 1024
KEYRING_MAX_BYTES = 1 << 20
KEYRING_MAX_FILES = 1000

WAYS_TO_PROVIDE = (
    "pass --key (a PEM file, env:VAR, - for stdin, k8s://NAMESPACE/SECRET[/FIELD] or "
    f"pkcs11:token=…;object=…), set ${KEY_ENV} (a PEM or one of those references), or "
    "create the default key once with `evalrun keys generate`"
)

_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_K8S_NAME = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")
_PEM_BLOCK = re.compile(rb"-----BEGIN ([A-Z0-9 ]+)-----\r?\n(.*?)-----END \1-----", re.DOTALL)
# CKA_EC_PARAMS of the curves evalrun signs with (DER of the OID, or the curve's name)
_P256_PARAMS = bytes.fromhex("06082a8648ce3d030107")
_ED25519_PARAMS = (bytes.fromhex("06032b6570"), b"\x13\x0cedwards25519")


# --------------------------------------------------------------------------- references


@dataclass(frozen=True)
class FileKey:
    """A PEM key file."""

    path: Path

    def __str__(self) -> str:
        return str(self.path)


@dataclass(frozen=True)
class EnvKey:
    """A PEM key held in an environment variable (``env:VAR``)."""

    var: str

    def __str__(self) -> str:
        return f"env:{self.var}"


@dataclass(frozen=True)
class StdinKey:
    """A PEM key read from standard input (``-``)."""

    def __str__(self) -> str:
        return "-"


@dataclass(frozen=True)
class InlineKey:
    """A PEM key given as the value of ``$EVALRUN_KEY`` itself."""

    pem: bytes = field(repr=False)

    def __str__(self) -> str:
        return f"${KEY_ENV}"


@dataclass(frozen=True)
class SecretKey:
    """A field of a Kubernetes Secret (``k8s://NAMESPACE/NAME[/FIELD]``)."""

    namespace: str
    name: str
    field: str = DEFAULT_SECRET_FIELD

    def __str__(self) -> str:
        return f"k8s://{self.namespace}/{self.name}/{self.field}"


@dataclass(frozen=True)
class Pkcs11Uri:
    """An RFC 7512 ``pkcs11:`` URI naming a key pair (no PIN: that comes from the environment)."""

    text: str
    token: str | None = None
    manufacturer: str | None = None
    serial: str | None = None
    model: str | None = None
    slot_id: int | None = None
    object: str | None = None
    id: bytes | None = None
    module_path: str | None = None


@dataclass(frozen=True)
class TokenKey:
    """A key pair in a PKCS#11 token."""

    uri: Pkcs11Uri

    def __str__(self) -> str:
        return self.uri.text


KeyRef = FileKey | EnvKey | StdinKey | InlineKey | SecretKey | TokenKey
"""A parsed key reference (see the module docstring)."""

_PATH_ATTRS = {"token", "manufacturer", "serial", "model", "slot-id", "object", "id", "type"}


def parse_pkcs11_uri(text: str, *, names_key: bool = True) -> Pkcs11Uri:
    """Parse an RFC 7512 ``pkcs11:`` URI; InputError names what is wrong with it.

    Path attributes: token, manufacturer, serial, model, slot-id, object, id
    (percent-encoded bytes), type (private or public). Query attributes:
    module-path. A PIN in the URI (pin-value, pin-source) is refused: it would
    end up in shell history and process listings. With ``names_key`` (the
    default) the URI must name a key by object and/or id.
    """
    if not text.startswith("pkcs11:"):
        raise InputError(f"not a pkcs11: URI: {text!r}")
    path, _, query = text[len("pkcs11:") :].partition("?")
    values: dict[str, str] = {}
    for part, sep in [(p, ";") for p in path.split(";") if p] + [
        (q, "&") for q in query.split("&") if q
    ]:
        name, eq, value = part.partition("=")
        if not eq or not name:
            raise InputError(f"pkcs11 URI: {part!r} is not NAME=VALUE", hint=f"in {text!r}")
        if name in ("pin-value", "pin-source"):
            raise InputError(
                f"pkcs11 URI: {name} is not accepted (a PIN on the command line leaks)",
                hint=f"put the PIN in ${PIN_ENV}, or name another variable with --pin-env",
            )
        allowed = _PATH_ATTRS if sep == ";" else {"module-path"}
        if name not in allowed:
            where = "path (before '?')" if sep == ";" else "query (after '?')"
            hint = (
                "module-path is a query attribute: pkcs11:token=…;object=…?module-path=/path.so"
                if name == "module-path"
                else f"supported: {', '.join(sorted(_PATH_ATTRS))}; query: module-path"
            )
            raise InputError(
                f"pkcs11 URI: unsupported attribute {name!r} in the {where}", hint=hint
            )
        if name in values:
            raise InputError(f"pkcs11 URI: attribute {name!r} given twice", hint=f"in {text!r}")
        values[name] = value
    if values.get("type", "private") not in ("private", "public"):
        raise InputError(
            f"pkcs11 URI: type={values['type']} names no key pair", hint="use type=private"
        )
    slot_id = None
    if "slot-id" in values:
        if not values["slot-id"].isdigit():
            raise InputError(f"pkcs11 URI: slot-id must be a number, not {values['slot-id']!r}")
        slot_id = int(values["slot-id"])
    texts = {k: unquote(values[k], errors="strict") for k in values if k not in ("id", "slot-id")}
    uri = Pkcs11Uri(
        text=text,
        token=texts.get("token"),
        manufacturer=texts.get("manufacturer"),
        serial=texts.get("serial"),
        model=texts.get("model"),
        slot_id=slot_id,
        object=texts.get("object"),
        id=unquote_to_bytes(values["id"]) if "id" in values else None,
        module_path=texts.get("module-path"),
    )
    if names_key and uri.object is None and uri.id is None:
        raise InputError(
            "pkcs11 URI names no key: add object=LABEL and/or id=%NN", hint=f"in {text!r}"
        )
    return uri


def parse_key_ref(text: str) -> KeyRef:
    """Parse a ``--key`` value (see the module docstring); InputError says what is wrong."""
    if not text:
        raise InputError("empty key reference", hint=WAYS_TO_PROVIDE)
    if text == "-":
        return StdinKey()
    if text.startswith("env:"):
        var = text[len("env:") :]
        if not _ENV_NAME.match(var):
            raise InputError(f"--key env:VAR: {var!r} is not an environment variable name")
        return EnvKey(var)
    if text.startswith("k8s://"):
        parts = text[len("k8s://") :].split("/")
        if len(parts) not in (2, 3) or not all(parts):
            raise InputError(
                f"--key {text!r}: expected k8s://NAMESPACE/NAME or k8s://NAMESPACE/NAME/FIELD"
            )
        for part in parts[:2]:
            if not _K8S_NAME.match(part):
                raise InputError(f"--key {text!r}: {part!r} is not a Kubernetes object name")
        return SecretKey(parts[0], parts[1], *parts[2:])
    if text.startswith("pkcs11:"):
        return TokenKey(parse_pkcs11_uri(text))
    return FileKey(Path(text).expanduser())


def key_ref_from_env(environ: Mapping[str, str]) -> KeyRef | None:
    """The key ``$EVALRUN_KEY`` names (a PEM itself, or a key reference), or None if unset."""
    value = environ.get(KEY_ENV, "")
    if not value.strip():
        return None
    if value.lstrip().startswith("-----BEGIN"):
        return InlineKey(value.encode("utf-8"))
    return parse_key_ref(value)


# --------------------------------------------------------------------------- access


@dataclass(frozen=True)
class KeyAccess:
    """How keys are reached and unlocked: variable names, the cluster, standard input."""

    passphrase_env: str = PASSPHRASE_ENV
    """The variable holding the passphrase of an encrypted PEM."""
    pin_env: str = PIN_ENV
    """The variable holding the PKCS#11 user PIN."""
    kubeconfig: str | None = None
    kube_context: str | None = None
    environ: Mapping[str, str] = field(default_factory=lambda: os.environ)
    stdin: IO[bytes] | None = None
    """Where ``-`` reads from (default: the process's standard input)."""

    def module_path(self, uri: Pkcs11Uri) -> str:
        """The PKCS#11 module: the URI's module-path, else $EVALRUN_PKCS11_MODULE, else SoftHSM."""
        return uri.module_path or self.environ.get(MODULE_ENV) or DEFAULT_PKCS11_MODULE


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


# --------------------------------------------------------------------------- tokens


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


def _token_query(uri: Pkcs11Uri, access: KeyAccess) -> TokenKeyQuery:
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


def _token_public_key(
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


def _token_signer(ref: TokenKey, access: KeyAccess) -> Signer:
    from runner.adapters.pkcs11_token import read_public_key

    query = _token_query(ref.uri, access)
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
    public_key, algorithm = _token_public_key(facts, query)
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


# --------------------------------------------------------------------------- loading


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
        return _token_signer(ref, access)
    return _pem_signer(_read_pem(ref, access), str(ref), access)


class TokenFacts(BaseModel):
    """Where a token key lives: token and key object, public facts only."""

    model_config = ConfigDict(frozen=True, extra="forbid")

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

    model_config = ConfigDict(frozen=True, extra="forbid")

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
    public_key, _ = _token_public_key(facts, query)
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

        query = _token_query(ref.uri, access)
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
    query = _token_query(uri, access)
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


# --------------------------------------------------------------------------- keyrings


def load_keyring(path: Path) -> Keyring:
    """The trusted public keys at ``path``: a directory of ``*.pub``/``*.pem`` files, or one
    file of concatenated ``PUBLIC KEY`` PEM blocks (text between blocks is ignored).

    Raises InputError naming the file if a block is not a supported public key
    (a private key is refused: verification never needs one), or if the keyring
    holds no key, is too large, or is missing.
    """
    if path.is_dir():
        files = sorted(
            p
            for p in path.iterdir()
            if p.suffix in (".pub", ".pem") and not p.name.startswith(".") and p.is_file()
        )
        if len(files) > KEYRING_MAX_FILES:
            raise InputError(
                f"keyring directory has more than {KEYRING_MAX_FILES} key files", file=str(path)
            )
        verifiers = [v for f in files for v in _keyring_file(f)]
    elif path.exists():
        verifiers = _keyring_file(path)
    else:
        raise InputError("keyring not found", file=str(path))
    if not verifiers:
        raise InputError(
            "the keyring holds no public key",
            file=str(path),
            hint="put PEM public keys (*.pub from `evalrun keys generate`) in it",
        )
    return Keyring.of(verifiers, source=str(path))


def _keyring_file(path: Path) -> list[Verifier]:
    try:
        data = read_regular_file(path, max_bytes=KEYRING_MAX_BYTES)
    except FileNotFoundError as exc:
        raise InputError(f"cannot read keyring file: {exc.strerror}", file=str(path)) from exc
    except RefusedFile as exc:
        if "limit" in exc.reason or "larger" in exc.reason:
            raise InputError(
                f"keyring file is larger than {KEYRING_MAX_BYTES} bytes", file=str(path)
            ) from exc
        raise InputError(f"cannot read keyring file: {exc.reason}", file=str(path)) from exc
    verifiers = []
    for index, match in enumerate(_PEM_BLOCK.finditer(data)):
        label = match.group(1).decode("ascii")
        where = f"{path} (block {index + 1})"
        if label != "PUBLIC KEY":
            raise InputError(
                f"keyring holds a {label!r} block; only PUBLIC KEY blocks are trusted",
                file=where,
                hint="a keyring lists public keys (the .pub files of `evalrun keys generate`)",
            )
        verifiers.append(verifier_from_pem(match.group(0), source=where))
    if not verifiers and b"-----BEGIN" in data:
        raise InputError("keyring file holds no complete PEM block", file=str(path))
    return verifiers


# --------------------------------------------------------------------------- the default key


@dataclass(frozen=True)
class Session:
    """Whether a person is at this process: CI, and terminals on stdin and stdout."""

    ci: str | None
    stdin_tty: bool
    stdout_tty: bool

    @classmethod
    def current(cls, environ: Mapping[str, str] | None = None) -> Session:
        """The session of this process."""
        env = os.environ if environ is None else environ
        return cls(
            ci=env.get("CI"),
            stdin_tty=_isatty(sys.stdin),
            stdout_tty=_isatty(sys.stdout),
        )

    def not_interactive_because(self) -> str | None:
        """Why nobody is there to notice a new key (CI, no terminal), or None if someone is."""
        if self.ci and self.ci.strip().lower() not in ("false", "0"):
            return f"CI={self.ci} is set"
        if not self.stdin_tty:
            return "standard input is not a terminal"
        if not self.stdout_tty:
            return "standard output is not a terminal"
        return None


def _isatty(stream: object) -> bool:
    try:
        return bool(stream.isatty())  # type: ignore[attr-defined]
    except (AttributeError, ValueError, OSError):
        return False


def resolve_signing_key(
    ref_text: str | None,
    access: KeyAccess,
    *,
    default_private: Path,
    default_public: Path,
    session: Session,
    announce: Callable[[str], None],
) -> Signer:
    """The signer to use: ``--key``, else ``$EVALRUN_KEY``, else the default key file.

    If none of them exists, a new default key pair is created, but only when a
    person is at a terminal and not in CI: then ``announce`` gets a several-line
    notice with both paths and the keyid. Otherwise SigningKeyRequired (exit 2)
    says why and every way to provide a key; nothing is created.
    """
    if ref_text is not None:
        return load_signing_key(parse_key_ref(ref_text), access)
    from_env = key_ref_from_env(access.environ)
    if from_env is not None:
        return load_signing_key(from_env, access)
    if default_private.exists() or default_private.is_symlink():
        return load_signing_key(FileKey(default_private), access)
    reason = session.not_interactive_because()
    if reason is not None:
        raise SigningKeyRequired(
            f"no signing key, and evalrun never creates one when {reason}: {WAYS_TO_PROVIDE}",
            reason=reason,
            default_key=str(default_private),
        )
    default_private.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    info = generate_keypair(default_private, default_public)
    announce(new_key_notice(info.private_path, info.public_path, info.keyid, info.algorithm))
    return load_signing_key(FileKey(default_private), access)


def new_key_notice(private: Path, public: Path, keyid: str, algorithm: str) -> str:
    """The loud, several-line notice that a new signing key was created."""
    rule = "=" * 72
    return "\n".join(
        (
            rule,
            "evalrun: CREATED A NEW SIGNING KEY (no --key, no $EVALRUN_KEY, no default key)",
            f"  private key  {private}",
            "               mode 0600: keep it secret and back it up",
            f"  public key   {public}",
            "               give it to whoever verifies your bundles",
            f"  keyid        {keyid} ({algorithm})",
            "  Bundles signed from now on verify only with this public key.",
            "  In CI, evalrun never does this: pass --key or set $EVALRUN_KEY.",
            rule,
        )
    )


__all__ = [
    "DEFAULT_PKCS11_MODULE",
    "DEFAULT_SECRET_FIELD",
    "KEY_ENV",
    "MODULE_ENV",
    "PASSPHRASE_ENV",
    "PIN_ENV",
    "WAYS_TO_PROVIDE",
    "EnvKey",
    "FileKey",
    "InlineKey",
    "KeyAccess",
    "KeyDescription",
    "KeyRef",
    "Pkcs11Uri",
    "SecretKey",
    "Session",
    "StdinKey",
    "TokenFacts",
    "TokenKey",
    "TokenSigner",
    "describe_key",
    "key_ref_from_env",
    "list_token_keys",
    "load_keyring",
    "load_signing_key",
    "new_key_notice",
    "parse_key_ref",
    "parse_pkcs11_uri",
    "resolve_signing_key",
]

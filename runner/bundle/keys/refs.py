"""Key references: how ``--key`` and ``$EVALRUN_KEY`` name a signing key, and how keys are reached.

============================  =======================================================
``PATH``                      a PEM private key file (PKCS#8, optionally encrypted)
``env:VAR``                   the PEM itself, in environment variable ``VAR``
``-``                         the PEM, read from standard input
``k8s://NS/NAME[/FIELD]``     field ``FIELD`` (default ``evalrun.key``) of Secret NS/NAME
``pkcs11:token=…;object=…``   a key pair in a PKCS#11 token (RFC 7512 URI)
============================  =======================================================

:func:`parse_key_ref` turns a ``--key`` value into a :data:`KeyRef`;
:func:`parse_pkcs11_uri` parses the RFC 7512 form. :class:`KeyAccess` says how a
reference is reached and unlocked (which variables hold the passphrase and the PIN,
which cluster holds a Secret, where standard input is). Nothing here reads a key.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO
from urllib.parse import unquote, unquote_to_bytes

from runner.errors import InputError

KEY_ENV = "EVALRUN_KEY"
PASSPHRASE_ENV = "EVALRUN_KEY_PASSPHRASE"  # noqa: S105 (the variable's name)
PIN_ENV = "EVALRUN_PKCS11_PIN"
MODULE_ENV = "EVALRUN_PKCS11_MODULE"
DEFAULT_PKCS11_MODULE = "/usr/lib/softhsm/libsofthsm2.so"
DEFAULT_SECRET_FIELD = "evalrun.key"  # noqa: S105 (a Secret field's name)

WAYS_TO_PROVIDE = (
    "pass --key (a PEM file, env:VAR, - for stdin, k8s://NAMESPACE/SECRET[/FIELD] or "
    f"pkcs11:token=…;object=…), set ${KEY_ENV} (a PEM or one of those references), or "
    "create the default key once with `evalrun keys generate`"
)

_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_K8S_NAME = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")


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

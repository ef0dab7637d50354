"""The boundary to PKCS#11 tokens (HSMs, cloud KMS behind PKCS#11, SoftHSM).

Through ``python-pkcs11``: load a module, find a token and a key pair, read the
public half, and sign inside the token. The private key never leaves it: this
module never reads a private attribute. ``pkcs11`` errors become evalrun errors
here and only here: what the user must fix (module, token, key, PIN, mechanism)
is :class:`~runner.errors.TokenRefused` (exit 2); a token that fails an operation
it should do is :class:`~runner.errors.TokenFailure` (exit 5). No message or
field ever carries the PIN.

Token operations are serialised by one lock: a PKCS#11 login belongs to the whole
application, and a sweep signs from several threads.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import pkcs11
from pkcs11 import Attribute, KeyType, ObjectClass, TokenFlag
from pkcs11._pkcs11 import lib as Pkcs11Lib

from runner.errors import TokenFailure, TokenRefused

KeyKind = Literal["ec", "ec_edwards"]
Mechanism = Literal["ECDSA", "EDDSA"]

_LOCK = threading.RLock()
_LIBS: dict[str, Pkcs11Lib] = {}
_KEY_TYPES = (KeyType.EC, KeyType.EC_EDWARDS)
_PIN_HINT = "check the PIN in $EVALRUN_PKCS11_PIN (or in the variable --pin-env names)"


@dataclass(frozen=True)
class TokenKeyQuery:
    """Which module, token and key pair to use; a None attribute matches anything."""

    module: str
    token_label: str | None = None
    token_serial: str | None = None
    token_manufacturer: str | None = None
    token_model: str | None = None
    slot_id: int | None = None
    object_label: str | None = None
    object_id: bytes | None = None

    def token_text(self) -> str:
        """The token as the query names it, for messages."""
        named = (
            ("token", self.token_label),
            ("serial", self.token_serial),
            ("manufacturer", self.token_manufacturer),
            ("model", self.token_model),
            ("slot-id", self.slot_id),
        )
        return ";".join(f"{k}={v}" for k, v in named if v is not None) or "(any token)"

    def object_text(self) -> str:
        """The key as the query names it (label and/or hex id), for messages."""
        named = (
            ("object", self.object_label),
            ("id", None if self.object_id is None else self.object_id.hex()),
        )
        return ";".join(f"{k}={v}" for k, v in named if v is not None) or "(any key)"


@dataclass(frozen=True)
class TokenPublicKey:
    """The public facts of one key pair in a token (no secret material)."""

    token_label: str
    token_serial: str
    token_manufacturer: str
    token_model: str
    object_label: str | None
    object_id: bytes | None
    kind: KeyKind
    ec_params: bytes
    """CKA_EC_PARAMS: DER of the curve's OID (or, for Edwards curves, its name)."""
    ec_point: bytes
    """CKA_EC_POINT as the token returns it (usually a DER OCTET STRING around the point)."""
    mechanisms: frozenset[Mechanism]
    """Which of CKM_ECDSA and CKM_EDDSA the token's slot offers."""


def _text(value: str | bytes) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace").strip()
    return value.strip()


def _lib(query: TokenKeyQuery) -> Pkcs11Lib:
    if query.module in _LIBS:
        return _LIBS[query.module]
    if not Path(query.module).is_file():
        raise TokenRefused(
            "PKCS#11 module not found",
            module=query.module,
            hint="install the token's module (SoftHSM: apt-get install softhsm2), or name it "
            "with ?module-path=… in the pkcs11: URI or in $EVALRUN_PKCS11_MODULE",
        )
    try:
        lib = pkcs11.lib(query.module)
    except pkcs11.PKCS11Error as exc:
        raise TokenRefused(f"cannot load the PKCS#11 module: {exc}", module=query.module) from exc
    _LIBS[query.module] = lib
    return lib


def _token(query: TokenKeyQuery) -> Any:
    matches = []
    try:
        slots = _lib(query).get_slots(token_present=True)
        for slot in slots:
            if query.slot_id is not None and slot.slot_id != query.slot_id:
                continue
            token = slot.get_token()
            if not token.flags & TokenFlag.TOKEN_INITIALIZED:
                continue
            facts = (
                (query.token_label, _text(token.label)),
                (query.token_serial, _text(token.serial)),
                (query.token_manufacturer, _text(token.manufacturer_id)),
                (query.token_model, _text(token.model)),
            )
            if all(wanted in (None, found) for wanted, found in facts):
                matches.append(token)
    except pkcs11.PKCS11Error as exc:
        raise TokenFailure(
            f"listing PKCS#11 tokens failed: {type(exc).__name__}", module=query.module
        ) from exc
    if not matches:
        raise TokenRefused(
            f"no initialised PKCS#11 token matches {query.token_text()}",
            module=query.module,
            token=query.token_text(),
            hint="list tokens with `softhsm2-util --show-slots` (or your HSM's tool)",
        )
    if len(matches) > 1:
        labels = ", ".join(repr(_text(t.label)) for t in matches)
        raise TokenRefused(
            f"several PKCS#11 tokens match {query.token_text()}: {labels}",
            module=query.module,
            token=query.token_text(),
            hint="name one with token=LABEL (or serial=…) in the pkcs11: URI",
        )
    return matches[0]


@contextlib.contextmanager
def _session(query: TokenKeyQuery, pin: str | None, what: str) -> Iterator[tuple[Any, Any]]:
    """A session on the token (logged in when ``pin`` is given), errors translated."""
    with _LOCK:
        token = _token(query)
        label = _text(token.label)
        try:
            with token.open(user_pin=pin) as session:
                yield token, session
        except (TokenRefused, TokenFailure):
            raise
        except pkcs11.PinIncorrect as exc:
            raise TokenRefused(
                "the token refused the PIN", module=query.module, token=label, hint=_PIN_HINT
            ) from exc
        except (
            pkcs11.PinInvalid,
            pkcs11.PinLenRange,
            pkcs11.PinExpired,
            pkcs11.PinLocked,
            pkcs11.UserPinNotInitialized,
        ) as exc:
            raise TokenRefused(
                f"the token refused the PIN ({type(exc).__name__})",
                module=query.module,
                token=label,
                hint=_PIN_HINT,
            ) from exc
        except pkcs11.PKCS11Error as exc:
            raise TokenFailure(
                f"{what}: the token failed ({type(exc).__name__})",
                module=query.module,
                token=label,
                key_object=query.object_text(),
            ) from exc


def _find(session: Any, query: TokenKeyQuery, token: Any, object_class: ObjectClass) -> Any:
    """The one EC/EdDSA key object of ``object_class`` matching the query, or None."""
    attrs: dict[Attribute, Any] = {Attribute.CLASS: object_class}
    if query.object_label is not None:
        attrs[Attribute.LABEL] = query.object_label
    if query.object_id is not None:
        attrs[Attribute.ID] = query.object_id
    found = [o for o in session.get_objects(attrs) if o.key_type in _KEY_TYPES]
    if len(found) > 1:
        raise TokenRefused(
            f"several keys in the token match {query.object_text()}",
            module=query.module,
            token=_text(token.label),
            key_object=query.object_text(),
            hint="name one key with object=LABEL and/or id=%NN in the pkcs11: URI",
        )
    return found[0] if found else None


def _mechanisms(token: Any) -> frozenset[Mechanism]:
    offered = token.slot.get_mechanisms()
    named: tuple[tuple[Mechanism, pkcs11.Mechanism], ...] = (
        ("ECDSA", pkcs11.Mechanism.ECDSA),
        ("EDDSA", pkcs11.Mechanism.EDDSA),
    )
    return frozenset(name for name, mechanism in named if mechanism in offered)


def _public_facts(token: Any, public: Any) -> TokenPublicKey:
    try:
        object_id: bytes | None = bytes(public[Attribute.ID]) or None
    except pkcs11.AttributeTypeInvalid:
        object_id = None
    try:
        label: str | None = public[Attribute.LABEL] or None
    except pkcs11.AttributeTypeInvalid:
        label = None
    return TokenPublicKey(
        token_label=_text(token.label),
        token_serial=_text(token.serial),
        token_manufacturer=_text(token.manufacturer_id),
        token_model=_text(token.model),
        object_label=label,
        object_id=object_id,
        kind="ec_edwards" if public.key_type == KeyType.EC_EDWARDS else "ec",
        ec_params=bytes(public[Attribute.EC_PARAMS]),
        ec_point=bytes(public[Attribute.EC_POINT]),
        mechanisms=_mechanisms(token),
    )


def _missing(query: TokenKeyQuery, token: Any, what: str) -> TokenRefused:
    return TokenRefused(
        f"no {what} in the token matches {query.object_text()}",
        module=query.module,
        token=_text(token.label),
        key_object=query.object_text(),
        hint="list the token's keys with `evalrun keys list --pkcs11 'pkcs11:token=LABEL'`",
    )


def read_public_key(query: TokenKeyQuery, pin: str | None) -> TokenPublicKey:
    """The public key of the key pair ``query`` names, read from its public key object.

    With a ``pin`` the session logs in and the matching private key object must
    exist too, so a wrong PIN or a missing private key shows before any work is
    done; without one only public objects are read.
    """
    with _session(query, pin, "reading the public key") as (token, session):
        public = _find(session, query, token, ObjectClass.PUBLIC_KEY)
        if public is None:
            raise _missing(query, token, "EC or EdDSA public key object")
        if pin is not None and _find(session, query, token, ObjectClass.PRIVATE_KEY) is None:
            raise _missing(query, token, "private key")
        return _public_facts(token, public)


def list_public_keys(query: TokenKeyQuery, pin: str | None) -> list[TokenPublicKey]:
    """Every EC/EdDSA public key object in the token (the query's object filters apply)."""
    with _session(query, pin, "listing keys") as (token, session):
        attrs: dict[Attribute, Any] = {Attribute.CLASS: ObjectClass.PUBLIC_KEY}
        if query.object_label is not None:
            attrs[Attribute.LABEL] = query.object_label
        if query.object_id is not None:
            attrs[Attribute.ID] = query.object_id
        return [
            _public_facts(token, o) for o in session.get_objects(attrs) if o.key_type in _KEY_TYPES
        ]


def sign_in_token(query: TokenKeyQuery, pin: str, mechanism: Mechanism, data: bytes) -> bytes:
    """Sign ``data`` inside the token with the private key ``query`` names.

    ``ECDSA`` (CKM_ECDSA) signs ``data`` as given, so pass the digest; it returns
    the raw ``r || s``. ``EDDSA`` (CKM_EDDSA) signs the message itself.
    """
    with _session(query, pin, "signing") as (token, session):
        if mechanism not in _mechanisms(token):
            raise TokenRefused(
                f"the token cannot sign with CKM_{mechanism}",
                module=query.module,
                token=_text(token.label),
                key_object=query.object_text(),
                hint="use an ECDSA P-256 key (CKM_ECDSA)",
            )
        private = _find(session, query, token, ObjectClass.PRIVATE_KEY)
        if private is None:
            raise _missing(query, token, "private key")
        signature = private.sign(data, mechanism=getattr(pkcs11.Mechanism, mechanism))
        return bytes(signature)


__all__ = [
    "KeyKind",
    "Mechanism",
    "TokenKeyQuery",
    "TokenPublicKey",
    "list_public_keys",
    "read_public_key",
    "sign_in_token",
]

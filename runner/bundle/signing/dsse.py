"""DSSE v1 envelopes: signing a payload and checking an envelope against trusted keys.

Envelopes follow DSSE v1 (the format sigstore, in-toto and securesystemslib verify):
signatures are over ``PAE(payloadType, payload)`` (:func:`pae`), base64 is canonical
(:func:`b64_decode_canonical`), and the envelope's keyid selects the trusted key.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TypedDict

from pydantic import BaseModel, ConfigDict, Field, StrictStr, ValidationError

from runner.bundle.signing.signer import Keyring, Signer, TrustedKeys
from runner.errors import VerificationFailed


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
    envelope: Mapping[str, object], trusted: TrustedKeys, expected_payload_type: str
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

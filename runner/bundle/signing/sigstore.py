"""The Sigstore bundle (protobuf-specs JSON, v0.3) that restates a bundle's DSSE envelope.

cosign and sigstore-go read it; it carries the same payload, type and signature as the
envelope, names the key by keyid only, and has no transparency-log entries.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TypedDict

from pydantic import ValidationError

from runner.bundle.signing.dsse import DsseEnvelope

SIGSTORE_BUNDLE_MEDIA_TYPE = "application/vnd.dev.sigstore.bundle.v0.3+json"


class SigstorePublicKeyJson(TypedDict):
    """``verificationMaterial.publicKey``: the key named by its keyid only."""

    hint: str


class SigstoreMaterialJson(TypedDict):
    """``verificationMaterial``: the key hint, and no transparency-log entries."""

    publicKey: SigstorePublicKeyJson
    tlogEntries: list[object]


class SigstoreSignatureJson(TypedDict):
    """One signature of ``dsseEnvelope`` (no keyid: sigstore-go would skip it)."""

    sig: str


class SigstoreEnvelopeJson(TypedDict):
    """``dsseEnvelope``: the DSSE envelope's payload, type and signature."""

    payload: str
    payloadType: str
    signatures: list[SigstoreSignatureJson]


class SigstoreBundleJson(TypedDict):
    """A Sigstore bundle v0.3 as JSON (the fields evalrun writes)."""

    mediaType: str
    verificationMaterial: SigstoreMaterialJson
    dsseEnvelope: SigstoreEnvelopeJson


def sigstore_bundle(envelope: Mapping[str, object]) -> SigstoreBundleJson:
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

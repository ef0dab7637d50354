"""Signing keys and DSSE envelopes.

The runner signs on the host with a key that never enters a container. Keys are
PEM files made by :func:`generate_keypair` (ECDSA P-256 with SHA-256, or Ed25519)
or keys held in a PKCS#11 token (:mod:`runner.bundle.keys`); a key's id is the
sha256 hex of its DER SubjectPublicKeyInfo, so the same key has the same id
everywhere. Envelopes follow DSSE v1 (the format sigstore, in-toto and
securesystemslib verify): signatures are over ``PAE(payloadType, payload)``,
ECDSA signatures are DER-encoded. Verification trusts one key (:class:`Verifier`)
or several (:class:`Keyring`); the envelope's keyid selects which.

The package, by responsibility: :mod:`~runner.bundle.signing.signer` (signers,
verifiers, keyrings, key ids), :mod:`~runner.bundle.signing.pem` (PEM key files),
:mod:`~runner.bundle.signing.dsse` (DSSE envelopes) and
:mod:`~runner.bundle.signing.sigstore` (the Sigstore bundle). Import from here.
"""

from runner.bundle.signing.dsse import (
    DsseEnvelope,
    DsseSignature,
    EnvelopeCheck,
    EnvelopeJson,
    SignatureJson,
    b64_decode_canonical,
    b64_encode,
    check_envelope,
    envelope_problems,
    pae,
    sign_envelope,
    verify_envelope,
)
from runner.bundle.signing.pem import (
    KeyInfo,
    generate_keypair,
    load_signer,
    load_verifier,
    pem_is_encrypted,
    read_key_file,
    signer_from_pem,
    verifier_from_pem,
)
from runner.bundle.signing.signer import (
    ALGORITHMS,
    Algorithm,
    Keyring,
    PrivateKeySigner,
    Signer,
    TrustedKeys,
    Verifier,
    keyid_of,
)
from runner.bundle.signing.sigstore import (
    SIGSTORE_BUNDLE_MEDIA_TYPE,
    SigstoreBundleJson,
    sigstore_bundle,
)

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
    "SignatureJson",
    "Signer",
    "SigstoreBundleJson",
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

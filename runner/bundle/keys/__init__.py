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

The package, by responsibility: :mod:`~runner.bundle.keys.refs` (references, parsing,
:class:`KeyAccess`), :mod:`~runner.bundle.keys.token` (PKCS#11 token signing),
:mod:`~runner.bundle.keys.loading` (loading and describing a key),
:mod:`~runner.bundle.keys.keyring` (trusted public keys) and
:mod:`~runner.bundle.keys.default_key` (the default key rule). Import from here.
"""

from runner.bundle.keys.default_key import Session, new_key_notice, resolve_signing_key
from runner.bundle.keys.keyring import load_keyring
from runner.bundle.keys.loading import (
    KeyDescription,
    TokenFacts,
    describe_key,
    list_token_keys,
    load_signing_key,
)
from runner.bundle.keys.refs import (
    DEFAULT_PKCS11_MODULE,
    DEFAULT_SECRET_FIELD,
    KEY_ENV,
    MODULE_ENV,
    PASSPHRASE_ENV,
    PIN_ENV,
    WAYS_TO_PROVIDE,
    EnvKey,
    FileKey,
    InlineKey,
    KeyAccess,
    KeyRef,
    Pkcs11Uri,
    SecretKey,
    StdinKey,
    TokenKey,
    key_ref_from_env,
    parse_key_ref,
    parse_pkcs11_uri,
)
from runner.bundle.keys.token import TokenSigner

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

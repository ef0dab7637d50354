"""Keyrings: the public keys verification trusts.

A keyring is a directory of ``*.pub``/``*.pem`` files, or one file of concatenated
``PUBLIC KEY`` PEM blocks; every file is read bounded, and a private key in it is refused.
"""

from __future__ import annotations

import re
from pathlib import Path

from runner._internal.files import RefusedFile, read_regular_file
from runner.bundle.signing import Keyring, Verifier, verifier_from_pem
from runner.errors import InputError

KEYRING_MAX_BYTES = 1 << 20
KEYRING_MAX_FILES = 1000

_PEM_BLOCK = re.compile(rb"-----BEGIN ([A-Z0-9 ]+)-----\r?\n(.*?)-----END \1-----", re.DOTALL)


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

"""The rule for the default signing key: created on the fly only when a person is there.

:func:`resolve_signing_key` picks ``--key``, else ``$EVALRUN_KEY``, else the default key
file. With none of them, evalrun creates a new key pair only in an interactive session
(:class:`Session`), announcing it loudly (:func:`new_key_notice`); in CI or without a
terminal it refuses (:class:`~runner.errors.SigningKeyRequired`) and says how to provide one.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from runner.bundle.keys.loading import load_signing_key
from runner.bundle.keys.refs import (
    WAYS_TO_PROVIDE,
    FileKey,
    KeyAccess,
    key_ref_from_env,
    parse_key_ref,
)
from runner.bundle.signing import Signer, generate_keypair
from runner.errors import SigningKeyRequired


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

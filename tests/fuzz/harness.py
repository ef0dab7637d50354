"""What every fuzz target shares: the property, the fixed key, and the limits.

The property (issue 14): any input ends in a result (exit 0) or in an evalrun error
with exit code 2 or 3 and a one-line message — never another exception (a traceback),
never beyond a bounded time and memory. :func:`check` enforces the first half inside
each target; ``run_fuzzers.py`` enforces the rest (libFuzzer ``-timeout`` per input,
``-rss_limit_mb``, and ``RLIMIT_AS`` set here for the target process).

Targets import no atheris: they define ``test_one_input(data: bytes)`` and can be
replayed anywhere (``tests/unit/test_fuzz_corpora.py`` replays every committed corpus
file in the unit tier). ``run_fuzzers.py`` imports them under atheris's
instrumentation.
"""

from __future__ import annotations

import resource
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from cryptography.hazmat.primitives.asymmetric import ed25519

from runner.bundle.signing import Signer, Verifier
from runner.errors import EvalrunError

T = TypeVar("T")

# The address space a target may use: a bounded-memory failure shows as MemoryError.
MEMORY_LIMIT_BYTES = 3 << 30
ALLOWED_EXIT_CODES = (2, 3)


class PropertyViolated(AssertionError):
    """An input ended in an evalrun error the property does not allow."""


def limit_memory(limit: int = MEMORY_LIMIT_BYTES) -> None:
    """Cap this process's address space (best effort where a lower cap exists)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    cap = limit if hard == resource.RLIM_INFINITY else min(limit, hard)
    if soft == resource.RLIM_INFINITY or soft > cap:
        resource.setrlimit(resource.RLIMIT_AS, (cap, hard))


def check(
    fn: Callable[..., T], *args: Any, allowed: tuple[int, ...] = ALLOWED_EXIT_CODES, **kwargs: Any
) -> T | None:
    """``fn(*args)``: its result, or None when it raised an allowed evalrun error.

    An evalrun error with another exit code or a message that is not one line raises
    :class:`PropertyViolated`; any other exception propagates (the fuzzer reports it).
    """
    try:
        return fn(*args, **kwargs)
    except EvalrunError as exc:
        if exc.exit_code not in allowed:
            raise PropertyViolated(f"exit code {exc.exit_code}: {exc.message!r}") from exc
        if not exc.message or "\n" in exc.message:
            raise PropertyViolated(f"not a one-line message: {exc.message!r}") from exc
        return None


def fuzz_signer() -> Signer:
    """The fixed key the committed corpora are signed with (never used for anything else)."""
    return Signer.from_private_key(ed25519.Ed25519PrivateKey.from_private_bytes(b"\x11" * 32))


def fuzz_verifier() -> Verifier:
    return fuzz_signer().verifier()


def scratch(name: str) -> Path:
    """A directory for this target's files, made once per process."""
    return Path(tempfile.mkdtemp(prefix=f"evalrun-fuzz-{name}-"))

"""Hints the agent adds to a failed evaluation's reason, from what only it knows.

The agent knows which inputs the container was given (``EVALRUN_DATA_<NAME>`` per
dataset); the evaluation's author often guesses a name. When the evaluation fails and
its stderr, its command or the script its command names refers to an
``EVALRUN_DATA_*`` name the container did not have, the hint names the ones it had.
Stdlib only: this runs inside the container.
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Mapping, Sequence
from pathlib import Path

_DATA_NAME = re.compile(r"EVALRUN_DATA_[A-Za-z0-9_]+")
# A script named on the command line is read for names only up to this size.
_SCRIPT_MAX_BYTES = 1 << 20
# How much of the end of the evaluation's stderr is searched.
_STDERR_MAX_BYTES = 1 << 16
# How many unknown names a hint lists.
_MAX_NAMES = 5


def _names_in(text: str) -> set[str]:
    return set(_DATA_NAME.findall(text))


def _script_text(arg: str, cwd: Path) -> str:
    """The text of ``arg`` when it names a small regular file, else ''."""
    path = Path(arg) if Path(arg).is_absolute() else cwd / arg
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0))
    except (OSError, ValueError):
        return ""
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_size > _SCRIPT_MAX_BYTES:
            return ""
        with os.fdopen(fd, "rb", closefd=False) as fh:
            return fh.read(_SCRIPT_MAX_BYTES).decode("utf-8", errors="replace")
    except OSError:
        return ""
    finally:
        os.close(fd)


def stderr_text(path: Path) -> str:
    """The end of the evaluation's stderr (bounded), '' when there is none."""
    try:
        with path.open("rb") as fh:
            size = fh.seek(0, os.SEEK_END)
            fh.seek(max(0, size - _STDERR_MAX_BYTES))
            return fh.read().decode("utf-8", errors="replace")
    except OSError:
        return ""


def missing_input_hint(
    *,
    stderr: str,
    command: Sequence[str],
    env: Mapping[str, str],
    datasets: Mapping[str, str],
    cwd: Path | None = None,
) -> str | None:
    """A hint naming the inputs the container had, when the evaluation refers to others.

    ``env`` is the evaluation's environment, ``datasets`` maps each input name to its
    path. The names the evaluation refers to are read from its stderr, its command and
    the files its command names (a script). None when it refers to no missing name.
    """
    where = cwd or Path.cwd()
    referred = _names_in(stderr)
    for arg in command:
        referred |= _names_in(arg)
        referred |= _names_in(_script_text(arg, where))
    missing = sorted(n for n in referred if n not in env)
    if not missing:
        return None
    had = sorted(k for k in env if k.startswith("EVALRUN_DATA_"))
    by_var = {"EVALRUN_DATA_" + re.sub(r"[^A-Z0-9]", "_", name.upper()): name for name in datasets}
    had_text = (
        ", ".join(f"{k} (input {by_var[k]!r})" if k in by_var else k for k in had)
        if had
        else "no EVALRUN_DATA_* variable at all"
    )
    shown = ", ".join(missing[:_MAX_NAMES]) + (
        f" and {len(missing) - _MAX_NAMES} more" if len(missing) > _MAX_NAMES else ""
    )
    return (
        f"hint: the evaluation refers to {shown}, which this container did not have; "
        f"it had {had_text} (an input named N is EVALRUN_DATA_<N upper-cased, "
        "non-alphanumerics as _>; all of them are in EVALRUN_DATASETS)"
    )


__all__ = ["missing_input_hint", "stderr_text"]

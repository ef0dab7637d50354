"""The ``evalrun`` program: a ``run``'s Docker helper forked before the command line loads.

``evalrun run SPEC`` on the local engine forks a helper that starts the sandbox (with
``--rerun``, the one the last run of the same spec and lock asked for) while this process
reads the spec (:mod:`runner.adapters.docker_early`). The command line's modules (~50 ms)
and its parser (~25 ms) stood between the program's start and that fork, on the path of
every rerun. So the program (:func:`console_main`, outside :mod:`runner.cli`, whose
package loads the whole command line) reads a ``run`` command line with the standard
library first (:func:`fork_for`) and forks the helper at once, for the command to
:func:`take` once it has parsed its arguments, if its own key is the same. A command line
read otherwise here (an option this does not know, a value it doubts, another backend)
forks nothing: the command forks its helper as before. A helper the command does not
take is let go (it removes what it started) when the program exits.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

if TYPE_CHECKING:
    from runner.adapters.docker_ahead import AheadKey
    from runner.adapters.docker_early import EarlyEngine

# ``run``'s options that change nothing of its sandbox (those with a value: True)
_NEUTRAL = {
    "--rerun": False,
    "--json": False,
    "--log-json": False,
    "-v": False,
    "--verbose": False,
    "--reason": True,
    "--key": True,
    "--key-passphrase-env": True,
    "--pin-env": True,
    "--pub": True,
    "--junit": True,
    "-o": True,
    "--out": True,
}
_VERIFY = ("used", "full")


class _Forked:
    engine: EarlyEngine | None = None
    key: AheadKey | None = None


def run_words(argv: Sequence[str]) -> tuple[str, bool, str | None] | None:
    """(spec, ``--rerun``, ``--verify-rootfs``) of a plain ``run`` command line on the local
    engine, as the command's parser will read it; None for anything else (the parser then
    decides, and the command forks its own helper)."""
    if not argv or argv[0] != "run":
        return None
    spec: str | None = None
    rerun = False
    verify: str | None = None
    seen: set[str] = set()
    rest = list(argv[1:])
    while rest:
        word = rest.pop(0)
        flag, has_value, value = word.partition("=")
        if word == "--" or (flag in seen and flag not in ("-v", "--verbose")):
            return None
        if flag in ("--verify-rootfs", "--backend"):
            if not has_value:
                if not rest:
                    return None
                value = rest.pop(0)
            if value not in (_VERIFY if flag == "--verify-rootfs" else ("docker",)):
                return None
            if flag == "--verify-rootfs":
                verify = value
        elif flag in _NEUTRAL and not has_value:
            if _NEUTRAL[flag] and (not rest or rest.pop(0).startswith("-")):
                return None
            rerun = rerun or flag == "--rerun"
        elif word.startswith("-") or spec is not None:
            return None  # an option the parser reads (or refuses), or a second operand
        else:
            spec = word
        seen.add(flag)
    return (spec, rerun, verify) if spec else None


def key_for(home: Path, spec: str, *, rerun: bool, verify_rootfs: str | None) -> AheadKey | None:
    """The helper's key for a run of ``spec`` in the store at ``home`` (both the early
    fork and the command compute it here, so that they agree)."""
    from runner.adapters.docker_ahead import AheadKey
    from runner.bundle.store_paths import StorePaths

    return AheadKey.for_run(
        home,
        StorePaths(home).runs_dir,
        Path(spec),
        rerun=rerun,
        options=(f"verify_rootfs={verify_rootfs}",),
    )


def fork_for(argv: Sequence[str]) -> None:
    """Fork the helper for ``argv`` when it is a plain ``run`` (:func:`run_words`)."""
    words = run_words(argv)
    if words is None:
        return
    from runner._internal.settings import Settings
    from runner.adapters.docker_early import EarlyEngine

    spec, rerun, verify = words
    try:
        home = Settings().home
    except Exception:  # the command says what is wrong with the environment
        return
    _Forked.key = key_for(home, spec, rerun=rerun, verify_rootfs=verify)
    _Forked.engine = EarlyEngine.fork(_Forked.key)


def take(key: AheadKey | None) -> EarlyEngine | None:
    """The helper forked early, when it was forked for ``key``; else None, and one that
    was forked for another is let go now (:func:`release`)."""
    engine, forked_for = _Forked.engine, _Forked.key
    if engine is None or forked_for != key:
        release()
        return None
    _Forked.engine = _Forked.key = None
    return engine


def release() -> None:
    """Let go of the helper forked early, if any (it removes a sandbox it started)."""
    engine = _Forked.engine
    _Forked.engine = _Forked.key = None
    if engine is not None:
        engine.close()


def console_main() -> NoReturn:
    """The ``evalrun`` program (``[project.scripts]``): :func:`fork_for` its command line,
    then :func:`runner.cli.main.console_main`."""
    fork_for(sys.argv[1:])
    from runner.cli.main import console_main as program

    program()


if __name__ == "__main__":  # ``python -m runner.entry``: the program, from its own module
    from runner.entry import console_main as _program  # (not this copy, run as __main__)

    _program()

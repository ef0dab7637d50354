"""The agent's entry point in an image: ``python3 /opt/evalrun/agent/runner/agent/launch.py``
(the template's ENTRYPOINT); it does what ``python3 -m runner.agent`` does, started sooner.

``-m`` has the interpreter import :mod:`runpy` before the agent's first line, and with it a
dozen standard-library modules (``importlib.util``, ``contextlib``, ``collections``,
``functools``, …), each from its own files: ~40 ms under gVisor in a fresh sandbox, on
the evaluation's CPU. Run as a script, the interpreter imports none of them; the agent
installs its module pack first (:mod:`runner.agent.module_pack`) and they come from it.

The script's folder is not left on ``sys.path``: the folder holding the ``runner`` package
takes its place. (``-m`` puts the working directory there, ``/tmp`` in the image: a folder
the evaluation can write to.)

An image built before this script existed keeps ``python3 -m runner.agent`` as its entry
point; both run the same ``main``.
"""

import os
import sys


def site_folders() -> None:
    """Put on ``sys.path`` what Python's ``site`` puts there at a start without ``-S``
    (the template starts the agent with it): the user's and the interpreter's
    site-packages, a virtual environment's, and the folders their ``.pth`` files name, in
    ``site``'s order, by ``site``'s own functions.

    Without the image's code ``site`` runs along the way: the ``import`` lines of ``.pth``
    files and the image's ``sitecustomize`` and ``usercustomize``. They are the
    evaluation's, which still runs them; the agent needs none of them, and in the digits
    image they cost every agent start ~15 ms under gVisor (setuptools'
    ``distutils-precedence.pth`` imports a module from its file, Debian's sitecustomize
    another). What the agent imports from these folders (NVML's binding, torch, for the GPU
    capture) and the distributions it lists in them are found as before."""
    import site

    add_lines = site.addpackage
    site.addpackage = _pth_folders  # type: ignore[assignment]
    try:
        known = site.removeduppaths()
        site.venv(known)  # the set is grown in place (and returned)
        if site.ENABLE_USER_SITE is None:
            site.ENABLE_USER_SITE = site.check_enableusersite()
        site.addsitepackages(site.addusersitepackages(known))
    finally:
        site.addpackage = add_lines


def _pth_folders(sitedir: str, name: str, known_paths: set[str] | None) -> set[str] | None:
    """``site.addpackage`` without its ``exec``: the folders a ``.pth`` file names (those
    that exist, each once), not its ``import`` lines. A file that cannot be read as
    ``site`` reads it (the locale's encoding) adds nothing."""
    import site

    known = site._init_pathinfo() if known_paths is None else known_paths  # type: ignore[attr-defined]
    try:
        with open(os.path.join(sitedir, name), encoding="locale") as fh:
            lines = fh.readlines()
    except (OSError, ValueError):
        lines = []
    for line in lines:
        if line.startswith(("#", "import ", "import\t")) or not line.strip():
            continue
        folder, case = site.makepath(sitedir, line.rstrip())
        if case not in known and os.path.exists(folder):
            sys.path.append(folder)
            known.add(case)
    return None if known_paths is None else known


if __name__ == "__main__":
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from runner.agent.module_pack import install_pack

    install_pack()
    if sys.flags.no_site:
        site_folders()
    from runner.agent.__main__ import main
    from runner.shared.quick_exit import leave

    leave(main())

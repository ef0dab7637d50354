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

if __name__ == "__main__":
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from runner.agent.module_pack import install_pack

    install_pack()
    from runner.agent.__main__ import main
    from runner.shared.quick_exit import leave

    leave(main())

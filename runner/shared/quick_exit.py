"""Leaving a program as Python's own exit would, without the teardown of every module.

The interpreter's shutdown unloads every imported module one by one (0.1 to 0.3 s for
the runner's ~700; 0.05 to 0.1 s for the agent under gVisor, between its last result and
the container's exit). Everything that matters of an ordinary exit still happens here,
in its order: other threads are waited for, exit handlers run, garbage is collected and
the standard streams are flushed. Standard library only: the agent uses it too.
"""

from __future__ import annotations

import atexit
import gc
import os
import sys
import threading
from typing import NoReturn


def wait_for_threads() -> None:
    """What Python's exit does first: the threading exit hooks (which tell idle executor
    workers to stop), then a join of every other non-daemon thread."""
    shutdown = getattr(threading, "_shutdown", None)
    if shutdown is not None:
        shutdown()
        return
    for thread in threading.enumerate():
        if thread is not threading.main_thread() and not thread.daemon:
            thread.join()


def leave(code: int) -> NoReturn:
    """Exit with ``code``: threads joined, exit handlers run, streams flushed, then
    ``os._exit``; a stream that cannot be flushed takes the ordinary exit, which reports it."""
    wait_for_threads()
    atexit._run_exitfuncs()
    gc.collect()
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except (OSError, ValueError):
        sys.exit(code)
    os._exit(code)

"""What the evaluation's Python processes use: an audit hook, installed as ``sitecustomize``.

The agent copies this file, as ``sitecustomize.py``, into a private folder it puts on the
evaluation's ``PYTHONPATH`` (with ``EVALRUN_TRACE_DIR``). In every Python process of the
evaluation it then records in ``$EVALRUN_TRACE_DIR/<pid>.paths``, each path as its bytes
ended by a NUL (which no path holds; a newline or an undecodable byte in a name is kept):
each file opened (the ``open`` audit event: sources and bytecode of imported modules, data
files), each program started (``subprocess.Popen``, ``os.exec``, ``os.posix_spawn``), each
library loaded through ctypes, and, at exit, the file each imported module was loaded from
when no open reported it (:func:`loaded_file`) and every file mapped into the process
(``/proc/self/maps``: extension modules, shared libraries). The agent checks those files
against the image's digest table.

It then steps aside: its folder leaves ``sys.path`` and the image's own ``sitecustomize``,
if any, is imported as usual. Standard library only, any Python from 3.8, and nothing the
interpreter has not loaded before its ``sitecustomize``: it runs in every process of the
evaluation, a worker pool's each, before its first line. (It wrote JSON lines once:
``json`` and the ``re`` it needs cost every such process 20-60 ms under gVisor when the
evaluation itself did not import them; ``from __future__`` would load a module too.)
"""

import atexit
import os
import sys

_PROGRAM_EVENTS = ("subprocess.Popen", "os.exec", "os.posix_spawn", "os.spawn")


def loaded_file(module: object) -> "str | None":
    """The file ``module``'s code was read from: its bytecode when it has some, else its
    ``__file__``; None for a module inside the interpreter (frozen, built in).

    A module's source is not read when its bytecode is loaded. Whether the bytecode was
    stale and the source compiled instead, the agent tells from the bytecode's header
    (:func:`runner.agent.usage.source_read_for`)."""
    spec = getattr(module, "__spec__", None)
    if getattr(spec, "origin", None) in ("frozen", "built-in"):
        return None
    cached = getattr(module, "__cached__", None)
    if isinstance(cached, str) and os.path.isfile(cached):
        return cached
    name = getattr(module, "__file__", None)
    return name if isinstance(name, str) else None


def _install(out_dir: str) -> None:
    try:
        fd = os.open(
            os.path.join(out_dir, "%d.paths" % os.getpid()),
            os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC,
            0o600,
        )
    except OSError:
        return
    seen = set()
    # bound now: the evaluation may replace module attributes later
    write, fsdecode, fsencode, abspath = os.write, os.fsdecode, os.fsencode, os.path.abspath
    state = {"fd": fd, "pid": os.getpid()}

    def note(path: object) -> None:
        if isinstance(path, int) or path is None:
            return
        try:
            text = abspath(fsdecode(path))  # type: ignore[arg-type]
        except Exception:
            return
        if text in seen:
            return
        seen.add(text)
        if os.getpid() != state["pid"]:  # a forked child writes its own file
            try:
                state["fd"] = os.open(
                    os.path.join(out_dir, "%d.paths" % os.getpid()),
                    os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC,
                    0o600,
                )
                state["pid"] = os.getpid()
            except OSError:
                pass
        try:
            write(state["fd"], fsencode(text) + b"\0")
        except Exception:
            pass

    def program(name: object) -> None:
        try:
            name = fsdecode(name)  # type: ignore[arg-type]
        except Exception:
            return
        if os.sep in name:
            note(name)
            return
        for folder in os.environ.get("PATH", "").split(os.pathsep):
            candidate = os.path.join(folder, name)
            if os.path.isfile(candidate):
                note(candidate)
                return

    def hook(event: str, args: tuple) -> None:  # type: ignore[type-arg]
        if event == "open":
            note(args[0])
        elif event in _PROGRAM_EVENTS:
            exe = args[0]
            if exe is None and len(args) > 1 and args[1]:
                exe = args[1][0] if isinstance(args[1], (list, tuple)) else args[1]
            if exe is not None:
                program(exe)
        elif event == "ctypes.dlopen" and args and args[0] and os.sep in str(args[0]):
            note(args[0])

    def modules() -> None:
        # a module whose file an open already reported needs no second look (nor a stat)
        for module in list(sys.modules.values()):
            names = (getattr(module, "__file__", None), getattr(module, "__cached__", None))
            if not any(isinstance(n, str) and abspath(n) in seen for n in names):
                note(loaded_file(module))

    def at_exit() -> None:
        modules()
        try:
            with open("/proc/self/maps", encoding="utf-8", errors="surrogateescape") as maps:
                for line in maps:
                    parts = line.rstrip("\n").split(None, 5)
                    if len(parts) == 6 and parts[5].startswith("/"):
                        note(parts[5].replace(" (deleted)", ""))
        except OSError:
            pass

    note(sys.executable)
    modules()
    sys.addaudithook(hook)
    atexit.register(at_exit)


def _chain() -> None:
    """Leave ``sys.path`` as it would be without this file; import the image's sitecustomize."""
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != here]
    this = sys.modules.pop("sitecustomize", None)
    # the image's own sitecustomize, when there is one
    try:
        import sitecustomize  # type: ignore[import-not-found]  # noqa: F401
    except ImportError:
        # none: this module stays the one imported (the import system expects to find it)
        if this is not None:
            sys.modules["sitecustomize"] = this


if __name__ == "sitecustomize" and os.environ.get("EVALRUN_TRACE_DIR"):
    _install(os.environ["EVALRUN_TRACE_DIR"])
    _chain()

"""The modules an agent run imports, compiled into one file at image build time.

Under gVisor's ptrace platform every module the agent imports costs it ~3 ms before its
code runs: a stat of the source, an open, a read and a close of its bytecode, each a
trip through the sandbox, and the first read of each file through the file proxy. The
agent's ~100 modules took 0.3 to 0.4 s to import in the digits image, on the evaluation's
CPU, in every run. From one file they take ~0.1 s.

``python3 -m runner.agent pack`` (a step of the image template, after the agent's
bytecode is compiled) writes :data:`PACK_FILE`: the code of every pure-Python module a
plain run imports — the agent's and the standard library's — compiled from the image's
own sources by the image's own interpreter, with that interpreter's bytecode magic. It
holds those modules as they were at that step: a template writes it after every step that
installs or changes Python code the agent uses (its own, the standard library).
``python3 -m runner.agent`` installs it (:func:`install_pack`) before its first import:

- a module in the pack is created from the pack's code; its ``__file__`` stays its source
  (tracebacks show its lines) and its ``__cached__`` is the pack, the file it was loaded
  from: the used-files check (``trace_hook.loaded_file``) hashes the pack against the
  image's digest table like any other file the agent ran on;
- a module not in the pack (an extension module, one a run imports only in some cases)
  is imported from the image's files as usual;
- a module the run looked for and the image did not have when the pack was written (the
  standard library asks for Windows' ``nt``, ``msvcrt``, ``_winapi``; ``pynvml`` in an image
  without it) is answered "no such module" at once, as the import system would after
  looking in every folder of ``sys.path`` (~1.5 ms a lookup under gVisor, cold). The image
  is immutable: it still does not have them; a file by such a name appearing later (in a
  writable ``/tmp``) is not imported;
- a pack written by another interpreter (magic), or of another format, is not used; nor
  is one that cannot be read. The agent then imports everything from its files: an image
  built without the step, or before it existed, runs as before.

Standard library only, and at run time only modules loaded before the agent is.
"""

# No ``from __future__ import annotations`` (it imports the ``__future__`` module, from its
# file, before the pack can serve it): annotations that need it are strings.
import marshal
import os
import sys

# the import system's own module: importlib.machinery would load four more, from their files
from _frozen_importlib import ModuleSpec

# typing and collections.abc are not loaded yet when this module is: they come from the pack
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Sequence
    from types import CodeType, ModuleType

PACK_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "modules.pack")
FORMAT = 2

# Not packed: the entry point and this module are imported before the pack is installed.
_NOT_PACKED = ("__main__", "runner", "runner.agent", "runner.agent.__main__", __name__)

# What a run imports beyond runner.agent.__main__, in every run or often: the GPU capture
# (every run asks it, GPU or not), tarfile and socket when its results are framed or held
# (results_out.prepare).
EXTRA_IMPORTS = ("runner.agent.gpu", "tarfile", "socket")
# ... and, where the image has it, NVML's binding (the GPU capture's).
OPTIONAL_IMPORTS = ("pynvml",)


def bytecode_magic() -> bytes:
    """This interpreter's bytecode magic (``importlib.util.MAGIC_NUMBER``), read from the
    import system's own module, which is always loaded: ``importlib.util`` would load five
    more modules into the agent."""
    bootstrap = sys.modules.get("_frozen_importlib_external")
    if bootstrap is None:
        import importlib.util

        return importlib.util.MAGIC_NUMBER
    magic: bytes = bootstrap.MAGIC_NUMBER
    return magic


class PackFinder:
    """Finds and loads the modules in one pack (a ``sys.meta_path`` entry)."""

    def __init__(
        self,
        path: str,
        modules: "dict[str, tuple[bool, str, bytes]]",
        absent: "frozenset[str]" = frozenset(),
    ) -> None:
        self.path = path
        self._modules = modules
        self._absent = absent

    def find_spec(
        self,
        name: str,
        path: "Sequence[str] | None" = None,
        target: "ModuleType | None" = None,
    ) -> "ModuleSpec | None":
        entry = self._modules.get(name)
        if entry is None:
            if name in self._absent:  # what the import system raises after a full search
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)
            return None
        is_package, origin, _ = entry
        # a loader by protocol (create_module, exec_module): importlib.abc costs more imports
        spec = ModuleSpec(name, self, origin=origin, is_package=is_package)  # type: ignore[arg-type]
        if is_package:  # its modules not in the pack are found in its folder as usual
            spec.submodule_search_locations = [os.path.dirname(origin)]
        spec.has_location = True  # __file__: the source, for tracebacks
        spec.cached = self.path  # __cached__: the file the code was read from
        return spec

    def create_module(self, spec: ModuleSpec) -> "ModuleType | None":
        return None  # the import system's default

    def exec_module(self, module: "ModuleType") -> None:
        spec = module.__spec__
        assert spec is not None
        code = marshal.loads(self._modules[spec.name][2])  # noqa: S302 - see exec below
        exec(code, module.__dict__)  # noqa: S102 - the image's own code, checked as the pack

    def packed(self) -> "frozenset[str]":
        """The names of the modules in the pack."""
        return frozenset(self._modules)


def load_pack(path: str) -> "tuple[dict[str, tuple[bool, str, bytes]], frozenset[str]] | None":
    """The modules in the pack at ``path`` and the names it records as absent from the
    image; None when it is missing, unreadable, of another format or written by another
    interpreter."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        chunks = []
        while chunk := os.read(fd, 1 << 20):
            chunks.append(chunk)
    except OSError:
        return None
    finally:
        os.close(fd)
    try:
        pack = marshal.loads(b"".join(chunks))  # noqa: S302 - the image's, checked as used
    except (EOFError, ValueError, TypeError):
        return None
    if (
        not isinstance(pack, dict)
        or pack.get("format") != FORMAT
        or pack.get("magic") != bytecode_magic()
    ):
        return None
    modules, absent = pack.get("modules"), pack.get("absent")
    if not isinstance(modules, dict) or not isinstance(absent, list):
        return None
    return modules, frozenset(name for name in absent if isinstance(name, str))


def install_pack(path: str = PACK_FILE) -> "PackFinder | None":
    """Serve the modules in the pack at ``path`` from now on (see the module's text); None,
    and nothing changed, when there is no usable pack."""
    loaded = load_pack(path)
    if loaded is None:
        return None
    finder = PackFinder(path, *loaded)
    sys.meta_path.insert(0, finder)
    return finder


def installed() -> "PackFinder | None":
    """The pack this process imports from, if any."""
    return next((f for f in sys.meta_path if isinstance(f, PackFinder)), None)


# --- at image build time -------------------------------------------------------------------

_PROBE = (
    "import sys\n"
    "class Absent:\n"  # asked last: no finder before it had the module
    "    names = set()\n"
    "    @classmethod\n"
    "    def find_spec(cls, name, path=None, target=None):\n"
    "        cls.names.add(name)\n"
    "sys.meta_path.append(Absent)\n"
    "before = set(sys.modules)\n"
    "from runner.agent.__main__ import main\n"
    "main(['run', '--plan', '/nonexistent/plan.json'])  # the command line, read\n"
    "import json\n"
    "for name in {extra!r}:\n"
    "    __import__(name)\n"
    "for name in {optional!r}:\n"
    "    try:\n"
    "        __import__(name)\n"
    "    except ImportError:\n"
    "        pass\n"
    "found = []\n"
    "for name in sorted(set(sys.modules) - before):\n"
    "    spec = getattr(sys.modules[name], '__spec__', None)\n"
    "    if spec is not None and spec.name == name and spec.has_location:\n"
    "        found.append([name, spec.origin, spec.submodule_search_locations is not None])\n"
    "print(json.dumps({{'modules': found, 'absent': sorted(Absent.names)}}))\n"
)


def modules_to_pack() -> "tuple[list[tuple[str, str, bool]], list[str]]":
    """The modules a run imports after the interpreter's start, each with its file and
    whether it is a package, and the names it looked for that no finder had: found by
    importing them in a fresh interpreter like the one the agent starts in."""
    import json
    import subprocess

    out = subprocess.run(
        [sys.executable, "-c", _PROBE.format(extra=EXTRA_IMPORTS, optional=OPTIONAL_IMPORTS)],
        capture_output=True,
        check=True,
    ).stdout
    found = json.loads(out)
    modules = [(str(name), str(origin), bool(pkg)) for name, origin, pkg in found["modules"]]
    return modules, [str(name) for name in found["absent"]]


def compile_module(name: str, origin: str, is_package: bool) -> "tuple[bool, str, bytes] | None":
    """``name``'s entry: whether it is a package, its source's path, its code compiled from
    that source; None for a module that is not pure Python from a source file."""
    if name in _NOT_PACKED or not origin.endswith(".py") or not os.path.isfile(origin):
        return None
    with open(origin, "rb") as fh:
        source = fh.read()
    code: CodeType = compile(source, origin, "exec", dont_inherit=True)
    return is_package, origin, marshal.dumps(code)


def build_pack(path: str = PACK_FILE) -> int:
    """Write the pack of :func:`modules_to_pack` to ``path``; returns how many it holds.

    Deterministic for the same image: names in order, code compiled like ``compileall``
    (run it with a fixed ``PYTHONHASHSEED``, as the image template does)."""
    modules: dict[str, tuple[bool, str, bytes]] = {}
    imported, absent = modules_to_pack()
    for name, origin, is_package in sorted(imported):
        entry = compile_module(name, origin, is_package)
        if entry is not None:
            modules[name] = entry
    data = marshal.dumps(
        {
            "format": FORMAT,
            "magic": bytecode_magic(),
            "modules": modules,
            "absent": sorted(absent),
        }
    )
    partial = path + ".partial"
    with open(partial, "wb") as fh:
        fh.write(data)
    os.replace(partial, path)
    return len(modules)

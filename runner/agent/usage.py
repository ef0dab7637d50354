"""Check what the evaluation uses against the image's digest table, while it runs.

The ``used`` mode of rootfs verification (see ``docs/design-decisions.md``): the digest
table baked into evalrun-built images (:data:`~runner.agent.rootfs.TABLE_PATH`) must
hash to the locked rootfs digest; then every file the agent and the evaluation use —
the interpreter, the agent's and the evaluation's modules, files opened, programs
started, libraries mapped — must match its line in the table. Files are hashed on one
thread as the evaluation's audit hooks (:mod:`runner.agent.trace_hook`) report them, so
most of the work overlaps the evaluation. The ``full`` mode hashes the whole rootfs in
the background instead, also while the evaluation runs.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import stat
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypedDict

from runner.agent.module_pack import bytecode_magic
from runner.agent.rootfs import is_excluded, rootfs_digest
from runner.agent.trace_hook import loaded_file
from runner.shared.inputs import MAP_FROM, hash_mapped
from runner.shared.rootfs_table import (
    MAX_TABLE_BYTES,
    TABLE_PATH,
    Table,
    TableEntry,
    TableIndex,
)

HOOK_SOURCE = Path(__file__).with_name("trace_hook.py")
# At most this many failures are listed in preflight.json (the count is always exact).
MAX_LISTED = 20


def read_table(path: str = TABLE_PATH) -> bytes | None:
    """The digest table's bytes, or None when the image carries none."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    with os.fdopen(fd, "rb") as fh:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        data = fh.read(MAX_TABLE_BYTES + 1)
    return data if len(data) <= MAX_TABLE_BYTES else None


class Lookup:
    """What the checks of one run learn about the filesystem, shared by all of them.

    The evaluation's few hundred files share a few dozen folders and links, and some are
    reached by several names (``/usr/bin/python3`` and ``python3.11``): each folder is
    resolved once, each link read once and each file hashed once, instead of once per path
    (a ``lstat`` per path component, under gVisor's file proxy, on the run's one CPU).
    Safe to share between threads: each cache entry is a pure function of the filesystem,
    at worst computed twice.
    """

    def __init__(self) -> None:
        self._real: dict[str, str] = {"/": "/"}
        self._links: dict[str, str | None] = {}
        self._files: dict[str, str | None] = {}
        self._heads: dict[str, bytes] = {}
        self.regular: set[str] = set()  # real paths of the regular files examined
        self.hashed_bytes = 0  # of the files read to hash them

    def link(self, path: str) -> str | None:
        """The target of ``path`` when it is a symbolic link, else None (also when missing)."""
        try:
            return self._links[path]
        except KeyError:
            pass
        try:
            target = os.readlink(path) if stat.S_ISLNK(os.lstat(path).st_mode) else None
        except OSError:
            target = None
        self._links[path] = target
        return target

    def realpath(self, path: str) -> str:
        """``os.path.realpath(path)`` for an absolute ``path``, each prefix resolved once."""
        try:
            return self._resolve(path, 0)
        except RecursionError:
            return os.path.realpath(path)

    def _resolve(self, path: str, hops: int) -> str:
        hit = self._real.get(path)
        if hit is not None:
            return hit
        parent, name = path.rsplit("/", 1)
        base = self._resolve(parent or "/", hops)
        if name in ("", "."):
            real = base
        elif name == "..":
            real = base.rsplit("/", 1)[0] or "/"
        else:
            here = f"{base.rstrip('/')}/{name}"
            target = self.link(here)
            if target is None:
                real = here
            elif hops >= 40:
                raise RecursionError(path)  # a loop: os.path.realpath says what is left
            else:
                start = target if target.startswith("/") else f"{base.rstrip('/')}/{target}"
                real = self._resolve(start.rstrip("/") or "/", hops + 1)
        self._real[path] = real
        return real

    def file_check(self, real: str, entry: TableEntry | None) -> str | None:
        """Why the file at real path ``real`` does not match ``entry`` (None: it does)."""
        if real in self._files:
            return self._files[real]
        reason, head, regular = _check_file(real, entry)
        self._files[real] = reason
        if head is not None:
            self._heads[real] = head
            self.hashed_bytes += entry.size if entry is not None else 0
        if regular:
            self.regular.add(real)
        return reason

    def head(self, real: str) -> bytes | None:
        """The first 16 bytes of the file at real path ``real`` (a bytecode file's header),
        as read when it was hashed against the table; None when it was not (a runtime path
        such as ``/tmp``, which is never opened here: it could be a FIFO)."""
        return self._heads.get(real)


def check_path(path: str, table: Table, lookup: Lookup | None = None) -> str | None:
    """Why ``path`` (absolute) does not match the table, or None when it does.

    A path outside the image (runtime mounts, ``/tmp``) or one that does not exist was
    not read from the image and needs nothing; a path that resolves from the image into
    a runtime path, or an existing file the table does not list, does not match.
    """
    lookup = lookup or Lookup()
    path = os.path.normpath(path)
    if is_excluded(path):
        return None
    real = lookup.realpath(path)
    if is_excluded(real):
        if os.path.lexists(real):
            return f"{path}: resolves to {real}, outside the image"
        return None
    if real != path:
        # each link on the way is part of what was used
        reason = _check_links(path, table, lookup)
        if reason:
            return reason
    return lookup.file_check(real, table.get(real))


def check_used(path: str, table: Table, lookup: Lookup) -> str | None:
    """:func:`check_path`, and for a module's bytecode also its source when the interpreter
    compiled that instead (:func:`source_read_for`)."""
    reason = check_path(path, table, lookup)
    if reason is None and path.endswith(".pyc"):
        real = lookup.realpath(os.path.normpath(path))
        head = lookup.head(real)
        source = source_read_for(real, head) if head is not None else None
        if source is not None:
            reason = check_path(source, table, lookup)
    return reason


# A bytecode file's header: magic, flags, then the source's mtime and size, or its hash.
_HEAD = 16


def source_read_for(pyc: str, head: bytes) -> str | None:
    """The source file an import read instead of (or besides) the bytecode ``pyc`` whose
    first bytes are ``head``; None when only the bytecode was read.

    That is the import system's rule for ``__pycache__`` files: bytecode of another
    interpreter, a timestamp or size that no longer matches the source, or a *checked*
    hash means the source is read; a matching timestamp or an unchecked hash means it is
    not (it is then only stat-ed, and a changed source would have been read and reported).
    """
    folder, name = os.path.split(pyc)
    if os.path.basename(folder) != "__pycache__":
        return None
    source = os.path.join(os.path.dirname(folder), name.split(".", 1)[0] + ".py")
    try:
        st = os.stat(source)
    except OSError:
        return None  # no source: the bytecode is all an import can have read
    if len(head) < _HEAD or head[:4] != bytecode_magic():
        return source
    flags = int.from_bytes(head[4:8], "little")
    if flags & 0b01:  # hash-based: a checked one reads the source to hash it
        return source if flags & 0b10 else None
    recorded = (int.from_bytes(head[8:12], "little"), int.from_bytes(head[12:16], "little"))
    return None if recorded == (int(st.st_mtime) & 0xFFFFFFFF, st.st_size & 0xFFFFFFFF) else source


# A file the table lists as regular is opened without following a link or blocking (a FIFO
# in its place), and then examined through its descriptor.
_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC


def _check_file(real: str, entry: TableEntry | None) -> tuple[str | None, bytes | None, bool]:
    """Why the file at ``real`` does not match ``entry`` (None: it does), the first bytes
    of it when it was read to hash it, and whether it is a regular file.

    Four system calls for a regular file (open, fstat, read, close) where ``open()`` and
    a ``lstat`` first took eight: under gVisor's ptrace platform each costs ~80 µs, on
    the evaluation's CPU, and a run checks a few hundred files."""
    fd = -1
    if entry is not None and entry.kind == "f":
        with contextlib.suppress(OSError):  # a link, unreadable, missing: lstat says which
            fd = os.open(real, _READ_FLAGS)
    try:
        try:
            st = os.fstat(fd) if fd >= 0 else os.lstat(real)
        except FileNotFoundError:
            missing = f"{real}: missing, the image has it" if entry and entry.kind == "f" else None
            return missing, None, False
        except OSError as exc:
            return f"{real}: cannot be read ({exc.strerror})", None, False
        regular = stat.S_ISREG(st.st_mode)
        if entry is None:
            return f"{real}: not in the image's digest table", None, regular
        owner = f"{st.st_uid}:{st.st_gid}"
        mode = f"{stat.S_IMODE(st.st_mode):04o}"
        if entry.kind == "d":
            return (None if stat.S_ISDIR(st.st_mode) else f"{real}: not a directory"), None, regular
        if entry.kind != "f" or not regular:
            return f"{real}: expected a {entry.kind} entry, found another type", None, regular
        if (mode, owner, st.st_size) != (entry.mode, entry.owner, entry.size):
            found = f"found {mode} {owner} {st.st_size}"
            expected = f"expected mode {entry.mode} owner {entry.owner} size {entry.size}"
            return f"{real}: {expected}, {found}", None, True
        if fd < 0:
            return f"{real}: expected sha256 {entry.sha256}, found unreadable", None, True
        found, head = _sha256_and_head(fd, st.st_size)
        if found != entry.sha256:
            return f"{real}: expected sha256 {entry.sha256}, found {found}", head, True
        return None, head, True
    finally:
        if fd >= 0:
            os.close(fd)


_BUFFERS = threading.local()


def _buffer() -> memoryview:
    """This thread's read buffer (1 MiB), made once: a fresh ``bytes`` per read is fresh
    memory, and under gVisor each new page of it is a fault the sandbox handles (the files
    a run checks are mostly under 1 MiB: reading into one buffer took the digits run's
    ~500 files from 0.21-0.28 s to 0.15-0.17 s, cold, on its one CPU)."""
    view: memoryview | None = getattr(_BUFFERS, "view", None)
    if view is None:
        view = _BUFFERS.view = memoryview(bytearray(1 << 20))
    return view


def _sha256_and_head(fd: int, size: int) -> tuple[str, bytes]:
    """The sha256 of the ``size`` bytes the open file ``fd`` has (fstat said so; a file
    that is shorter now hashes to something else), and its first bytes. A large file is
    hashed from a mapping (:func:`runner.shared.inputs.hash_mapped`)."""
    if size >= MAP_FROM and (mapped := hash_mapped(fd, size)) is not None:
        return mapped
    digest = hashlib.sha256()
    buffer = _buffer()
    head = b""
    left = size
    while left > 0:
        count = os.readv(fd, [buffer[: min(left, len(buffer))]])
        if not count:
            break
        if not head:
            head = bytes(buffer[: min(count, _HEAD)])
        digest.update(buffer[:count])
        left -= count
    return digest.hexdigest(), head


def _check_links(path: str, table: Table, lookup: Lookup) -> str | None:
    """Each link met on the way from ``path`` to its file must be the table's link."""
    pending = path
    for _ in range(40):
        parts = pending.strip("/").split("/")
        current = ""
        for index, part in enumerate(parts):
            current = f"{current}/{part}"
            if is_excluded(current):
                return None
            target = lookup.link(current)
            if target is None:
                continue
            entry = table.get(current)
            if entry is None or entry.kind != "l" or entry.target != target:
                want = entry.target if entry and entry.kind == "l" else "no link"
                return f"{current}: expected link to {want}, found link to {target}"
            base = os.path.join(os.path.dirname(current), target)
            pending = os.path.normpath(os.path.join(base, *parts[index + 1 :]))
            break
        else:
            return None
    return f"{path}: too many links"


def agent_paths() -> list[str]:
    """What the agent itself runs on: interpreter, the file each imported module was loaded
    from (its bytecode when it has some: :func:`check_used` adds a source it was compiled
    from), mapped files."""
    paths = [sys.executable]
    for module in list(sys.modules.values()):
        name = loaded_file(module)
        if name is not None:
            paths.append(os.path.abspath(name))
    paths += mapped_files("/proc/self/maps")
    return paths


def mapped_files(maps: str) -> list[str]:
    """The files mapped into a process, from its ``/proc/<pid>/maps``."""
    out: list[str] = []
    with contextlib.suppress(OSError), open(maps, encoding="utf-8", errors="surrogateescape") as fh:
        for line in fh:
            parts = line.rstrip("\n").split(None, 5)
            if len(parts) == 6 and parts[5].startswith("/"):
                out.append(parts[5].removesuffix(" (deleted)"))
    return out


class UsageVerifier:
    """Checks used files against the table as they are reported, on one thread.

    One: the files are small and many, so checking them is system calls more than
    hashing, and under gVisor's ptrace platform several threads doing that on the
    evaluation's CPUs take longer than one (the agent's 194 files in the digits image under
    one CPU: 0.24 s on one thread, 0.43 s and twice the CPU time on four).
    """

    def __init__(self, table: Table | bytes, trace_dir: Path) -> None:
        # the table's bytes are indexed on the thread (:meth:`start`), not on the
        # evaluation's way to its start
        self._table_bytes = table if isinstance(table, bytes) else None
        self.table: Table = {} if isinstance(table, bytes) else table
        self.table_error: str | None = None
        self.trace_dir = trace_dir
        self._lookup = Lookup()
        self._seen: set[str] = set()
        self._pending: list[str] = []
        self._failures: list[str] = []
        self._offsets: dict[str, int] = {}
        self._stop = threading.Event()
        self._cancelled = False
        self._thread: threading.Thread | None = None
        self.traced_processes = 0
        self._cpu_s = 0.0  # the checks' CPU time, on the thread and in finish()

    def submit(self, paths: list[str]) -> None:
        """Queue ``paths`` for checking; only before :meth:`start` (the thread queues the
        rest) or as part of :meth:`finish`."""
        for path in paths:
            if path not in self._seen:
                self._seen.add(path)
                self._pending.append(path)

    def start(self, first: Callable[[], list[str]] | None = None) -> None:
        """Follow the trace folder and check what it names in the background until
        :meth:`finish`; the thread first parses the table and queues the paths ``first``
        gives (the agent's own files: listing them costs the evaluation's start ~10 ms)."""
        self._thread = threading.Thread(target=self._follow, args=(first,), daemon=True)
        self._thread.start()

    def _follow(self, first: Callable[[], list[str]] | None) -> None:
        t0 = time.thread_time()
        try:
            self._load_table()
            if first is not None:
                self.submit(first())
            self._check_pending()
            while not self._stop.wait(0.05):
                self._poll(live=True)
                self._check_pending()
        finally:
            self._cpu_s += time.thread_time() - t0

    def _load_table(self) -> None:
        if self._table_bytes is None:
            return
        try:
            self.table = TableIndex(self._table_bytes)
        except ValueError as exc:  # nothing can be checked against it: the run fails
            self.table_error = f"the image's digest table cannot be read: {exc}"
            self._failures.append(self.table_error)
        self._table_bytes = None

    def _check_pending(self) -> None:
        if self.table_error is not None:
            self._pending.clear()
            return
        while self._pending and not self._cancelled:
            path = self._pending.pop()
            try:
                reason = check_used(path, self.table, self._lookup)
            except Exception as exc:  # a check that cannot be made is a failed one
                reason = f"{path}: cannot be checked ({exc!r})"
            if reason:
                self._failures.append(reason)

    def _poll(self, live: bool = False) -> None:
        """Queue what the trace files name since the last look; while the evaluation runs
        (``live``), also what each traced process has mapped so far (``/proc/<pid>/maps``:
        extension modules and the libraries they load, which no ``open`` reports). Each
        process lists its mappings at exit too; read now, the largest files of a run
        (numpy's are 43 MB) are hashed while it runs, not after it."""
        try:
            names = sorted(os.listdir(self.trace_dir))
        except OSError:
            names = []
        for name in names:
            if not name.endswith(".paths"):
                continue
            pid = name.removesuffix(".paths")
            if live and pid.isdigit():
                self.submit(mapped_files(f"/proc/{pid}/maps"))
            path = self.trace_dir / name
            offset = self._offsets.get(name, 0)
            with contextlib.suppress(OSError), path.open("rb") as fh:
                fh.seek(offset)
                data = fh.read()
                complete = data[: data.rfind(b"\0") + 1]  # each path ends in a NUL
                self._offsets[name] = offset + len(complete)
                self.submit([os.fsdecode(path) for path in complete.split(b"\0") if path])
        self.traced_processes = len(self._offsets)

    def stop(self) -> None:
        """Stop following, and checking, without a verdict."""
        self._cancelled = True
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def finish(self, more: list[str] | None = None) -> UsageRecord:
        """Stop following; check what is left, with ``more`` paths, and say what was
        checked and what failed."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        t0 = time.thread_time()
        self._poll()
        self.submit(more or [])
        self._check_pending()
        self._cpu_s += time.thread_time() - t0
        failures = sorted(self._failures)
        return {
            "files_reported": len(self._seen),
            "files_verified": len(self._lookup.regular),
            "bytes_hashed": self._lookup.hashed_bytes,
            "check_cpu_s": round(self._cpu_s, 4),
            "traced_processes": self.traced_processes,
            "failures": failures[:MAX_LISTED],
            "failure_count": len(failures),
        }


class UsageRecord(TypedDict):
    """What :meth:`UsageVerifier.finish` found (the rootfs record's usage keys)."""

    files_reported: int
    files_verified: int
    bytes_hashed: int
    check_cpu_s: float
    traced_processes: int
    failures: list[str]
    failure_count: int


class FullCheck:
    """The whole-rootfs digest, computed in the background on all cores."""

    def __init__(self) -> None:
        self._result: tuple[str, int] | None = None
        self._error: BaseException | None = None
        self._t0 = time.monotonic()
        self.duration_s = 0.0
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> FullCheck:
        self._thread.start()
        return self

    def _run(self) -> None:
        try:
            self._result = rootfs_digest("/")
        except BaseException as exc:  # reported as a failed check, never lost
            self._error = exc
        self.duration_s = round(time.monotonic() - self._t0, 4)

    def finish(self) -> tuple[str, int]:
        self._thread.join()
        if self._result is None:
            raise RuntimeError(f"full rootfs check failed: {self._error!r}")
        return self._result


def install_trace_hook(trace_dir: Path) -> Path:
    """Put the hook, as ``sitecustomize.py``, in a folder for the evaluation's PYTHONPATH."""
    hook_dir = trace_dir / "hook"
    hook_dir.mkdir(parents=True, exist_ok=True)
    (hook_dir / "sitecustomize.py").write_bytes(HOOK_SOURCE.read_bytes())
    return hook_dir


__all__ = [
    "FullCheck",
    "Lookup",
    "UsageVerifier",
    "agent_paths",
    "check_path",
    "check_used",
    "install_trace_hook",
    "mapped_files",
    "read_table",
    "source_read_for",
]

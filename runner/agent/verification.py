"""Rootfs verification of one run: what the agent checks in the image, how, and when.

``used`` (the default of plans that ask for it): the image's digest table must hash to
the locked rootfs digest before the evaluation starts; the files the agent and the
evaluation use are checked against it while the evaluation runs, and finished after it.
``full`` (``--verify-rootfs full``, and plans that say nothing: what older runners
expect): every file of the image is hashed in the background, on all cores, while the
evaluation runs. In both, results are accepted only once the check has passed; an
image without a table is checked in full.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Literal, Required, TypedDict

from runner.agent.module_pack import installed
from runner.agent.usage import FullCheck, UsageVerifier, agent_paths, install_trace_hook, read_table
from runner.shared.agent_plan import AgentPlan
from runner.shared.rootfs_table import TABLE_PATH, table_digest

Mode = Literal["used", "full"]


class RootfsRecord(TypedDict, total=False):
    """The preflight's ``rootfs`` record: what was asked, how it was checked, and the verdict."""

    requested: Required[Mode]
    expected: Required[str]
    note: str
    mode: Mode
    how: str
    table: str
    table_digest: str
    module_pack: str  # the file the agent's modules were loaded from, when it had one
    found: str
    passed: bool
    reason: str
    entries: int
    files_reported: int
    files_verified: int
    bytes_hashed: int  # of the files used (``used`` mode)
    check_cpu_s: float  # the CPU time the check of the files used took, in the sandbox
    traced_processes: int
    failures: list[str]
    failure_count: int  # the seven keys before come from UsageVerifier.finish
    duration_s: float


def _private_dir(prefix: str) -> Path:
    """A new folder only this user can use, in ``$TMPDIR`` or ``/tmp``: what
    ``tempfile.mkdtemp`` makes, without the modules ``tempfile`` loads (``random``, and
    with it four more), which cost the agent ~5 ms each under gVisor."""
    base = os.environ.get("TMPDIR") or "/tmp"
    for _ in range(100):
        path = os.path.join(base, prefix + os.urandom(8).hex())
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            continue
        return Path(path)
    raise FileExistsError(f"no free name for {prefix}* in {base}")


def _program(name: str) -> str:
    """The file ``name`` runs, found on ``$PATH`` as ``shutil.which`` finds it."""
    if os.sep not in name:
        for folder in os.environ.get("PATH", os.defpath).split(os.pathsep):
            candidate = os.path.join(folder or os.curdir, name)
            if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
                return os.path.abspath(candidate)
    return os.path.abspath(name)


def _remove_tree(path: str, depth: int = 0) -> None:
    """``shutil.rmtree(path, ignore_errors=True)`` for the trace folder: no link is
    followed, and what is deeper than 32 levels (the evaluation can write there) is left
    in the sandbox's ``/tmp``. ``shutil`` itself would load six more modules."""
    with contextlib.suppress(OSError):
        with os.scandir(path) as entries:
            for entry in list(entries):
                if entry.is_dir(follow_symlinks=False) and depth < 32:
                    _remove_tree(entry.path, depth + 1)
                else:
                    with contextlib.suppress(OSError):
                        os.unlink(entry.path)
        os.rmdir(path)


class ImageTable:
    """The image's digest table as read and hashed, where ``used`` checks begin; None for
    both when the image carries none. Read before the plan by an agent whose sandbox was
    started ahead of it (the image's files are the same before and after). A plain class:
    ``dataclasses`` would load ``inspect``, ~10 ms of every agent's start under gVisor."""

    __slots__ = ("data", "digest")

    def __init__(self, data: bytes | None, digest: str | None) -> None:
        self.data, self.digest = data, digest

    @classmethod
    def read(cls) -> ImageTable:
        data = read_table()
        if data is None:
            return cls(None, None)
        return cls(data, table_digest(data.splitlines(keepends=True)))


def _start_usage(table_bytes: bytes, first: Callable[[], list[str]]) -> tuple[Path, UsageVerifier]:
    """A new trace folder with the trace hook in it, and the checking thread started on it
    (the table parsed, then ``first`` listed and checked, on the thread)."""
    trace_dir = _private_dir("evalrun-trace-")
    install_trace_hook(trace_dir)
    usage = UsageVerifier(table_bytes, trace_dir)
    usage.start(first=first)
    return trace_dir, usage


class EarlyCheck:
    """A ``used`` check begun before the plan, by an agent whose sandbox was started ahead
    of it: the table read and hashed, and on the checking thread its lines parsed and the
    agent's own files (interpreter, modules, libraries: ~200 files, the check's largest
    part before the evaluation reports any) checked against it. The plan then says whether
    the table is the locked one and the check goes on (:meth:`RootfsVerification.begin`),
    or it is dropped (:meth:`cancel`)."""

    def __init__(self) -> None:
        self.table = ImageTable.read()
        self.trace_dir: Path | None = None
        self.usage: UsageVerifier | None = None
        if self.table.data is not None:
            self.trace_dir, self.usage = _start_usage(self.table.data, agent_paths)

    def cancel(self) -> None:
        """Stop the check begun (the plan asks for another, or the table is not the
        locked one) and remove its trace folder."""
        if self.usage is not None:
            self.usage.stop()
            self.usage = None
        if self.trace_dir is not None:
            _remove_tree(str(self.trace_dir))
            self.trace_dir = None


class RootfsVerification:
    """Begun before the evaluation (:meth:`begin`), finished after it (:meth:`finish`)."""

    def __init__(self, plan: AgentPlan, early: EarlyCheck | None = None) -> None:
        self.requested: Mode = plan.get("verify_rootfs", "full")
        self.expected = plan["expected_rootfs_digest"]
        self.command = plan["command"]
        self.record: RootfsRecord = {"requested": self.requested, "expected": self.expected}
        self._t0 = time.monotonic()
        self._usage: UsageVerifier | None = None
        self._full: FullCheck | None = None
        self._trace_dir: Path | None = None
        self._early = early
        self._later: list[str] = []  # checked at the end: the program, on an early check

    def begin(self) -> RootfsRecord:
        """Start the check; the record says ``passed: False`` already when the table is wrong."""
        early, self._early = self._early, None
        table = ImageTable(None, None)
        if self.requested == "used":
            table = early.table if early is not None else ImageTable.read()
        if early is not None and (self.requested != "used" or table.digest != self.expected):
            early.cancel()  # a check the plan does not ask for, or against another table
            early = None
        table_bytes, found = table.data, table.digest
        if self.requested == "used" and table_bytes is None:
            self.record["note"] = f"the image carries no digest table ({TABLE_PATH}): full check"
        if table_bytes is None or found is None:
            self.record["mode"] = "full"
            self.record["how"] = "every file of the image hashed while the evaluation runs"
            self._full = FullCheck().start()
            return self.record
        self.record["mode"] = "used"
        self.record["how"] = (
            "the digest table hashed and compared with the locked digest; every file the "
            "agent and the evaluation used (interpreter, modules, files opened, programs, "
            "mapped libraries) hashed and compared with its table line"
        )
        self.record["table"] = TABLE_PATH
        self.record["table_digest"] = found
        self.record["found"] = found
        if found != self.expected:
            self.record["passed"] = False
            self.record["reason"] = "the image's digest table does not match"
            return self.record
        self.record["entries"] = table_bytes.count(b"\n")  # a line per entry
        pack = installed()
        if pack is not None:  # checked as one of the agent's files, like any module file
            self.record["module_pack"] = pack.path
        program = self.command[0]
        if early is not None and early.usage is not None and early.trace_dir is not None:
            self._trace_dir, self._usage = early.trace_dir, early.usage
            self._later.append(_program(program))
            return self.record
        # the table is parsed, and the agent's own files listed, on the checking thread
        self._trace_dir, self._usage = _start_usage(
            table_bytes, lambda: [*agent_paths(), _program(program)]
        )
        return self.record

    @property
    def failed_early(self) -> bool:
        return self.record.get("passed") is False

    def child_env(self) -> dict[str, str]:
        """What the evaluation's environment gains: the trace hook (``used`` mode only)."""
        if self._trace_dir is None:
            return {}
        return {
            "PYTHONPATH": str(self._trace_dir / "hook"),
            "EVALRUN_TRACE_DIR": str(self._trace_dir),
        }

    def finish(self) -> RootfsRecord:
        """Wait for the check; the record gains ``passed`` and what was checked."""
        if self.failed_early:
            return self.record
        if self._usage is not None:
            # what the agent imported since the start (metrics, results framing) is used too
            usage = self._usage.finish([*agent_paths(), *self._later])
            self.record["files_reported"] = usage["files_reported"]
            self.record["files_verified"] = usage["files_verified"]
            self.record["bytes_hashed"] = usage["bytes_hashed"]
            self.record["check_cpu_s"] = usage["check_cpu_s"]
            self.record["traced_processes"] = usage["traced_processes"]
            self.record["failures"] = usage["failures"]
            self.record["failure_count"] = usage["failure_count"]
            self.record["passed"] = usage["failure_count"] == 0
            if self._usage.table_error is not None:
                self.record["reason"] = self._usage.table_error
            elif usage["failures"]:
                self.record["reason"] = (
                    "a file the evaluation used differs from the image: " + (usage["failures"][0])
                )
            if usage["traced_processes"] == 0 and self.record["passed"]:
                # nothing reported what it used (not Python, or the hook bypassed): check all
                self.record["note"] = "no evaluation process reported what it used: full check"
                self.record["mode"] = "full"
                self._full = FullCheck().start()
        if self._full is not None:
            try:
                found, entries = self._full.finish()
            except RuntimeError as exc:
                found, entries = f"unreadable: {exc}", 0
            self.record["found"] = found
            self.record["entries"] = entries
            self.record["files_verified"] = entries
            self.record["passed"] = found == self.expected and self.record.get("passed", True)
            if found != self.expected:
                self.record["reason"] = "rootfs digest mismatch"
        if self._trace_dir is not None:
            _remove_tree(str(self._trace_dir))
        self.record["duration_s"] = round(time.monotonic() - self._t0, 4)
        return self.record

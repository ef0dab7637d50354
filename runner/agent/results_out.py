"""What the agent hands back: the results directory as a deterministic tar, and the results
frame written to the container log (``emit-results``)."""

from __future__ import annotations

import contextlib
import io
import os
import stat
import sys
from pathlib import Path
from typing import IO, Any

from runner.agent.hold import emit_stream, is_holding
from runner.shared.agent_plan import AgentPlan
from runner.shared.protocol import (
    MAX_RESULT_FILE_BYTES,
    MAX_RESULT_FILES,
    NOT_HOLDING_EXIT,
    encode_frame,
)
from runner.shared.tarformat import MAX_DEPTH, file_header, member_name_reason


def prepare(plan: AgentPlan) -> None:
    """Import now what handing ``plan``'s results back will use (a tar frame, the hold
    socket), so that the used-files check, which ends before, covers it too.

    A run that neither frames nor holds its results (Docker reads the results folder)
    never loads these modules: under gVisor each costs the agent ~5 ms to import and
    ~2 ms to check, on the evaluation's CPU."""
    if plan["emit_results"] or plan.get("collect") == "exec":
        import tarfile  # noqa: F401
    if plan.get("collect") == "exec":
        import socket  # noqa: F401


def results_tar(results: Path, notes: IO[str] | None = None) -> bytes:
    """The results directory as one tar the runner's strict reader accepts.

    Regular files only, walked without following links, each with the shared
    deterministic header; a link, a special file, a name the reader would refuse,
    a file over :data:`MAX_RESULT_FILE_BYTES` or beyond :data:`MAX_RESULT_FILES`
    is left out, with one line on ``notes`` (stderr) saying so.
    """
    buf = io.BytesIO()
    write_results_tar(results, buf, notes)
    return buf.getvalue()


def write_results_tar(results: Path, fileobj: Any, notes: IO[str] | None = None) -> None:
    """:func:`results_tar`, written as it is made to ``fileobj`` (anything with ``write``)."""
    import tarfile

    notes = notes or sys.stderr
    count = 0
    # Stream mode: the tar is written as it is made, never held whole in memory.
    with tarfile.open(fileobj=fileobj, mode="w|", format=tarfile.PAX_FORMAT) as tar:
        for rel, path in _result_files(results, "", notes):
            reason = member_name_reason(rel, portable=False)
            if reason is None and count >= MAX_RESULT_FILES:
                reason = f"more than {MAX_RESULT_FILES} result files"
            if reason:
                print(f"agent: results entry {rel!r} not framed: {reason}", file=notes)
                continue
            try:
                fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
            except OSError as exc:
                print(f"agent: results entry {rel!r} not framed: {exc.strerror}", file=notes)
                continue
            with os.fdopen(fd, "rb") as fh:
                st = os.fstat(fd)
                if not stat.S_ISREG(st.st_mode) or st.st_size > MAX_RESULT_FILE_BYTES:
                    print(
                        f"agent: results entry {rel!r} not framed: not a regular file "
                        f"of at most {MAX_RESULT_FILE_BYTES} bytes",
                        file=notes,
                    )
                    continue
                tar.addfile(file_header(rel, st.st_size), fh)
                count += 1


def _result_files(
    folder: Path, prefix: str, notes: IO[str], depth: int = 0
) -> list[tuple[str, Path]]:
    """(relative name, path) of the regular files under ``folder``, in path order; no links."""
    out: list[tuple[str, Path]] = []
    with os.scandir(folder) as it:
        entries = sorted(it, key=lambda e: e.name)
    for entry in entries:
        rel = prefix + entry.name
        if entry.is_symlink():
            print(f"agent: results entry {rel!r} not framed: a symlink", file=notes)
        elif entry.is_dir(follow_symlinks=False):
            if depth >= MAX_DEPTH:
                print(f"agent: results entry {rel!r} not framed: too deep", file=notes)
            else:
                out += _result_files(Path(entry.path), rel + "/", notes, depth + 1)
        elif entry.is_file(follow_symlinks=False):
            out.append((rel, Path(entry.path)))
        else:
            print(f"agent: results entry {rel!r} not framed: not a regular file", file=notes)
    return out


def emit_results(results: Path, out: IO[str] | None = None) -> None:
    """Write the results directory to stdout as one framed, checksummed tar (base64).

    Used where the runner cannot read the results volume (Kubernetes): the frame
    travels on the log stream; the runner checks the checksum and every member.
    """
    stream = out or sys.stdout
    stream.write(encode_frame(results_tar(results)))
    stream.flush()


LOG_FRAME_MAX_BYTES = 4 << 20


def _tree_size(root: Path) -> int:
    """Bytes of the regular files under ``root`` (links not followed)."""
    total = 0
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            with contextlib.suppress(OSError):
                st = (Path(dirpath) / name).lstat()
                if stat.S_ISREG(st.st_mode):
                    total += st.st_size
    return total


def _emit_held(results: Path) -> int:
    """``emit-results``: only while the agent holds, so the results are final."""
    if not is_holding():
        print(
            "agent: no agent holds finished results here (still running, or already acknowledged)",
            file=sys.stderr,
        )
        return NOT_HOLDING_EXIT
    emit_stream(results, write_results_tar, sys.stdout.buffer)
    return 0

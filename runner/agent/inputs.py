"""Preflight of the inputs: every file checked against the plan before the evaluation starts.

A file input must hash to its sha256. A directory input must hold exactly the files
the plan lists (no file missing, none extra, no link or special file), each with its
size and sha256; the plan's list must give the pinned tree digest. Files are read
streaming (1 MiB at a time, never mapped) by a few threads, so multi-GiB shards cost
memory only for the read buffers. What is wrong is named file by file.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Literal, NotRequired, TypedDict

from runner.shared.agent_plan import AgentPlanFile, AgentPlanInput
from runner.shared.inputs import MAP_FROM, hash_fd, hash_mapped, tree_digest_of
from runner.shared.tarformat import MAX_DEPTH

MAX_PROBLEMS = 20
"""Problems listed per input (the count says how many there were)."""


class InputCheck(TypedDict):
    """The preflight record of one input; ``found`` and ``passed`` are set before it is returned."""

    name: str
    role: Literal["model", "dataset"]
    kind: NotRequired[Literal["directory"]]
    expected: str
    files: NotRequired[int]
    bytes: NotRequired[int]
    found: NotRequired[str]
    passed: NotRequired[bool]
    problems: NotRequired[list[str]]
    problem_count: NotRequired[int]


_OPEN_FILE = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK


def hash_workers() -> int:
    """Files hashed at once: the CPUs this process may use, between 1 and 8."""
    try:
        usable = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        usable = os.cpu_count() or 1
    return max(1, min(8, usable))


def _hash_regular(path: Path) -> tuple[str, int] | str:
    """(sha256, size) of the regular file at ``path`` (not followed), or why it cannot be read."""
    try:
        fd = os.open(path, _OPEN_FILE)
    except OSError as exc:
        return exc.strerror or "cannot open"
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return "not a regular file"
        if st.st_size >= MAP_FROM and (mapped := hash_mapped(fd, st.st_size)) is not None:
            return mapped[0], st.st_size
        return hash_fd(fd)
    except OSError as exc:
        return exc.strerror or "cannot read"
    finally:
        os.close(fd)


def check_input(item: AgentPlanInput, *, workers: int | None = None) -> InputCheck:
    """The preflight record of one input: expected and found digest, passed, problems."""
    if item.get("kind", "file") == "directory":
        return _check_directory(item, workers or hash_workers())
    path = Path(item["path"])
    found: str
    problems: list[str] = []
    if not path.exists() and not path.is_symlink():
        found = "missing"
        problems.append(f"missing file {path.name}")
    else:
        hashed = _hash_regular(path)
        if isinstance(hashed, str):
            found = "unreadable"
            problems.append(f"{path.name}: {hashed}")
        else:
            found = hashed[0]
            if found != item["sha256"]:
                problems.append(f"changed file {path.name} (sha256 {found[:16]}…)")
    record: InputCheck = {
        "name": item["name"],
        "role": item["role"],
        "expected": item["sha256"],
        "found": found,
        "passed": not problems,
    }
    if problems:
        record["problems"] = problems
    return record


def _walk(root: Path) -> tuple[dict[str, Path], list[str]]:
    """Regular files under ``root`` by relative path, and every entry that is not one."""
    files: dict[str, Path] = {}
    odd: list[str] = []

    def visit(folder: Path, prefix: str, depth: int) -> None:
        with os.scandir(folder) as entries:
            listed = sorted(entries, key=lambda e: e.name)
        for entry in listed:
            rel = prefix + entry.name
            if entry.is_symlink():
                odd.append(f"unexpected symbolic link {rel}")
            elif entry.is_dir(follow_symlinks=False):
                if depth >= MAX_DEPTH:
                    odd.append(f"directory {rel} nested deeper than {MAX_DEPTH} levels")
                else:
                    visit(Path(entry.path), rel + "/", depth + 1)
            elif entry.is_file(follow_symlinks=False):
                files[rel] = Path(entry.path)
            else:
                odd.append(f"unexpected special file {rel}")

    visit(root, "", 0)
    return files, odd


def _check_directory(item: AgentPlanInput, workers: int) -> InputCheck:
    root = Path(item["path"])
    listed: list[AgentPlanFile] = item.get("files", [])
    record: InputCheck = {
        "name": item["name"],
        "role": item["role"],
        "kind": "directory",
        "expected": item["sha256"],
        "files": len(listed),
    }
    problems: list[str] = []
    planned = "sha256:" + item["sha256"]
    if tree_digest_of((f["path"], f["sha256"], f["size"]) for f in listed) != planned:
        problems.append("the plan's file list does not give the pinned tree digest")
    if not root.is_dir() or root.is_symlink():
        problems.append(f"missing directory {root}")
        return _finish(record, "missing", problems)
    try:
        present, odd = _walk(root)
    except OSError as exc:
        problems.append(f"cannot list {root}: {exc.strerror}")
        return _finish(record, "unreadable", problems)
    problems += odd
    wanted = {f["path"]: f for f in listed}
    problems += [f"missing file {rel}" for rel in sorted(wanted.keys() - present.keys())]
    problems += [f"extra file {rel}" for rel in sorted(present.keys() - wanted.keys())]
    # Largest first, so one big shard does not start last and run alone.
    order = sorted(wanted.keys() & present.keys(), key=lambda rel: -wanted[rel]["size"])
    from concurrent.futures import ThreadPoolExecutor  # only folders use it: see rootfs.py

    with ThreadPoolExecutor(max_workers=max(1, min(workers, len(order) or 1))) as pool:
        results = pool.map(lambda rel: _hash_regular(present[rel]), order)
        hashed = dict(zip(order, results, strict=True))
    found_entries: list[tuple[str, str, int]] = []
    for rel in sorted(hashed):
        want, got = wanted[rel], hashed[rel]
        if isinstance(got, str):
            problems.append(f"{rel}: {got}")
        elif got[1] != want["size"]:
            problems.append(f"changed file {rel} (size {got[1]}, expected {want['size']})")
        elif got[0] != want["sha256"]:
            problems.append(f"changed file {rel} (sha256 {got[0][:16]}…)")
        if not isinstance(got, str):
            found_entries.append((rel, got[0], got[1]))
    record["bytes"] = sum(size for _, _, size in found_entries)
    complete = not odd and wanted.keys() == present.keys() and len(found_entries) == len(wanted)
    found = tree_digest_of(found_entries).removeprefix("sha256:") if complete else "differs"
    return _finish(record, found, problems)


def _finish(record: InputCheck, found: str, problems: list[str]) -> InputCheck:
    record["found"] = found
    record["passed"] = not problems and found == record["expected"]
    if problems:
        record["problems"] = problems[:MAX_PROBLEMS]
        record["problem_count"] = len(problems)
    return record


def failure_reason(records: list[InputCheck]) -> str:
    """One line naming each input that failed and its first problems."""
    parts = []
    for rec in records:
        if rec.get("passed"):
            continue
        listed = rec.get("problems") or [f"digest {rec.get('found')}"]
        more = int(rec.get("problem_count", len(listed))) - len(listed[:3])
        text = "; ".join(listed[:3]) + (f"; and {more} more" if more > 0 else "")
        parts.append(f"{rec['role']} {rec['name']}: {text}")
    return "input digest mismatch: " + " | ".join(parts)

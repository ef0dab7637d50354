"""Collect what the container wrote, without trusting it.

The results directory was writable by the sandbox, so every entry is checked:
only regular files and directories, no links, no odd names, bounded sizes. Files
are copied with ``O_NOFOLLOW``. Then the runner recomputes every metric from the
per-sample file itself and compares it with the container's aggregate.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import json
import math
import os
import posixpath
import re
import shutil
import stat
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from runner.shared.metrics import (
    SampleFormatError,
    compute_metrics,
    perturbation_effects,
    read_samples,
    select_perturbed,
)

MAX_FILE_BYTES = 4 * 1024**3
MAX_TOTAL_BYTES = 16 * 1024**3
MAX_FILES = 10_000


@dataclass
class Collected:
    """What was copied, and every problem found on the way."""

    files: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    total_bytes: int = 0


def collect_results(src: Path, dest: Path) -> Collected:
    """Copy the regular files under ``src`` into ``dest``; refuse links and specials."""
    out = Collected()
    dest.mkdir(parents=True, exist_ok=True)
    root_fd = os.open(src, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    try:
        _walk(root_fd, "", dest, out)
    finally:
        os.close(root_fd)
    return out


def _safe_name(name: str) -> bool:
    return name not in (".", "..") and "/" not in name and "\\" not in name and name.isprintable()


def _walk(dir_fd: int, prefix: str, dest: Path, out: Collected) -> None:
    for name in sorted(os.listdir(dir_fd)):
        rel = f"{prefix}{name}"
        if not _safe_name(name):
            out.problems.append(f"results entry {rel!r}: unsafe name, not collected")
            continue
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        if stat.S_ISLNK(st.st_mode):
            out.problems.append(f"results entry {rel!r}: is a symlink, not collected")
        elif stat.S_ISDIR(st.st_mode):
            child = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=dir_fd)
            try:
                (dest / rel).mkdir(parents=True, exist_ok=True)
                _walk(child, rel + "/", dest, out)
            finally:
                os.close(child)
        elif stat.S_ISREG(st.st_mode):
            if len(out.files) >= MAX_FILES:
                out.problems.append(f"more than {MAX_FILES} result files; {rel!r} not collected")
            elif st.st_size > MAX_FILE_BYTES or out.total_bytes + st.st_size > MAX_TOTAL_BYTES:
                out.problems.append(f"results entry {rel!r}: too large ({st.st_size} bytes)")
            else:
                _copy(dir_fd, name, dest / rel)
                out.files.append(rel)
                out.total_bytes += st.st_size
        else:
            out.problems.append(f"results entry {rel!r}: not a regular file, not collected")


def _copy(dir_fd: int, name: str, target: Path) -> None:
    fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW, dir_fd=dir_fd)
    try:
        with os.fdopen(fd, "rb", closefd=False) as src, target.open("xb") as dst:
            while chunk := src.read(4 * 1024 * 1024):
                dst.write(chunk)
    finally:
        os.close(fd)


def read_json(path: Path) -> Any:
    """JSON from a collected file, or None when absent or unreadable."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _same(a: Any, b: Any) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return (
        isinstance(a, int | float)
        and isinstance(b, int | float)
        and math.isclose(float(a), float(b), rel_tol=0.0, abs_tol=1e-12)
    )


@dataclass(frozen=True)
class MetricCheck:
    metrics: list[dict[str, Any]]
    problems: list[str]
    perturbations: list[dict[str, Any]] = field(default_factory=list)


def _recompute_perturbations(
    results: Path,
    definitions: list[dict[str, Any]],
    perturbations: list[dict[str, Any]],
    samples: list[dict[str, Any]],
    reported: Any,
    seed: int,
) -> tuple[list[dict[str, Any]], list[str]]:
    """Recompute each perturbation's metrics and deltas; compare with the container's."""
    ours: list[dict[str, Any]] = []
    problems: list[str] = []
    theirs = {
        p.get("name"): p
        for p in (reported.get("perturbations") or [] if isinstance(reported, dict) else [])
        if isinstance(p, dict)
    }
    for pert in perturbations:
        try:
            if pert["kind"] in ("subsample", "slice"):
                perturbed: list[dict[str, Any]] = [
                    dict(x) for x in select_perturbed(pert, samples, seed)
                ]
            else:
                perturbed = read_samples(
                    results / "perturbations" / f"{pert['name']}.jsonl", definitions
                )
            effect = perturbation_effects(definitions, pert, samples, perturbed, seed)
        except (OSError, SampleFormatError) as exc:
            problems.append(f"perturbation {pert['name']}: outputs unusable: {exc}")
            continue
        ours.append(effect)
        other = theirs.pop(pert["name"], None)
        if other is None:
            problems.append(f"perturbation {pert['name']}: not reported by the container")
            continue
        their_metrics = {m.get("name"): m for m in other.get("metrics") or []}
        for m in effect["metrics"]:
            o = their_metrics.get(m["name"]) or {}
            for label, a, b in (
                ("value", m["value"], o.get("value")),
                ("delta", m["delta"], o.get("delta")),
                ("delta_ci.low", m["delta_ci"]["low"], (o.get("delta_ci") or {}).get("low")),
                ("delta_ci.high", m["delta_ci"]["high"], (o.get("delta_ci") or {}).get("high")),
            ):
                if not _same(a, b):
                    problems.append(
                        f"perturbation {pert['name']} metric {m['name']} {label}: container "
                        f"reported {b!r}, recomputed {a!r}"
                    )
    for extra in sorted(str(k) for k in theirs):
        problems.append(f"perturbation {extra}: reported by the container but not declared")
    return ours, problems


def recompute_metrics(
    results: Path,
    definitions: list[dict[str, Any]],
    seed: int,
    perturbations: list[dict[str, Any]] | None = None,
) -> MetricCheck:
    """Recompute every metric and CI from ``predictions.jsonl``; compare with ``metrics.json``."""
    try:
        samples = read_samples(results / "predictions.jsonl", definitions)
    except FileNotFoundError:
        return MetricCheck([], ["predictions.jsonl is missing: no per-sample outputs"])
    except (OSError, SampleFormatError) as exc:
        return MetricCheck([], [f"per-sample outputs unusable: {exc}"])
    ours = [m.as_dict() for m in compute_metrics(definitions, samples, seed)]
    reported = read_json(results / "metrics.json")
    problems: list[str] = []
    if not isinstance(reported, dict) or not isinstance(reported.get("metrics"), list):
        problems.append("metrics.json from the container is missing or malformed")
        return MetricCheck(ours, problems)
    theirs = {m.get("name"): m for m in reported["metrics"] if isinstance(m, dict)}
    for metric in ours:
        other = theirs.pop(metric["name"], None)
        if other is None:
            problems.append(f"metric {metric['name']}: not reported by the container")
            continue
        ci, oci = metric["ci"], other.get("ci") or {}
        for label, a, b in (
            ("value", metric["value"], other.get("value")),
            ("ci.low", ci["low"], oci.get("low")),
            ("ci.high", ci["high"], oci.get("high")),
        ):
            if not _same(a, b):
                problems.append(
                    f"metric {metric['name']} {label}: container reported {b!r}, "
                    f"recomputed from per-sample outputs {a!r}"
                )
    for extra in sorted(str(k) for k in theirs):
        problems.append(f"metric {extra}: reported by the container but not declared in the spec")
    effects, more = _recompute_perturbations(
        results, definitions, perturbations or [], samples, reported, seed
    )
    return MetricCheck(ours, problems + more, effects)


# --------------------------------------------------------------------------- framed results

FRAME_BEGIN_RE = re.compile(r"^-----BEGIN EVALRUN RESULTS sha256=([0-9a-f]{64}) bytes=(\d+)-----$")
FRAME_END = "-----END EVALRUN RESULTS-----"
MAX_FRAME_BYTES = 64 * 1024 * 1024


def extract_results_frame(log_text: str, dest: Path) -> Collected:
    """Find the agent's results frame in a log stream, check it, and unpack it safely.

    The frame's checksum and size are checked before the tar is opened; every member
    must be a regular file or directory with a relative, normalized, unique path;
    links, devices, absolute paths and ``..`` are refused and nothing is extracted
    from a frame with any such member.
    """
    out = Collected()
    lines = log_text.splitlines()
    begins = [i for i, line in enumerate(lines) if FRAME_BEGIN_RE.match(line.strip())]
    if not begins:
        out.problems.append("no results frame in the pod log (the agent did not finish)")
        return out
    if len(begins) > 1:
        out.problems.append(f"{len(begins)} results frames in the pod log; expected one")
        return out
    start = begins[0]
    match = FRAME_BEGIN_RE.match(lines[start].strip())
    assert match is not None
    expected_sha, size = match[1], int(match[2])
    if size > MAX_FRAME_BYTES:
        out.problems.append(f"results frame is {size} bytes; the limit is {MAX_FRAME_BYTES}")
        return out
    try:
        end = next(i for i in range(start + 1, len(lines)) if lines[i].strip() == FRAME_END)
    except StopIteration:
        out.problems.append("results frame is truncated (no end marker)")
        return out
    try:
        data = base64.b64decode("".join(x.strip() for x in lines[start + 1 : end]), validate=True)
    except (binascii.Error, ValueError):
        out.problems.append("results frame is not valid base64")
        return out
    if len(data) != size or hashlib.sha256(data).hexdigest() != expected_sha:
        out.problems.append(
            f"results frame checksum mismatch: header says sha256={expected_sha} "
            f"bytes={size}, found sha256={hashlib.sha256(data).hexdigest()} bytes={len(data)}"
        )
        return out
    try:
        tar = tarfile.open(fileobj=io.BytesIO(data), mode="r:")  # noqa: SIM115 - closed below
    except tarfile.TarError as exc:
        out.problems.append(f"results frame is not a tar archive: {exc}")
        return out
    with tar:
        members = tar.getmembers()
        seen: set[str] = set()
        for m in members:
            name = m.name
            norm = posixpath.normpath(name)
            if name.startswith("/") or norm.startswith("..") or norm != name or norm == ".":
                out.problems.append(f"results entry {name!r}: unsafe path")
            elif not (m.isfile() or m.isdir()):
                out.problems.append(f"results entry {name!r}: not a regular file")
            elif name in seen:
                out.problems.append(f"results entry {name!r}: duplicate")
            elif m.isfile() and m.size > MAX_FILE_BYTES:
                out.problems.append(f"results entry {name!r}: too large ({m.size} bytes)")
            seen.add(name)
        if len(members) > MAX_FILES:
            out.problems.append(f"more than {MAX_FILES} result entries")
        if out.problems:
            return out
        dest.mkdir(parents=True, exist_ok=True)
        for m in members:
            target = dest / m.name
            if m.isdir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            src = tar.extractfile(m)
            assert src is not None
            with target.open("xb") as fh:
                shutil.copyfileobj(src, fh, 4 * 1024 * 1024)
            out.files.append(m.name)
            out.total_bytes += m.size
    return out

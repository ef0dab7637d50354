"""Environment capture inside the container: OS, kernel, Python, packages, CPU, limits, GPU."""

from __future__ import annotations

import hashlib
import os
import platform
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Literal, TypedDict

if TYPE_CHECKING:
    from runner.agent.gpu import GpuCapture

LimitKey = Literal["memory_bytes", "cpu_max", "cpu_quota_us", "pids_max"]

# Where each cgroup limit is read, v2 first then v1; the first file found wins.
_LIMIT_FILES: tuple[tuple[LimitKey, str], ...] = (
    ("memory_bytes", "/sys/fs/cgroup/memory.max"),
    ("memory_bytes", "/sys/fs/cgroup/memory/memory.limit_in_bytes"),
    ("cpu_max", "/sys/fs/cgroup/cpu.max"),
    ("cpu_quota_us", "/sys/fs/cgroup/cpu/cpu.cfs_quota_us"),
    ("pids_max", "/sys/fs/cgroup/pids.max"),
    ("pids_max", "/sys/fs/cgroup/pids/pids.max"),
)


class CpuInfo(TypedDict):
    model: str | None
    logical_cpus: int | None
    usable_cpus: int
    machine: str


class Limits(TypedDict, total=False):
    """The cgroup limits as their files say them, and the memory /proc/meminfo reports."""

    memory_bytes: str
    cpu_max: str
    cpu_quota_us: str
    pids_max: str
    mem_total_kib: int


class Package(TypedDict):
    name: str
    version: str
    record_sha256: str


class KernelInfo(TypedDict):
    release: str
    version: str
    system: str


class PythonInfo(TypedDict):
    version: str
    implementation: str
    executable: str


class UserIds(TypedDict):
    uid: int
    gid: int


class EnvironmentCapture(TypedDict):
    """``environment.json`` as the agent writes it."""

    image_ref: str
    os: dict[str, str]
    kernel: KernelInfo
    python: PythonInfo
    packages: list[Package]
    cpu: CpuInfo
    limits: Limits
    user: UserIds
    gpu: GpuCapture


def _read(path: str) -> str | None:
    try:
        return Path(path).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None


def _os_release() -> dict[str, str]:
    text = _read("/etc/os-release") or _read("/usr/lib/os-release") or ""
    out: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep and key in ("ID", "VERSION_ID", "PRETTY_NAME", "VERSION_CODENAME"):
            out[key] = value.strip().strip('"')
    return out


def _cpu() -> CpuInfo:
    model = None
    for line in (_read("/proc/cpuinfo") or "").splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    try:
        affinity = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        affinity = os.cpu_count() or 0
    return {
        "model": model,
        "logical_cpus": os.cpu_count(),
        "usable_cpus": affinity,
        "machine": platform.machine(),
    }


def _limits() -> Limits:
    limits: Limits = {}
    for key, path in _LIMIT_FILES:
        value = _read(path)
        if value is not None and key not in limits:
            limits[key] = value.strip()
    mem = _read("/proc/meminfo") or ""
    for line in mem.splitlines():
        if line.startswith("MemTotal:"):
            limits["mem_total_kib"] = int(line.split()[1])
    return limits


def packages(path: list[str] | None = None) -> list[Package]:
    """Installed distributions with the sha256 of their RECORD (the installed-file list).

    What ``importlib.metadata.distributions()`` lists, read straight from the
    ``*.dist-info`` / ``*.egg-info`` entries of ``sys.path``: the same names, versions and
    RECORD digests, without importing ``importlib.metadata`` and the e-mail parser it
    brings (about a third of a second of start-up under gVisor).
    """
    out: list[Package] = []
    for entry in sys.path if path is None else path:
        root = entry or "."
        try:
            names = os.listdir(root)
        except OSError:
            continue  # not a folder (a zip, a missing entry): importlib finds none there
        for name in names:
            if not name.lower().endswith((".dist-info", ".egg-info")):
                continue
            dist = os.path.join(root, name)
            headers = _metadata_headers(dist)
            record = _read_text(os.path.join(dist, "RECORD"))
            out.append(
                {
                    "name": headers.get("name") or "?",
                    "version": headers.get("version", ""),
                    "record_sha256": hashlib.sha256(
                        record.encode("utf-8", "surrogateescape")
                    ).hexdigest()
                    if record
                    else "",
                }
            )
    out.sort(key=lambda p: (p["name"].lower(), p["version"]))
    return out


def _read_text(path: str) -> str | None:
    """A metadata file as ``importlib.metadata`` reads it (UTF-8, universal newlines)."""
    try:
        with open(path, encoding="utf-8", errors="surrogateescape") as fh:
            return fh.read()
    except OSError:  # missing, a folder, not a folder on the way, unreadable
        return None


def _metadata_headers(dist: str) -> dict[str, str]:
    """The first ``Name`` and ``Version`` headers of a distribution's metadata.

    Like ``importlib.metadata``: ``METADATA``, else ``PKG-INFO``, else the entry itself (an
    ``.egg-info`` file), the first of them that is not empty; headers end at the first
    empty line; names are case-insensitive. Read up to there only, not the description.
    """
    for name in ("METADATA", "PKG-INFO", ""):
        path = os.path.join(dist, name) if name else dist
        found: dict[str, str] = {}
        try:
            with open(path, encoding="utf-8", errors="surrogateescape") as fh:
                lines = 0
                for line in fh:
                    lines += 1
                    if not line.strip():
                        break
                    if line[:1] in (" ", "\t"):
                        continue  # a folded continuation line
                    key, sep, value = line.partition(":")
                    key = key.strip().lower()
                    if sep and key in ("name", "version") and key not in found:
                        found[key] = value.strip()
        except OSError:  # missing, a folder, not a folder on the way, unreadable
            continue
        if lines:
            return found
    return {}


def gpu_capture() -> GpuCapture:
    """NVML's view of the GPUs (every field guarded) and the frameworks' own view.

    A clear ``{"visible": False, "reason": ...}`` when no GPU, driver or pynvml is there.
    See ``runner.agent.gpu`` for the fields.
    """
    # Imported on use: only GPU capture needs it, and the agent's import graph stays small.
    from runner.agent.gpu import gpu_capture as capture_gpus

    return capture_gpus()


def capture_environment(image_ref: str) -> EnvironmentCapture:
    """Everything about the environment the evaluation ran in, as seen from inside."""
    uname = platform.uname()
    return {
        "image_ref": image_ref,
        "os": _os_release(),
        "kernel": {"release": uname.release, "version": uname.version, "system": uname.system},
        "python": {
            "version": platform.python_version(),
            "implementation": sys.implementation.name,
            "executable": sys.executable,
        },
        "packages": packages(),
        "cpu": _cpu(),
        "limits": _limits(),
        "user": {"uid": os.getuid(), "gid": os.getgid()},
        "gpu": gpu_capture(),
    }

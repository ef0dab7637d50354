"""Wheels for the image, downloaded on the host with their hashes and cached by sha256.

Containers cannot reach a package index, so the build installs only these files,
with ``--no-index --require-hashes`` (see :mod:`runner.build.context`).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

from runner._internal.files import read_regular_file
from runner._internal.settings import Settings
from runner._internal.strict_json import load_json_strict
from runner._internal.tree import sha256_file
from runner.errors import DigestMismatch, EvalrunError, InfrastructureError, InputError
from runner.model.lock import LockedWheel

Progress = Callable[[str], None]

WHEEL_PLATFORMS = ("manylinux2014_x86_64", "manylinux_2_17_x86_64", "manylinux_2_28_x86_64", "any")
IMAGE_PYTHON = "3.11"


def _noop(_: str) -> None:
    return None


_WHEEL_RE = re.compile(r"^(?P<name>[^-]+)-(?P<version>[^-]+)(-\d[^-]*)?-[^-]+-[^-]+-[^-]+\.whl$")


def normalize_project_name(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def resolve_wheels(
    requirements: Iterable[str], settings: Settings, progress: Progress = _noop
) -> list[LockedWheel]:
    """Download the wheels (and their dependencies) for the image's Python; hash each."""
    reqs = sorted(requirements)
    if not reqs:
        return []
    cache = settings.wheel_cache
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="evalrun-wheels-") as tmp:
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--quiet",
            "--only-binary=:all:",
            "--python-version",
            IMAGE_PYTHON,
            "--implementation",
            "cp",
            "-d",
            tmp,
        ]
        for plat in WHEEL_PLATFORMS:
            cmd += ["--platform", plat]
        progress(f"resolving wheels: {', '.join(reqs)}")
        proc = subprocess.run([*cmd, *reqs], capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise InfrastructureError(
                "pip download failed", requirements=reqs, stderr=proc.stderr.strip()[-1500:]
            )
        wheels = []
        for path in sorted(Path(tmp).glob("*.whl")):
            match = _WHEEL_RE.match(path.name)
            if not match:
                raise InputError(f"cannot parse wheel filename {path.name!r}")
            digest = sha256_file(path)
            target = cache / digest / path.name
            if not target.exists():
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(path, target.with_suffix(".partial"))
                target.with_suffix(".partial").replace(target)
            wheels.append(
                LockedWheel(
                    name=normalize_project_name(match["name"]),
                    version=match["version"],
                    filename=path.name,
                    sha256=digest,
                )
            )
    _remember_resolution(reqs, wheels, settings)
    return wheels


def _resolution_path(requirements: Iterable[str], settings: Settings) -> Path:
    text = "\n".join(["evalrun-wheels/v1", IMAGE_PYTHON, *WHEEL_PLATFORMS, *sorted(requirements)])
    return settings.wheel_cache / "resolved" / f"{hashlib.sha256(text.encode()).hexdigest()}.json"


def _remember_resolution(
    requirements: Iterable[str], wheels: list[LockedWheel], settings: Settings
) -> None:
    """Record what ``requirements`` resolved to (best effort: only a later lock is faster)."""
    path = _resolution_path(requirements, settings)
    data = json.dumps([w.model_dump(mode="json") for w in wheels], sort_keys=True)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".resolved.", dir=path.parent)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(data + "\n")
        Path(tmp).replace(path)
    except OSError:
        return


def remembered_wheels(requirements: Iterable[str], settings: Settings) -> list[LockedWheel] | None:
    """What ``requirements`` resolved to last time on this host, every wheel still in the
    cache with its hash; None when there is no such record (then resolve again)."""
    try:
        data = read_regular_file(_resolution_path(requirements, settings), max_bytes=1 << 20)
        wheels = [LockedWheel.model_validate(w) for w in load_json_strict(data)]
        for wheel in wheels:
            cached_wheel(wheel, settings)
    except (OSError, EvalrunError, ValueError, TypeError):
        return None
    return wheels


def cached_wheel(wheel: LockedWheel, settings: Settings) -> Path:
    """The cached file of a locked wheel, verified against its hash."""
    path = settings.wheel_cache / wheel.sha256 / wheel.filename
    if not path.is_file():
        raise InputError(
            f"wheel {wheel.filename} is not in the cache",
            file=str(path),
            hint="run `evalrun lock` to download the locked wheels again",
        )
    found = sha256_file(path)
    if found != wheel.sha256:
        raise DigestMismatch(
            f"cached wheel {wheel.filename}", expected=wheel.sha256, found=found, path=str(path)
        )
    return path

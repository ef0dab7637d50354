"""A sandbox started ahead of the runner, from the request the last run of the same bytes made.

``evalrun run --rerun`` on the local engine spends its first fraction of a second in
Python (pydantic and the spec's models, the spec, lock and inputs checked, the plan)
before it can ask for its container, and the sandbox's start (~0.5 s under gVisor)
waits for it. Its request is nearly always the one the last run of the same spec and
lock made. So the Docker helper (:mod:`runner.adapters.docker_early`) finds that request
(:class:`AheadKey`, a file in the store keyed by the spec's and lock's bytes), guesses
the run's id (the next attempt), and creates and starts that sandbox at once, with a
fresh plan folder and results folder; the agent boots and waits for its plan
(``--plan-wait``). The runner does everything it does today, then asks for its own
container: the helper compares the two requests (all but the plan and results folders,
and the agent's wait), and only when they are equal, and the agent is still waiting,
hands the sandbox over; the runner writes the plan into it. Otherwise the sandbox is
removed before anything ran in it and the runner's container is created as always.

So nothing rests on the stored request but the time saved: only the comparison decides,
and the agent never starts an evaluation without a plan this run's runner wrote. The
stored request is still checked before use (:func:`_checked_entry`): the sandbox policy's
fixed parts (no network, read-only, gVisor or runc, every capability dropped, the
sandbox user), the lock's image, the agent's command, read-only inputs under
:data:`INPUTS_MOUNT`; anything else and nothing is started. Standard library only: the
helper reads it before it imports the Docker SDK.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from runner.shared.protocol import (
    AGENT_RUN_COMMAND,
    INPUTS_MOUNT,
    PLAN_MOUNT,
    RESULTS_MOUNT,
    RUN_ID_LABEL,
    SANDBOX_UID,
)
from runner.shared.run_ids import run_id_for

PLAN_WAIT_S = 300
"""How long an agent started ahead waits for its plan before it gives up (exit 2)."""
ADOPT_WITHIN_S = PLAN_WAIT_S - 60
"""A sandbox started ahead is handed over only this soon after its start: its agent is then
sure to be still waiting when the plan is written."""

_ENTRY_VERSION = 1
_MAX_GUESSES = 64  # attempts looked past the stored one before the guess is given up
_MAX_FILE = 4 << 20  # a spec, lock or stored request read for the key
# what a stored request's options may hold: docker_policy.EngineOptions less the entrypoint
_OPTION_KEYS = frozenset(
    {
        "name",
        "runtime",
        "network_mode",
        "read_only",
        "tmpfs",
        "user",
        "cap_drop",
        "security_opt",
        "pids_limit",
        "mem_limit",
        "memswap_limit",
        "nano_cpus",
        "labels",
    }
)
_FIXED_OPTIONS: dict[str, object] = {
    "network_mode": "none",
    "read_only": True,
    "user": f"{SANDBOX_UID}:{SANDBOX_UID}",
    "cap_drop": ["ALL"],
    "security_opt": ["no-new-privileges"],
}

Mount = tuple[str, str | None, bool]
"""(target, source, read-only); the plan's and results' sources are None in a stored request."""


@dataclass(frozen=True)
class Request:
    """A container as the runner asks the helper for it (``create``'s arguments)."""

    image: str
    command: tuple[str, ...]
    mounts: tuple[Mount, ...]
    options: dict[str, Any]

    def normalized(self) -> Request:
        """The request without what is fresh in every run (the plan's and results' folders)
        and without the agent's wait: what two runs must have equal to share a sandbox."""
        command = self.command
        if command[-2:] == ("--plan-wait", str(PLAN_WAIT_S)):
            command = command[:-2]
        mounts = tuple(
            (target, None if target in (PLAN_MOUNT, RESULTS_MOUNT) else source, read_only)
            for target, source, read_only in self.mounts
        )
        return Request(self.image, command, mounts, self.options)


@dataclass(frozen=True)
class Ahead:
    """What the helper starts ahead: the request, with its run id guessed."""

    request: Request
    run_id: str


@dataclass(frozen=True)
class AheadKey:
    """Where the request of a run of these spec and lock bytes is stored, and whether this
    run may start one ahead (``--rerun`` only: a plain run of a stored attempt makes no
    container)."""

    path: Path
    speculate: bool
    image: str | None
    """The lock's image (a stored request for another is not used)."""
    runs: Path
    """The store's run index: a run's id is taken when ``<id>.json`` is there."""

    @classmethod
    def for_run(
        cls,
        home: Path,
        runs: Path,
        spec_path: Path,
        *,
        rerun: bool,
        options: tuple[str, ...] = (),
    ) -> AheadKey | None:
        """The key of a run of ``spec_path`` (with the lock beside it) in the store at
        ``home`` (its run index: ``runs``); None where either file cannot be read (the run
        says why, later). ``options`` are the command line's choices that shape the
        sandbox."""
        digest = hashlib.sha256(f"evalrun-ahead/v{_ENTRY_VERSION}\n".encode())
        try:
            spec_path = spec_path.resolve()
            lock_path = spec_path.with_name(spec_path.stem + ".lock.json")
            for part in (str(spec_path), *options):
                digest.update(part.encode() + b"\0")
            digest.update(hashlib.sha256(_read_bounded(spec_path)).digest())
            lock = _read_bounded(lock_path)
            digest.update(hashlib.sha256(lock).digest())
        except (OSError, ValueError, RuntimeError):
            return None
        image: Any = None
        if rerun:
            with contextlib.suppress(ValueError, TypeError, AttributeError):
                image = json.loads(lock).get("image", {}).get("ref")
        return cls(
            home / "ahead" / f"{digest.hexdigest()}.json",
            rerun,
            image if isinstance(image, str) else None,
            runs,
        )

    def ahead(self) -> Ahead | None:
        """The sandbox to start ahead of this run, or None (no stored request, one stored
        by a run whose sandbox could not wait for its plan, or one that fails a check)."""
        if not self.speculate or self.image is None:
            return None
        try:
            ahead = _checked_entry(json.loads(_read_bounded(self.path)), self._taken)
            return ahead if ahead is not None and ahead.request.image == self.image else None
        except (OSError, ValueError, TypeError, KeyError):
            return None

    def remember(self, request: Request, *, lock_digest: str, attempt: int, waits: bool) -> None:
        """Store ``request`` (the one this run made) for the next run of the same bytes;
        ``waits``: False when the last sandbox started ahead did not wait for its plan
        (an image whose agent has no ``--plan-wait``): none is started for it again."""
        stored = request.normalized()
        entry = {
            "version": _ENTRY_VERSION,
            "speculate": waits,
            "lock_digest": lock_digest,
            "attempt": attempt,
            "image": stored.image,
            "command": list(stored.command),
            "mounts": [list(m) for m in stored.mounts],
            "options": stored.options,
        }
        data = json.dumps(entry, sort_keys=True).encode()
        with contextlib.suppress(OSError, TypeError, ValueError):
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, name = tempfile.mkstemp(prefix=".entry-", dir=self.path.parent)
            tmp = Path(name)
            try:
                with os.fdopen(fd, "wb") as fh:
                    fh.write(data)
                tmp.replace(self.path)
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise

    def _taken(self, run_id: str) -> bool:
        return (self.runs / f"{run_id}.json").exists()


def _read_bounded(path: Path) -> bytes:
    with path.open("rb") as fh:
        data = fh.read(_MAX_FILE + 1)
    if len(data) > _MAX_FILE:
        raise ValueError(f"{path}: larger than {_MAX_FILE} bytes")
    return data


def _checked_entry(entry: Any, taken: Callable[[str], bool]) -> Ahead | None:
    """The stored request as the sandbox of the next attempt (the first after the stored
    one whose run id is not ``taken``: as ``--rerun`` chooses it, when nothing else runs
    the same lock meanwhile); None for anything but what ``docker_policy.container_policy``
    makes."""
    if not isinstance(entry, dict) or entry.get("version") != _ENTRY_VERSION:
        return None
    if entry.get("speculate") is not True:
        return None
    lock_digest, attempt = entry["lock_digest"], entry["attempt"]
    image, command, mounts, options = (
        entry["image"],
        entry["command"],
        entry["mounts"],
        entry["options"],
    )
    if not (isinstance(lock_digest, str) and type(attempt) is int and attempt >= 0):
        return None
    if not (isinstance(image, str) and "@sha256:" in image):
        return None
    if command != list(AGENT_RUN_COMMAND):
        return None
    checked = _checked_mounts(mounts)
    if checked is None or not _checked_options(options):
        return None
    previous = run_id_for(lock_digest, attempt)
    if options["name"] != f"evalrun-{previous}" or options["labels"][RUN_ID_LABEL] != previous:
        return None
    attempt += 1
    run_id = run_id_for(lock_digest, attempt)
    for _ in range(_MAX_GUESSES):
        if not taken(run_id):
            break
        attempt += 1
        run_id = run_id_for(lock_digest, attempt)
    else:
        return None
    options = {
        **options,
        "name": f"evalrun-{run_id}",
        "labels": {**options["labels"], RUN_ID_LABEL: run_id},
    }
    return Ahead(Request(image, AGENT_RUN_COMMAND, checked, options), run_id)


def _checked_mounts(mounts: Any) -> tuple[Mount, ...] | None:
    if not isinstance(mounts, list):
        return None
    checked: list[Mount] = []
    for mount in mounts:
        if not (isinstance(mount, list) and len(mount) == 3):
            return None
        target, source, read_only = mount
        if target in (PLAN_MOUNT, RESULTS_MOUNT):
            if source is not None or read_only is not (target == PLAN_MOUNT):
                return None
        elif not (
            isinstance(target, str)
            and target.startswith(INPUTS_MOUNT + "/")
            and isinstance(source, str)
            and Path(source).is_absolute()
            and read_only is True
        ):
            return None
        checked.append((target, source, read_only))
    targets = [m[0] for m in checked]
    if targets[:2] != [PLAN_MOUNT, RESULTS_MOUNT] or len(set(targets)) != len(targets):
        return None
    return tuple(checked)


def _checked_options(options: Any) -> bool:
    if not isinstance(options, dict) or set(options) != _OPTION_KEYS:
        return False
    if any(options[key] != value for key, value in _FIXED_OPTIONS.items()):
        return False
    labels = options["labels"]
    return (
        options["runtime"] in ("runsc", "runc")
        and isinstance(options["name"], str)
        and isinstance(labels, dict)
        and all(isinstance(k, str) and isinstance(v, str) for k, v in labels.items())
        and isinstance(labels.get(RUN_ID_LABEL), str)
        and isinstance(options["tmpfs"], dict)
        and type(options["pids_limit"]) is int
        and type(options["nano_cpus"]) is int
        and isinstance(options["mem_limit"], str)
        and isinstance(options["memswap_limit"], str)
    )

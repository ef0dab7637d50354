"""A detached run's record in the store (``$EVALRUN_HOME/detached/RUN_ID/``): where its Job
is, its plan, its files and journal, whether a cancel was asked for, and the one lock per run
through which runners sharing a store cooperate (whoever holds it collects and seals)."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

from pydantic import BaseModel, ConfigDict

from runner._internal.settings import Settings
from runner.bundle.store import Store
from runner.errors import InputError
from runner.model.base import AS_JSON_OBJECT
from runner.model.plan import RunPlan
from runner.model.predicate import JsonObject
from runner.workflows.run import Journal
from runner.workflows.run_predicate import _now

RUN_ID_RE = re.compile(r"r-[0-9a-f]{24}")
_POLL_S = 0.5


class DetachedRecord(BaseModel):
    """Where a detached run's Job is and what sealing it needs (``record.json``)."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    run_id: str
    attempt: int
    backend: str
    job: str
    kubeconfig: str | None = None
    context: str | None = None
    namespace: str
    stuck_after_s: float = 60.0
    ttl_after_finished_s: int = 600
    started: str
    submitted: str
    # the provenance block as built at submission (runner.build.provenance), kept as found
    run_provenance: Annotated[JsonObject, AS_JSON_OBJECT]
    run_target: str | None = None
    """The backend's target, part of the run's identity (API server and namespace)."""


def check_run_id(text: str) -> str:
    """``text`` if it is a run id (``r-`` and 24 hex digits), else InputError (exit 2)."""
    if not RUN_ID_RE.fullmatch(text):
        raise InputError(
            f"{text!r} is not a run id",
            expected="r- followed by 24 hex digits (what `evalrun run --detach` printed)",
        )
    return text


class DetachedRun:
    """The detached record of one run in a store (it may not exist)."""

    def __init__(self, settings: Settings, run_id: str) -> None:
        self.run_id = check_run_id(run_id)
        self.root = settings.home / "detached"
        self.dir = self.root / run_id

    def exists(self) -> bool:
        return (self.dir / "record.json").is_file()

    def record(self) -> DetachedRecord:
        return DetachedRecord.model_validate_json((self.dir / "record.json").read_bytes())

    def plan(self) -> RunPlan:
        return RunPlan.model_validate_json((self.dir / "plan.json").read_bytes())

    @property
    def files(self) -> Path:
        """The run's files as its bundle will carry them (spec, lock, preprocessing, plan)."""
        return self.dir / "files"

    def journal(self) -> Journal:
        journal = Journal(self.run_id)
        path = self.dir / "journal.jsonl"
        if path.is_file():
            journal.records = [json.loads(line) for line in path.read_text().splitlines() if line]
        return journal

    @property
    def cancel_requested(self) -> bool:
        return (self.dir / "cancel-requested").exists()

    def request_cancel(self) -> None:
        with contextlib.suppress(FileExistsError):
            (self.dir / "cancel-requested").write_text(_now() + "\n")

    def write(self, record: DetachedRecord, plan: RunPlan, files: Path, journal: Journal) -> bool:
        """Write the record atomically; False if another runner wrote it first."""
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = Path(tempfile.mkdtemp(prefix=".new-", dir=self.root))
        try:
            shutil.copytree(files, tmp / "files", symlinks=True)
            (tmp / "plan.json").write_text(plan.model_dump_json(indent=2) + "\n")
            (tmp / "journal.jsonl").write_bytes(journal.dump())
            (tmp / "record.json").write_text(record.model_dump_json(indent=2) + "\n")
            try:
                tmp.rename(self.dir)
            except OSError:
                return False
            return True
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)

    def remove(self) -> None:
        """Forget the record once the run is sealed (the lock file goes with it)."""
        with contextlib.suppress(FileNotFoundError):
            gone = self.dir.rename(self.root / f".sealed-{self.run_id}-{os.getpid()}")
            shutil.rmtree(gone, ignore_errors=True)

    @contextlib.contextmanager
    def exclusive(self, store: Store, timeout_s: float | None) -> Iterator[bool]:
        """Hold this run's lock (True), or give up (False) once the run is sealed by the
        holder or ``timeout_s`` has passed. Released if the holder dies."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        try:
            fd = os.open(self.dir / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except FileNotFoundError:  # sealed and removed meanwhile
            yield False
            return
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if store.find_run(self.run_id) is not None:
                        yield False
                        return
                    if deadline is not None and time.monotonic() >= deadline:
                        yield False
                        return
                    time.sleep(_POLL_S)
            yield True
        finally:
            os.close(fd)


def pending_runs(settings: Settings) -> list[str]:
    """Run ids with a detached record in this store (not yet sealed)."""
    root = settings.home / "detached"
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if RUN_ID_RE.fullmatch(p.name))

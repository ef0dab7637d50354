"""Runs under CI control: started detached, then waited for, followed or cancelled.

``evalrun run --detach`` does what a blocking run does up to the submission (inputs
re-hashed, preflight), submits the Job and leaves a *detached record* in the store
(``$EVALRUN_HOME/detached/RUN_ID/``: the plan, the run's files, where the Job is).
``wait`` attaches to that Job (the backend's own attach: it never submits), collects,
judges and seals exactly as the blocking run would, so its exit code is the one the
blocking run would have returned. ``cancel`` annotates and deletes the Job and seals a
signed ``cancelled`` bundle. Every step is idempotent, and runners sharing a store
cooperate through one lock per run: whoever holds it collects and seals; the others
wait for the lock and then return the sealed bundle. A runner that follows the Job from
another store (a blocking ``run`` of the same locked spec) attaches as it always did.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

from runner._internal.settings import Settings
from runner.backends.custom_metric import CustomMetricSandbox
from runner.backends.kubernetes import ClusterTarget, KubernetesBackend
from runner.backends.kubernetes_control import cancel_job
from runner.bundle.signing import Signer
from runner.bundle.store import Store
from runner.errors import EvalrunError, InputError, Interrupted, StillRunning
from runner.model.lock import load_lock
from runner.model.outcome import Outcome
from runner.model.plan import Backend, BackendResult, RunPlan
from runner.model.spec import load_spec
from runner.workflows.custom_metrics import BUNDLE_DIR, custom_jobs
from runner.workflows.judge import ContainerReport, Judgement
from runner.workflows.run import (
    Journal,
    Progress,
    RunOutcome,
    Sealing,
    _PlanHolder,
    backend_target,
    error_judgement,
    judged_attempt,
    load_locked,
    open_run,
    plan_and_check,
    run_id_for,
    seal_run,
    stage_run_files,
    stored_outcome,
)
from runner.workflows.run_predicate import _now
from runner.workflows.run_setup import choose_attempt

RUN_ID_RE = re.compile(r"r-[0-9a-f]{24}")
# How long ``cancel`` waits for a runner that is collecting the run to notice and seal.
CANCEL_SEAL_WAIT_S = 300.0
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
    run_provenance: dict[str, Any]
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


@dataclass(frozen=True)
class Detached:
    """What ``run --detach`` did: started the run, found it started, or found it ended."""

    run_id: str
    state: str  # "submitted", "already submitted", "sealed"
    job: str | None = None
    namespace: str | None = None
    sealed: RunOutcome | None = None

    @property
    def exit_code(self) -> int:
        return self.sealed.exit_code if self.sealed is not None else 0


def start_detached(
    spec_path: Path,
    backend: KubernetesBackend,
    signer: Signer,
    settings: Settings,
    *,
    rerun: bool = False,
    progress: Progress = lambda _: None,
    reason: str | None = None,
    environ: Mapping[str, str] | None = None,
) -> Detached:
    """Submit the run of a locked spec and return once the Job is accepted.

    The same checks as a blocking run come first; one that fails before submission ends
    the run now, sealed as the blocking run would have sealed it (``sealed`` is set).
    """
    spec, lock = load_locked(spec_path)
    store = Store(settings.home)
    lock_digest = lock.digest()
    run_target = backend_target(backend)
    attempt = choose_attempt(store, lock_digest, backend.name, run_target, rerun=rerun)
    while rerun and DetachedRun(settings, run_id_for(lock_digest, attempt, run_target)).exists():
        attempt += 1  # --rerun: a new attempt, past the ones still running too
    run_id = run_id_for(lock_digest, attempt, run_target)
    if (existing := stored_outcome(store, run_id)) is not None:
        progress(f"run {run_id} already ended and is sealed; returning it")
        return Detached(run_id, "sealed", sealed=existing)
    detached = DetachedRun(settings, run_id)
    if detached.exists():
        record = detached.record()
        progress(f"run {run_id} was already submitted (Job {record.job}); nothing to do")
        return Detached(run_id, "already submitted", record.job, record.namespace)
    steps, sealing = open_run(
        spec,
        lock,
        spec_path,
        signer,
        backend.name,
        run_id=run_id,
        attempt=attempt,
        target=run_target,
        reason=reason,
        environ=environ,
        detached=True,
    )
    journal = sealing.journal
    with store.staging_dir() as stage:
        stage_run_files(spec_path, spec, stage)
        try:
            plan, _, _ = plan_and_check(
                spec_path, settings, stage, sealing, steps, backend, progress=progress
            )
            job = backend.submit(plan)
        except EvalrunError as exc:
            judgement = error_judgement(exc)
            if judgement is None:
                raise
            progress("the run ended before it was submitted; sealing the bundle (hash, sign)")
            sealed = seal_run(stage, store, signer, sealing, None, ContainerReport(), judgement)
            return Detached(run_id, "sealed", sealed=sealed)
        journal.emit("job_submitted", job=job, namespace=backend.namespace)
        target = backend.target
        record = DetachedRecord(
            run_id=run_id,
            attempt=attempt,
            backend=backend.name,
            job=job,
            # absolute: a later `wait` may run from another directory
            kubeconfig=str(Path(target.kubeconfig).resolve()) if target.kubeconfig else None,
            context=target.context,
            namespace=backend.namespace,
            stuck_after_s=backend.grace["unschedulable"],
            ttl_after_finished_s=backend.ttl_after_finished_s,
            started=sealing.started,
            submitted=_now(),
            run_provenance=dict(sealing.run_provenance),
            run_target=run_target,
        )
        created = detached.write(record, plan, stage, journal)
    progress(f"submitted {run_id} as Job {job} in namespace {record.namespace}")
    return Detached(run_id, "submitted" if created else "already submitted", job, record.namespace)


@dataclass(frozen=True)
class ClusterOverrides:
    """The global cluster flags of a later command; None keeps what the record says."""

    kubeconfig: str | None = None
    context: str | None = None
    namespace: str | None = None


def backend_for_record(record: DetachedRecord, overrides: ClusterOverrides) -> KubernetesBackend:
    """The backend that follows a detached run: where it was submitted, unless the flags say
    otherwise (a CI step with its kubeconfig elsewhere)."""
    target = ClusterTarget(
        kubeconfig=overrides.kubeconfig or record.kubeconfig,
        context=overrides.context or record.context,
        namespace=overrides.namespace or record.namespace,
    )
    return KubernetesBackend(
        target,
        unschedulable_grace_s=record.stuck_after_s,
        image_pull_grace_s=record.stuck_after_s,
        ttl_after_finished_s=record.ttl_after_finished_s,
    )


def _detached_or_error(settings: Settings, store: Store, run_id: str) -> DetachedRun:
    detached = DetachedRun(settings, run_id)
    if not detached.exists():
        raise InputError(
            f"no run {run_id} in this store ({settings.home}): neither sealed nor started "
            "with `evalrun run --detach`",
            hint="use the EVALRUN_HOME the run was started with",
        )
    return detached


def require_known(settings: Settings, run_id: str) -> None:
    """InputError (exit 2) unless ``run_id`` is sealed in this store or detached from it."""
    check_run_id(run_id)
    if Store(settings.home).find_run(run_id) is None:
        _detached_or_error(settings, Store(settings.home), run_id)


def _sealed(store: Store, run_id: str) -> RunOutcome | None:
    return stored_outcome(store, run_id)


def wait_for(
    run_id: str,
    settings: Settings,
    signer: Signer,
    overrides: ClusterOverrides,
    *,
    timeout_s: float | None = None,
    progress: Progress = lambda _: None,
    output: Callable[[Any], None] | None = None,
) -> RunOutcome:
    """The sealed outcome of a detached run: collected and sealed now, or already sealed
    (by this or another runner of this store). StillRunning once ``timeout_s`` is up."""
    detached = DetachedRun(settings, run_id)
    store = Store(settings.home)
    if (sealed := _sealed(store, run_id)) is not None:
        detached.remove()  # sealed by a blocking run of the same spec: the record is stale
        return sealed
    if not detached.exists() and (sealed := _sealed(store, run_id)) is not None:
        return sealed
    detached = _detached_or_error(settings, store, run_id)
    give_up_at = None if timeout_s is None else time.monotonic() + timeout_s
    with detached.exclusive(store, timeout_s) as holder:
        if (sealed := _sealed(store, run_id)) is not None:
            progress(f"run {run_id} was sealed by another runner")
            return sealed
        if not holder:
            raise StillRunning(
                f"run {run_id} is being collected by another runner and is not sealed yet",
                hint="wait again later",
            )
        return _collect_and_seal(detached, store, signer, overrides, give_up_at, progress, output)


def _collect_and_seal(
    detached: DetachedRun,
    store: Store,
    signer: Signer,
    overrides: ClusterOverrides,
    give_up_at: float | None,
    progress: Progress,
    output: Callable[[Any], None] | None,
) -> RunOutcome:
    record, plan = detached.record(), detached.plan()
    backend = backend_for_record(record, overrides)
    backend.output = output
    sealing = _sealing_of(detached, record)
    with store.staging_dir() as stage:
        shutil.copytree(detached.files, stage, dirs_exist_ok=True)
        # custom metrics: the files the run carried, checked against the lock again
        jobs = custom_jobs(sealing.spec, stage / BUNDLE_DIR / "spec.yaml", sealing.lock)
        holder = _PlanHolder(plan, jobs, CustomMetricSandbox() if jobs else None)

        def attach(results_tmp: Path) -> BackendResult:
            backend.preflight(plan)
            progress(f"following {record.run_id} (Job {record.job}, namespace {backend.namespace})")
            return backend.attach(
                plan,
                results_tmp,
                started=record.started,
                cancel_requested=detached.cancel_requested,
                give_up_at=give_up_at,
            )

        result, report, judgement = judged_attempt(stage, sealing.journal, attach, holder)
        if judgement.outcome is Outcome.INTERRUPTED:
            # Ctrl-C on a waiter leaves the run going: nothing is sealed
            raise Interrupted(
                f"wait for {record.run_id} interrupted; the run goes on (wait again, or cancel)"
            )
        progress("sealing the bundle (hash, sign)")
        outcome = seal_run(stage, store, signer, sealing, result, report, judgement)
    detached.remove()
    return outcome


def _sealing_of(detached: DetachedRun, record: DetachedRecord) -> Sealing:
    files = detached.files
    spec = load_spec(files / "spec.yaml")
    lock = load_lock(files / "eval.lock.json")
    return Sealing(
        spec=spec,
        lock=lock,
        run_id=record.run_id,
        attempt=record.attempt,
        started=record.started,
        backend=record.backend,
        run_provenance=record.run_provenance,
        journal=detached.journal(),
        target=record.run_target,
    )


@dataclass(frozen=True)
class Cancelled:
    """What ``cancel`` found: the sealed run, and whether this call cancelled it."""

    outcome: RunOutcome
    cancelled_now: bool
    job_deleted: bool


def cancel(
    run_id: str,
    settings: Settings,
    signer: Signer,
    overrides: ClusterOverrides,
    *,
    progress: Progress = lambda _: None,
) -> Cancelled:
    """Cancel a detached run: delete its Job and seal a signed ``cancelled`` bundle.

    Idempotent: a run already sealed (cancelled or ended) is returned as it is. A runner
    following the run (``wait``) notices and seals it ``cancelled`` itself.
    """
    check_run_id(run_id)
    store = Store(settings.home)
    if (sealed := _sealed(store, run_id)) is not None:
        return Cancelled(sealed, cancelled_now=False, job_deleted=False)
    detached = _detached_or_error(settings, store, run_id)
    record = detached.record()
    detached.request_cancel()
    backend = backend_for_record(record, overrides)
    deleted = cancel_job(backend, record.job, when=_now())
    progress(f"deleted Job {record.job}" if deleted else f"Job {record.job} was already gone")
    with detached.exclusive(store, CANCEL_SEAL_WAIT_S) as holder:
        if (sealed := _sealed(store, run_id)) is not None:
            return Cancelled(
                sealed, cancelled_now=sealed.outcome is Outcome.CANCELLED, job_deleted=deleted
            )
        if not holder:
            raise StillRunning(
                f"Job {record.job} was deleted, but the runner collecting run {run_id} has not "
                "sealed it yet",
                hint="cancel again, or wait for it",
            )
        sealing = _sealing_of(detached, record)
        judgement = Judgement(
            Outcome.CANCELLED,
            f"cancelled (evalrun cancel) before it ended: Job {record.job}"
            + (" deleted" if deleted else " was already gone"),
        )
        with store.staging_dir() as stage:
            shutil.copytree(detached.files, stage, dirs_exist_ok=True)
            sealed = seal_run(stage, store, signer, sealing, None, ContainerReport(), judgement)
    detached.remove()
    return Cancelled(sealed, cancelled_now=True, job_deleted=deleted)


def refuse_detach(backend: Backend) -> None:
    """InputError (exit 2) for a backend that cannot leave a run to be collected later."""
    if not isinstance(backend, KubernetesBackend):
        raise InputError(
            f"--detach needs --backend kubernetes (not {backend.name})",
            hint="the docker backend's runner process is what enforces the run's wall-clock "
            "limit and holds its results; run it without --detach (see README, CI)",
        )


def pending_runs(settings: Settings) -> list[str]:
    """Run ids with a detached record in this store (not yet sealed)."""
    root = settings.home / "detached"
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if RUN_ID_RE.fullmatch(p.name))


__all__ = [
    "BackendResult",
    "Cancelled",
    "ClusterOverrides",
    "Detached",
    "DetachedRecord",
    "DetachedRun",
    "backend_for_record",
    "cancel",
    "check_run_id",
    "pending_runs",
    "refuse_detach",
    "start_detached",
    "wait_for",
]

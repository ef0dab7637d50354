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

import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from runner._internal.settings import Settings
from runner.backends.kubernetes import ClusterTarget, KubernetesBackend
from runner.backends.kubernetes_control import cancel_job
from runner.bundle.signing import Signer
from runner.bundle.store import Store
from runner.errors import EvalrunError, InputError, Interrupted, StillRunning
from runner.model.lock import load_lock
from runner.model.outcome import Outcome
from runner.model.plan import Backend, BackendResult
from runner.model.spec import load_spec
from runner.workflows.custom_metrics import BUNDLE_DIR, custom_jobs
from runner.workflows.detached_record import DetachedRecord, DetachedRun, check_run_id
from runner.workflows.judge import ContainerReport, Judgement
from runner.workflows.run import (
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

# How long ``cancel`` waits for a runner that is collecting the run to notice and seal.
CANCEL_SEAL_WAIT_S = 300.0


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
        holder = _PlanHolder(plan, jobs)  # custom metrics: a sandbox is made to recompute them

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
        # the block as built at submission, kept as found
        provenance_of=lambda: record.run_provenance,
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


__all__ = [
    "BackendResult",
    "Cancelled",
    "ClusterOverrides",
    "Detached",
    "backend_for_record",
    "cancel",
    "refuse_detach",
    "start_detached",
    "wait_for",
]

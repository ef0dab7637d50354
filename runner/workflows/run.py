"""Run a locked evaluation on a backend and seal the result into a signed bundle.

Order of events: load spec + lock (the lock must match the spec) → re-hash every
input on the host (exit 3 before any container) → derive the run id (from the
lock digest and attempt: a repeated run finds the existing bundle) → backend
preflight (sandbox policy) → sandboxed run → collect without trusting the
container → recompute metrics → thresholds → bundle (signed, content addressed,
atomic). Failed and rejected runs are sealed too, saying why.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from importlib.metadata import version as dist_version
from pathlib import Path
from typing import Any, Literal

from runner._internal.settings import Settings
from runner.adapters.sources import SourceOptions
from runner.backends.collect import collect_results, recompute_available, recompute_metrics
from runner.backends.custom_metric import CustomMetricJob, CustomMetricSandbox
from runner.build.lock import source_options
from runner.build.provenance import preprocessing_records, provenance
from runner.bundle.build import build_bundle
from runner.bundle.reader import expect_kind, read_predicate
from runner.bundle.signing import Signer
from runner.bundle.store import Store, StoredBundle
from runner.errors import (
    DigestMismatch,
    EnvironmentMismatch,
    EvalrunError,
    InfrastructureError,
    IntegrityError,
    RunCancelled,
    SpecError,
    interrupted_reason,
)
from runner.model.lock import LockedSpec, load_lock, lock_path_for
from runner.model.outcome import Outcome
from runner.model.plan import Backend, BackendResult, PlanInput, RunPlan
from runner.model.predicate import (
    RunPredicate,
)
from runner.model.spec import EvalSpec, load_spec
from runner.render.markdown import render_markdown
from runner.workflows.compare import check_group_definitions
from runner.workflows.custom_metrics import carry_files, custom_jobs, with_custom_metrics
from runner.workflows.inputs import InputResolver, TransferProgress, WantedInput, host_inputs
from runner.workflows.judge import (
    ContainerReport,
    Judgement,
    interrupted_judgement_reason,
    judge,
    judge_metrics,
    judge_partial,
    read_container_report,
)
from runner.workflows.run_predicate import build_run_predicate

log = logging.getLogger("evalrun.run")
Progress = Callable[[str], None]
# A re-run's hook: the finished predicate with keys added (it may not change existing ones).
Annotate = Callable[[RunPredicate], RunPredicate]

_LOG_RESERVED = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message"}


def run_id_for(lock_digest: str, attempt: int, target: str | None = None) -> str:
    """Deterministic run id: the same locked spec, attempt and target name the same run.

    ``target`` is where the run runs beyond the embedded default (a backend's
    ``run_target``, e.g. a cluster's API server and namespace); None — the local Docker
    engine — keeps the id runs have always had there, so earlier runs are still found.
    """
    if target is None:
        text = f"evalrun-run/v1\n{lock_digest}\n{attempt}"
    else:
        text = f"evalrun-run/v2\n{lock_digest}\n{attempt}\n{target}"
    return f"r-{hashlib.sha256(text.encode()).hexdigest()[:24]}"


def backend_target(backend: Backend) -> str | None:
    """What, besides the lock and the attempt, makes a run on ``backend`` this run.

    A backend may say where it runs (``run_target``: for Kubernetes the API server and
    the namespace); one that does not (the local Docker engine) is the embedded default.
    """
    target = getattr(backend, "run_target", None)
    return target if isinstance(target, str) and target else None


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds")


def _evalrun_version() -> str:
    try:
        return dist_version("evalrun")
    except Exception:
        return "unknown"


class Journal:
    """The runner's own JSON-lines events for one run; also sent to logging."""

    def __init__(self, run_id: str) -> None:
        self.run_id = run_id
        self.records: list[dict[str, Any]] = []

    def emit(self, event: str, level: str = "info", **fields: Any) -> None:
        record = {
            "ts": time.time(),
            "level": level,
            "event": event,
            "run_id": self.run_id,
            "source": "runner",
            **fields,
        }
        self.records.append(record)
        safe = {k: v for k, v in fields.items() if k not in _LOG_RESERVED}
        log.log(
            logging.getLevelName(level.upper()),
            event,
            extra={"event": event, "run_id": self.run_id, **safe},
        )

    def dump(self) -> bytes:
        return "".join(
            json.dumps(r, sort_keys=True, default=str) + "\n" for r in self.records
        ).encode()


@dataclass(frozen=True)
class RunOutcome:
    """What ``evalrun run`` reports: the stored bundle and its verdict."""

    run_id: str
    outcome: Outcome
    exit_code: int
    reason: str | None
    bundle: StoredBundle
    predicate: RunPredicate
    reused: bool


def load_locked(spec_path: Path) -> tuple[EvalSpec, LockedSpec]:
    """Spec plus its lock; refuse a lock that belongs to a different spec."""
    spec = load_spec(spec_path)
    lock_path = lock_path_for(spec_path)
    lock = load_lock(lock_path)
    if lock.spec_digest != spec.digest():
        raise SpecError(
            "the lock does not match the spec (the spec changed since it was locked)",
            file=str(lock_path),
            problems=[("spec_digest", f"lock has {lock.spec_digest}, spec is {spec.digest()}")],
            hint=f"run `evalrun lock {spec_path}` to resolve the inputs again",
        )
    return spec, lock


def _check_inputs_on_host(
    spec_dir: Path,
    lock: LockedSpec,
    settings: Settings,
    *,
    spec: EvalSpec | None = None,
    progress: Progress = lambda _: None,
    transfer: TransferProgress | None = None,
    remote: bool = False,
) -> list[PlanInput]:
    """Every input verified in the cache before any container: local ones re-hashed now.

    A local input edited since the lock stops the run (exit 3); one that is gone, or a
    remote one not cached here, is fetched by digest from where the lock says it was
    published (see :mod:`runner.workflows.inputs`) — or, with ``remote`` (a backend
    whose nodes pull inputs), only checked to be in the registry.
    """
    by_name = {"model": spec.model} if spec else {}
    if spec:
        by_name |= {f"dataset {d.name}": d for d in spec.datasets}

    def options(want: WantedInput) -> SourceOptions:
        declared = by_name.get(want.what)
        if declared is None:
            return SourceOptions(s3_endpoint=want.locked.endpoint)
        return source_options(declared, spec_dir)

    resolver = InputResolver(
        settings,
        spec_dir=spec_dir,
        options=options,
        progress=progress,
        transfer=transfer,
        remote=remote,
    )
    return host_inputs(lock, resolver)


def _carry_preprocessing(spec: EvalSpec, spec_dir: Path, dest: Path) -> None:
    """Copy the declared preprocessing code into the bundle, so a re-run can replay it."""
    for step in spec.preprocessing:
        src = spec_dir / step.code
        target = dest / step.code
        target.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(
                src, target, symlinks=False, ignore=shutil.ignore_patterns("__pycache__", "*.pyc")
            )
        elif src.is_file():
            shutil.copy2(src, target)


def _check_preprocessing(steps: list[dict[str, Any]], lock: LockedSpec) -> None:
    """The preprocessing code found now must be the code that was locked."""
    locked = {p.name: p.code_digest for p in lock.preprocessing}
    for step in steps:
        expected = locked.get(step["name"])
        if expected != step["code_digest"]:
            raise DigestMismatch(
                f"preprocessing step {step['name']} ({step['code']})",
                expected=expected or "not in the lock",
                found=step["code_digest"],
                hint="the preprocessing code changed since it was locked; re-lock deliberately",
            )


def make_plan(
    spec: EvalSpec,
    lock: LockedSpec,
    inputs: list[PlanInput],
    attempt: int,
    target: str | None = None,
    *,
    verify_rootfs: Literal["used", "full"] | None = None,
) -> RunPlan:
    """The run's plan; ``verify_rootfs`` (``--verify-rootfs``) wins over the spec's."""
    return RunPlan(
        run_id=run_id_for(lock.digest(), attempt, target),
        attempt=attempt,
        image_ref=lock.image.ref,
        expected_rootfs_digest=lock.image.rootfs_digest,
        runtime=spec.sandbox.runtime,
        network=spec.sandbox.network,
        command=list(spec.command),
        params=dict(spec.params),
        seed=spec.seed,
        metrics=[m.definition() for m in spec.metrics if m.custom is None],
        custom_metrics=[m.definition() for m in spec.metrics if m.custom is not None],
        perturbations=[x.model_dump(mode="json") for x in spec.perturbations],
        expect=spec.expect.model_dump(mode="json"),
        inputs=inputs,
        timeout_s=spec.timeout_s,
        cpus=spec.resources.cpus,
        memory_mib=spec.resources.memory_mib,
        pids=spec.resources.pids,
        gpus=spec.resources.gpus,
        results_mib=spec.resources.results_mib,
        retries=spec.retries,
        gpu_product=spec.resources.gpu_product,
        gpu_driver_major=spec.resources.gpu_driver_major,
        mig_profile=spec.resources.mig_profile,
        runtime_class=spec.sandbox.runtime_class,
        verify_rootfs=verify_rootfs or spec.sandbox.verify_rootfs,
        queue=spec.cluster.queue,
        priority_class=spec.cluster.priority_class,
        image_pull_secrets=list(spec.cluster.image_pull_secrets),
        spec_digest=spec.digest(),
        lock_digest=lock.digest(),
        spec_name=spec.metadata.name,
    )


def _made_by(found: StoredBundle, backend: str) -> bool:
    """Whether a stored run was made by ``backend`` (runs before v2 ids: any backend)."""
    made_by = _load_predicate(found.path).backend
    return made_by is None or made_by == backend


def _current_attempt(store: Store, lock_digest: str, backend: str, target: str | None) -> int:
    """The attempt a plain run attaches to: the first one not ended by infrastructure/Ctrl-C.

    A run made by another backend under the same id (a Kubernetes run from before the
    target was part of the id) is another run: it is skipped, never returned.
    """
    attempt = 0
    while (found := store.find_run(run_id_for(lock_digest, attempt, target))) is not None:
        outcome = Outcome.parse(found.outcome)
        # runs that never got to evaluate: a plain `evalrun run` tries again
        if (outcome is None or not outcome.retryable) and _made_by(found, backend):
            return attempt
        attempt += 1
    return attempt


def _next_attempt(store: Store, lock_digest: str, target: str | None) -> int:
    attempt = 0
    while store.find_run(run_id_for(lock_digest, attempt, target)) is not None:
        attempt += 1
    return attempt


def run_evaluation(
    spec_path: Path,
    backend: Backend,
    signer: Signer,
    settings: Settings,
    *,
    rerun: bool = False,
    progress: Progress = lambda _: None,
    annotate: Annotate | None = None,
    reason: str | None = None,
    environ: Mapping[str, str] | None = None,
    transfer: TransferProgress | None = None,
    verify_rootfs: Literal["used", "full"] | None = None,
) -> RunOutcome:
    """Run (or find) the evaluation of a locked spec; always ends in a stored bundle.

    ``annotate`` (used by ``evalrun rerun``) is called with the finished predicate
    of a new run and returns it with keys added; that is what gets signed (it may
    not replace or drop existing keys: ValueError). ``reason`` is the launcher's
    rationale (``--reason``); it wins over the spec's ``metadata.rationale`` and both
    are recorded in the predicate's ``provenance``, with the launcher's identity read
    from ``environ`` (default: the process environment). ``transfer(what)`` may return
    a ``(done, total)`` callback to follow an input fetched by digest (the CLI's bar).
    ``verify_rootfs`` overrides the spec's ``sandbox.verify_rootfs`` for a new run.
    """
    spec, lock = load_locked(spec_path)
    store = Store(settings.home)
    lock_digest = lock.digest()
    target = backend_target(backend)
    attempt = (
        _next_attempt(store, lock_digest, target)
        if rerun
        else _current_attempt(store, lock_digest, backend.name, target)
    )
    run_id = run_id_for(lock_digest, attempt, target)
    existing = stored_outcome(store, run_id)
    if existing is not None:
        progress(f"run {run_id} already exists; returning it (use --rerun for a new attempt)")
        return existing

    spec_dir = spec_path.resolve().parent
    check_group_definitions(store, spec)
    steps = preprocessing_records(spec, spec_dir)
    journal = Journal(run_id)
    started = _now()
    run_provenance = provenance(
        spec,
        env=os.environ if environ is None else environ,
        launched_at=started,
        evalrun_version=_evalrun_version(),
        reason=reason,
        preprocessing=steps,
        signer_keyid=signer.keyid,
    )
    journal.emit(
        "run_start",
        spec=spec.metadata.name,
        lock_digest=lock_digest,
        attempt=attempt,
        backend=backend.name,
    )
    sealing = Sealing(
        spec=spec,
        lock=lock,
        run_id=run_id,
        attempt=attempt,
        started=started,
        backend=backend.name,
        run_provenance=run_provenance,
        journal=journal,
        annotate=annotate,
        target=target,
    )
    with store.staging_dir() as stage:
        stage_run_files(spec_path, spec, stage)

        def attempt_run(results_tmp: Path) -> BackendResult:
            inputs = _check_inputs_on_host(
                spec_dir,
                lock,
                settings,
                spec=spec,
                progress=progress,
                transfer=transfer,
                remote=backend.pulls_inputs,
            )
            _check_preprocessing(steps, lock)
            jobs = custom_jobs(spec, spec_path, lock)
            carry_files(jobs, spec_dir, stage)
            journal.emit("inputs_verified", count=len(inputs))
            plan = make_plan(spec, lock, inputs, attempt, target, verify_rootfs=verify_rootfs)
            (stage / "plan.json").write_text(
                json.dumps(plan.agent_plan(), indent=2, sort_keys=True) + "\n"
            )
            progress(f"preflight on backend {backend.name} (sandbox: {plan.runtime})")
            sandbox = CustomMetricSandbox()
            if jobs:
                sandbox.preflight(plan.image_ref)
            backend.preflight(plan)
            progress(
                f"running {run_id} in the sandbox (image {lock.image.ref.split('@')[1][:19]}…)"
            )
            holder.plan, holder.jobs, holder.sandbox = plan, jobs, sandbox
            return backend.run(plan, results_tmp)

        holder = _PlanHolder()
        result, report, judgement = judged_attempt(stage, journal, attempt_run, holder)
        progress("sealing the bundle (hash, sign)")
        return seal_run(stage, store, signer, sealing, result, report, judgement)


def stage_run_files(spec_path: Path, spec: EvalSpec, stage: Path) -> None:
    """What every run bundle carries from the spec's folder: spec, lock, preprocessing code."""
    shutil.copy2(spec_path, stage / "spec.yaml")
    shutil.copy2(lock_path_for(spec_path), stage / "eval.lock.json")
    _carry_preprocessing(spec, spec_path.resolve().parent, stage / "preprocessing")


@dataclass
class _PlanHolder:
    """The plan an attempt ran, and its custom metrics with the sandbox that recomputes
    them (set by the attempt once it has them)."""

    plan: RunPlan | None = None
    jobs: list[CustomMetricJob] = field(default_factory=list)
    sandbox: CustomMetricSandbox | None = None


@dataclass(frozen=True)
class Sealing:
    """What sealing a run needs besides how it ended: what ran, when, launched by whom."""

    spec: EvalSpec
    lock: LockedSpec
    run_id: str
    attempt: int
    started: str
    backend: str
    run_provenance: Mapping[str, Any]
    journal: Journal
    annotate: Annotate | None = None
    target: str | None = None
    """The backend's target when it names one (part of the run's identity)."""


def judged_attempt(
    stage: Path,
    journal: Journal,
    attempt_run: Callable[[Path], BackendResult],
    holder: _PlanHolder,
) -> tuple[BackendResult | None, ContainerReport, Judgement]:
    """Run ``attempt_run`` (which sets ``holder.plan``), collect its results into
    ``stage/results`` without trusting them, and judge how the run ended.

    Integrity, environment and infrastructure errors, Ctrl-C and a cancellation end
    in a judgement (the run is sealed saying so); any other error propagates and
    nothing is sealed.
    """
    result: BackendResult | None = None
    report = ContainerReport()
    judgement: Judgement
    try:
        with tempfile.TemporaryDirectory(prefix="evalrun-results-") as tmp:
            results_tmp = Path(tmp) / "results"
            result = attempt_run(results_tmp)
            plan = holder.plan
            assert plan is not None
            journal.emit(
                "container_done",
                exit_code=result.exit_code,
                timed_out=result.timed_out,
                duration_s=result.duration_s,
                runtime=result.runtime,
            )
            collected = collect_results(results_tmp, stage / "results")
            collected.problems[:0] = result.collection_problems
            journal.emit(
                "results_collected",
                files=len(collected.files),
                bytes=collected.total_bytes,
                problems=collected.problems,
            )
        results = stage / "results"
        agent_report = read_container_report(results)
        judgement = judge(plan, result, collected.problems, agent_report) or judge_metrics(
            plan,
            result,
            agent_report,
            with_custom_metrics(
                recompute_metrics(
                    results,
                    plan.metrics,
                    plan.seed,
                    plan.perturbations,
                    overridden=[str(m["name"]) for m in plan.custom_metrics],
                ),
                results,
                plan,
                holder.jobs,
                holder.sandbox or CustomMetricSandbox(),
            ),
        )
        if judgement.outcome is Outcome.BAD_OUTPUT:
            judgement = judge_partial(
                judgement, recompute_available(results, plan.metrics, plan.seed)
            )
        report = agent_report  # recorded only once judged, as it always was
    except KeyboardInterrupt as stop:  # Ctrl-C, or SIGTERM as StopRequested
        judgement = Judgement(
            Outcome.INTERRUPTED, interrupted_reason(getattr(stop, "signal_name", None))
        )
    except (RunCancelled, IntegrityError, EnvironmentMismatch, InfrastructureError) as exc:
        judgement = error_judgement(exc) or Judgement(Outcome.AGENT_ERROR, _one_line(exc))
    if result is not None and result.interrupted:
        judgement = Judgement(
            Outcome.INTERRUPTED, interrupted_judgement_reason(result), facts=judgement.facts
        )
    return result, report, judgement


def error_judgement(exc: EvalrunError) -> Judgement | None:
    """How a run ends on ``exc`` (cancelled, integrity, environment, infrastructure), or None
    for an error that is not a run's outcome (it propagates; nothing is sealed)."""
    if isinstance(exc, RunCancelled):
        return Judgement(Outcome.CANCELLED, exc.message)
    if isinstance(exc, IntegrityError):
        return Judgement(Outcome.INTEGRITY_FAILURE, _one_line(exc))
    if isinstance(exc, EnvironmentMismatch):
        return Judgement(Outcome.ENVIRONMENT_MISMATCH, _one_line(exc))
    if isinstance(exc, InfrastructureError):
        return Judgement(Outcome.INFRASTRUCTURE_FAILURE, _one_line(exc))
    return None


def stored_outcome(store: Store, run_id: str) -> RunOutcome | None:
    """The run ``run_id`` as sealed in ``store`` (``reused``), or None."""
    existing = store.find_run(run_id)
    if existing is None:
        return None
    found = _load_predicate(existing.path)
    # a stored run always has an outcome; one without is an internal error (exit 1)
    outcome = found.outcome or Outcome.AGENT_ERROR
    return RunOutcome(
        run_id, outcome, outcome.exit_code, found.reason, existing, found, reused=True
    )


def seal_run(
    stage: Path,
    store: Store,
    signer: Signer,
    sealing: Sealing,
    result: BackendResult | None,
    report: ContainerReport,
    judgement: Judgement,
) -> RunOutcome:
    """Build, sign and store the bundle of a run that ended in ``judgement``.

    ``stage`` (a store staging dir) already holds the run's files (spec, lock, plan,
    results); the predicate, report and logs are added here.
    """
    outcome, reason = judgement.outcome, judgement.reason
    journal = sealing.journal
    journal.emit(
        "run_end",
        level="info" if outcome.exit_code == 0 else "error",
        outcome=outcome,
        reason=reason,
    )
    predicate = build_run_predicate(
        sealing.spec,
        sealing.lock,
        run_id=sealing.run_id,
        attempt=sealing.attempt,
        result=result,
        judgement=judgement,
        report=report,
        started=sealing.started,
        backend=sealing.backend,
        target=sealing.target,
        run_provenance=sealing.run_provenance,
        finished=_now(),
        evalrun_version=_evalrun_version(),
    )
    if sealing.annotate is not None:
        predicate = _annotated(predicate, sealing.annotate)
    (stage / "report.md").write_text(render_markdown(predicate))
    (stage / "logs").mkdir(exist_ok=True)
    (stage / "logs" / "runner.jsonl").write_bytes(journal.dump())
    if result is not None and result.container_log:
        (stage / "logs" / "container.log").write_text(result.container_log)
    build_bundle(stage, predicate.to_json(), signer, stage)
    stored = store.put(stage)
    return RunOutcome(
        sealing.run_id, outcome, outcome.exit_code, reason, stored, predicate, reused=False
    )


def _one_line(exc: EvalrunError) -> str:
    return exc.diagnostics().replace("\n", "; ")


def _annotated(predicate: RunPredicate, annotate: Annotate) -> RunPredicate:
    """The predicate ``annotate`` returns, refused if it changed or dropped a key."""
    annotated = annotate(predicate)
    before, after = predicate.to_json(), annotated.to_json()
    if changed := sorted(k for k, v in before.items() if k not in after or after[k] != v):
        raise ValueError(f"annotate may not replace predicate keys {changed}")
    return annotated


def _load_predicate(bundle_dir: Path) -> RunPredicate:
    return expect_kind(read_predicate(bundle_dir), RunPredicate, bundle_dir)


__all__ = [
    "EvalrunError",
    "IntegrityError",
    "RunOutcome",
    "build_run_predicate",
    "run_evaluation",
    "run_id_for",
]

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
import functools
import importlib
import json
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from importlib.metadata import version as dist_version
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from runner._internal.settings import Settings
from runner.build.preprocessing import preprocessing_records
from runner.bundle.signing import Signer
from runner.bundle.store import Store, StoredBundle
from runner.errors import EvalrunError, IntegrityError
from runner.model.lock import LockedSpec
from runner.model.outcome import Outcome
from runner.model.plan import Backend, BackendResult, RunPlan
from runner.model.spec import EvalSpec
from runner.shared.run_ids import run_id_for
from runner.workflows.custom_metrics import carry_files, custom_jobs
from runner.workflows.inputs import TransferProgress
from runner.workflows.run_judging import (
    _one_line,
    _PlanHolder,
    error_judgement,
    judged_attempt,
)
from runner.workflows.run_setup import (
    Progress,
    _carry_preprocessing,
    _check_inputs_on_host,
    _check_preprocessing,
    _current_attempt,
    _load_predicate,
    _made_by,
    _next_attempt,
    backend_target,
    choose_attempt,
    load_locked,
    make_plan,
    stage_run_files,
)

if TYPE_CHECKING:
    # loaded (with the Docker SDK) only for a spec with custom metrics
    from runner.backends.custom_metric import CustomMetricJob, CustomMetricSandbox

    # loaded while the run's sandbox runs (prepare_sealing)
    from runner.model.predicate import JsonObject, RunPredicate
    from runner.workflows.judge import ContainerReport, Judgement
    from runner.workflows.run_predicate import build_run_predicate

    # A re-run's hook: the finished predicate with keys added (it may not change existing ones).
    Annotate = Callable[[RunPredicate], RunPredicate]

# What sealing a run loads beyond what starting it does: the predicate's models, the bundle
# writer and signer, the report. A new run loads them while its sandbox runs
# (prepare_sealing, the backend's on_start), not before it starts: ~60 ms less before the
# container is created, where the whole run waits for them.
SEALING_MODULES = (
    "runner.workflows.run_predicate",
    "runner.bundle.build",
    "runner.render.markdown",
    "runner.build.provenance",
)

log = logging.getLogger("evalrun.run")

_LOG_RESERVED = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message"}


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds")


@functools.cache  # the installed distribution is looked up once (a run needs it twice)
def _evalrun_version() -> str:
    try:
        return dist_version("evalrun")
    except Exception:
        return "unknown"


class Journal:
    """The runner's own JSON-lines events for one run; also sent to logging."""

    def __init__(self, run_id: str) -> None:
        self.run_id = run_id
        # each event's fixed keys and the fields it was given: only ever written as JSON
        self.records: list[dict[str, object]] = []

    def emit(self, event: str, level: str = "info", **fields: Any) -> None:
        record: dict[str, object] = {
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
    spec: EvalSpec | None = None,
    preload: Sequence[str] = (),
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
    ``spec`` is the spec as the caller already loaded it from ``spec_path`` (read once).
    ``preload``: modules the caller uses once the run is sealed (its report), loaded with
    those sealing needs while the sandbox runs (:func:`prepare_sealing`).
    """
    spec, lock = load_locked(spec_path, spec)
    store = Store(settings.home)
    lock_digest = lock.digest()
    target = backend_target(backend)
    attempt = choose_attempt(store, lock_digest, backend.name, target, rerun=rerun)
    run_id = run_id_for(lock_digest, attempt, target)
    existing = stored_outcome(store, run_id)
    if existing is not None:
        progress(f"run {run_id} already exists; returning it (use --rerun for a new attempt)")
        return existing

    if spec.metadata.comparison_group:
        # the comparison code (ranking, bundle reading) loads only for a run in a group
        from runner.workflows.compare import check_group_definitions

        check_group_definitions(store, spec)
    steps, sealing = open_run(
        spec,
        lock,
        spec_path,
        signer,
        backend.name,
        run_id=run_id,
        attempt=attempt,
        target=target,
        reason=reason,
        environ=environ,
        annotate=annotate,
    )
    with store.staging_dir() as stage:
        stage_run_files(spec_path, spec, stage)

        def attempt_run(results_tmp: Path) -> BackendResult:
            plan, jobs, sandbox = plan_and_check(
                spec_path,
                settings,
                stage,
                sealing,
                steps,
                backend,
                progress=progress,
                transfer=transfer,
                verify_rootfs=verify_rootfs,
            )
            progress(
                f"running {run_id} in the sandbox (image {lock.image.ref.split('@')[1][:19]}…)"
            )
            holder.plan, holder.jobs, holder.sandbox = plan, jobs, sandbox
            return backend.run(
                plan, results_tmp, on_start=functools.partial(prepare_sealing, sealing, preload)
            )

        holder = _PlanHolder()
        result, report, judgement = judged_attempt(stage, sealing.journal, attempt_run, holder)
        progress("sealing the bundle (hash, sign)")
        return seal_run(stage, store, signer, sealing, result, report, judgement)


@dataclass(frozen=True)
class Sealing:
    """What sealing a run needs besides how it ended: what ran, when, launched by whom."""

    spec: EvalSpec
    lock: LockedSpec
    run_id: str
    attempt: int
    started: str
    backend: str
    provenance_of: Callable[[], Mapping[str, Any]]
    """Builds the predicate's ``provenance`` block, from facts fixed when the run opened
    (:attr:`run_provenance` calls it once)."""
    journal: Journal
    annotate: Annotate | None = None
    target: str | None = None
    """The backend's target when it names one (part of the run's identity)."""

    @functools.cached_property
    def run_provenance(self) -> Mapping[str, Any]:
        """The ``provenance`` block (built on first use: while the sandbox runs, for a new
        run whose backend calls :func:`prepare_sealing`)."""
        return self.provenance_of()


def prepare_sealing(sealing: Sealing, preload: Sequence[str] = ()) -> None:
    """What sealing ``sealing``'s run needs and its start did not: loaded, with the
    caller's ``preload`` (what it uses after), and its provenance block built. A backend
    calls it (``on_start``) once the sandbox runs, on the caller's thread, while the
    evaluation goes on; an error in it ends the run like an error before the start (the
    sandbox is removed, nothing is sealed from it)."""
    for name in (*SEALING_MODULES, *preload):
        importlib.import_module(name)
    _ = sealing.run_provenance


def _provenance_block(
    spec: EvalSpec,
    *,
    env: Mapping[str, str],
    launched_at: str,
    reason: str | None,
    preprocessing: list[JsonObject],
    signer_keyid: str | None,
) -> Mapping[str, Any]:
    from runner.build.provenance import provenance

    return provenance(
        spec,
        env=env,
        launched_at=launched_at,
        evalrun_version=_evalrun_version(),
        reason=reason,
        preprocessing=preprocessing,
        signer_keyid=signer_keyid,
    )


def open_run(
    spec: EvalSpec,
    lock: LockedSpec,
    spec_path: Path,
    signer: Signer,
    backend: str,
    *,
    run_id: str,
    attempt: int,
    target: str | None,
    reason: str | None,
    environ: Mapping[str, str] | None,
    annotate: Annotate | None = None,
    **start_facts: Any,
) -> tuple[list[JsonObject], Sealing]:
    """The start of a new run (blocking or detached): its preprocessing records, and what
    sealing it will need — when it started, who launched it and why, its journal (the
    ``run_start`` event emitted, with ``start_facts``)."""
    steps = preprocessing_records(spec, spec_path.resolve().parent)
    journal = Journal(run_id)
    started = _now()
    # the launcher's environment as it is now (a copy): the block is built later
    provenance_of = functools.partial(
        _provenance_block,
        spec,
        env=dict(os.environ if environ is None else environ),
        launched_at=started,
        reason=reason,
        preprocessing=steps,
        signer_keyid=signer.keyid,
    )
    journal.emit(
        "run_start",
        spec=spec.metadata.name,
        lock_digest=lock.digest(),
        attempt=attempt,
        backend=backend,
        **start_facts,
    )
    sealing = Sealing(
        spec=spec,
        lock=lock,
        run_id=run_id,
        attempt=attempt,
        started=started,
        backend=backend,
        provenance_of=provenance_of,
        journal=journal,
        annotate=annotate,
        target=target,
    )
    return steps, sealing


def plan_and_check(
    spec_path: Path,
    settings: Settings,
    stage: Path,
    sealing: Sealing,
    steps: list[JsonObject],
    backend: Backend,
    *,
    progress: Progress,
    transfer: TransferProgress | None = None,
    verify_rootfs: Literal["used", "full"] | None = None,
) -> tuple[RunPlan, list[CustomMetricJob], CustomMetricSandbox | None]:
    """Everything before a run's container or Job, blocking or detached: inputs checked on
    the host (or in the registry, for a backend that pulls them), preprocessing and custom
    metric files against the lock (carried into ``stage``), the plan written, the custom
    metric sandbox (None for a spec without custom metrics) and the backend's preflight."""
    spec, lock = sealing.spec, sealing.lock
    spec_dir = spec_path.resolve().parent
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
    sealing.journal.emit("inputs_verified", count=len(inputs))
    plan = make_plan(
        spec, lock, inputs, sealing.attempt, sealing.target, verify_rootfs=verify_rootfs
    )
    (stage / "plan.json").write_text(json.dumps(plan.agent_plan(), indent=2, sort_keys=True) + "\n")
    progress(f"preflight on backend {backend.name} (sandbox: {plan.runtime})")
    sandbox = None
    if jobs:  # recomputed after the run, in the runner host's sandbox: check it now
        from runner.backends.custom_metric import CustomMetricSandbox

        sandbox = CustomMetricSandbox()
        sandbox.preflight(plan.image_ref)
    backend.preflight(plan)
    return plan, jobs, sandbox


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
    from runner.bundle.build import build_bundle
    from runner.render.markdown import render_markdown
    from runner.workflows.run_predicate import build_run_predicate

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


def _annotated(predicate: RunPredicate, annotate: Annotate) -> RunPredicate:
    """The predicate ``annotate`` returns, refused if it changed or dropped a key."""
    annotated = annotate(predicate)
    before, after = predicate.to_json(), annotated.to_json()
    if changed := sorted(k for k, v in before.items() if k not in after or after[k] != v):
        raise ValueError(f"annotate may not replace predicate keys {changed}")
    return annotated


def __getattr__(name: str) -> Any:
    """``build_run_predicate`` stays importable from here, loaded when asked for."""
    if name == "build_run_predicate":
        from runner.workflows.run_predicate import build_run_predicate

        return build_run_predicate
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# names moved to run_setup and run_judging stay importable from here
__all__ = [
    "EvalrunError",
    "IntegrityError",
    "Progress",
    "RunOutcome",
    "_PlanHolder",
    "_carry_preprocessing",
    "_check_inputs_on_host",
    "_check_preprocessing",
    "_current_attempt",
    "_load_predicate",
    "_made_by",
    "_next_attempt",
    "_one_line",
    "backend_target",
    "build_run_predicate",
    "error_judgement",
    "judged_attempt",
    "load_locked",
    "make_plan",
    "run_evaluation",
    "run_id_for",
    "stage_run_files",
]

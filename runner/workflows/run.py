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
from dataclasses import dataclass
from importlib.metadata import version as dist_version
from pathlib import Path
from typing import Any

from runner._internal.settings import Settings
from runner.adapters.sources import SourceOptions
from runner.backends.collect import collect_results, recompute_available, recompute_metrics
from runner.build.image import image_reproducibility
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
    InputError,
    IntegrityError,
    SpecError,
)
from runner.model.lock import LockedSpec, load_lock, lock_path_for
from runner.model.outcome import Outcome
from runner.model.plan import Backend, BackendResult, PlanInput, RunPlan
from runner.model.predicate import (
    DatasetInput,
    ImageFacts,
    ImageReproducibility,
    JsonObject,
    MetricDefinition,
    MetricResult,
    ModelInput,
    Provenance,
    RunPredicate,
    SandboxFacts,
    Seeds,
    SourceFacts,
    SpecRef,
    Timestamps,
    json_at,
)
from runner.model.spec import EvalSpec, load_spec
from runner.render.markdown import render_markdown
from runner.shared.metrics import is_gating
from runner.workflows.compare import check_group_definitions
from runner.workflows.inputs import InputResolver, TransferProgress, WantedInput, host_inputs
from runner.workflows.judge import (
    INTERRUPTED,
    ContainerReport,
    Judgement,
    ThresholdVerdict,
    judge,
    judge_metrics,
    judge_partial,
    read_container_report,
)

log = logging.getLogger("evalrun.run")
Progress = Callable[[str], None]
# A re-run's hook: the finished predicate with keys added (it may not change existing ones).
Annotate = Callable[[RunPredicate], RunPredicate]

_LOG_RESERVED = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message"}


def run_id_for(lock_digest: str, attempt: int) -> str:
    """Deterministic run id: the same locked spec and attempt always name the same run."""
    h = hashlib.sha256(f"evalrun-run/v1\n{lock_digest}\n{attempt}".encode()).hexdigest()
    return f"r-{h[:24]}"


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
) -> list[PlanInput]:
    """Every input verified in the cache before any container: local ones re-hashed now.

    A local input edited since the lock stops the run (exit 3); one that is gone, or a
    remote one not cached here, is fetched by digest from where the lock says it was
    published (see :mod:`runner.workflows.inputs`).
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
        settings, spec_dir=spec_dir, options=options, progress=progress, transfer=transfer
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


def make_plan(spec: EvalSpec, lock: LockedSpec, inputs: list[PlanInput], attempt: int) -> RunPlan:
    return RunPlan(
        run_id=run_id_for(lock.digest(), attempt),
        attempt=attempt,
        image_ref=lock.image.ref,
        expected_rootfs_digest=lock.image.rootfs_digest,
        runtime=spec.sandbox.runtime,
        network=spec.sandbox.network,
        command=list(spec.command),
        params=dict(spec.params),
        seed=spec.seed,
        metrics=[m.definition() for m in spec.metrics],
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
        queue=spec.cluster.queue,
        priority_class=spec.cluster.priority_class,
        image_pull_secrets=list(spec.cluster.image_pull_secrets),
        spec_digest=spec.digest(),
        lock_digest=lock.digest(),
        spec_name=spec.metadata.name,
    )


def _current_attempt(store: Store, lock_digest: str) -> int:
    """The attempt a plain run attaches to: the first one not ended by infrastructure/Ctrl-C."""
    attempt = 0
    while (found := store.find_run(run_id_for(lock_digest, attempt))) is not None:
        outcome = Outcome.parse(found.outcome)
        # runs that never got to evaluate: a plain `evalrun run` tries again
        if outcome is None or not outcome.retryable:
            return attempt
        attempt += 1
    return attempt


def _next_attempt(store: Store, lock_digest: str) -> int:
    attempt = 0
    while store.find_run(run_id_for(lock_digest, attempt)) is not None:
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
) -> RunOutcome:
    """Run (or find) the evaluation of a locked spec; always ends in a stored bundle.

    ``annotate`` (used by ``evalrun rerun``) is called with the finished predicate
    of a new run and returns it with keys added; that is what gets signed (it may
    not replace or drop existing keys: ValueError). ``reason`` is the launcher's
    rationale (``--reason``); it wins over the spec's ``metadata.rationale`` and both
    are recorded in the predicate's ``provenance``, with the launcher's identity read
    from ``environ`` (default: the process environment). ``transfer(what)`` may return
    a ``(done, total)`` callback to follow an input fetched by digest (the CLI's bar).
    """
    spec, lock = load_locked(spec_path)
    store = Store(settings.home)
    lock_digest = lock.digest()
    attempt = _next_attempt(store, lock_digest) if rerun else _current_attempt(store, lock_digest)
    run_id = run_id_for(lock_digest, attempt)
    existing = store.find_run(run_id)
    if existing is not None:
        progress(f"run {run_id} already exists; returning it (use --rerun for a new attempt)")
        found = _load_predicate(existing.path)
        # a stored run always has an outcome; one without is an internal error (exit 1)
        outcome = found.outcome or Outcome.AGENT_ERROR
        return RunOutcome(
            run_id, outcome, outcome.exit_code, found.reason, existing, found, reused=True
        )

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
    with store.staging_dir() as stage:
        shutil.copy2(spec_path, stage / "spec.yaml")
        shutil.copy2(lock_path_for(spec_path), stage / "eval.lock.json")
        _carry_preprocessing(spec, spec_dir, stage / "preprocessing")
        result: BackendResult | None = None
        report = ContainerReport()
        judgement: Judgement
        try:
            inputs = _check_inputs_on_host(
                spec_dir, lock, settings, spec=spec, progress=progress, transfer=transfer
            )
            _check_preprocessing(steps, lock)
            journal.emit("inputs_verified", count=len(inputs))
            plan = make_plan(spec, lock, inputs, attempt)
            (stage / "plan.json").write_text(
                json.dumps(plan.agent_plan(), indent=2, sort_keys=True) + "\n"
            )
            progress(f"preflight on backend {backend.name} (sandbox: {plan.runtime})")
            backend.preflight(plan)
            progress(
                f"running {run_id} in the sandbox (image {lock.image.ref.split('@')[1][:19]}…)"
            )
            with tempfile.TemporaryDirectory(prefix="evalrun-results-") as tmp:
                results_tmp = Path(tmp) / "results"
                result = backend.run(plan, results_tmp)
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
                recompute_metrics(results, plan.metrics, plan.seed, plan.perturbations),
            )
            if judgement.outcome is Outcome.BAD_OUTPUT:
                judgement = judge_partial(
                    judgement, recompute_available(results, plan.metrics, plan.seed)
                )
            report = agent_report  # recorded only once judged, as it always was
        except KeyboardInterrupt:
            judgement = Judgement(Outcome.INTERRUPTED, INTERRUPTED)
        except IntegrityError as exc:
            judgement = Judgement(Outcome.INTEGRITY_FAILURE, _one_line(exc))
        except EnvironmentMismatch as exc:
            judgement = Judgement(Outcome.ENVIRONMENT_MISMATCH, _one_line(exc))
        except InfrastructureError as exc:
            judgement = Judgement(Outcome.INFRASTRUCTURE_FAILURE, _one_line(exc))
        if result is not None and result.interrupted:
            judgement = Judgement(Outcome.INTERRUPTED, INTERRUPTED, facts=judgement.facts)
        outcome, reason = judgement.outcome, judgement.reason
        journal.emit(
            "run_end",
            level="info" if outcome.exit_code == 0 else "error",
            outcome=outcome,
            reason=reason,
        )
        predicate = build_run_predicate(
            spec,
            lock,
            run_id=run_id,
            attempt=attempt,
            result=result,
            judgement=judgement,
            report=report,
            started=started,
            backend=backend.name,
            run_provenance=run_provenance,
        )
        if annotate is not None:
            predicate = _annotated(predicate, annotate)
        (stage / "report.md").write_text(render_markdown(predicate))
        (stage / "logs").mkdir(exist_ok=True)
        (stage / "logs" / "runner.jsonl").write_bytes(journal.dump())
        if result is not None and result.container_log:
            (stage / "logs" / "container.log").write_text(result.container_log)
        progress("sealing the bundle (hash, sign)")
        build_bundle(stage, predicate.to_json(), signer, stage)
        stored = store.put(stage)
    return RunOutcome(run_id, outcome, outcome.exit_code, reason, stored, predicate, reused=False)


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


# --------------------------------------------------------------------------- the predicate


def _plain_json(value: Mapping[str, Any]) -> JsonObject:
    """``value`` as the bundle will hold it: what ``json.dumps`` makes of it (tuples as lists)."""
    try:
        data = json.loads(json.dumps(dict(value), allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise InputError(f"bundle predicate is not plain JSON: {exc}") from exc
    assert isinstance(data, dict)
    return data


def _metric_result(
    recomputed: MetricResult, spec: EvalSpec, verdicts: Mapping[str, ThresholdVerdict]
) -> MetricResult:
    """A recomputed metric with its definition from the spec and its threshold verdict."""
    definition = next(d for d in spec.metrics if d.name == recomputed.name)
    verdict = verdicts.get(recomputed.name) or ThresholdVerdict(None, None)
    return MetricResult.model_validate(
        {
            **recomputed.to_json(),
            "threshold": definition.threshold,
            "direction": definition.direction,
            "compute": definition.compute,
            "field": definition.field,
            "role": definition.role,
            "gating": is_gating(definition.model_dump(mode="json")),
            "promoted": (
                definition.promoted.model_dump(mode="json") if definition.promoted else None
            ),
            "threshold_met": verdict.threshold_met,
            "passed": verdict.passed,
        }
    )


def build_run_predicate(
    spec: EvalSpec,
    lock: LockedSpec,
    *,
    run_id: str,
    attempt: int,
    result: BackendResult | None,
    judgement: Judgement,
    report: ContainerReport,
    started: str,
    backend: str,
    run_provenance: Mapping[str, Any] | None = None,
) -> RunPredicate:
    """The signed predicate of a run: what ran, where, on what, and how it ended."""
    facts = judgement.facts
    launched = Provenance.model_validate(run_provenance or {})
    return RunPredicate(
        run_id=run_id,
        attempt=attempt,
        evalrun_version=_evalrun_version(),
        backend=backend,
        spec=SpecRef(name=spec.metadata.name, digest=spec.digest()),
        lock_digest=lock.digest(),
        image=ImageFacts(
            ref=lock.image.ref,
            digest=lock.image.ref.split("@", 1)[1],
            rootfs_expected=lock.image.rootfs_digest,
            rootfs_found=json_at(report.preflight, "rootfs.found"),
            digest_confirmed_by_backend=result.image_digest_confirmed if result else None,
        ),
        sandbox=SandboxFacts(
            runtime_requested=spec.sandbox.runtime,
            runtime_used=result.runtime if result else None,
            network=result.network if result else None,
            network_requested=spec.sandbox.network,
            details=_plain_json(result.details) if result else {},
        ),
        model=ModelInput.model_validate(lock.model.record()),
        datasets=tuple(DatasetInput.model_validate(d.record()) for d in lock.datasets),
        source=SourceFacts.model_validate(lock.source.model_dump(mode="json")),
        image_reproducibility=ImageReproducibility.model_validate(image_reproducibility(lock)),
        provenance=launched,
        comparison_group=spec.metadata.comparison_group,
        preprocessing=launched.preprocessing,
        metric_definitions=tuple(
            MetricDefinition.model_validate(d.definition() | {"gating": d.gating})
            for d in spec.metrics
        ),
        params=_plain_json(spec.params),
        seeds=Seeds(seed=spec.seed, determinism=report.summary.get("determinism")),
        environment=report.environment,
        preflight=report.preflight,
        node_crosscheck=facts.node_crosscheck,
        perturbations=facts.perturbations,
        evaluation=report.summary.get("evaluation"),
        metrics=tuple(_metric_result(m, spec, facts.verdicts) for m in facts.metrics),
        outcome=judgement.outcome,
        reason=judgement.reason,
        exit_code=judgement.outcome.exit_code,
        timestamps=Timestamps(
            started=started,
            finished=_now(),
            container_started=result.started_at if result else None,
            container_finished=result.finished_at if result else None,
            **_queue_timestamps(result),
        ),
    )


def _queue_timestamps(result: BackendResult | None) -> dict[str, Any]:
    # only a queued run has these keys: older bundles and unqueued runs stay as they were
    if result is None or result.queued_at is None:
        return {}
    return {"queued": result.queued_at, "queue_wait_s": result.queue_wait_s}


__all__ = [
    "EvalrunError",
    "IntegrityError",
    "RunOutcome",
    "build_run_predicate",
    "run_evaluation",
    "run_id_for",
]

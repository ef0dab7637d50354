"""The signed predicate of a run: what ran, where, on what, and how it ended."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Mapping
from importlib.metadata import version as dist_version
from typing import Any, TypedDict

from pydantic import JsonValue

from runner.errors import InputError
from runner.model.lock import LockedSpec
from runner.model.plan import BackendResult
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
    rootfs_check,
)
from runner.model.predicate_parts import image_reproducibility
from runner.model.spec import EvalSpec
from runner.shared.metrics import is_gating
from runner.workflows.judge import ContainerReport, Judgement, ThresholdVerdict


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds")


def _evalrun_version() -> str:
    try:
        return dist_version("evalrun")
    except Exception:
        return "unknown"


class _QueueTimestamps(TypedDict, total=False):
    queued: str
    queue_wait_s: float | None


def _queue_timestamps(result: BackendResult | None) -> _QueueTimestamps:
    # only a queued run has these keys: older bundles and unqueued runs stay as they were
    if result is None or result.queued_at is None:
        return {}
    return {"queued": result.queued_at, "queue_wait_s": result.queue_wait_s}


def _present(**fields: JsonValue) -> JsonObject:
    return {k: v for k, v in fields.items() if v is not None}


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
            "gating": is_gating(definition.definition()),
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
    target: str | None = None,
    run_provenance: Mapping[str, Any] | None = None,
    finished: str | None = None,
    evalrun_version: str | None = None,
) -> RunPredicate:
    """The signed predicate of a run: what ran, where, on what, and how it ended
    (``finished`` and ``evalrun_version``: now and this evalrun unless given)."""
    facts = judgement.facts
    launched = Provenance.model_validate(run_provenance or {})
    return RunPredicate(
        run_id=run_id,
        attempt=attempt,
        evalrun_version=evalrun_version or _evalrun_version(),
        backend=backend,
        # set only when the backend names one, so runs on the embedded default read as before
        **({"backend_target": target} if target else {}),
        spec=SpecRef(name=spec.metadata.name, digest=spec.digest()),
        lock_digest=lock.digest(),
        image=ImageFacts(
            ref=lock.image.ref,
            digest=lock.image.ref.split("@", 1)[1],
            rootfs_expected=lock.image.rootfs_digest,
            rootfs_found=json_at(report.preflight, "rootfs.found"),
            # only what the agent said: bundles of agents that say nothing keep their shape
            **_present(rootfs_check=rootfs_check(report.preflight)),
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
        # only a run that failed in the container has one: others read as before
        **({"stderr_tail": judgement.stderr_tail} if judgement.stderr_tail else {}),
        exit_code=judgement.outcome.exit_code,
        timestamps=Timestamps(
            started=started,
            finished=finished or _now(),
            container_started=result.started_at if result else None,
            container_finished=result.finished_at if result else None,
            **_queue_timestamps(result),
        ),
    )

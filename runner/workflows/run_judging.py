"""Judging one attempt of a run: run it, collect its results without trusting them, and
say how it ended."""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from runner.backends.collect import collect_results, recompute_available, recompute_metrics
from runner.backends.metrics_ahead import MetricsAhead
from runner.errors import (
    EnvironmentMismatch,
    EvalrunError,
    InfrastructureError,
    IntegrityError,
    RunCancelled,
    interrupted_reason,
)
from runner.model.outcome import Outcome
from runner.model.plan import BackendResult, RunPlan
from runner.shared.metrics import MetricDefinition
from runner.workflows.custom_metrics import with_custom_metrics
from runner.workflows.judge import (
    ContainerReport,
    Judgement,
    interrupted_judgement_reason,
    judge,
    judge_metrics,
    judge_partial,
    read_container_report,
)

if TYPE_CHECKING:
    from runner.backends.custom_metric import CustomMetricJob, CustomMetricSandbox
    from runner.workflows.run import Journal


@dataclass
class _PlanHolder:
    """The plan an attempt ran, and its custom metrics with the sandbox that recomputes
    them (set by the attempt once it has them)."""

    plan: RunPlan | None = None
    jobs: list[CustomMetricJob] = field(default_factory=list)
    sandbox: CustomMetricSandbox | None = None


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
            # the recomputation starts as soon as the evaluation has ended; used only for
            # the very bytes collected below
            ahead = MetricsAhead(results_tmp, lambda: _plan_metrics(holder)).start()
            try:
                result = attempt_run(results_tmp)
            finally:
                recomputed = ahead.result()
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
                    ahead=recomputed,
                ),
                results,
                plan,
                holder.jobs,
                holder.sandbox,
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


def _plan_metrics(holder: _PlanHolder) -> tuple[list[MetricDefinition], int] | None:
    plan = holder.plan
    return None if plan is None else (plan.metrics, plan.seed)


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


def _one_line(exc: EvalrunError) -> str:
    return exc.diagnostics().replace("\n", "; ")

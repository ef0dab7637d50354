"""Judging a sandboxed run: how it ended, from what the backend saw and the agent left.

Pure functions over data read once (:func:`read_container_report`): the agent's files
are trusted for nothing beyond choosing among failures; only metrics the runner
recomputed from the per-sample outputs can make a run pass.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

from pydantic import JsonValue

from runner.backends.collect import MetricCheck, read_json
from runner.backends.crosscheck import crosscheck_node_labels
from runner.errors import interrupted_reason
from runner.model.outcome import Outcome
from runner.model.plan import BackendResult, RunPlan
from runner.shared.metrics import partial_reason, threshold_verdicts

if TYPE_CHECKING:  # the predicate's models load while the run's sandbox runs (workflows.run)
    from runner.model.predicate import JsonObject, MetricResult, PerturbationResult

# The outcomes an agent may report for itself; anything else it says is an evaluation failure.
_AGENT_OUTCOMES = frozenset(
    {
        Outcome.INTEGRITY_FAILURE,
        Outcome.ENVIRONMENT_MISMATCH,
        Outcome.EVALUATION_FAILED,
        Outcome.TIMEOUT,
        Outcome.BAD_OUTPUT,
    }
)
# How much of the end of the evaluation's stderr is read for the last lines of a failure,
# and how many of those lines a failed run records (the bundle keeps the whole file).
_STDERR_TAIL_BYTES = 1 << 16
STDERR_TAIL_LINES = 20
# The outcomes of a run that failed in the container, whose stderr says why.
_SHOWS_STDERR = frozenset(
    {Outcome.EVALUATION_FAILED, Outcome.TIMEOUT, Outcome.BAD_OUTPUT, Outcome.OUT_OF_MEMORY}
)
INTERRUPTED = interrupted_reason("SIGINT")


def _object(value: JsonValue) -> JsonObject:
    return value if isinstance(value, dict) else {}


@dataclass(frozen=True)
class ContainerReport:
    """What the agent left in ``results/``, read once and trusted for nothing.

    ``summary``, ``preflight`` and ``environment`` are the agent's JSON objects (an
    absent file, or one that is not a JSON object, reads as ``{}``); ``stderr_tail``
    is the last lines of the evaluation's stderr (at most :data:`STDERR_TAIL_LINES`).
    """

    summary: JsonObject = field(default_factory=dict)
    preflight: JsonObject = field(default_factory=dict)
    environment: JsonObject = field(default_factory=dict)
    stderr_tail: tuple[str, ...] = ()


def _tail_lines(path: Path, count: int) -> tuple[str, ...]:
    try:
        with path.open("rb") as fh:
            size = fh.seek(0, os.SEEK_END)
            fh.seek(max(0, size - _STDERR_TAIL_BYTES))
            text = fh.read().decode("utf-8", errors="replace")
    except OSError:
        return ()
    return tuple(text.rstrip().splitlines()[-count:])


def read_container_report(results: Path) -> ContainerReport:
    """Read the agent's summary, preflight and environment capture from ``results``."""
    return ContainerReport(
        summary=_object(read_json(results / "summary.json")),
        preflight=_object(read_json(results / "preflight.json")),
        environment=_object(read_json(results / "env.json")),
        stderr_tail=_tail_lines(results / "logs" / "evaluation.stderr", STDERR_TAIL_LINES),
    )


class ThresholdVerdict(NamedTuple):
    threshold_met: bool | None
    passed: bool | None


@dataclass(frozen=True)
class RunFacts:
    """What the runner established itself while judging (recorded in the predicate)."""

    node_crosscheck: tuple[str, ...] | None = None
    metrics: tuple[MetricResult, ...] = ()
    perturbations: tuple[PerturbationResult, ...] = ()
    verdicts: Mapping[str, ThresholdVerdict] = field(default_factory=dict)


@dataclass(frozen=True)
class Judgement:
    """How a run ended, why, and the facts behind it.

    ``stderr_tail``: the end of the evaluation's stderr, for a run that failed in the
    container (recorded in the predicate and shown intact by every report).
    """

    outcome: Outcome
    reason: str | None
    facts: RunFacts = RunFacts()
    stderr_tail: tuple[str, ...] = ()


def _with_stderr(judgement: Judgement, report: ContainerReport) -> Judgement:
    """``judgement`` with the evaluation's stderr tail when it failed in the container."""
    if judgement.outcome not in _SHOWS_STDERR or not report.stderr_tail:
        return judgement
    return Judgement(judgement.outcome, judgement.reason, judgement.facts, report.stderr_tail)


def judge(
    plan: RunPlan,
    result: BackendResult,
    collect_problems: list[str],
    report: ContainerReport,
) -> Judgement | None:
    """The outcome of a sandboxed run from what the backend saw and the agent reported.

    Pure: trusts nothing the container says beyond choosing among failures. Returns
    None when the evaluation ran to the end and only its recomputed metrics can
    decide (:func:`judge_metrics`).
    """
    if result.interrupted:
        return Judgement(Outcome.INTERRUPTED, interrupted_judgement_reason(result))
    # A sandbox the backend stopped (deadline) or the kernel killed (memory) left no results
    # to judge: that is the verdict, whatever is missing because of it. No metric is used.
    if result.timed_out:
        return _with_stderr(Judgement(Outcome.TIMEOUT, _timeout_reason(plan, result)), report)
    if _oom_killed(result):
        oom = Judgement(Outcome.OUT_OF_MEMORY, _oom_reason(plan, result, report))
        return _with_stderr(oom, report)
    if _gvisor_sandbox_killed(plan, result, report):
        inferred = Judgement(Outcome.OUT_OF_MEMORY, _inferred_oom_reason(plan, result))
        return _with_stderr(inferred, report)
    if not result.image_digest_confirmed:
        return Judgement(
            Outcome.INTEGRITY_FAILURE, "the container did not run the pinned image digest"
        )
    if collect_problems:
        return Judgement(Outcome.INTEGRITY_FAILURE, "; ".join(collect_problems))
    swapped = _plan_swapped(result, report)
    if swapped:
        return Judgement(Outcome.INTEGRITY_FAILURE, swapped)
    agent_outcome = report.summary.get("outcome")
    crosscheck = _node_crosscheck(result, report)
    facts = RunFacts(node_crosscheck=crosscheck)
    if crosscheck:
        return Judgement(Outcome.ENVIRONMENT_MISMATCH, "; ".join(crosscheck), facts)
    if result.exit_code == 137 and not agent_outcome:
        return Judgement(
            Outcome.EVALUATION_FAILED,
            "the container was killed by SIGKILL (exit 137) and the backend did not say why",
            facts,
        )
    if agent_outcome != "completed" or result.exit_code != 0:
        reported = Outcome.parse(agent_outcome)
        outcome = reported if reported in _AGENT_OUTCOMES else Outcome.EVALUATION_FAILED
        said = report.summary.get("reason")
        reason = said if isinstance(said, str) and said else f"agent exited {result.exit_code}"
        if outcome is Outcome.EVALUATION_FAILED and report.stderr_tail:
            # the last line (usually the exception) in the reason; all of the tail beside it
            reason += ": " + report.stderr_tail[-1].strip()[:300]
        hint = report.summary.get("hint")
        if outcome is Outcome.EVALUATION_FAILED and isinstance(hint, str) and hint:
            # the agent knows which inputs the container had; it says so when the
            # evaluation refers to another (text only: it decides nothing)
            reason += "; " + hint[:1000]
        return _with_stderr(Judgement(outcome, reason, facts), report)
    return None


def _plan_swapped(result: BackendResult, report: ContainerReport) -> str | None:
    """Why the agent ran another plan than the backend handed it, if it did.

    The agent reports the sha256 of the plan bytes it read; a plan changed on its way
    (a ConfigMap replaced, a pod's annotation patched) is an integrity failure. Agents
    that report nothing (images built before they did) are not judged on it."""
    read = report.summary.get("plan_sha256")
    sent = result.details.get("plan_sha256")
    if not isinstance(read, str) or not isinstance(sent, str) or read == sent:
        return None
    return (
        f"the agent ran another plan than the one evalrun sent (it read sha256:"
        f"{read[:64]!s}, evalrun sent sha256:{sent})"
    )


def _timeout_reason(plan: RunPlan, result: BackendResult) -> str:
    deadline = result.details.get("active_deadline_s")
    if result.details.get("job_condition") == "DeadlineExceeded":
        reason = (
            f"timed out: the Job ran past its activeDeadlineSeconds ({deadline} s) and "
            "Kubernetes stopped it (DeadlineExceeded)"
        )
        waits = result.details.get("capacity_waits")
        if isinstance(waits, dict) and waits:
            pod, message = next(reversed(waits.items()))
            reason += (
                f"; its pod {pod} had waited for capacity in use by other pods "
                f"(scheduler: {str(message)[:300]})"
            )
        return reason
    return (
        f"timed out: the sandbox exceeded its wall-clock limit ({plan.timeout_s} s plus "
        "preflight allowance) and was killed"
    )


def _oom_killed(result: BackendResult) -> bool:
    """The backend (Docker's State.OOMKilled, the kubelet's OOMKilled) saw the OOM killer."""
    return bool(
        result.details.get("termination_reason") == "OOMKilled" or result.details.get("oom_killed")
    )


# How a gVisor sandbox killed from outside ends on Kubernetes (128: the shim has no status).
_SANDBOX_KILLED = frozenset({128, 137})


def _gvisor_sandbox_killed(plan: RunPlan, result: BackendResult, report: ContainerReport) -> bool:
    """A gVisor pod SIGKILLed before its agent reported, with no deadline or disruption.

    The host's OOM killer takes the whole gVisor sandbox at the memory limit, and
    Kubernetes (unlike Docker) does not learn that it was an OOM kill: it says "Error",
    exit 128 (the runsc shim: no exit status) or 137. Nothing else in the cluster kills a
    sandbox that way without leaving another trace.
    """
    details = result.details
    disrupted = {d.get("pod") for d in details.get("disruptions") or [] if isinstance(d, dict)}
    return (
        result.backend == "kubernetes"
        and plan.runtime == "gvisor"
        and details.get("container_exit_code") in _SANDBOX_KILLED
        and not report.summary
        and details.get("pod") not in disrupted
    )


def _inferred_oom_reason(plan: RunPlan, result: BackendResult) -> str:
    return (
        f"out of memory (inferred): the gVisor sandbox of pod {result.details.get('pod')} was "
        f"killed (exit {result.details.get('container_exit_code')}) before it reported "
        "anything, with no deadline, eviction "
        f"or deletion to explain it: the kernel's OOM killer at the memory limit "
        f"({plan.memory_mib} MiB); under gVisor Kubernetes cannot say OOMKilled"
    )


def _oom_reason(plan: RunPlan, result: BackendResult, report: ContainerReport) -> str:
    where = "pod " + str(result.details["pod"]) if result.details.get("pod") else "container"
    reason = (
        f"out of memory: the {where} reached its memory limit ({plan.memory_mib} MiB) and "
        "was OOMKilled"
    )
    evaluation = report.summary.get("evaluation")
    peak = evaluation.get("peak_rss_kib") if isinstance(evaluation, dict) else None
    if isinstance(peak, int) and not isinstance(peak, bool):
        reason += f" (peak RSS the agent saw: {peak // 1024} MiB)"
    return reason


def interrupted_judgement_reason(result: BackendResult) -> str:
    """Which signal stopped the run, and what became of its container or Job."""
    by = result.details.get("interrupted_by")
    reason = interrupted_reason(by if isinstance(by, str) else None)
    if job := result.details.get("deleted_job"):
        reason += f"; Job {job} in namespace {result.details.get('namespace')} was deleted"
    elif container := result.details.get("removed_container"):
        reason += f"; container {str(container).lstrip('/')} was removed"
    return reason


def _node_crosscheck(result: BackendResult, report: ContainerReport) -> tuple[str, ...] | None:
    """Where the node's labels disagree with the GPUs the agent saw (None: not checked)."""
    labels = result.details.get("node_labels")
    if not isinstance(labels, dict) or report.summary.get("outcome") != "completed":
        return None
    gpu = report.environment.get("gpu") or {}
    return tuple(crosscheck_node_labels(labels, gpu if isinstance(gpu, dict) else {}))


def judge_metrics(
    plan: RunPlan, result: BackendResult, report: ContainerReport, check: MetricCheck
) -> Judgement:
    """The outcome of a run that evaluated to the end: its recomputed metrics decide.

    Pure. Only gating metrics (primary, or promoted supplementary) decide the outcome.
    """
    from runner.model.predicate import MetricResult, PerturbationResult

    facts = RunFacts(
        node_crosscheck=_node_crosscheck(result, report),
        metrics=tuple(MetricResult.model_validate(m) for m in check.metrics),
        perturbations=tuple(PerturbationResult.model_validate(p) for p in check.perturbations),
    )
    if check.problems:
        return Judgement(
            Outcome.INTEGRITY_FAILURE,
            "metrics do not match the per-sample outputs: " + "; ".join(check.problems),
            facts,
        )
    verdicts = threshold_verdicts(
        [*plan.metrics, *plan.custom_metrics], {m["name"]: m["value"] for m in check.metrics}
    )
    facts = RunFacts(
        node_crosscheck=facts.node_crosscheck,
        metrics=facts.metrics,
        perturbations=facts.perturbations,
        verdicts={
            name: ThresholdVerdict(v.get("threshold_met"), v.get("passed"))
            for name, v in verdicts.items()
        },
    )
    failed = [n for n, v in verdicts.items() if v.get("gating", True) and v["passed"] is False]
    if failed:
        return Judgement(
            Outcome.THRESHOLDS_FAILED, "metrics below threshold: " + ", ".join(failed), facts
        )
    return Judgement(Outcome.PASSED, None, facts)


def judge_partial(judgement: Judgement, check: MetricCheck) -> Judgement:
    """A bad-output run whose per-sample outputs feed only some metrics: say which, keep those.

    Pure. The outcome stays a failure; the metrics the runner could recompute are recorded
    (never ranked: a bad-output run has no metrics to compare) and the reason names each
    metric that could not be computed and why. A container whose partial numbers differ
    from the runner's is an integrity failure, as for a complete run.
    """
    if judgement.outcome is not Outcome.BAD_OUTPUT or not (check.metrics or check.problems):
        return judgement
    from runner.model.predicate import MetricResult

    facts = RunFacts(
        node_crosscheck=judgement.facts.node_crosscheck,
        metrics=tuple(MetricResult.model_validate(m) for m in check.metrics),
    )
    tail = judgement.stderr_tail
    if check.problems:
        return Judgement(
            Outcome.INTEGRITY_FAILURE,
            "metrics do not match the per-sample outputs: " + "; ".join(check.problems),
            facts,
        )
    if not check.unusable:
        # every metric was computable: the agent failed on something else (perturbations)
        return judgement
    reason = partial_reason([m["name"] for m in check.metrics], check.unusable)
    return Judgement(Outcome.BAD_OUTPUT, reason, facts, tail)


__all__ = [
    "INTERRUPTED",
    "ContainerReport",
    "Judgement",
    "RunFacts",
    "ThresholdVerdict",
    "interrupted_judgement_reason",
    "judge",
    "judge_metrics",
    "judge_partial",
    "read_container_report",
]

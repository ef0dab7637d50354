"""A run's verdict as JUnit XML, the test report CI systems render (``--junit FILE``).

One test case per gating metric: its value, confidence interval, threshold and direction;
a missed threshold is a ``<failure>`` that says what was expected and what was found, with
the CI. A run that never got to a verdict on its metrics (crash, timeout, unusable output,
environment or integrity problem, infrastructure) is one failing test case with the reason;
an evalrun error before any bundle existed is one ``<error>`` case. The report fails exactly
when the command's exit code is not 0.

The cases and suites are built here from the predicates; the XML they are written as is
:mod:`runner.render.junit_xml`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Literal

from runner.model.outcome import Outcome
from runner.model.predicate import (
    ConfidenceInterval,
    MetricResult,
    ReproducedMetric,
    RunPredicate,
    RunSetMember,
    RunSetPredicate,
)
from runner.render.junit_xml import JUnitCase, JUnitProblem, JUnitSuite, one_line

# What a re-run's metric verdicts count as reproduced (runner.workflows.diff agrees).
REPRODUCED = frozenset({"identical", "within_tolerance", "within_ci"})


# --------------------------------------------------------------------------- text


def _num(value: float | None) -> str:
    return "—" if value is None else f"{value:.4f}"


def _ci_text(ci: ConfidenceInterval | None) -> str | None:
    if ci is None or ci.low is None or ci.high is None:
        return None
    level = f"{round(ci.level * 100)}% " if ci.level is not None else ""
    how = ", ".join(
        x
        for x in (ci.method, f"{ci.resamples} resamples" if ci.resamples else None)
        if x is not None
    )
    return f"{level}CI [{_num(ci.low)}, {_num(ci.high)}]" + (f" ({how})" if how else "")


def _pair_ci(ci: tuple[float, float] | None) -> str:
    return "—" if ci is None else f"[{_num(ci[0])}, {_num(ci[1])}]"


def _op(m: MetricResult) -> str:
    return "<=" if m.direction == "lower_is_better" else ">="


def _timestamp(rfc3339: str | None) -> str | None:
    """``YYYY-MM-DDTHH:MM:SS`` in UTC (the form Ant's schema requires), or None."""
    if not rfc3339:
        return None
    try:
        moment = datetime.fromisoformat(rfc3339.replace("Z", "+00:00"))
    except ValueError:
        return None
    if moment.tzinfo is not None:
        moment = moment.astimezone(UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S")


def _seconds(started: str | None, finished: str | None) -> float:
    try:
        a = datetime.fromisoformat((started or "").replace("Z", "+00:00"))
        b = datetime.fromisoformat((finished or "").replace("Z", "+00:00"))
        return max(0.0, (b - a).total_seconds())
    except (TypeError, ValueError):
        return 0.0


# --------------------------------------------------------------------------- cases


def is_gating(m: MetricResult) -> bool:
    """Whether ``m`` decides the run (bundles from before metric roles: every metric did)."""
    if m.gating is not None:
        return m.gating
    return m.role != "supplementary"


def metric_facts(m: MetricResult) -> list[str]:
    """What a metric case says: value, CI, threshold and direction, role."""
    lines = [f"{m.name} = {_num(m.value)}" + (f" (n={m.n})" if m.n is not None else "")]
    if (ci := _ci_text(m.ci)) is not None:
        lines.append(ci)
    if m.threshold is not None:
        verdict = {True: "met", False: "MISSED", None: "not judged"}[m.passed]
        lines.append(
            f"threshold {_op(m)} {m.threshold:g} ({m.direction or 'higher_is_better'}): {verdict}"
        )
    else:
        lines.append("no threshold declared: reported, nothing to gate on")
    promoted = " (promoted)" if m.promoted is not None and not m.promoted.is_empty() else ""
    lines.append(f"role {m.role or 'primary'}{promoted}, gating")
    return lines


def metric_case(m: MetricResult, classname: str) -> JUnitCase:
    """A gating metric: passes unless its threshold was missed (expected vs found, CI)."""
    facts = "\n".join(metric_facts(m))
    if m.passed is not False:
        return JUnitCase(classname, m.name, facts)
    ci = _ci_text(m.ci)
    threshold = "—" if m.threshold is None else f"{m.threshold:g}"
    message = f"expected {m.name} {_op(m)} {threshold}, found {_num(m.value)}" + (
        f" ({ci})" if ci else ""
    )
    return JUnitCase(
        classname, m.name, "", JUnitProblem("failure", "threshold_missed", message, facts)
    )


def outcome_case(
    classname: str,
    outcome: Outcome | str | None,
    reason: str | None,
    exit_code: int,
    *,
    name: str = "evaluation",
    detail: Sequence[str] = (),
) -> JUnitCase:
    """The run as one test case: passing when ``exit_code`` is 0, else failing with the reason.

    A verdict on the evaluation (exit 6: thresholds, crash, timeout, unusable output) is a
    ``failure``; anything that kept it from a verdict (integrity, environment,
    infrastructure, internal, interrupted) is an ``error``.
    """
    said = f"{outcome or 'error'}" + (f": {one_line(reason)}" if reason else "")
    text = "\n".join([said, f"exit code {exit_code}", *detail])
    if exit_code == 0:
        return JUnitCase(classname, name, text)
    kind: Literal["failure", "error"] = (
        "failure" if exit_code == Outcome.THRESHOLDS_FAILED.exit_code else "error"
    )
    return JUnitCase(classname, name, "", JUnitProblem(kind, str(outcome or "error"), said, text))


def _classname(spec_name: str | None) -> str:
    return f"evalrun.{spec_name or 'evaluation'}"


def _metric_cases(
    classname: str,
    metrics: Sequence[MetricResult],
    outcome: Outcome | str | None,
    reason: str | None,
    exit_code: int,
    detail: Sequence[str],
) -> tuple[JUnitCase, ...]:
    """Gating metric cases when the evaluation got to a verdict; else the one outcome case.

    Whatever the metrics say, the cases fail when the exit code is not 0 (and pass when it is).
    """
    evaluated = Outcome.parse(outcome)
    if evaluated is None or not evaluated.has_metrics:
        return (outcome_case(classname, outcome, reason, exit_code, detail=detail),)
    cases = tuple(metric_case(m, classname) for m in metrics if is_gating(m))
    failing = any(c.problem is not None for c in cases)
    if not cases or (exit_code != 0 and not failing):
        cases += (outcome_case(classname, outcome, reason, exit_code, detail=detail),)
    return cases


def _supplementary(metrics: Sequence[MetricResult]) -> list[str]:
    return [
        f"not gating: {m.name} = {_num(m.value)}" + (f" ({ci})" if (ci := _ci_text(m.ci)) else "")
        for m in metrics
        if not is_gating(m)
    ]


# --------------------------------------------------------------------------- suites


def run_suite(
    predicate: RunPredicate,
    *,
    name: str | None = None,
    properties: Mapping[str, str | None] | None = None,
) -> JUnitSuite:
    """A run's suite: a case per gating metric, or one case for a run without a verdict.

    ``properties`` (bundle path and digest, verification, …) follow the predicate's own
    (run id, outcome, exit code, spec, lock and image digests).
    """
    p = predicate
    exit_code = p.exit_code if p.exit_code is not None else _exit_of(p.outcome)
    classname = _classname(p.spec.name)
    detail = [f"run id {p.run_id}"]
    if p.stderr_tail:
        # a run that failed in the container: the end of its stderr, line by line
        detail += [f"the evaluation's stderr (last {len(p.stderr_tail)} lines):", *p.stderr_tail]
    cases = _metric_cases(classname, p.metrics, p.outcome, p.reason, exit_code, detail)
    return JUnitSuite(
        name=name or p.spec.name or p.run_id,
        cases=cases,
        output="\n".join(_supplementary(p.metrics)),
        properties=_properties(
            {
                "run_id": p.run_id,
                "outcome": str(p.outcome) if p.outcome is not None else None,
                "exit_code": str(exit_code),
                "reason": p.reason,
                "spec_digest": p.spec.digest,
                "lock_digest": p.lock_digest,
                "image": p.image.ref,
                "backend": p.backend,
                **(properties or {}),
            }
        ),
        timestamp=_timestamp(p.timestamps.started),
        time=_seconds(p.timestamps.started, p.timestamps.finished),
        hostname=_host(p),
    )


def run_set_suites(
    predicate: RunSetPredicate,
    properties: Mapping[str, str | None] | None = None,
) -> list[JUnitSuite]:
    """A run set: one suite per seed (its gating metrics, or why it has none)."""
    p = predicate
    extra = properties or {}
    return [_member_suite(p, m, extra) for m in p.members] or [
        JUnitSuite(
            name=p.spec.name or p.run_id,
            cases=(
                outcome_case(
                    _classname(p.spec.name),
                    p.outcome,
                    "the run set has no members",
                    p.exit_code if p.exit_code is not None else _exit_of(p.outcome),
                ),
            ),
            properties=_properties({"run_set": p.run_id, **extra}),
        )
    ]


def _member_suite(
    p: RunSetPredicate, m: RunSetMember, properties: Mapping[str, str | None]
) -> JUnitSuite:
    exit_code = _exit_of(m.outcome)
    classname = f"{_classname(p.spec.name)}.seed-{m.seed}"
    detail = [f"run id {m.run_id}", f"run set {p.run_id}"]
    return JUnitSuite(
        name=f"{p.spec.name or p.run_id} seed {m.seed}",
        cases=_metric_cases(classname, m.metrics, m.outcome, m.reason, exit_code, detail),
        properties=_properties(
            {
                "run_set": p.run_id,
                "run_id": m.run_id,
                "seed": str(m.seed),
                "outcome": str(m.outcome) if m.outcome is not None else None,
                "bundle_digest": m.bundle_digest,
                **properties,
            }
        ),
        timestamp=_timestamp(p.timestamps.started),
    )


def reproduction_suite(
    predicate: RunPredicate,
    exit_code: int,
    properties: Mapping[str, str | None] | None = None,
) -> JUnitSuite:
    """A re-run: one case per metric, failing when the re-run did not reproduce it.

    A re-run that did not evaluate is one failing case with its outcome and reason.
    """
    p = predicate
    origin, repro = p.reproduction_of, p.reproduction
    classname = f"{_classname(p.spec.name)}.reproduction"
    detail = [f"re-run {p.run_id}", f"of {origin.run_id if origin else '?'}"]
    evaluated = Outcome.parse(p.outcome)
    cases: tuple[JUnitCase, ...]
    if repro is None or evaluated is None or not evaluated.has_metrics or not repro.metrics:
        reason = p.reason if not evaluated or not evaluated.has_metrics else None
        reason = reason or (repro.reason if repro else None)
        cases = (outcome_case(classname, p.outcome, reason, exit_code, detail=detail),)
    else:
        cases = tuple(_reproduced_case(m, classname, repro.tolerance) for m in repro.metrics)
        if exit_code != 0 and not any(c.problem for c in cases):
            cases += (outcome_case(classname, repro.verdict, repro.reason, exit_code),)
    return JUnitSuite(
        name=f"{p.spec.name or p.run_id} reproduction",
        cases=cases,
        properties=_properties(
            {
                "run_id": p.run_id,
                "reproduction_of": origin.run_id if origin else None,
                "original_bundle": origin.bundle_digest if origin else None,
                "verdict": repro.verdict if repro else None,
                "outcome": str(p.outcome) if p.outcome is not None else None,
                "exit_code": str(exit_code),
                **(properties or {}),
            }
        ),
        timestamp=_timestamp(p.timestamps.started),
        time=_seconds(p.timestamps.started, p.timestamps.finished),
        hostname=_host(p),
    )


def _reproduced_case(m: ReproducedMetric, classname: str, tolerance: float | None) -> JUnitCase:
    delta = "—" if m.delta is None else f"{m.delta:+.4f}"
    facts = "\n".join(
        [
            f"original {_num(m.original)} CI {_pair_ci(m.original_ci)}",
            f"re-run   {_num(m.rerun)} CI {_pair_ci(m.rerun_ci)}",
            f"delta {delta}" + (f" (tolerance {tolerance:g})" if tolerance is not None else ""),
            f"verdict {m.verdict}",
        ]
    )
    name = m.name or "metric"
    if m.verdict in REPRODUCED:
        return JUnitCase(classname, name, facts)
    message = (
        f"expected {name} to reproduce {_num(m.original)} (CI {_pair_ci(m.original_ci)}), "
        f"found {_num(m.rerun)} (CI {_pair_ci(m.rerun_ci)}): {m.verdict}"
    )
    return JUnitCase(classname, name, "", JUnitProblem("failure", "not_reproduced", message, facts))


def error_suite(name: str, *, error: str, message: str, exit_code: int) -> JUnitSuite:
    """An evalrun error before any bundle existed (bad spec, no key, …): one ``<error>`` case."""
    text = f"{message}\nexit code {exit_code}"
    case = JUnitCase("evalrun", name, "", JUnitProblem("error", error, one_line(message), text))
    return JUnitSuite(name=name, cases=(case,), properties=(("exit_code", str(exit_code)),))


def _exit_of(outcome: object) -> int:
    parsed = Outcome.parse(outcome)
    return parsed.exit_code if parsed is not None else 1


def _host(p: RunPredicate) -> str:
    return p.provenance.launched_by.host or "localhost"


def _properties(values: Mapping[str, str | None]) -> tuple[tuple[str, str], ...]:
    return tuple((k, v) for k, v in values.items() if v is not None)


__all__ = [
    "error_suite",
    "is_gating",
    "metric_case",
    "outcome_case",
    "reproduction_suite",
    "run_set_suites",
    "run_suite",
]

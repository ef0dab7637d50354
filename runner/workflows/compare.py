"""Fair comparison of the runs in a comparison group (``evalrun compare GROUP``).

Comparability is checked before anything is ranked: the runs must share their
dataset digests and splits, their preprocessing steps (names, code digests,
params), their primary metric definitions and their seeds policy. Any field that
differs is listed and the comparison refused, unless the caller allows that
field by name; an allowance is carried on the result so every output shows it.

Ranking is by the group's first primary metric, respecting its direction.
Significance criterion: two runs differ significantly when their confidence
intervals (as recorded in the bundles) do not overlap. This is conservative:
overlapping intervals do not prove that there is no difference.

Every run of the group is verified (signature and every hash) before it is compared;
one that does not verify stops the comparison (exit 3), naming it. A CI gate names
its candidate (:func:`gate`): the comparison then fails (exit 6) when the candidate
ranks below the leader with disjoint confidence intervals.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TypedDict

from pydantic import JsonValue

from runner._internal.sanitize import markdown_text, one_line
from runner.bundle.index import History
from runner.bundle.reader import UNVERIFIED, Trust, open_bundle, read_predicate
from runner.bundle.run_records import RunFilter
from runner.bundle.store import Store
from runner.errors import InputError, IntegrityError, NotComparable, VerificationFailed
from runner.model.comparability import COMPARABILITY_FIELDS
from runner.model.predicate import (
    ConfidenceInterval,
    JsonObject,
    MetricDefinition,
    RunPredicate,
)
from runner.model.spec import EvalSpec
from runner.render.markdown import percent

# a candidate significantly worse than the leader fails a gate like a missed threshold
THRESHOLDS_EXIT = 6
SIGNIFICANCE_CRITERION = "non-overlapping confidence intervals (as recorded per run)"


class VariantJson(TypedDict):
    value: JsonValue
    runs: list[str]


class DifferenceJson(TypedDict):
    field: str
    variants: list[VariantJson]


@dataclass(frozen=True)
class Difference:
    """One comparability field and the distinct values it takes (with the runs of each)."""

    field: str
    variants: tuple[tuple[str, tuple[str, ...]], ...]

    def as_dict(self) -> DifferenceJson:
        return {
            "field": self.field,
            "variants": [{"value": json.loads(v), "runs": list(r)} for v, r in self.variants],
        }


@dataclass(frozen=True)
class GroupRun:
    run_id: str
    bundle_digest: str
    path: Path
    started: str
    predicate: RunPredicate


@dataclass(frozen=True)
class RankedRun:
    rank: int
    run_id: str
    bundle_digest: str
    spec_name: str | None
    model_sha256: str | None
    outcome: str | None
    value: float
    ci_low: float | None
    ci_high: float | None
    ci_method: str | None
    ci_level: float | None
    significant_vs_leader: bool | None
    significant_vs_next: bool | None
    started: str = ""


@dataclass(frozen=True)
class Comparison:
    group: str
    metric: str
    direction: str
    criterion: str
    ranking: tuple[RankedRun, ...]
    allowed: tuple[Difference, ...] = ()
    excluded: tuple[tuple[str, str], ...] = field(default=())

    def as_dict(self) -> JsonObject:
        """``evalrun compare --format json``: every field, the ranking row by row."""
        data = asdict(self)
        data["allowed"] = [d.as_dict() for d in self.allowed]
        data["excluded"] = [{"run_id": r, "why": why} for r, why in self.excluded]
        return data


# --------------------------------------------------------------------------- loading


def load_group(
    store: Store, group: str, trust: Trust
) -> tuple[list[GroupRun], list[tuple[str, str]]]:
    """The group's runs from the run index (oldest first), and those left out with why.

    Runs are found by the group their statement names and then opened with ``trust``:
    VerificationFailed (exit 3) naming every run of the group that does not verify.
    """
    runs: list[GroupRun] = []
    excluded: list[tuple[str, str]] = []
    failed: list[str] = []
    for record in History(store).query(RunFilter(kind="run")):
        try:
            found = read_predicate(record.path)
        except IntegrityError:
            continue
        if not isinstance(found, RunPredicate) or found.comparison_group != group:
            continue
        try:
            opened = open_bundle(record.path, trust)
        except IntegrityError as exc:
            failed.append(f"{record.run_id}: {one_line(exc.message, limit=200)}")
            continue
        predicate = opened.predicate
        if not isinstance(predicate, RunPredicate):
            continue
        if record.reproduction_of:
            excluded.append((record.run_id, f"a re-run of {record.reproduction_of}"))
            continue
        if predicate.outcome is None or not predicate.outcome.has_metrics:
            excluded.append((record.run_id, f"outcome {predicate.outcome}: no metrics"))
            continue
        runs.append(
            GroupRun(
                run_id=record.run_id,
                bundle_digest=record.bundle_digest,
                path=record.path,
                started=record.started or "",
                predicate=predicate,
            )
        )
    if failed:
        raise VerificationFailed(
            f"{len(failed)} run(s) of comparison group {group!r} do not verify; "
            "nothing was compared",
            problems=failed,
            bundle=group,
        )
    return runs, excluded


# --------------------------------------------------------------------------- comparability


def _metric_definitions(predicate: RunPredicate) -> list[MetricDefinition]:
    if predicate.metric_definitions is not None:
        return list(predicate.metric_definitions)
    # bundles from before metric roles: every metric was primary
    return [
        MetricDefinition(
            name=m.name,
            compute=m.compute,
            direction=m.direction,
            threshold=m.threshold,
            role="primary",
            ci=ConfidenceInterval(
                method=m.ci.method if m.ci else None,
                level=m.ci.level if m.ci else None,
                resamples=m.ci.resamples if m.ci else None,
            ),
        )
        for m in predicate.metrics
    ]


# What the metric catalogue's parameters change about a value (not confusion_matrix).
_CATALOGUE_KEYS = ("fields", "average", "positive", "classes", "bins", "k", "normalize")


def _primaries(definitions: Sequence[MetricDefinition]) -> list[dict[str, JsonValue]]:
    return [
        {
            "name": d.name,
            "compute": d.compute,
            "field": d.field,
            "direction": d.direction,
            "threshold": d.threshold,
            "ci": d.ci.to_json() if d.ci is not None else None,
            **{k: v for k, v in d.to_json().items() if k in _CATALOGUE_KEYS},
        }
        for d in definitions
        if d.role == "primary" or "role" not in d.model_fields_set
    ]


def primary_metrics(predicate: RunPredicate) -> list[dict[str, JsonValue]]:
    """The definitions of the run's primary metrics (promotions are not primaries)."""
    return _primaries(_metric_definitions(predicate))


def comparability_key(predicate: RunPredicate, name: str) -> JsonValue:
    """The value of one comparability field for a run (JSON-comparable)."""
    if name == "datasets":
        ordered = sorted(predicate.datasets, key=lambda d: str(d.name))
        return [{"name": d.name, "sha256": d.sha256, "split": d.split} for d in ordered]
    if name == "preprocessing":
        steps = predicate.preprocessing
        if steps is None:
            steps = predicate.provenance.preprocessing
        return [{"name": s.name, "code_digest": s.code_digest, "params": s.params} for s in steps]
    if name == "primary_metrics":
        return list(primary_metrics(predicate))
    if name == "seeds":
        return {"seed": predicate.seeds.seed}
    raise ValueError(f"unknown comparability field {name!r}")


def differences(runs: Sequence[GroupRun]) -> list[Difference]:
    """Every comparability field on which the runs do not all agree."""
    found = []
    for name in COMPARABILITY_FIELDS:
        variants: dict[str, list[str]] = {}
        for run in runs:
            value = json.dumps(comparability_key(run.predicate, name), sort_keys=True)
            variants.setdefault(value, []).append(run.run_id)
        if len(variants) > 1:
            found.append(Difference(name, tuple((v, tuple(ids)) for v, ids in variants.items())))
    return found


# --------------------------------------------------------------------------- ranking


def _disjoint(a: RankedRun, b: RankedRun) -> bool | None:
    if None in (a.ci_low, a.ci_high, b.ci_low, b.ci_high):
        return None
    assert a.ci_low is not None and a.ci_high is not None
    assert b.ci_low is not None and b.ci_high is not None
    return a.ci_high < b.ci_low or b.ci_high < a.ci_low


def rank(runs: Sequence[GroupRun], metric: str, direction: str) -> list[RankedRun]:
    """Runs ordered best first by ``metric``; ties keep the older run first."""
    rows: list[tuple[GroupRun, float, ConfidenceInterval]] = []
    for run in runs:
        m = run.predicate.metric(metric)
        if m is None or m.value is None:
            continue
        rows.append((run, float(m.value), m.ci or ConfidenceInterval()))
    sign = -1.0 if direction == "higher_is_better" else 1.0
    rows.sort(key=lambda r: (sign * r[1], r[0].started, r[0].run_id))
    ranked = [
        RankedRun(
            rank=i + 1,
            run_id=run.run_id,
            bundle_digest=run.bundle_digest,
            spec_name=run.predicate.spec.name,
            model_sha256=run.predicate.model.sha256,
            outcome=None if run.predicate.outcome is None else run.predicate.outcome.value,
            value=value,
            ci_low=ci.low,
            ci_high=ci.high,
            ci_method=ci.method,
            ci_level=ci.level,
            significant_vs_leader=None,
            significant_vs_next=None,
            started=run.started,
        )
        for i, (run, value, ci) in enumerate(rows)
    ]
    out = []
    for i, r in enumerate(ranked):
        vs_leader = None if i == 0 else _disjoint(ranked[0], r)
        vs_next = _disjoint(r, ranked[i + 1]) if i + 1 < len(ranked) else None
        out.append(
            RankedRun(
                **{**asdict(r), "significant_vs_leader": vs_leader, "significant_vs_next": vs_next}
            )
        )
    return out


def compare_group(
    store: Store, group: str, *, trust: Trust, allow: Sequence[str] = ()
) -> Comparison:
    """Verify the group's runs with ``trust``, check they are comparable, then rank them.

    Raises VerificationFailed (exit 3) for runs that do not verify, :class:`NotComparable`
    naming every differing field not in ``allow``, and :class:`InputError` for an unknown
    ``allow`` field or a group without runs.
    """
    unknown = sorted(set(allow) - set(COMPARABILITY_FIELDS))
    if unknown:
        raise InputError(
            f"--allow names unknown field(s) {unknown}",
            hint=f"comparability fields: {', '.join(COMPARABILITY_FIELDS)}",
        )
    runs, excluded = load_group(store, group, trust)
    if not runs:
        raise InputError(
            f"no comparable runs in comparison group {group!r}",
            hint="set metadata.comparison_group in the spec and run it (`evalrun run`)",
        )
    diffs = differences(runs)
    refused = [d for d in diffs if d.field not in allow]
    if refused:
        raise NotComparable(group, refused)
    newest = max(runs, key=lambda r: (r.started, r.run_id))
    primaries = primary_metrics(newest.predicate)
    if not primaries:
        raise InputError(f"the runs of comparison group {group!r} declare no primary metric")
    metric = str(primaries[0]["name"])
    direction = str(primaries[0].get("direction") or "higher_is_better")
    ranking = rank(runs, metric, direction)
    ranked_ids = {r.run_id for r in ranking}
    excluded += [
        (r.run_id, f"no value for metric {metric}") for r in runs if r.run_id not in ranked_ids
    ]
    return Comparison(
        group=group,
        metric=metric,
        direction=direction,
        criterion=SIGNIFICANCE_CRITERION,
        ranking=tuple(ranking),
        allowed=tuple(d for d in diffs if d.field in allow),
        excluded=tuple(excluded),
    )


# --------------------------------------------------------------------------- gate


@dataclass(frozen=True)
class Gate:
    """A CI gate's verdict on one candidate run of a comparison."""

    candidate: str
    rank: int
    leader: str
    significantly_worse: bool
    exit_code: int

    def line(self) -> str:
        if self.significantly_worse:
            return (
                f"gate: FAIL — candidate {self.candidate} ranks {self.rank}, significantly "
                f"worse than the leader {self.leader} (exit {self.exit_code})"
            )
        return f"gate: pass — candidate {self.candidate} ranks {self.rank}" + (
            "" if self.rank == 1 else f"; not significantly worse than {self.leader}"
        )


def gate(c: Comparison, candidate: str) -> Gate:
    """Judge ``candidate`` (a run id, or ``newest``: the run started last) in ``c``.

    Fails (exit 6) when it ranks below the leader and their confidence intervals are
    disjoint; InputError (exit 2) when the candidate is not in the ranking.
    """
    if not c.ranking:
        raise InputError(f"comparison group {c.group!r} ranks no run")
    if candidate == "newest":
        row = max(c.ranking, key=lambda r: (r.started, r.run_id))
    else:
        found = [r for r in c.ranking if r.run_id == candidate]
        if not found:
            why = dict(c.excluded).get(candidate)
            raise InputError(
                f"candidate {one_line(candidate, limit=80)} is not ranked in comparison group "
                f"{c.group!r}" + (f" ({why})" if why else ""),
                hint="name a run id of the group, or `newest`",
            )
        row = found[0]
    worse = row.rank > 1 and bool(row.significant_vs_leader)
    return Gate(
        candidate=row.run_id,
        rank=row.rank,
        leader=c.ranking[0].run_id,
        significantly_worse=worse,
        exit_code=THRESHOLDS_EXIT if worse else 0,
    )


# --------------------------------------------------------------------------- output


def _num(value: float | None) -> str:
    return "—" if value is None else f"{value:.4f}"


def _yes_no(value: bool | None) -> str:
    return {True: "yes", False: "no", None: "—"}[value]


# How a value from a bundle (or the command line) is written: one line for the
# terminal, escaped for Markdown.
_Escape = Callable[[object], str]


def _rows(c: Comparison, esc: _Escape) -> list[list[str]]:
    return [
        [
            str(r.rank),
            esc(r.run_id),
            esc(r.spec_name or "—"),
            _num(r.value),
            f"[{_num(r.ci_low)}, {_num(r.ci_high)}]"
            + (f" ({percent(r.ci_level)}% {esc(r.ci_method)})" if r.ci_level else ""),
            _yes_no(r.significant_vs_leader),
            _yes_no(r.significant_vs_next),
        ]
        for r in c.ranking
    ]


HEADER = ["rank", "run", "spec", "value", "confidence interval", "sig. vs leader", "sig. vs next"]


def _heading(c: Comparison, esc: _Escape) -> list[str]:
    """What the ranking is by, the significance criterion, and every allowed difference."""
    arrow = "higher" if c.direction == "higher_is_better" else "lower"
    lines = [
        f"comparison group {esc(c.group)}: ranked by {esc(c.metric)} ({arrow} is better)",
        f"significance: {c.criterion}",
    ]
    for d in c.allowed:
        lines.append(f"ALLOWED difference in {d.field} (--allow {d.field}):")
        lines += [f"  {esc(', '.join(runs))}: {esc(value)}" for value, runs in d.variants]
    return lines


def _footer(c: Comparison, esc: _Escape) -> list[str]:
    return [f"left out {esc(run_id)}: {esc(why)}" for run_id, why in c.excluded]


def format_text(c: Comparison, candidate: Gate | None = None) -> str:
    rows = _rows(c, one_line)
    widths = [max(len(r[i]) for r in [HEADER, *rows]) for i in range(len(HEADER))]
    lines = [*_heading(c, one_line), ""]
    for row in [HEADER, ["-" * w for w in widths], *rows]:
        lines.append("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip())
    if c.excluded:
        lines += ["", *_footer(c, one_line)]
    if candidate is not None:
        lines += ["", one_line(candidate.line())]
    return "\n".join(lines) + "\n"


def _md_item(line: str) -> str:
    return f"  - {line.strip()}" if line.startswith("  ") else f"- {line}"


def format_markdown(c: Comparison, candidate: Gate | None = None) -> str:
    lines = [
        f"# evalrun comparison — {markdown_text(c.group)}",
        "",
        *map(_md_item, _heading(c, markdown_text)),
        "",
    ]
    lines.append("| " + " | ".join(HEADER) + " |")
    lines.append("|" + "---|" * len(HEADER))
    lines += ["| " + " | ".join(r) + " |" for r in _rows(c, markdown_text)]
    if c.excluded:
        lines += ["", *map(_md_item, _footer(c, markdown_text))]
    if candidate is not None:
        lines += ["", f"- {markdown_text(candidate.line())}"]
    return "\n".join(lines) + "\n"


def format_json(c: Comparison, candidate: Gate | None = None) -> str:
    data = c.as_dict()
    if candidate is not None:
        data["gate"] = {
            "candidate": candidate.candidate,
            "rank": candidate.rank,
            "leader": candidate.leader,
            "significantly_worse": candidate.significantly_worse,
            "exit_code": candidate.exit_code,
        }
    return json.dumps(data, indent=2, sort_keys=True, default=str) + "\n"


def check_group_definitions(store: Store, spec: EvalSpec) -> None:
    """Refuse a run that would change a comparison group's primary metric definitions.

    Once runs exist in a group, its primary metrics (definition and threshold) are
    fixed; a changed definition needs a new version of the group (a new
    ``comparison_group`` name, e.g. ``NAME.v2``), so old and new runs are never ranked
    against each other by accident.
    """
    group = spec.metadata.comparison_group
    if not group:
        return
    # a consistency check of the launcher's own store before a run, not an output: the
    # runs are read as stored (a tampered one can only make this refuse)
    runs, _ = load_group(store, group, UNVERIFIED)
    if not runs:
        return
    mine = _primaries([MetricDefinition.model_validate(d.definition()) for d in spec.metrics])
    theirs = primary_metrics(runs[0].predicate)
    if mine != theirs:
        changed = sorted(
            {str(d.get("name")) for d in mine if d not in theirs}
            | {str(d.get("name")) for d in theirs if d not in mine}
        )
        raise InputError(
            f"comparison group {group!r} already has runs ({len(runs)}) whose primary metrics "
            f"are defined differently: {', '.join(changed)}",
            file="metadata.comparison_group",
            expected=json.dumps(theirs, sort_keys=True),
            found=json.dumps(mine, sort_keys=True),
            hint=f"keep the group's definitions, or start a new version of the group "
            f"(comparison_group: {group}.v2)",
        )

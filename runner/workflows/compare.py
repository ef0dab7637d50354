"""Fair comparison of the runs in a comparison group (``evalrun compare GROUP``).

Comparability is checked before anything is ranked: the runs must share their
dataset digests and splits, their preprocessing steps (names, code digests,
params), their primary metric definitions and their seeds policy. Any field that
differs is listed and the comparison refused, unless the caller allows that
field by name; an allowance is carried on the result so every output shows it.

Ranking is by ``--metric`` (default: the group's first primary metric), respecting its
direction. Runs may be narrowed (``--spec``, ``--backend``, ``--since``); a run set whose
seeds are runs of the group is one entry (mean across seeds, Student-t interval) instead
of its seeds; ``--group-by model`` keeps the newest entry of each model. Significance and
ties: :mod:`runner.workflows.compare_rank` (a paired bootstrap where runs share sample
ids, otherwise non-overlapping confidence intervals).

Every run of the group is verified (signature and every hash) before it is compared;
one that does not verify stops the comparison (exit 3), naming it. A CI gate names
its candidate (:func:`gate`): the comparison then fails (exit 6) when the candidate
ranks below the leader and differs significantly from it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import cast

from pydantic import JsonValue

from runner._internal.sanitize import one_line
from runner.bundle.reader import UNVERIFIED, Trust
from runner.bundle.store import Store
from runner.errors import InputError, NotComparable
from runner.model.comparability import COMPARABILITY_FIELDS, GROUP_BY
from runner.model.predicate import (
    ConfidenceInterval,
    MetricDefinition,
    RunPredicate,
)
from runner.model.spec import EvalSpec
from runner.shared.definitions import MetricDefinition as SharedMetricDefinition
from runner.workflows.compare_load import (
    GroupRun,
    RunSetEntry,
    Selection,
    load_group,
    load_run_sets,
    samples_by_id,
)
from runner.workflows.compare_output import (
    Comparison,
    Difference,
    DifferenceJson,
    Gate,
    VariantJson,
    format_json,
    format_markdown,
    format_text,
)
from runner.workflows.compare_rank import (
    SIGNIFICANCE_CRITERION,
    Entry,
    RankedRun,
    rank_entries,
)

__all__ = [
    "COMPARABILITY_FIELDS",
    "GROUP_BY",
    "Comparison",
    "Difference",
    "DifferenceJson",
    "Gate",
    "NotComparable",
    "RankedRun",
    "Selection",
    "VariantJson",
    "check_group_definitions",
    "compare_group",
    "format_json",
    "format_markdown",
    "format_text",
    "gate",
]

# a candidate significantly worse than the leader fails a gate like a missed threshold
THRESHOLDS_EXIT = 6


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
_CATALOGUE_KEYS = ("fields", "average", "positive", "classes", "bins", "k", "normalize", "custom")


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


Unit = GroupRun | RunSetEntry


def _unit_key(unit: Unit, name: str) -> JsonValue:
    if isinstance(unit, GroupRun):
        return comparability_key(unit.predicate, name)
    if name == "seeds":
        seeds: list[JsonValue] = [int(s) for s in sorted(unit.predicate.seeds.seeds or ())]
        return {"seeds": seeds}
    return comparability_key(unit.members[0].predicate, name)


def differences(units: Sequence[Unit]) -> list[Difference]:
    """Every comparability field on which the runs (and run sets) do not all agree."""
    found = []
    for name in COMPARABILITY_FIELDS:
        variants: dict[str, list[str]] = {}
        for unit in units:
            value = json.dumps(_unit_key(unit, name), sort_keys=True)
            variants.setdefault(value, []).append(unit.run_id)
        if len(variants) > 1:
            found.append(Difference(name, tuple((v, tuple(ids)) for v, ids in variants.items())))
    return found


# --------------------------------------------------------------------------- entries


def _definition(predicate: RunPredicate, metric: str) -> SharedMetricDefinition | None:
    """The metric's definition as the run's predicate signed it: the spec's own definition
    (``MetricSpec.definition()``) and whether it gates. Read from a bundle, so only as
    sound as the predicate's model checked it; ``build_metric`` refuses what it cannot
    compute, and the paired test is then left out."""
    for d in _metric_definitions(predicate):
        if d.name == metric:
            return cast(SharedMetricDefinition, dict(d.to_json()))
    return None


def _model_name(predicate: RunPredicate) -> str | None:
    path = predicate.model.path
    return None if path is None else str(path)


def entry_of(unit: Unit, metric: str) -> Entry | None:
    """The unit's value for ``metric`` as a rankable entry (None: the unit has none)."""
    if isinstance(unit, GroupRun):
        p = unit.predicate
        m = p.metric(metric)
        if m is None or m.value is None:
            return None
        ci = m.ci or ConfidenceInterval()
        definition = _definition(p, metric)
        return Entry(
            run_id=unit.run_id,
            bundle_digest=unit.bundle_digest,
            kind="run",
            spec_name=p.spec.name,
            model=_model_name(p),
            model_sha256=p.model.sha256,
            backend=unit.backend,
            outcome=None if p.outcome is None else p.outcome.value,
            started=unit.started,
            value=float(m.value),
            ci_low=ci.low,
            ci_high=ci.high,
            ci_method=ci.method,
            ci_level=ci.level,
            definition=definition,
            samples=samples_by_id(unit) if definition is not None else None,
        )
    stats = [s for s in unit.predicate.across_seeds if s.name == metric and s.mean is not None]
    if not stats:
        return None
    stat, first = stats[0], unit.members[0].predicate
    ci = stat.ci or ConfidenceInterval()
    assert stat.mean is not None
    return Entry(
        run_id=unit.run_id,
        bundle_digest=unit.bundle_digest,
        kind="run_set",
        spec_name=unit.predicate.spec.name,
        model=_model_name(first),
        model_sha256=first.model.sha256,
        backend=unit.members[0].backend,
        outcome=None if unit.predicate.outcome is None else str(unit.predicate.outcome),
        started=unit.started,
        value=float(stat.mean),
        ci_low=ci.low,
        ci_high=ci.high,
        ci_method=ci.method,
        ci_level=ci.level,
    )


def _metric_names(units: Sequence[Unit]) -> list[str]:
    names: dict[str, None] = {}
    for unit in units:
        predicate = unit.predicate if isinstance(unit, GroupRun) else unit.members[0].predicate
        for m in predicate.metrics:
            names.setdefault(m.name)
    return list(names)


def _direction(units: Sequence[Unit], metric: str) -> str:
    for unit in sorted(units, key=lambda u: (u.started, u.run_id), reverse=True):
        predicate = unit.predicate if isinstance(unit, GroupRun) else unit.members[0].predicate
        for d in _metric_definitions(predicate):
            if d.name == metric and d.direction:
                return str(d.direction)
        m = predicate.metric(metric)
        if m is not None and m.direction:
            return str(m.direction)
    return "higher_is_better"


def _by_model(entries: Sequence[Entry]) -> tuple[list[Entry], list[tuple[str, str]]]:
    """The newest entry of each model; the others, left out with why."""
    newest: dict[str, Entry] = {}
    for e in entries:
        key = e.model_sha256 or e.run_id
        if key not in newest or (e.started, e.run_id) > (newest[key].started, newest[key].run_id):
            newest[key] = e
    kept = set(id(e) for e in newest.values())
    left = [
        (e.run_id, f"grouped by model: {newest[e.model_sha256 or e.run_id].run_id} is newer")
        for e in entries
        if id(e) not in kept
    ]
    return [e for e in entries if id(e) in kept], left


# --------------------------------------------------------------------------- comparing


def compare_group(
    store: Store,
    group: str,
    *,
    trust: Trust,
    allow: Sequence[str] = (),
    metric: str | None = None,
    selection: Selection | None = None,
    group_by: str | None = None,
) -> Comparison:
    """Verify the group's selected runs with ``trust``, check they are comparable, rank them.

    Raises VerificationFailed (exit 3) for runs that do not verify, :class:`NotComparable`
    naming every differing field not in ``allow``, and :class:`InputError` for an unknown
    ``allow`` field or grouping, a metric no run has, or a group without runs.
    """
    unknown = sorted(set(allow) - set(COMPARABILITY_FIELDS))
    if unknown:
        raise InputError(
            f"--allow names unknown field(s) {unknown}",
            hint=f"comparability fields: {', '.join(COMPARABILITY_FIELDS)}",
        )
    if group_by is not None and group_by not in GROUP_BY:
        raise InputError(
            f"--group-by {one_line(group_by, limit=40)!r} is not a grouping",
            hint=f"group by: {', '.join(GROUP_BY)}",
        )
    selection = selection or Selection()
    runs, excluded = load_group(store, group, trust, selection)
    if not runs:
        raise InputError(
            f"no comparable runs in comparison group {group!r}"
            + (f" ({' '.join(selection.words())})" if selection.words() else ""),
            hint="set metadata.comparison_group in the spec and run it (`evalrun run`)",
        )
    run_sets = load_run_sets(store, runs, trust, selection)
    in_sets = {m.run_id: s.run_id for s in run_sets for m in s.members}
    units: list[Unit] = [r for r in runs if r.run_id not in in_sets]
    units += run_sets
    excluded += [(run_id, f"a seed of run set {set_id}") for run_id, set_id in in_sets.items()]
    diffs = differences(units)
    refused = [d for d in diffs if d.field not in allow]
    if refused:
        raise NotComparable(group, refused)
    if metric is None:
        newest = max(runs, key=lambda r: (r.started, r.run_id))
        primaries = primary_metrics(newest.predicate)
        if not primaries:
            raise InputError(f"the runs of comparison group {group!r} declare no primary metric")
        metric = str(primaries[0]["name"])
    elif metric not in _metric_names(units):
        raise InputError(
            f"no run of comparison group {group!r} has metric {one_line(metric, limit=80)!r}",
            file="--metric",
            hint=f"metrics of the group: {', '.join(_metric_names(units))}",
        )
    direction = _direction(units, metric)
    entries: list[Entry] = []
    for unit in units:
        e = entry_of(unit, metric)
        if e is None:
            excluded.append((unit.run_id, f"no value for metric {metric}"))
        else:
            entries.append(e)
    if group_by == "model":
        entries, left = _by_model(entries)
        excluded += left
    return Comparison(
        group=group,
        metric=metric,
        direction=direction,
        criterion=SIGNIFICANCE_CRITERION,
        ranking=tuple(rank_entries(entries, direction)),
        allowed=tuple(d for d in diffs if d.field in allow),
        excluded=tuple(excluded),
        selection=selection.words(),
        group_by=group_by,
    )


# --------------------------------------------------------------------------- gate


def gate(c: Comparison, candidate: str) -> Gate:
    """Judge ``candidate`` (a run id, or ``newest``: the run started last) in ``c``.

    Fails (exit 6) when it ranks below the leader (not tied) and differs significantly
    from it; InputError (exit 2) when the candidate is not in the ranking.
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

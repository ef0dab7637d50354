"""What the run index holds of one bundle, what ``runs ls`` selects, and the times both compare.

:func:`record_from_predicate` flattens a signed predicate (run, run set or audit) into a
:class:`RunRecord`; :class:`RunFilter` narrows a query of :class:`~runner.bundle.index.History`.
Times are stored and compared in one form (:func:`normalize_time`: UTC, milliseconds).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from runner._internal.sanitize import one_line
from runner.errors import InputError

if TYPE_CHECKING:  # the models load only when a bundle is read (``runs ls`` reads the index)
    from runner.model.predicate import JsonObject, MetricResult, Predicate


@dataclass(frozen=True)
class MetricRecord:
    name: str
    value: float | None
    low: float | None
    high: float | None
    passed: bool | None


@dataclass(frozen=True)
class RunRecord:
    """One indexed bundle: a run, or an audit report (``kind == "audit"``)."""

    run_id: str
    bundle_digest: str
    path: Path
    kind: str
    spec_name: str | None
    spec_digest: str | None
    lock_digest: str | None
    attempt: int | None
    image_ref: str | None
    image_digest: str | None
    model_sha256: str | None
    outcome: str | None
    exit_code: int | None
    started: str | None
    finished: str | None
    seed: int | None
    backend: str | None
    reproduction_of: str | None
    reproduction_verdict: str | None
    datasets: tuple[tuple[str, str, str], ...] = ()
    metrics: tuple[MetricRecord, ...] = field(default=())

    def as_dict(self) -> JsonObject:
        """``evalrun runs ls --json``: every field; path as text, datasets as objects."""
        # field by field: dataclasses.asdict deep-copies, slow over 100,000 runs
        data: JsonObject = {f.name: getattr(self, f.name) for f in _RECORD_FIELDS}
        data["path"] = str(self.path)
        data["datasets"] = [{"name": n, "sha256": s, "split": sp} for n, s, sp in self.datasets]
        data["metrics"] = [
            {"name": m.name, "value": m.value, "low": m.low, "high": m.high, "passed": m.passed}
            for m in self.metrics
        ]
        return data


_RECORD_FIELDS = dataclasses.fields(RunRecord)

ListRow = Sequence[str]
"""What ``runs ls`` shows of a run (:func:`listing_row`): run id, spec, backend,
outcome (with the reproduction mark), started (to the second), metrics, bundle digest
(cut); each cell one line and cut to its column's limit (:data:`LISTING_LIMITS`)."""
# Cell limits (characters) of the columns but the last (the digest, evalrun's own).
LISTING_LIMITS = (140, 80, 40, 80, 2000, 300)


@dataclass(frozen=True)
class RunFilter:
    """What ``runs ls`` selects; every field narrows the result, None means any."""

    spec: str | None = None
    model: str | None = None
    dataset: str | None = None
    image: str | None = None
    outcome: str | None = None
    since: str | None = None
    until: str | None = None
    kind: str | None = "run"
    reproduction_of: str | None = None
    limit: int | None = None


def normalize_time(value: str, *, end_of_day: bool = False) -> str:
    """An ISO date or date-time as a UTC ISO string comparable with the stored ones.

    A bare date means the start of that day (UTC), or its end with ``end_of_day``.
    ``30d``, ``12h`` or ``2w`` mean that long before now (for scheduled audits).
    """
    text = value.strip()
    relative = re.fullmatch(r"(\d{1,5})([hdw])", text)
    if relative:
        hours = int(relative[1]) * {"h": 1, "d": 24, "w": 168}[relative[2]]
        moment = dt.datetime.now(dt.UTC) - dt.timedelta(hours=hours)
        return moment.isoformat(timespec="milliseconds")
    try:
        if len(text) == 10:
            day = dt.date.fromisoformat(text)
            moment = dt.datetime.combine(
                day, dt.time.max if end_of_day else dt.time.min, tzinfo=dt.UTC
            )
        else:
            moment = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
            if moment.tzinfo is None:
                moment = moment.replace(tzinfo=dt.UTC)
    except ValueError:
        raise InputError(
            f"not a date: {one_line(value, limit=80)!r}",
            hint="use YYYY-MM-DD, an ISO 8601 date-time, or a span back from now (30d, 12h, 2w)",
        ) from None
    return moment.astimezone(dt.UTC).isoformat(timespec="milliseconds")


def _normalized(moment: str | None) -> str | None:
    """A recorded time in the index's comparable form (as recorded if it does not parse)."""
    if not moment:
        return None
    with contextlib.suppress(InputError):
        return normalize_time(moment)
    return moment


def metrics_cell(metrics: tuple[MetricRecord, ...]) -> str:
    """The metrics of a run as ``runs ls`` shows them: ``name=value`` (4 decimals), in order."""
    return ", ".join(
        f"{one_line(m.name, limit=60)}={m.value:.4f}" for m in metrics if m.value is not None
    )


def listing_row(r: RunRecord) -> ListRow:
    """``r`` as ``runs ls`` shows it; the index stores this when it indexes the run."""
    repro = f" ↺{r.reproduction_verdict or '?'}" if r.reproduction_of else ""
    cells = (
        r.run_id,
        r.spec_name or "?",
        # run sets and audits have no backend of their own; old runs may lack one
        r.backend or "—",
        (r.outcome or "?") + repro,
        (r.started or "?")[:19].replace("T", " "),
        metrics_cell(r.metrics) or "—",
    )
    shown = [one_line(c, limit=n) for c, n in zip(cells, LISTING_LIMITS, strict=True)]
    # the index only holds records whose digest is sha256 hex
    return [*shown, r.bundle_digest[:19] + "…"]


def record_from_predicate(digest: str, path: Path, predicate: Predicate) -> RunRecord:
    """Flatten a predicate into the fields the index stores (a run set or audit has fewer)."""
    from runner.model.predicate import AuditPredicate, RunPredicate, SpecRef

    spec = predicate.spec if not isinstance(predicate, AuditPredicate) else SpecRef()
    record = RunRecord(
        run_id=predicate.run_id,
        bundle_digest=digest,
        path=path,
        kind=predicate.kind,
        spec_name=spec.name,
        spec_digest=spec.digest,
        lock_digest=None if isinstance(predicate, AuditPredicate) else predicate.lock_digest,
        attempt=None,
        image_ref=None,
        image_digest=None,
        model_sha256=None,
        outcome=None if predicate.outcome is None else str(predicate.outcome),
        exit_code=predicate.exit_code,
        started=_normalized(predicate.timestamps.started),
        finished=_normalized(predicate.timestamps.finished),
        seed=None,
        backend=None,
        reproduction_of=None,
        reproduction_verdict=None,
    )
    if not isinstance(predicate, RunPredicate):
        return record
    origin, repro = predicate.reproduction_of, predicate.reproduction
    return dataclasses.replace(
        record,
        attempt=predicate.attempt,
        image_ref=predicate.image.ref,
        image_digest=predicate.image.digest,
        model_sha256=predicate.model.sha256,
        seed=predicate.seeds.seed,
        backend=predicate.backend,
        reproduction_of=origin.run_id if origin is not None else None,
        reproduction_verdict=repro.verdict if repro is not None else None,
        datasets=tuple((str(d.name), str(d.sha256), str(d.split)) for d in predicate.datasets),
        metrics=tuple(_metric_record(m) for m in predicate.metrics),
    )


def _metric_record(m: MetricResult) -> MetricRecord:
    from runner.model.predicate import ConfidenceInterval

    ci = m.ci or ConfidenceInterval()
    return MetricRecord(
        name=m.name,
        value=None if m.value is None else float(m.value),
        low=None if ci.low is None else float(ci.low),
        high=None if ci.high is None else float(ci.high),
        passed=m.passed,
    )

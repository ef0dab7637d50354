"""Reproduction audits: re-run a sample of past runs and seal what happened.

``evalrun audit --sample N [--seed S] [--since DATE]`` picks N original runs
(never re-runs of runs) that produced metrics, with a seeded PRNG over the
runs sorted by start time, re-runs each (see :mod:`runner.workflows.rerun`), and writes a
signed audit bundle into the store: which runs reproduced, which did not and
why — ``missing_artifact``, ``image_unavailable``, ``bundle_invalid``,
``metric_drift``, ``evaluation_failed`` or an infrastructure error. The exit
code is non-zero when any sampled run did not reproduce, so CI or a CronJob
can gate on it.
"""

from __future__ import annotations

import datetime as dt
import functools
import hashlib
import json
import random
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TypedDict

from runner._internal.settings import Settings
from runner.bundle.build import build_bundle
from runner.bundle.index import History
from runner.bundle.run_records import RunFilter, RunRecord
from runner.bundle.signing import Signer, Verifier
from runner.bundle.store import Store, StoredBundle
from runner.errors import EvalrunError, InputError
from runner.model.outcome import Outcome, worst_exit_code
from runner.model.plan import Backend
from runner.model.predicate import (
    AuditedRun,
    AuditFilters,
    AuditPredicate,
    JsonObject,
    MissingInput,
    Timestamps,
)
from runner.render.safe import markdown_view
from runner.workflows.rerun import (
    REPRODUCED,
    ImageUnavailable,
    InputsUnavailable,
    evaluated,
    load_original,
    rerun,
)

Progress = Callable[[str], None]


@dataclass(frozen=True)
class AuditEntry:
    run_id: str
    bundle_digest: str
    spec: str | None
    reproduced: bool
    category: str
    detail: str
    rerun_id: str | None = None
    rerun_bundle: str | None = None
    verdicts: dict[str, str] = field(default_factory=dict)
    missing: list[dict[str, str]] = field(default_factory=list)
    exit_code: int = 0

    def record(self) -> AuditedRun:
        """This entry as the audit predicate records it (every field, as ``as_dict``)."""
        return AuditedRun(
            run_id=self.run_id,
            bundle_digest=self.bundle_digest,
            spec=self.spec,
            reproduced=self.reproduced,
            category=self.category,
            detail=self.detail,
            rerun_id=self.rerun_id,
            rerun_bundle=self.rerun_bundle,
            verdicts=dict(self.verdicts),
            missing=tuple(MissingInput(**m) for m in self.missing),
            exit_code=self.exit_code,
        )


class AuditSummary(TypedDict):
    """``evalrun audit --json``: how many were re-run and reproduced, and each run's entry."""

    audit_id: str
    seed: int
    sampled_from: int
    audited: int
    reproduced: int
    failed: int
    bundle: str
    bundle_digest: str
    exit_code: int
    runs: list[JsonObject]  # each AuditEntry's fields


@dataclass(frozen=True)
class AuditResult:
    audit_id: str
    seed: int
    sampled_from: int
    entries: tuple[AuditEntry, ...]
    bundle: StoredBundle
    exit_code: int

    @property
    def failed(self) -> list[AuditEntry]:
        return [e for e in self.entries if not e.reproduced]

    def as_dict(self) -> AuditSummary:
        return {
            "audit_id": self.audit_id,
            "seed": self.seed,
            "sampled_from": self.sampled_from,
            "audited": len(self.entries),
            "reproduced": len(self.entries) - len(self.failed),
            "failed": len(self.failed),
            "bundle": str(self.bundle.path),
            "bundle_digest": self.bundle.digest,
            "exit_code": self.exit_code,
            "runs": [asdict(e) for e in self.entries],
        }


def default_seed(today: dt.date | None = None) -> int:
    """A new sample every day unless a seed is given: ``YYYYMMDD`` of today (UTC)."""
    day = today or dt.datetime.now(dt.UTC).date()
    return int(day.strftime("%Y%m%d"))


def candidates(
    history: History, *, since: str | None, until: str | None, spec: str | None
) -> list[RunRecord]:
    """Original runs with metrics, oldest first."""
    records = history.query(RunFilter(since=since, until=until, spec=spec))
    return [
        r for r in records if r.reproduction_of is None and _has_metrics(r.outcome) and r.metrics
    ]


def _has_metrics(outcome: str | None) -> bool:
    parsed = Outcome.parse(outcome)
    return parsed is not None and parsed.has_metrics


def sample(records: Sequence[RunRecord], n: int, seed: int) -> list[RunRecord]:
    """``n`` records chosen by a PRNG seeded with ``seed`` (all if fewer), in start order."""
    if n <= 0:
        raise InputError("--sample must be at least 1")
    if len(records) <= n:
        return list(records)
    picked = random.Random(seed).sample(range(len(records)), n)  # noqa: S311 (a sample, not a secret)
    return [records[i] for i in sorted(picked)]


def _audit_one(
    record: RunRecord,
    backend: Backend,
    signer: Signer,
    verifier: Verifier,
    settings: Settings,
    search_dirs: Sequence[Path],
    tolerance: float | None,
    progress: Progress,
) -> AuditEntry:
    entry = functools.partial(
        AuditEntry,
        run_id=record.run_id,
        bundle_digest=record.bundle_digest,
        spec=record.spec_name,
    )
    try:
        original = load_original(record.path, verifier)
        result = rerun(
            original,
            backend,
            signer,
            settings,
            search_dirs=search_dirs,
            tolerance=tolerance,
            progress=progress,
        )
    except InputsUnavailable as exc:
        return entry(
            reproduced=False,
            category="missing_artifact",
            detail="; ".join(f"{m.wanted.label}: {m.reason}" for m in exc.missing),
            missing=[m.as_dict() for m in exc.missing],
            exit_code=exc.exit_code,
        )
    except ImageUnavailable as exc:
        return entry(
            reproduced=False,
            category="image_unavailable",
            detail=exc.diagnostics().replace("\n", "; "),
            exit_code=exc.exit_code,
        )
    except EvalrunError as exc:
        category = "bundle_invalid" if exc.kind == "verification_failed" else exc.kind
        return entry(
            reproduced=False,
            category=category,
            detail=exc.diagnostics().replace("\n", "; "),
            exit_code=exc.exit_code,
        )
    repro = result.reproduction
    reproduced = result.exit_code == 0 and repro.verdict in REPRODUCED
    if reproduced:
        category = repro.verdict
    elif not evaluated(result.outcome.outcome):
        category = result.outcome.outcome.value
    elif repro.verdict == "failed":
        category = "evaluation_failed"
    else:
        category = "metric_drift"
    return entry(
        reproduced=reproduced,
        category=category,
        detail=repro.reason or f"{repro.verdict}; re-run outcome {result.outcome.outcome}",
        rerun_id=result.outcome.run_id,
        rerun_bundle=result.outcome.bundle.digest,
        verdicts={d.name: d.verdict for d in repro.deltas},
        exit_code=result.exit_code,
    )


def render_audit_markdown(predicate: AuditPredicate) -> str:
    """An audit's ``report.md`` (from its predicate; deterministic)."""
    p = markdown_view(predicate)
    lines = [
        f"# evalrun reproduction audit {p.run_id}",
        "",
        f"- started: {p.started}",
        f"- seed: {p.seed}; sampled {len(p.runs)} of {p.sampled_from} runs",
        f"- filters: {json.dumps(p.filters.to_json(), sort_keys=True)}",
        f"- result: **{p.outcome}** ({p.reproduced} reproduced, {p.failed} not)",
        "",
        "| run | spec | reproduced | why | re-run |",
        "|---|---|---|---|---|",
    ]
    for e in p.runs:
        lines.append(
            f"| {e.run_id} | {e.spec} | {'yes' if e.reproduced else 'NO'} | "
            f"{e.category}: {e.detail} | {e.rerun_id or '—'} |"
        )
    return "\n".join(lines) + "\n"


def run_audit(
    *,
    n: int,
    seed: int | None,
    since: str | None,
    until: str | None,
    spec: str | None,
    backend: Backend,
    signer: Signer,
    verifier: Verifier,
    settings: Settings,
    search_dirs: Sequence[Path] = (),
    tolerance: float | None = None,
    progress: Progress = lambda _: None,
) -> AuditResult:
    """Sample, re-run, and store a signed audit bundle; see the module docstring."""
    store = Store(settings.home)
    history = History(store)
    seed = default_seed() if seed is None else seed
    pool = candidates(history, since=since, until=until, spec=spec)
    if not pool:
        raise InputError(
            "no runs to audit match the filters",
            since=since,
            until=until,
            spec=spec,
            hint="`evalrun runs ls` lists stored runs",
        )
    chosen = sample(pool, n, seed)
    started = dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds")
    audit_id = (
        "audit-"
        + hashlib.sha256(
            json.dumps([started, seed, [r.bundle_digest for r in chosen]]).encode()
        ).hexdigest()[:24]
    )
    entries = []
    for i, record in enumerate(chosen, 1):
        progress(f"audit {i}/{len(chosen)}: re-running {record.run_id} ({record.spec_name})")
        entry = _audit_one(
            record, backend, signer, verifier, settings, search_dirs, tolerance, progress
        )
        progress(
            f"  {record.run_id}: {'reproduced' if entry.reproduced else 'NOT reproduced'} "
            f"({entry.category})"
        )
        entries.append(entry)
    failed = [e for e in entries if not e.reproduced]
    # a failed entry without an exit code still failed: it counts as "did not reproduce" (6)
    exit_code = worst_exit_code(e.exit_code or 6 for e in failed) if failed else 0
    predicate = AuditPredicate(
        kind="audit",
        run_id=audit_id,
        started=started,
        finished=dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds"),
        seed=seed,
        sample=n,
        sampled_from=len(pool),
        filters=AuditFilters(since=since, until=until, spec=spec, tolerance=tolerance),
        outcome="reproduced" if not failed else "not_reproduced",
        reproduced=len(entries) - len(failed),
        failed=len(failed),
        exit_code=exit_code,
        runs=tuple(e.record() for e in entries),
        timestamps=Timestamps(started=started),
    )
    body = predicate.to_json()
    with store.staging_dir() as stage:
        (stage / "audit.json").write_text(json.dumps(body, indent=2, sort_keys=True) + "\n")
        (stage / "report.md").write_text(render_audit_markdown(predicate))
        build_bundle(stage, body, signer, stage)
        stored = store.put(stage)
    return AuditResult(
        audit_id=audit_id,
        seed=seed,
        sampled_from=len(pool),
        entries=tuple(entries),
        bundle=stored,
        exit_code=exit_code,
    )


__all__ = ["AuditEntry", "AuditResult", "candidates", "default_seed", "run_audit", "sample"]

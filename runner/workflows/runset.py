"""Run sets: one evaluation under several seeds, with the uncertainty across seeds.

Each seed is a full run with its own signed bundle (its bootstrap CI says how
uncertain the number is for that seed's sample of randomness). The run set adds
the spread *between* seeds: per metric the mean, the sample standard deviation and
a Student-t confidence interval for the mean, sealed in its own signed bundle
that names every member bundle by digest.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from runner._internal.settings import Settings
from runner.bundle.build import build_bundle
from runner.bundle.reader import expect_kind, read_predicate
from runner.bundle.signing import Signer
from runner.bundle.store import Store, StoredBundle
from runner.model.outcome import Outcome
from runner.model.plan import Backend
from runner.model.predicate import (
    AcrossSeedsStat,
    ConfidenceInterval,
    JsonObject,
    MetricResult,
    RunSetMember,
    RunSetPredicate,
    SeedList,
    SpecRef,
    Timestamps,
)
from runner.model.spec_metrics import MetricSpec
from runner.render.markdown import percent
from runner.render.safe import markdown_view
from runner.workflows.run import load_locked
from runner.workflows.sweep import Cell, CellResult, run_sweep, sweep_exit_code

Progress = Callable[[str], None]


# --------------------------------------------------------------------------- Student t


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction for the regularized incomplete beta (modified Lentz)."""
    tiny = 1e-300
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 300):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < 1e-15:
            break
    return h


def _betainc(a: float, b: float, x: float) -> float:
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    ln = (
        math.lgamma(a + b)
        - math.lgamma(a)
        - math.lgamma(b)
        + a * math.log(x)
        + b * math.log(1.0 - x)
    )
    front = math.exp(ln)
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def student_t_cdf(t: float, df: int) -> float:
    """P(T <= t) for Student's t with ``df`` degrees of freedom."""
    x = df / (df + t * t)
    tail = 0.5 * _betainc(df / 2.0, 0.5, x)
    return 1.0 - tail if t >= 0 else tail


def student_t_quantile(p: float, df: int) -> float:
    """The ``p`` quantile of Student's t (bisection; exact to ~1e-12)."""
    if not 0.0 < p < 1.0 or df < 1:
        raise ValueError("need 0 < p < 1 and df >= 1")
    if p < 0.5:
        return -student_t_quantile(1.0 - p, df)
    lo, hi = 0.0, 1.0
    while student_t_cdf(hi, df) < p:
        hi *= 2.0
    for _ in range(200):
        mid = (lo + hi) / 2.0
        if student_t_cdf(mid, df) < p:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-13:
            break
    return (lo + hi) / 2.0


@dataclass(frozen=True)
class AcrossSeeds:
    name: str
    n: int
    mean: float
    sd: float
    ci_low: float
    ci_high: float
    level: float

    def stat(self) -> AcrossSeedsStat:
        """The run set predicate's record of this metric."""
        return AcrossSeedsStat(
            name=self.name,
            n=self.n,
            mean=self.mean,
            sd=self.sd,
            ci=ConfidenceInterval(
                low=self.ci_low,
                high=self.ci_high,
                level=self.level,
                method="student_t_across_seeds",
            ),
        )

    def as_dict(self) -> JsonObject:
        return self.stat().to_json()


def across_seeds(name: str, values: Sequence[float], level: float) -> AcrossSeeds:
    """Mean, sample standard deviation and Student-t CI of per-seed values."""
    n = len(values)
    if n < 2:
        raise ValueError("need at least two seeds")
    mean = math.fsum(values) / n
    sd = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1))
    half = student_t_quantile(1 - (1 - level) / 2, n - 1) * sd / math.sqrt(n)
    return AcrossSeeds(name, n, mean, sd, mean - half, mean + half, level)


# --------------------------------------------------------------------------- run sets


def run_set_id(lock_digest: str, seeds: Sequence[int]) -> str:
    text = f"evalrun-run-set/v1\n{lock_digest}\n{','.join(map(str, seeds))}"
    return "rs-" + hashlib.sha256(text.encode()).hexdigest()[:24]


@dataclass(frozen=True)
class RunSetOutcome:
    run_id: str
    outcome: Outcome
    exit_code: int
    bundle: StoredBundle
    predicate: RunSetPredicate
    reused: bool


def _stats(members: list[CellResult], definitions: Sequence[MetricSpec]) -> list[AcrossSeedsStat]:
    out = []
    for d in definitions:
        values = [
            float(m.value)
            for r in members
            if r.outcome is not None
            for m in r.outcome.predicate.metrics
            if m.name == d.name and m.value is not None
        ]
        if len(values) >= 2:
            out.append(across_seeds(d.name, values, d.ci.level).stat())
        else:
            out.append(
                AcrossSeedsStat(
                    name=d.name,
                    n=len(values),
                    mean=None,
                    sd=None,
                    ci=None,
                    note="fewer than two seeds produced this metric",
                )
            )
    return out


def _member(seed: int, result: CellResult) -> RunSetMember:
    """One seed's row: its run by id and bundle digest, or why there is none."""
    if result.outcome is None:
        return RunSetMember(
            seed=seed,
            outcome="error",
            reason=result.error.message if result.error else None,
        )
    return RunSetMember(
        seed=seed,
        run_id=result.outcome.run_id,
        bundle_digest=result.outcome.bundle.digest,
        outcome=result.outcome.outcome,
        metrics=tuple(
            MetricResult(name=m.name, value=m.value, ci=m.ci)
            for m in result.outcome.predicate.metrics
        ),
    )


def run_set(
    spec_path: Path,
    seeds: list[int],
    backend: Backend,
    signer: Signer,
    settings: Settings,
    *,
    parallel: int = 2,
    progress: Progress = lambda _: None,
) -> RunSetOutcome:
    """Run every seed (one bundle each), then seal the run set's own bundle."""
    spec, lock = load_locked(spec_path)
    set_id = run_set_id(lock.digest(), seeds)
    store = Store(settings.home)
    existing = store.find_run(set_id)
    if existing is not None:
        found = expect_kind(read_predicate(existing.path), RunSetPredicate, existing.path)
        return RunSetOutcome(
            set_id,
            found.outcome or Outcome.INFRASTRUCTURE_FAILURE,
            found.exit_code if found.exit_code is not None else 1,
            existing,
            found,
            reused=True,
        )
    started = dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds")
    cells = [Cell(i, {"seed": s}) for i, s in enumerate(seeds)]
    progress(f"run set {set_id}: {len(seeds)} seeds {seeds}")
    members = run_sweep(
        spec_path, cells, backend, signer, settings, parallel=parallel, progress=progress
    )
    code = sweep_exit_code(members)
    worst = next((r for r in members if r.exit_code == code), None)
    outcome = Outcome.PASSED
    if code and worst is not None:
        outcome = worst.outcome.outcome if worst.outcome else Outcome.INFRASTRUCTURE_FAILURE
    predicate = RunSetPredicate(
        run_id=set_id,
        kind="run_set",
        spec=SpecRef(name=spec.metadata.name, digest=spec.digest()),
        lock_digest=lock.digest(),
        seeds=SeedList(seeds=tuple(seeds)),
        members=tuple(_member(seed, r) for seed, r in zip(seeds, members, strict=True)),
        across_seeds=tuple(_stats(members, spec.metrics)),
        outcome=outcome,
        exit_code=code,
        timestamps=Timestamps(
            started=started,
            finished=dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds"),
        ),
    )
    body = predicate.to_json()
    with store.staging_dir() as stage:
        (stage / "runset.json").write_text(json.dumps(body, indent=2, sort_keys=True) + "\n")
        (stage / "report.md").write_text(render_run_set(predicate))
        build_bundle(stage, body, signer, stage)
        stored = store.put(stage)
    return RunSetOutcome(set_id, outcome, code, stored, predicate, reused=False)


def _f(value: float | None) -> str:
    return "—" if value is None else f"{value:.4f}"


def render_run_set(predicate: RunSetPredicate) -> str:
    """Per-seed metrics with their bootstrap CIs, then the spread across seeds."""
    p = markdown_view(predicate)
    names = [s.name for s in p.across_seeds]
    seeds = list(p.seeds.seeds) if p.seeds.seeds is not None else None
    lines = [
        f"# evalrun run set — {p.spec.name}",
        "",
        f"- run set: `{p.run_id}`, outcome **{p.outcome}**",
        f"- seeds: {seeds}",
        "",
        "## Per seed",
        "",
        "| seed | run | " + " | ".join(f"{n} (bootstrap CI)" for n in names) + " |",
        "|---|---|" + "---|" * len(names),
    ]
    for row in p.members:
        by = {m.name: m for m in row.metrics}
        cells = []
        for n in names:
            m = by.get(n) if n is not None else None
            ci = (m.ci if m is not None else None) or ConfidenceInterval()
            value = m.value if m is not None else None
            cells.append(f"{_f(value)} [{_f(ci.low)}, {_f(ci.high)}]")
        run = row.run_id if "run_id" in row.model_fields_set else row.outcome
        lines.append(f"| {row.seed} | `{run}` | " + " | ".join(cells) + " |")
    lines += [
        "",
        "## Across seeds (Student-t CI of the mean)",
        "",
        "| metric | n | mean | sd | CI |",
        "|---|---|---|---|---|",
    ]
    for s in p.across_seeds:
        ci = s.ci or ConfidenceInterval()
        ci_text = f"[{_f(ci.low)}, {_f(ci.high)}] ({percent(ci.level)}%)" if ci.level else "—"
        lines.append(f"| {s.name} | {s.n} | {_f(s.mean)} | {_f(s.sd)} | {ci_text} |")
    return "\n".join(lines) + "\n"

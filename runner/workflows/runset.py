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
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from runner._internal.settings import Settings
from runner.bundle.build import build_bundle
from runner.bundle.signing import Signer
from runner.bundle.store import Store, StoredBundle
from runner.errors import InputError
from runner.model.plan import Backend
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

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "n": self.n,
            "mean": self.mean,
            "sd": self.sd,
            "ci": {
                "low": self.ci_low,
                "high": self.ci_high,
                "level": self.level,
                "method": "student_t_across_seeds",
            },
        }


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
    outcome: str
    exit_code: int
    bundle: StoredBundle
    predicate: dict[str, Any]
    reused: bool


def _stats(members: list[CellResult], definitions: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for d in definitions:
        values = []
        for r in members:
            if r.outcome is None:
                continue
            for m in r.outcome.predicate.get("metrics") or []:
                if m.get("name") == d["name"] and isinstance(m.get("value"), int | float):
                    values.append(float(m["value"]))
        level = float((d.get("ci") or {}).get("level", 0.95))
        if len(values) >= 2:
            out.append(across_seeds(d["name"], values, level).as_dict())
        else:
            out.append(
                {
                    "name": d["name"],
                    "n": len(values),
                    "mean": None,
                    "sd": None,
                    "ci": None,
                    "note": "fewer than two seeds produced this metric",
                }
            )
    return out


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
        predicate = json.loads((existing.path / "statement.json").read_text())["predicate"]
        return RunSetOutcome(
            set_id,
            str(predicate["outcome"]),
            int(predicate["exit_code"]),
            existing,
            predicate,
            reused=True,
        )
    started = dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds")
    cells = [Cell(i, {"seed": s}) for i, s in enumerate(seeds)]
    progress(f"run set {set_id}: {len(seeds)} seeds {seeds}")
    members = run_sweep(
        spec_path, cells, backend, signer, settings, parallel=parallel, progress=progress
    )
    definitions = [m.model_dump(mode="json") for m in spec.metrics]
    code = sweep_exit_code(members)
    worst = next((r for r in members if r.exit_code == code), None)
    outcome = "passed"
    if code and worst is not None:
        outcome = worst.outcome.outcome if worst.outcome else "infrastructure_failure"
    member_rows = []
    for seed, r in zip(seeds, members, strict=True):
        row: dict[str, Any] = {"seed": seed}
        if r.outcome is not None:
            row.update(
                run_id=r.outcome.run_id,
                bundle_digest=r.outcome.bundle.digest,
                outcome=r.outcome.outcome,
                metrics=[
                    {"name": m["name"], "value": m.get("value"), "ci": m.get("ci")}
                    for m in r.outcome.predicate.get("metrics") or []
                ],
            )
        else:
            row.update(outcome="error", reason=r.error.message if r.error else None)
        member_rows.append(row)
    predicate = {
        "run_id": set_id,
        "kind": "run_set",
        "spec": {"name": spec.metadata.name, "digest": spec.digest()},
        "lock_digest": lock.digest(),
        "seeds": {"seeds": seeds},
        "members": member_rows,
        "across_seeds": _stats(members, definitions),
        "outcome": outcome,
        "exit_code": code,
        "timestamps": {
            "started": started,
            "finished": dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds"),
        },
    }
    with store.staging_dir() as stage:
        (stage / "runset.json").write_text(json.dumps(predicate, indent=2, sort_keys=True) + "\n")
        (stage / "report.md").write_text(render_run_set(predicate))
        build_bundle(stage, predicate, signer, stage)
        stored = store.put(stage)
    return RunSetOutcome(set_id, outcome, code, stored, predicate, reused=False)


def _f(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, int | float) else "—"


def render_run_set(predicate: Mapping[str, Any]) -> str:
    """Per-seed metrics with their bootstrap CIs, then the spread across seeds."""
    names = [s["name"] for s in predicate.get("across_seeds") or []]
    lines = [
        f"# evalrun run set — {predicate['spec']['name']}",
        "",
        f"- run set: `{predicate['run_id']}`, outcome **{predicate['outcome']}**",
        f"- seeds: {predicate['seeds']['seeds']}",
        "",
        "## Per seed",
        "",
        "| seed | run | " + " | ".join(f"{n} (bootstrap CI)" for n in names) + " |",
        "|---|---|" + "---|" * len(names),
    ]
    for row in predicate.get("members") or []:
        by = {m["name"]: m for m in row.get("metrics") or []}
        cells = []
        for n in names:
            m = by.get(n) or {}
            ci = m.get("ci") or {}
            cells.append(f"{_f(m.get('value'))} [{_f(ci.get('low'))}, {_f(ci.get('high'))}]")
        lines.append(
            f"| {row['seed']} | `{row.get('run_id', row.get('outcome'))}` | "
            + " | ".join(cells)
            + " |"
        )
    lines += [
        "",
        "## Across seeds (Student-t CI of the mean)",
        "",
        "| metric | n | mean | sd | CI |",
        "|---|---|---|---|---|",
    ]
    for s in predicate.get("across_seeds") or []:
        ci = s.get("ci") or {}
        level = ci.get("level")
        ci_text = (
            f"[{_f(ci.get('low'))}, {_f(ci.get('high'))}] ({int(level * 100)}%)" if level else "—"
        )
        lines.append(
            f"| {s['name']} | {s['n']} | {_f(s.get('mean'))} | {_f(s.get('sd'))} | {ci_text} |"
        )
    return "\n".join(lines) + "\n"


def check_seeds(seeds: list[int] | None) -> list[int]:
    if not seeds:
        raise InputError("the spec declares no 'seeds' or 'repeats'")
    return seeds

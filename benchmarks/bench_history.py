"""``evalrun runs ls`` over a large store, and the ``runs reindex`` rate.

Generates a synthetic store of N bundles (default 100,000): each a ``statement.json``
made from one real run predicate (different run id, start time, outcome, metric
values), which is all the index reads (it is a cache; commands that act on a run
verify it). Then times, as a user would run them (fresh processes):

* ``runs reindex`` (throw the index away, read every bundle): bundles per second;
* ``runs ls`` with the index in sync: everything, ``--limit 20``, ``--spec``, ``--json``.

Prints one JSON line: each ``runs ls`` time as the best (``*_s``) and the median
(``*_median_s``) of ``--repeat`` runs, with the load average before and after (the
machine may be shared). Goal: ``runs ls`` ≤ 1 s at 100,000 runs.

    python benchmarks/bench_history.py [--runs 100000] [--keep DIR] [--repeat 5]
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EVALRUN = [sys.executable, "-m", "runner.cli"]
FIXTURE = ROOT / "tests" / "unit" / "fixtures" / "legacy" / "bundles" / "run" / "statement.json"


def generate(home: Path, runs: int) -> None:
    """``runs`` bundle folders under ``home/bundles``, each with a statement.json."""
    template = json.loads(FIXTURE.read_text())
    bundles = home / "bundles"
    bundles.mkdir(parents=True)
    outcomes = ("passed", "passed", "passed", "thresholds_failed", "evaluation_failed")
    for i in range(runs):
        statement = copy.deepcopy(template)
        pred = statement["predicate"]
        pred["run_id"] = f"r-{i:024x}"
        pred["spec"]["name"] = f"spec-{i % 50}"
        day, second = divmod(i, 86_400)
        pred["timestamps"]["started"] = (
            f"2026-{1 + day // 28 % 12:02d}-{1 + day % 28:02d}T"
            f"{second // 3600:02d}:{second // 60 % 60:02d}:{second % 60:02d}Z"
        )
        pred["outcome"] = outcomes[i % len(outcomes)]
        for metric in pred.get("metrics", []):
            metric["value"] = round(0.9 + (i % 1000) / 10_000, 4)
        data = json.dumps(statement, sort_keys=True).encode()
        digest = hashlib.sha256(data + i.to_bytes(8, "big")).hexdigest()
        folder = bundles / f"sha256-{digest}"
        folder.mkdir()
        (folder / "statement.json").write_bytes(data)


def timed(env: dict[str, str], *args: str) -> tuple[float, int]:
    t0 = time.perf_counter()
    proc = subprocess.run([*EVALRUN, *args], env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, check=False)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"evalrun {args} exited {proc.returncode}: {proc.stderr[-500:]!r}")
    return wall, len(proc.stdout)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=100_000)
    parser.add_argument("--keep", type=Path, help="reuse (or leave) the generated store here")
    parser.add_argument("--repeat", type=int, default=5, help="runs of each listing")
    args = parser.parse_args()
    home = args.keep or Path(tempfile.mkdtemp(prefix="evalrun-bench-history-")) / "home"
    t0 = time.perf_counter()
    if not (home / "bundles").is_dir():
        generate(home, args.runs)
    generate_s = time.perf_counter() - t0
    env = {**os.environ, "EVALRUN_HOME": str(home)}
    load_before = os.getloadavg()[0]
    reindex_s, _ = timed(env, "runs", "reindex")
    results = {}
    for name, extra in (
        ("ls_all_s", ()),
        ("ls_limit20_s", ("--limit", "20")),
        ("ls_spec_s", ("--spec", "spec-7")),
        ("ls_json_s", ("--json",)),
    ):
        walls = [timed(env, "runs", "ls", *extra)[0] for _ in range(args.repeat)]
        results[name] = round(min(walls), 3)
        results[name.removesuffix("_s") + "_median_s"] = round(statistics.median(walls), 3)
    print(json.dumps({
        "benchmark": "history",
        "machine": f"{os.cpu_count()} cores, shared with other work",
        "load_average_1m_at_start": round(load_before, 1),
        "load_average_1m_at_end": round(os.getloadavg()[0], 1),
        "runs": args.runs,
        "generate_s": round(generate_s, 1),
        "reindex_s": round(reindex_s, 2),
        "reindex_rate_per_s": round(args.runs / reindex_s),
        **results,
        "goal_ls_le_1s": results["ls_all_s"] <= 1.0,
    }))
    if not args.keep:
        shutil.rmtree(home.parent, ignore_errors=True)


if __name__ == "__main__":
    main()

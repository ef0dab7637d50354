"""Interleaved A/B of `evalrun run` (digits) between two versions of the runner.

On a shared machine the seconds of one benchmark run move by ±0.25 s from one run to the
next, so a change of a tenth of a second shows only in runs of both versions taken in
turns, in alternating order, and compared pair by pair. ``A`` is a git revision (checked
out in a temporary worktree), ``B`` the working tree; both run the same locked copy of
examples/digits in one store (the agent image is built from ``B``'s checkout, so the
runner is what differs, not the image; with ``--own-images`` each side runs its own copy,
locked by its own evalrun from its own image template, so a change of the agent or the
template counts too). Prints one JSON line:
each side's median wall time and phases (as ``bench_run.py`` measures them) and the
paired differences B - A.

    python benchmarks/ab_run.py REV [--rounds 8] [--own-images]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_run

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("rev", help="the A side: a git revision of this checkout")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--own-images", action="store_true",
                        help="each side runs an image with its own agent (locked by it)")
    args = parser.parse_args()
    home = tempfile.mkdtemp(prefix="evalrun-ab-")
    worktree = Path(home) / "a"
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "-q", "--detach", str(worktree),
                    args.rev], check=True)
    try:
        env = bench_run.bench_env(home)
        spec = bench_run.locked_example(home, env)
        specs = {"a": spec, "b": spec}
        if args.own_images:
            specs["a"] = bench_run.locked_example(
                home, dict(env, PYTHONPATH=str(worktree)), name="digits-a", cwd=worktree)
        sides = {"a": worktree, "b": ROOT}
        walls: dict[str, list[float]] = {"a": [], "b": []}
        phases: dict[str, dict[str, list[float]]] = {"a": {}, "b": {}}

        def one(side: str) -> tuple[float, dict[str, float]]:
            run_env = dict(env, PYTHONPATH=str(sides[side]))
            took, _events, run_phases = bench_run.measured_run(
                specs[side], home, run_env, sides[side])
            return took, run_phases

        one("a")  # one of each first, not counted (first-process costs)
        one("b")
        for round_ in range(args.rounds):
            for side in ("a", "b") if round_ % 2 == 0 else ("b", "a"):
                took, run_phases = one(side)
                walls[side].append(took)
                for name, value in run_phases.items():
                    phases[side].setdefault(name, []).append(value)
        paired = [b - a for a, b in zip(walls["a"], walls["b"], strict=True)]
        print(json.dumps({
            "benchmark": "run_ab",
            "a": args.rev,
            "b": "working tree",
            "rounds": args.rounds,
            "images": "each side's own" if args.own_images else "B's",
            "cpu_reference_s": round(bench_run._cpu_reference(), 3),
            "wall_s": {s: round(statistics.median(v), 3) for s, v in walls.items()},
            "paired_b_minus_a_s": {"median": round(statistics.median(paired), 3),
                                   "mean": round(statistics.mean(paired), 3)},
            "phases_s": {s: {k: round(statistics.median(v), 3) for k, v in p.items()}
                         for s, p in phases.items()},
        }))
    finally:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(worktree)],
                       check=False)
        shutil.rmtree(home, ignore_errors=True)


if __name__ == "__main__":
    main()

"""Added wall time of `evalrun run` over a raw sandboxed `docker run --runtime runsc`.

Both run the same image (cached build) doing the same evaluation of examples/digits:
the raw run calls the evaluation directly; evalrun adds preflight (rootfs and input
digests), environment capture, metrics + CIs, collection, recomputation, bundle
signing and storage. Prints one JSON line; medians of N runs, measured in one go.

    python benchmarks/bench_run.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SPEC = ROOT / "examples" / "digits" / "eval.yaml"
EVALRUN = [sys.executable, "-m", "runner.cli"]


def _timed(cmd: list[str], env: dict[str, str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, capture_output=True)
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    home = tempfile.mkdtemp(prefix="evalrun-bench-")
    env = {**os.environ, "EVALRUN_HOME": home}
    # evalrun never creates a signing key without a terminal: make this store's key first
    subprocess.run([*EVALRUN, "keys", "generate"], check=True, env=env, capture_output=True)
    subprocess.run([*EVALRUN, "lock", str(SPEC)], check=True, env=env, capture_output=True)
    lock = json.loads(SPEC.with_name("eval.lock.json").read_text())
    ref = lock["image"]["ref"]
    here = SPEC.parent
    raw_times, evalrun_times, preflight = [], [], []
    for _ in range(args.repeats):
        with tempfile.TemporaryDirectory() as out:
            os.chown(out, 65532, 65532)
            raw = [
                "docker", "run", "--rm", "--runtime", "runsc", "--network", "none",
                "--read-only", "--tmpfs", "/tmp", "--user", "65532:65532", "--cap-drop", "ALL",
                "--security-opt", "no-new-privileges",
                "-v", f"{here / lock['model']['path']}:/in/model.json:ro",
                "-v", f"{here / lock['datasets'][0]['path']}:/in/data.jsonl:ro",
                "-v", f"{out}:/out", "-e", "EVALRUN_MODEL=/in/model.json",
                "-e", "EVALRUN_DATA_DIGITS_TEST=/in/data.jsonl",
                "-e", "EVALRUN_OUTPUT=/out/predictions.jsonl",
                "--entrypoint", "python3", ref, "/app/evaluate.py",
            ]
            raw_times.append(_timed(raw, env))
        evalrun_times.append(_timed([*EVALRUN, "run", str(SPEC), "--rerun", "--json"], env))
        runs = sorted(Path(home, "bundles").iterdir(), key=lambda p: p.stat().st_mtime)
        events = Path(runs[-1], "results", "logs", "events.jsonl").read_text().splitlines()
        for line in events:
            event = json.loads(line)
            if event["event"] == "preflight_rootfs":
                preflight.append(event["duration_s"])
    raw_med = statistics.median(raw_times)
    evalrun_med = statistics.median(evalrun_times)
    print(json.dumps({
        "benchmark": "run_overhead",
        "repeats": args.repeats,
        "raw_docker_runsc_s": round(raw_med, 3),
        "evalrun_run_s": round(evalrun_med, 3),
        "added_s": round(evalrun_med - raw_med, 3),
        "ratio": round(evalrun_med / raw_med, 3),
        "of_which_rootfs_preflight_s": round(statistics.median(preflight), 3) if preflight else None,
        "added_without_rootfs_preflight_s": round(evalrun_med - raw_med
                                                  - statistics.median(preflight), 3)
        if preflight else None,
    }))


if __name__ == "__main__":
    main()

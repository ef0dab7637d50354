"""The agent's rootfs preflight on a large image: digest table (``used``) vs the full check.

Builds (once, with evalrun's own hermetic build) the digits example plus generated data
files — by default 50,000 files, 3 GiB — so the image has ≥ 60,000 entries and > 3 GB.
Then, under gVisor:

* ``used`` (``evalrun run``): the preflight before the evaluation (read the digest table,
  bind it to the locked digest, parse it) and the tail after it (used files still to check);
* ``full`` (``evalrun run --verify-rootfs full``): the whole-image hash on all cores,
  running alongside the evaluation;
* today's check before this change: the same hash in one thread, blocking
  (``docker run --runtime runsc``, the agent's code with one hashing thread).

Prints one JSON line. Goals: preflight ≤ 1 s and ≤ 0.2× the full check.

    python benchmarks/bench_preflight_large.py [--files 50000] [--gib 3] [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "digits"
EVALRUN = [sys.executable, "-m", "runner.cli"]
REPO_NAME = "bench-large-preflight"

GENERATE = '''\
"""Bulk data files for the preflight benchmark: deterministic, in folders of 1,000."""
import os, sys
root, count, total = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
size = total // count
block = bytes(range(256)) * (size // 256 + 1)
for i in range(count):
    folder = os.path.join(root, f"d{i // 1000:03d}")
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, f"f{i:06d}.bin"), "wb") as fh:
        fh.write(i.to_bytes(8, "big") + block[: size - 8])
'''


def _events(bundle: Path) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for line in (bundle / "results" / "logs" / "events.jsonl").read_text().splitlines():
        event = json.loads(line)
        out[event["event"]] = event
    return out


def _run(env: dict[str, str], spec: Path, *extra: str) -> tuple[float, dict[str, dict], dict]:
    t0 = time.perf_counter()
    proc = subprocess.run([*EVALRUN, "run", str(spec), "--rerun", "--json", *extra],
                          env=env, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - t0
    out = json.loads(proc.stdout)
    if proc.returncode != 0:
        raise SystemExit(f"evalrun run {extra} exited {proc.returncode}: {out.get('reason')}")
    bundle = Path(out["bundle"])
    pred = json.loads((bundle / "statement.json").read_text())["predicate"]
    return wall, _events(bundle), pred["image"]["rootfs_check"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--files", type=int, default=50_000)
    parser.add_argument("--gib", type=float, default=3.0)
    parser.add_argument("--keep", action="store_true", help="keep the image in the engine")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="evalrun-bench-large-"))
    home = work / "home"
    env = {**os.environ, "EVALRUN_HOME": str(home)}
    subprocess.run([*EVALRUN, "keys", "generate"], check=True, env=env, capture_output=True)
    example = work / "digits"
    shutil.copytree(EXAMPLE, example, ignore=shutil.ignore_patterns("eval.lock.json"))
    (example / "app" / "generate_data.py").write_text(GENERATE)
    template = (ROOT / "images" / "python-eval.Dockerfile.j2").read_text().replace(
        "COPY app/ /app/\n",
        "COPY app/ /app/\n"
        f'RUN ["python3", "/app/generate_data.py", "/opt/bulk", "{args.files}", '
        f'"{int(args.gib * 2**30)}"]\n',
    )
    (work / "large.Dockerfile.j2").write_text(template)
    spec = example / "eval.yaml"
    spec.write_text(spec.read_text().replace(
        "template: ../../images/python-eval.Dockerfile.j2",
        f"template: {work / 'large.Dockerfile.j2'}",
    ).replace("name: digits-logreg", f"name: {REPO_NAME}"))
    t0 = time.perf_counter()
    subprocess.run([*EVALRUN, "lock", str(spec)], check=True, env=env, capture_output=True)
    build_s = time.perf_counter() - t0
    ref = json.loads((example / "eval.lock.json").read_text())["image"]["ref"]

    used_wall, used, used_check = _run(env, spec)
    full_wall, full, full_check = _run(env, spec, "--verify-rootfs", "full")
    # the evaluation's end to the verdict: what the used-files check adds after it
    used_tail = used["rootfs_verified"]["ts"] - used["metrics_done"]["ts"]
    full_tail = full["rootfs_verified"]["ts"] - full["metrics_done"]["ts"]

    # today's check before this change: one thread, before the evaluation
    today = (
        "import time, runner.agent.rootfs as r; r.hash_workers = lambda: 1; "
        "t = time.monotonic(); d, n = r.rootfs_digest('/'); "
        "print(d, n, round(time.monotonic() - t, 3))"
    )
    proc = subprocess.run(
        ["docker", "run", "--rm", "--runtime", "runsc", "--network", "none", "--read-only",
         "--tmpfs", "/tmp", "--user", "65532:65532", "--entrypoint", "python3", ref, "-c", today],
        capture_output=True, text=True, check=True,
    )
    digest, entries, today_s = proc.stdout.split()
    assert digest == used_check["table_digest"], "single-threaded digest differs from the table"
    preflight_s = used["preflight_rootfs"]["duration_s"]
    print(json.dumps({
        "benchmark": "preflight_large_image",
        "machine": f"{os.cpu_count()} cores, shared with other work",
        "load_average_1m_at_end": round(os.getloadavg()[0], 1),
        "files_generated": args.files,
        "gib_generated": args.gib,
        "image_entries": int(entries),
        "build_and_lock_s": round(build_s, 1),
        "used_preflight_s": preflight_s,
        "used_files_verified": used_check["files_verified"],
        "used_tail_after_evaluation_s": round(used_tail, 3),
        "used_run_wall_s": round(used_wall, 2),
        "full_check_parallel_s": full_check["duration_s"],
        "full_tail_after_evaluation_s": round(full_tail, 3),
        "full_run_wall_s": round(full_wall, 2),
        "today_full_check_single_thread_s": float(today_s),
        "preflight_over_today": round(preflight_s / float(today_s), 4),
        "preflight_over_full_parallel": round(preflight_s / full_check["duration_s"], 4),
        "goal_preflight_le_1s": preflight_s <= 1.0,
        "goal_le_0.2x_full": preflight_s <= 0.2 * float(today_s),
    }))
    if not args.keep:
        images = subprocess.run(
            ["docker", "images", "--no-trunc", "--format", "{{.ID}} {{.Repository}}"],
            capture_output=True, text=True, check=False,
        ).stdout.split("\n")
        ids = {line.split()[0] for line in images if line.endswith(f"/{REPO_NAME}")}
        subprocess.run(["docker", "rmi", "-f", *ids], capture_output=True, check=False)
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

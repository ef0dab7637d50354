#!/usr/bin/env python3
"""Run the coverage-guided fuzz targets (atheris) one at a time and report executions.

    python tests/fuzz/run_fuzzers.py --seconds 300            # every target, 300 s in all
    python tests/fuzz/run_fuzzers.py --targets spec,frame --seconds 60
    python tests/fuzz/run_fuzzers.py --seed                    # (re)write the seed inputs

Each target runs in its own process (``-workers=1``, one after the other: the machines
are shared) with libFuzzer's per-input ``-timeout`` and ``-rss_limit_mb`` and an
``RLIMIT_AS`` cap, from a working copy of its committed corpus
(``tests/fuzz/corpus/<target>/``). Afterwards the working corpus is merged back
(``-merge=1``: only inputs that add coverage), crashes are left under
``build/fuzz/<target>/`` and the totals are printed and written to
``build/fuzz/summary.json``. Exit status 1 if any target found a crash; once fixed, copy
the crash into ``tests/fuzz/crashes/<target>/`` (the unit tier replays it for good — the
corpus merge keeps only what adds coverage).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
CORPUS = HERE / "corpus"
WORK = ROOT / "build" / "fuzz"
TARGETS = ("spec", "bundle", "frame", "pull", "index", "ahead", "engine", "table")
# the largest input worth mutating per target (a bundle tar, a frame with its tar)
MAX_LEN = {
    "spec": 8192, "bundle": 65536, "frame": 16384, "pull": 65536, "index": 65536, "ahead": 8192,
    "engine": 4096, "table": 8192,
}
TIMEOUT_S = 10
RSS_LIMIT_MB = 3072
INSTRUMENTED = ["runner", "yaml", "tarfile", "http.client"]


def _seed(target: str) -> int:
    module = _target_module(target)
    directory = CORPUS / target
    directory.mkdir(parents=True, exist_ok=True)
    for name, data in module.seeds().items():
        (directory / f"seed-{name}").write_bytes(data)
    return len(module.seeds())


def _target_module(target: str):  # type: ignore[no-untyped-def]
    sys.path[:0] = [str(HERE), str(ROOT)]
    return importlib.import_module(f"fuzz_{target}")


def _run_target_in_this_process(target: str, libfuzzer_args: list[str]) -> None:
    import atheris

    sys.path[:0] = [str(HERE), str(ROOT)]
    from harness import limit_memory

    limit_memory()
    with atheris.instrument_imports(include=INSTRUMENTED):
        module = importlib.import_module(f"fuzz_{target}")
    # libFuzzer re-runs argv[0] for -merge: the wrapper that starts this target again
    atheris.Setup([str(_wrapper(target)), *libfuzzer_args], module.test_one_input)
    atheris.Fuzz()


def _wrapper(target: str) -> Path:
    """An executable that runs ``target`` under atheris with the arguments it is given."""
    path = WORK / target / "target.sh"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(
            "#!/bin/sh\n"
            f'exec "{sys.executable}" "{Path(__file__).resolve()}" --run-target={target} "$@"\n'
        )
        path.chmod(0o755)
    return path


def _libfuzzer(target: str, args: list[str], log: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), str(ROOT)])}
    with log.open("w") as out:
        return subprocess.run(
            [str(_wrapper(target)), *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
            cwd=ROOT,
            check=False,
        )


def _stat(text: str, name: str) -> int:
    found = re.findall(rf"stat::{name}:\s+(\d+)", text)
    return int(found[-1]) if found else 0


def fuzz(target: str, seconds: int) -> dict[str, object]:
    work = WORK / target
    corpus = work / "corpus"
    if corpus.exists():
        shutil.rmtree(corpus)
    corpus.mkdir(parents=True)
    if not any((CORPUS / target).glob("*")):
        _seed(target)
    for path in (CORPUS / target).iterdir():
        shutil.copy(path, corpus / path.name)
    artifacts = work / "artifacts"
    artifacts.mkdir(parents=True, exist_ok=True)
    before = set(artifacts.iterdir())
    log = work / "fuzz.log"
    started = time.monotonic()
    result = _libfuzzer(
        target,
        [
            str(corpus),
            f"-max_total_time={seconds}",
            f"-timeout={TIMEOUT_S}",
            f"-rss_limit_mb={RSS_LIMIT_MB}",
            f"-max_len={MAX_LEN[target]}",
            f"-artifact_prefix={artifacts}/",
            "-print_final_stats=1",
            "-workers=1",
        ],
        log,
    )
    elapsed = time.monotonic() - started
    text = log.read_text(errors="replace")
    crashes = sorted(str(p) for p in set(artifacts.iterdir()) - before)
    merged = work / "merged"
    if merged.exists():
        shutil.rmtree(merged)
    merged.mkdir()
    _libfuzzer(
        target,
        ["-merge=1", f"-max_len={MAX_LEN[target]}", str(merged), str(corpus)],
        work / "merge.log",
    )
    if any(merged.iterdir()):
        shutil.rmtree(CORPUS / target)
        shutil.copytree(merged, CORPUS / target)
    return {
        "target": target,
        "executions": _stat(text, "number_of_executed_units"),
        "seconds": round(elapsed, 1),
        "exec_per_second": _stat(text, "average_exec_per_sec"),
        "new_units": _stat(text, "new_units_added"),
        "peak_rss_mb": _stat(text, "peak_rss_mb"),
        "corpus_files": len(list((CORPUS / target).iterdir())),
        "crashes": crashes,
        "exit_status": result.returncode,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--seconds",
        type=int,
        default=int(os.environ.get("FUZZ_SECONDS", 300)),
        help="fuzzing time in all, shared by the targets (default $FUZZ_SECONDS or 300)",
    )
    parser.add_argument("--targets", default=",".join(TARGETS))
    parser.add_argument("--seed", action="store_true", help="write the seed inputs and stop")
    parser.add_argument("--run-target", help=argparse.SUPPRESS)
    args, rest = parser.parse_known_args(argv)
    if args.run_target:
        _run_target_in_this_process(args.run_target, rest)
        return 0
    targets = [t for t in args.targets.split(",") if t]
    unknown = sorted(set(targets) - set(TARGETS))
    if unknown:
        parser.error(f"unknown targets {unknown}; known: {', '.join(TARGETS)}")
    if args.seed:
        for target in targets:
            print(f"{target}: {_seed(target)} seed inputs")
        return 0
    per_target = max(10, args.seconds // len(targets))
    results = []
    for target in targets:
        print(f"fuzzing {target} for {per_target} s …", flush=True)
        summary = fuzz(target, per_target)
        results.append(summary)
        print(
            f"  {target:7} {summary['executions']:>10,} executions in {summary['seconds']:>7} s "
            f"({summary['exec_per_second']}/s), corpus {summary['corpus_files']} files, "
            f"crashes {len(summary['crashes'])}",  # type: ignore[arg-type]
            flush=True,
        )
    total = sum(int(r["executions"]) for r in results)  # type: ignore[call-overload]
    print(f"total   {total:>10,} executions")
    WORK.mkdir(parents=True, exist_ok=True)
    (WORK / "summary.json").write_text(json.dumps({"total": total, "targets": results}, indent=2))
    return 1 if any(r["crashes"] for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())

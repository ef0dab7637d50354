"""Bundle hash + sign + verify throughput against plain hashlib sha256 of the same bytes.

Writes ``--files`` result files totalling ``--size-mib`` MiB (default 8 x 128 MiB =
1 GiB) into a temp dir, then, ``--repeat`` times each, measures:

* baseline: ``hashlib.file_digest(f, "sha256")`` over every file, one after another;
* bundle: ``build_bundle`` (in place, as the runner does in a store staging dir)
  followed by ``verify_bundle`` of the result.

All reads come from the page cache (the files were just written and are read
once before timing), so this compares CPU work, not disk speed. Best-of-N times
are used for both sides. Prints one JSON line::

    {"baseline_MiB_s": ..., "bundle_MiB_s": ..., "ratio": ..., ...}

where ``bundle_MiB_s`` is the data size over (build + verify) time: the bundle
side hashes every byte twice (once to build, once to verify), the baseline once.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from runner.bundle.build import build_bundle
from runner.bundle.hashing import default_workers
from runner.bundle.metadata import METADATA_NAMES
from runner.bundle.signing import generate_keypair, load_signer, load_verifier
from runner.bundle.verify import verify_bundle

MIB = 1 << 20


def write_files(root: Path, count: int, size_mib: int) -> list[Path]:
    """Write ``count`` files of random bytes totalling ``size_mib`` MiB under root/results."""
    results = root / "results"
    results.mkdir(parents=True)
    per_file = size_mib // count
    block = os.urandom(8 * MIB)
    paths = []
    for i in range(count):
        path = results / f"shard-{i:03d}.bin"
        with path.open("wb") as out:
            for j in range(0, per_file, 8):
                # vary each block so no two files (or blocks) are identical
                out.write(i.to_bytes(4, "big") + j.to_bytes(4, "big") + block[8:])
        paths.append(path)
    (root / "report.md").write_text("# benchmark\n")
    return paths


def baseline(paths: list[Path]) -> float:
    start = time.perf_counter()
    for path in paths:
        with path.open("rb") as f:
            hashlib.file_digest(f, "sha256").hexdigest()
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--files", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--workers", type=int, default=None, help="hashing threads")
    parser.add_argument("--dir", type=Path, default=None, help="where to put the temp files")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="evalrun-bench-", dir=args.dir))
    try:
        generate_keypair(work / "bench.key", work / "bench.pub", "ecdsa-p256")
        signer, verifier = load_signer(work / "bench.key"), load_verifier(work / "bench.pub")
        content = work / "bundle"
        paths = write_files(content, args.files, args.size_mib)
        total = sum(p.stat().st_size for p in paths) + (content / "report.md").stat().st_size
        baseline(paths)  # warm the page cache

        base_times, build_times, verify_times = [], [], []
        for _ in range(args.repeat):
            base_times.append(baseline(paths))
            start = time.perf_counter()
            build_bundle(
                content,
                {"run_id": "bench", "outcome": "passed"},
                signer,
                content,
                workers=args.workers,
            )
            built = time.perf_counter()
            verify_bundle(content, verifier, workers=args.workers)
            verified = time.perf_counter()
            build_times.append(built - start)
            verify_times.append(verified - built)
            for name in METADATA_NAMES:
                (content / name).unlink()

        size_mib = total / MIB
        base = min(base_times)
        build_t, verify_t = min(build_times), min(verify_times)
        best_pair = min(b + v for b, v in zip(build_times, verify_times, strict=True))
        result = {
            "baseline_MiB_s": round(size_mib / base, 1),
            "bundle_MiB_s": round(size_mib / best_pair, 1),
            "ratio": round(base / best_pair, 3),
            "build_MiB_s": round(size_mib / build_t, 1),
            "verify_MiB_s": round(size_mib / verify_t, 1),
            "build_ratio": round(base / build_t, 3),
            "verify_ratio": round(base / verify_t, 3),
            "size_MiB": round(size_mib, 1),
            "files": args.files + 1,
            "workers": args.workers or default_workers(),
            "cpus": os.cpu_count(),
            "repeat": args.repeat,
        }
        print(json.dumps(result))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Locking a directory input vs plain hashlib over the same files (issue 12: goal >= 0.9x).

Writes a directory of ``--files`` shards totalling ``--size-mib`` MiB (default 8 x 256 MiB
= 2 GiB) of non-sparse pseudo-random bytes into a temp dir, reads it once so every
side runs from the page cache (CPU work, not disk speed), then ``--repeat`` times each,
alternating, measures:

* ``hashlib``: ``hashlib.file_digest(f, "sha256")`` over every file, one after another;
* ``scan``: ``scan_tree`` (walk without following links + hashing in parallel threads
  + tree digest), i.e. what locking a local directory input costs when its blobs are
  already cached;
* ``scan_1_thread``: the same with one thread (per-byte overhead against hashlib);

and once each, for information, ``acquire`` of the directory into an empty cache (hash,
then copy every byte into the content-addressed cache, then hard-link the tree) and
into the warm cache. Best-of-N times are used. Prints JSON lines, the last one::

    {"bench": "lock_inputs", "hashlib_MiB_s": ..., "scan_MiB_s": ..., "ratio": ..., ...}
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

from runner._internal.cas import ContentStore, remove_tree
from runner._internal.input_tree import default_workers, scan_tree
from runner.adapters.sources import acquire

MIB = 1 << 20
GOAL = 0.9


def write_shards(root: Path, count: int, size_mib: int) -> list[Path]:
    """``count`` shards of distinct, non-sparse bytes totalling ``size_mib`` MiB."""
    root.mkdir(parents=True)
    per_file = max(1, size_mib // count)
    block = bytearray(os.urandom(8 * MIB))
    paths = []
    for i in range(count):
        path = root / f"model-{i + 1:05d}-of-{count:05d}.safetensors"
        with path.open("wb") as out:
            left = per_file * MIB
            j = 0
            while left:
                # vary each block so no two blocks (or files) are identical
                block[:8] = i.to_bytes(4, "big") + j.to_bytes(4, "big")
                n = min(left, len(block))
                out.write(memoryview(block)[:n])
                left -= n
                j += 1
        paths.append(path)
    (root / "config.json").write_text(f'{{"shards": {count}}}\n')
    return paths


def hashlib_pass(paths: list[Path]) -> float:
    start = time.perf_counter()
    for path in paths:
        with path.open("rb") as f:
            hashlib.file_digest(f, "sha256").hexdigest()
    return time.perf_counter() - start


def scan_pass(root: Path, workers: int | None) -> tuple[float, str]:
    start = time.perf_counter()
    tree = scan_tree(root, what="bench", workers=workers)
    return time.perf_counter() - start, tree.digest


def line(**fields: object) -> None:
    print(json.dumps({"bench": "lock_inputs", **fields}), flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size-mib", type=int, default=2048)
    parser.add_argument("--files", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--workers", type=int, default=None, help="hashing threads")
    parser.add_argument("--dir", type=Path, default=None, help="where to put the temp files")
    parser.add_argument("--skip-acquire", action="store_true", help="only hashlib vs scan")
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="bench-lock-", dir=args.dir))
    try:
        root = tmp / "ckpt"
        paths = write_shards(root, args.files, args.size_mib)
        size = sum(p.stat().st_size for p in root.iterdir())
        hashlib_pass(paths)  # warm the page cache
        base, scan, scan1 = [], [], []
        digest = ""
        for _ in range(args.repeat):
            base.append(hashlib_pass(paths))
            t, digest = scan_pass(root, args.workers)
            scan.append(t)
            scan1.append(scan_pass(root, 1)[0])
        mib = size / MIB
        rates = {
            "hashlib_MiB_s": round(mib / min(base), 1),
            "scan_MiB_s": round(mib / min(scan), 1),
            "scan_1_thread_MiB_s": round(mib / min(scan1), 1),
        }
        for name, rate in rates.items():
            line(what=name.removesuffix("_MiB_s"), MiB_s=rate)
        if not args.skip_acquire:
            store = ContentStore(tmp / "cache")
            start = time.perf_counter()
            got = acquire(str(root), digest, field="bench", spec_dir=tmp, store=store)
            cold = time.perf_counter() - start
            start = time.perf_counter()
            acquire(str(root), digest, field="bench", spec_dir=tmp, store=store)
            warm = time.perf_counter() - start
            line(
                what="acquire_cold_cache",
                MiB_s=round(mib / cold, 1),
                note="hash + copy into the cache + hard-link tree",
            )
            line(what="acquire_warm_cache", MiB_s=round(mib / warm, 1), note="hash only")
            remove_tree(got.path)
        ratio = rates["scan_MiB_s"] / rates["hashlib_MiB_s"]
        line(
            size_MiB=round(mib, 1),
            files=len(paths) + 1,
            workers=args.workers or default_workers(),
            cpus=os.cpu_count(),
            repeat=args.repeat,
            **rates,
            ratio=round(ratio, 3),
            ratio_1_thread=round(rates["scan_1_thread_MiB_s"] / rates["hashlib_MiB_s"], 3),
            goal=GOAL,
            ok=ratio >= GOAL,
        )
        return 0 if ratio >= GOAL else 1
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())

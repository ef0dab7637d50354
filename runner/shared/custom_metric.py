"""A custom metric's recompute: the driver that runs in its own sandbox, and the resampling.

Stdlib only, and a script as well as a module: the runner passes this file's source to
``python3 -I -B -c`` in a separate container of the run's pinned image (no network,
read-only, only the per-sample file and the metric file mounted). There it imports the
user's metric file, calls the function on all samples and on every bootstrap resample,
and prints one result line. The runner never imports the user's file itself.

The runner controls the resampling: the driver draws the indices from the seed the runner
passes (:func:`resample_indices`) and reports the digest of every index it used; the runner
draws the same indices on the host and refuses the result if the digests differ. The
interval is computed by the runner from the per-resample values.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import math
import random
import sys
from collections.abc import Iterator
from typing import Any, TypedDict

MOUNT = "/evalrun-metric"
SAMPLES_FILE = "predictions.jsonl"
METRIC_FILE = "metric.py"
RESULT_MARKER = "EVALRUN-CUSTOM-METRIC "
MAX_SAMPLES = 5_000_000

# One row of the per-sample file as the evaluation wrote it: untrusted JSON handed whole to
# the user's metric function (this script imports nothing of runner.shared to share a name).
SampleRow = dict[str, Any]


class DriverArgs(TypedDict):
    """What the runner passes the driver (JSON in ``argv[1]``)."""

    function: str
    seed: int
    resamples: int


class DriverResult(TypedDict):
    """The driver's result line: the value, each resample's value (None: undefined there)."""

    value: float
    n: int
    resamples: list[float | None]
    indices_sha256: str


def resample_indices(seed: int, n: int, resamples: int) -> Iterator[list[int]]:
    """The bootstrap resamples of ``n`` samples, as index lists, for ``seed``."""
    rng = random.Random(seed)  # noqa: S311 - reproducible resampling, not secrecy
    positions = range(n)
    for _ in range(resamples):
        yield rng.choices(positions, k=n)


def indices_digest(seed: int, n: int, resamples: int) -> str:
    """sha256 over every resample's indices (what the driver must report back)."""
    h = hashlib.sha256()
    for idx in resample_indices(seed, n, resamples):
        h.update((",".join(map(str, idx)) + "\n").encode())
    return "sha256:" + h.hexdigest()


def number(value: Any, what: str) -> float:
    """``value`` as a finite float; ValueError naming ``what`` and the type found otherwise."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{what} returned {type(value).__name__}, expected a finite number")
    result = float(value)
    if not math.isfinite(result):
        raise ValueError(f"{what} returned {result}, expected a finite number")
    return result


def _refuse_constant(name: str) -> float:
    raise ValueError(f"non-finite number {name}")


def _read_samples(path: str) -> list[SampleRow]:
    samples: list[SampleRow] = []
    with open(path, "rb") as fh:  # noqa: PTH123 - the driver stays plain
        for lineno, raw in enumerate(fh, start=1):
            if not raw.strip():
                continue
            if len(samples) >= MAX_SAMPLES:
                raise ValueError(f"{SAMPLES_FILE}: more than {MAX_SAMPLES} samples")
            row = json.loads(raw.decode("utf-8"), parse_constant=_refuse_constant)
            if not isinstance(row, dict):
                raise ValueError(f"{SAMPLES_FILE} line {lineno}: expected an object")
            samples.append(row)
    if not samples:
        raise ValueError(f"{SAMPLES_FILE}: no samples")
    return samples


def _load_function(path: str, name: str) -> Any:
    spec = importlib.util.spec_from_file_location("evalrun_custom_metric", path)
    if spec is None or spec.loader is None:
        raise ValueError(f"cannot load {METRIC_FILE}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    fn = getattr(module, name, None)
    if not callable(fn):
        raise ValueError(f"the metric file defines no function {name!r}")
    return fn


def compute(
    args: DriverArgs, samples_path: str, metric_path: str
) -> DriverResult:  # pragma: no cover - runs in the sandbox
    """Everything the driver reports: the value, each resample's value, the indices' digest."""
    fn = _load_function(metric_path, str(args["function"]))
    samples = _read_samples(samples_path)
    what = f"{args['function']}()"
    value = number(fn(list(samples)), what)
    seed, resamples, n = int(args["seed"]), int(args["resamples"]), len(samples)
    values: list[float | None] = []
    h = hashlib.sha256()
    for idx in resample_indices(seed, n, resamples):
        h.update((",".join(map(str, idx)) + "\n").encode())
        try:
            values.append(number(fn([samples[i] for i in idx]), what + " on a resample"))
        except ArithmeticError:
            # no value on this resample (e.g. a division by zero): left out of the interval
            values.append(None)
    return {
        "value": value,
        "n": n,
        "resamples": values,
        "indices_sha256": "sha256:" + h.hexdigest(),
    }


def main(argv: list[str]) -> int:  # pragma: no cover - runs in the sandbox
    args = json.loads(argv[0])
    try:
        # what the metric prints goes to stderr: stdout carries only the result line
        with contextlib.redirect_stdout(sys.stderr):
            result = compute(args, f"{MOUNT}/{SAMPLES_FILE}", f"{MOUNT}/{METRIC_FILE}")
    except Exception as exc:
        print(RESULT_MARKER + json.dumps({"error": f"{type(exc).__name__}: {exc}"[:2000]}))
        return 1
    print(RESULT_MARKER + json.dumps(result, allow_nan=False))
    return 0


if __name__ == "__main__":  # pragma: no cover - the sandbox entry point
    sys.exit(main(sys.argv[1:]))

"""Reading a per-sample JSON-lines file: every row an object with a unique ``id`` and what
each metric reads, in the shape it reads it; strict UTF-8 and finite numbers only."""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from pathlib import Path
from typing import NamedTuple, TypeAlias

from runner.shared.definitions import MetricDefinition
from runner.shared.json_types import JSONObject
from runner.shared.metric_functions import Metric, build_metric
from runner.shared.sample_fields import FieldError, SampleFormatError

MAX_SAMPLES = 5_000_000

# One row of a per-sample file: a JSON object the evaluation wrote, untrusted; only the
# fields the metrics read are checked (each metric's reader), the rest is the evaluation's.
SampleRow: TypeAlias = JSONObject


def _refuse(name: str) -> float:
    raise ValueError(f"non-finite number {name}")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text[:40]} is not finite")
    return value


def read_samples(path: Path, definitions: Iterable[MetricDefinition]) -> list[SampleRow]:
    """Read a per-sample JSON-lines file, checking each row has what the metrics need.

    Every row must carry an ``id`` and, for each metric, the fields it reads in the shape
    it reads them; the first problem is raised as a :class:`SampleFormatError` naming the
    file, the line, the field, the metric, and what was expected and found.
    """
    return _read(path, [build_metric(d) for d in definitions], strict=True).samples


class SampleRead(NamedTuple):
    """The samples of a per-sample file, and the metrics they cannot feed (name → why)."""

    samples: list[SampleRow]
    unusable: dict[str, str]


def read_outputs(path: Path, definitions: Iterable[MetricDefinition]) -> SampleRead:
    """Like :func:`read_samples`, but a field a metric cannot use sets only that metric aside.

    What no metric can do without (a row that is not a JSON object, a missing or duplicate
    ``id``, no samples at all) still raises :class:`SampleFormatError`. For every other
    metric the first problem (file, line, field, expected, found) is in ``unusable``.
    """
    return _read(path, [build_metric(d) for d in definitions], strict=False)


def _read(path: Path, metrics: list[Metric], *, strict: bool) -> SampleRead:
    readers: dict[str, list[str]] = {"id": []}
    for m in metrics:
        for field in m.reads.values():
            readers.setdefault(field, []).append(m.name)
    samples: list[SampleRow] = []
    unusable: dict[str, str] = {}
    seen: set[str] = set()
    with path.open("rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            if not raw.strip():
                continue
            where = f"{path.name} line {lineno}"
            if len(samples) >= MAX_SAMPLES:
                raise SampleFormatError(f"{path.name}: more than {MAX_SAMPLES} samples")
            try:
                # strict: UTF-8, and no NaN/Infinity (nor 1e400) a signed bundle could not hold
                row = json.loads(raw.decode("utf-8"), parse_constant=_refuse, parse_float=_finite)
            except ValueError as exc:
                raise SampleFormatError(f"{where}: not JSON ({getattr(exc, 'msg', exc)})") from None
            if not isinstance(row, dict):
                raise SampleFormatError(f"{where}: expected an object")
            missing = sorted(readers.keys() - row.keys())
            if missing and (strict or "id" in missing):
                who = sorted({n for f in missing for n in readers[f]})
                raise SampleFormatError(
                    f"{where}: missing field(s) {missing}"
                    + (f" (read by metric(s) {', '.join(who)})" if who else "")
                )
            for m in metrics:
                if m.name in unusable:
                    continue
                lacks = sorted(f for f in set(m.reads.values()) if f not in row)
                if lacks:
                    unusable[m.name] = f"{where}: missing field(s) {lacks}"
                    continue
                try:
                    m.extract(row)
                    if m.matrix_pair is not None:
                        m.matrix_pair(row)
                except FieldError as exc:
                    if strict:
                        raise SampleFormatError(f"{where}: {exc} (metric {m.name})") from None
                    unusable[m.name] = f"{where}: {exc}"
            sid = str(row["id"])
            if sid in seen:
                raise SampleFormatError(f"{where}: duplicate sample id {sid!r}")
            seen.add(sid)
            samples.append(row)
    if not samples:
        raise SampleFormatError(f"{path.name}: no samples")
    return SampleRead(samples, unusable)

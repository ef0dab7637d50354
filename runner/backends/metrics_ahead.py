"""The runner's recomputation of the metrics, begun while the sandbox is still winding down.

Once the evaluation has ended its per-sample outputs are written; the container then
computes its own metrics, finishes verifying the files the evaluation used, exits and is
removed (about a second under gVisor). :class:`MetricsAhead` watches the results folder a
backend fills on this host and, as soon as the agent says the evaluation ended (or has
written ``metrics.json``), copies ``predictions.jsonl`` (a regular file, no link, bounded)
and computes every metric and CI from that copy on a thread, alongside the container.

Nothing here is trusted: :func:`runner.backends.collect.recompute_metrics` takes the
result only for a collected ``predictions.jsonl`` with the very bytes it was computed
from (sha256), and the same definitions and seed; for anything else it recomputes as it
always did. So what the sandbox does later can only cost the time saved.
"""

from __future__ import annotations

import hashlib
import os
import stat
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass
from io import BufferedReader
from pathlib import Path

from runner._internal.files import read_regular_file
from runner.errors import EvalrunError
from runner.shared.metrics import MetricDefinition, MetricRecord, compute_metrics
from runner.shared.protocol import MAX_RESULT_FILE_BYTES
from runner.shared.sample_file import SampleRow, read_samples

# What the agent writes (runner.agent.__main__) once the evaluation command has exited.
_ENDED = b'"event": "evaluation_end"'
_EVENTS_MAX_BYTES = 4 << 20


@dataclass(frozen=True)
class Recomputed:
    """Metrics computed from per-sample outputs whose bytes hash to ``sha256``."""

    sha256: str
    definitions: list[MetricDefinition]
    seed: int
    samples: list[SampleRow]
    metrics: list[MetricRecord]

    def fits(self, path: Path, definitions: list[MetricDefinition], seed: int) -> bool:
        """Whether this is the recomputation of the file ``path`` (its bytes, hashed now)
        under ``definitions`` and ``seed``."""
        if definitions != self.definitions or seed != self.seed:
            return False
        try:
            with _open_regular(path) as fh:
                return hashlib.file_digest(fh, "sha256").hexdigest() == self.sha256
        except OSError:
            return False  # the recomputation from the file itself says what is wrong with it


def _open_regular(path: Path) -> BufferedReader:
    """``path`` opened for reading: a regular file of at most MAX_RESULT_FILE_BYTES, no link
    (OSError otherwise)."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_size > MAX_RESULT_FILE_BYTES:
        os.close(fd)
        raise OSError(f"{path.name}: not a regular file of at most {MAX_RESULT_FILE_BYTES} bytes")
    os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")


# The plan's metric definitions and seed, once the attempt has made its plan (else None).
PlanMetrics = Callable[[], tuple[list[MetricDefinition], int] | None]


class MetricsAhead:
    """Watches ``results`` from :meth:`start` until :meth:`result`."""

    def __init__(self, results: Path, plan_metrics: PlanMetrics, *, poll_s: float = 0.01) -> None:
        self.results = results
        self._plan_metrics = plan_metrics
        self._poll_s = poll_s
        self._stop = threading.Event()
        self._result: Recomputed | None = None
        self._events_size = -1
        self._thread = threading.Thread(target=self._watch, name="metrics-ahead", daemon=True)

    def start(self) -> MetricsAhead:
        self._thread.start()
        return self

    def result(self) -> Recomputed | None:
        """Stop watching, let a computation under way finish, and return what it gave."""
        self._stop.set()
        if self._thread.ident is not None:
            self._thread.join()
        return self._result

    def _watch(self) -> None:
        while not self._stop.wait(self._poll_s):
            wanted = self._plan_metrics()
            if wanted is not None and self._evaluation_ended():
                self._compute(*wanted)
                return

    def _evaluation_ended(self) -> bool:
        """Whether the agent has said so; its events are read again only once they have
        grown (a look every 10 ms costs one ``stat`` while nothing changes)."""
        if (self.results / "metrics.json").exists():
            return True
        try:
            size = (self.results / "logs" / "events.jsonl").stat().st_size
        except OSError:
            return False
        if size == self._events_size:
            return False
        try:
            events = read_regular_file(
                self.results / "logs" / "events.jsonl",
                max_bytes=_EVENTS_MAX_BYTES,
                follow_links=False,
            )
        except (OSError, EvalrunError):
            return False
        self._events_size = size
        return _ENDED in events

    def _compute(self, definitions: list[MetricDefinition], seed: int) -> None:
        try:
            with tempfile.TemporaryDirectory(prefix="evalrun-ahead-") as tmp:
                # a private copy (streamed, hashed on the way): the sandbox may still write
                copy = Path(tmp) / "predictions.jsonl"
                digest = hashlib.sha256()
                with (
                    _open_regular(self.results / "predictions.jsonl") as src,
                    copy.open("xb") as dst,
                ):
                    total = 0
                    while chunk := src.read(1 << 20):
                        total += len(chunk)
                        if total > MAX_RESULT_FILE_BYTES:
                            return
                        digest.update(chunk)
                        dst.write(chunk)
                samples = read_samples(copy, definitions)
            metrics = [m.as_dict() for m in compute_metrics(definitions, samples, seed)]
        except Exception:  # whatever it is, the recomputation after collection meets it again
            return
        self._result = Recomputed(digest.hexdigest(), definitions, seed, samples, metrics)

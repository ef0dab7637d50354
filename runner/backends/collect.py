"""Collect what the container wrote, without trusting it.

The results directory was writable by the sandbox, so every entry is checked:
only regular files and directories, no links, no odd names, bounded sizes. Files
are copied with ``O_NOFOLLOW``. Then the runner recomputes every metric from the
per-sample file itself and compares it with the container's aggregate.
"""

from __future__ import annotations

import io
import math
import os
import shutil
import stat
import tarfile
import tempfile
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from runner._internal.files import read_regular_file
from runner._internal.strict_json import load_json_strict
from runner._internal.tar import (
    MemberRules,
    extract_members,
    file_under_file,
    open_tar_stream,
    scan_members,
)
from runner.backends.metrics_ahead import Recomputed
from runner.errors import EvalrunError
from runner.shared.definitions import PerturbationDefinition
from runner.shared.metrics import (
    MetricDefinition,
    MetricRecord,
    SampleFormatError,
    compute_available,
    compute_metrics,
)
from runner.shared.perturbations import (
    PerturbationRecord,
    perturbation_effects,
    select_perturbed,
)
from runner.shared.protocol import (
    MAX_RESULT_BYTES,
    MAX_RESULT_FILE_BYTES,
    MAX_RESULT_FILES,
    FrameError,
    StreamReader,
    decode_frame,
)
from runner.shared.sample_file import SampleRow, read_outputs, read_samples

if TYPE_CHECKING:
    from runner.backends.custom_metric import CustomMetricRecord


@dataclass
class Collected:
    """What was copied, and every problem found on the way."""

    files: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    total_bytes: int = 0


def collect_results(src: Path, dest: Path) -> Collected:
    """Copy the regular files under ``src`` into ``dest``; refuse links and specials."""
    out = Collected()
    dest.mkdir(parents=True, exist_ok=True)
    root_fd = os.open(src, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    try:
        _walk(root_fd, "", dest, out)
    finally:
        os.close(root_fd)
    return out


def _safe_name(name: str) -> bool:
    return name not in (".", "..") and "/" not in name and "\\" not in name and name.isprintable()


def _walk(dir_fd: int, prefix: str, dest: Path, out: Collected) -> None:
    for name in sorted(os.listdir(dir_fd)):
        rel = f"{prefix}{name}"
        if not _safe_name(name):
            out.problems.append(f"results entry {rel!r}: unsafe name, not collected")
            continue
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        if stat.S_ISLNK(st.st_mode):
            out.problems.append(f"results entry {rel!r}: is a symlink, not collected")
        elif stat.S_ISDIR(st.st_mode):
            child = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=dir_fd)
            try:
                (dest / rel).mkdir(parents=True, exist_ok=True)
                _walk(child, rel + "/", dest, out)
            finally:
                os.close(child)
        elif stat.S_ISREG(st.st_mode):
            if len(out.files) >= MAX_RESULT_FILES:
                out.problems.append(
                    f"more than {MAX_RESULT_FILES} result files; {rel!r} not collected"
                )
            elif (
                st.st_size > MAX_RESULT_FILE_BYTES
                or out.total_bytes + st.st_size > MAX_RESULT_BYTES
            ):
                out.problems.append(f"results entry {rel!r}: too large ({st.st_size} bytes)")
            else:
                _copy(dir_fd, name, dest / rel)
                out.files.append(rel)
                out.total_bytes += st.st_size
        else:
            out.problems.append(f"results entry {rel!r}: not a regular file, not collected")


def _copy(dir_fd: int, name: str, target: Path) -> None:
    fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW, dir_fd=dir_fd)
    try:
        with os.fdopen(fd, "rb", closefd=False) as src, target.open("xb") as dst:
            while chunk := src.read(4 * 1024 * 1024):
                dst.write(chunk)
    finally:
        os.close(fd)


# A container report (summary, preflight, environment, metrics) larger than this is not read.
MAX_REPORT_BYTES = 64 << 20


def read_json(path: Path) -> Any:
    """Strict JSON from a collected file (no NaN/Infinity, no duplicate keys, at most
    :data:`MAX_REPORT_BYTES`, no link followed), or None when absent or unreadable."""
    try:
        return load_json_strict(
            read_regular_file(path, max_bytes=MAX_REPORT_BYTES, follow_links=False)
        )
    except (OSError, ValueError, EvalrunError):
        return None


def _same(a: Any, b: Any) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return (
        isinstance(a, int | float)
        and isinstance(b, int | float)
        and math.isclose(float(a), float(b), rel_tol=0.0, abs_tol=1e-12)
    )


@dataclass(frozen=True)
class MetricCheck:
    # the catalogue's records; a run's custom metrics join them as recomputed by
    # runner.backends.custom_metric.result_from_driver (runner.workflows.custom_metrics)
    metrics: Sequence[MetricRecord | CustomMetricRecord]
    problems: list[str]
    perturbations: list[PerturbationRecord] = field(default_factory=list)
    # metrics the per-sample outputs cannot feed (name → why), from recompute_available
    unusable: dict[str, str] = field(default_factory=dict)


def _recompute_perturbations(
    results: Path,
    definitions: list[MetricDefinition],
    perturbations: list[PerturbationDefinition],
    samples: list[SampleRow],
    reported: Any,
    seed: int,
) -> tuple[list[PerturbationRecord], list[str]]:
    """Recompute each perturbation's metrics and deltas; compare with the container's."""
    ours: list[PerturbationRecord] = []
    problems: list[str] = []
    theirs = {
        p.get("name"): p
        for p in (reported.get("perturbations") or [] if isinstance(reported, dict) else [])
        if isinstance(p, dict)
    }
    for pert in perturbations:
        try:
            if pert["kind"] in ("subsample", "slice"):
                perturbed: list[SampleRow] = [
                    dict(x) for x in select_perturbed(pert, samples, seed)
                ]
            else:
                perturbed = read_samples(
                    results / "perturbations" / f"{pert['name']}.jsonl", definitions
                )
            effect = perturbation_effects(definitions, pert, samples, perturbed, seed)
        except (OSError, SampleFormatError) as exc:
            problems.append(f"perturbation {pert['name']}: outputs unusable: {exc}")
            continue
        ours.append(effect)
        other = theirs.pop(pert["name"], None)
        if other is None:
            problems.append(f"perturbation {pert['name']}: not reported by the container")
            continue
        their_metrics = {m.get("name"): m for m in other.get("metrics") or []}
        for m in effect["metrics"]:
            o = their_metrics.get(m["name"]) or {}
            for label, a, b in (
                ("value", m["value"], o.get("value")),
                ("delta", m["delta"], o.get("delta")),
                ("delta_ci.low", m["delta_ci"]["low"], (o.get("delta_ci") or {}).get("low")),
                ("delta_ci.high", m["delta_ci"]["high"], (o.get("delta_ci") or {}).get("high")),
            ):
                if not _same(a, b):
                    problems.append(
                        f"perturbation {pert['name']} metric {m['name']} {label}: container "
                        f"reported {b!r}, recomputed {a!r}"
                    )
    for extra in sorted(str(k) for k in theirs):
        problems.append(f"perturbation {extra}: reported by the container but not declared")
    return ours, problems


_MALFORMED = "metrics.json from the container is missing or malformed"


def _reported_metrics(reported: Any) -> list[Any] | None:
    if not isinstance(reported, dict) or not isinstance(reported.get("metrics"), list):
        return None
    return list(reported["metrics"])


def _compare_reported(
    ours: list[MetricRecord], reported: list[Any], unusable: Mapping[str, str]
) -> list[str]:
    """Where the container's metrics differ from the runner's own numbers."""
    problems: list[str] = []
    theirs = {m.get("name"): m for m in reported if isinstance(m, dict)}
    for metric in ours:
        other = theirs.pop(metric["name"], None)
        if other is None:
            problems.append(f"metric {metric['name']}: not reported by the container")
            continue
        ci, oci = metric["ci"], other.get("ci") or {}
        compared: list[tuple[str, float | None, object]] = [
            ("value", metric["value"], other.get("value"))
        ]
        if oci.get("method") != "none" or ci["method"] == "none":
            # agents since the point-values change leave the interval to the runner
            compared += [
                ("ci.low", ci["low"], oci.get("low")),
                ("ci.high", ci["high"], oci.get("high")),
            ]
        for label, a, b in compared:
            if not _same(a, b):
                problems.append(
                    f"metric {metric['name']} {label}: container reported {b!r}, "
                    f"recomputed from per-sample outputs {a!r}"
                )
        if metric.get("confusion_matrix") != other.get("confusion_matrix"):
            problems.append(
                f"metric {metric['name']} confusion_matrix: the container's differs from the "
                "one recomputed from per-sample outputs"
            )
    for extra in sorted(str(k) for k in theirs):
        if extra in unusable:
            problems.append(
                f"metric {extra}: reported by the container, but the per-sample outputs "
                f"cannot give it ({unusable[extra]})"
            )
        else:
            problems.append(
                f"metric {extra}: reported by the container but not declared in the spec"
            )
    return problems


def recompute_metrics(
    results: Path,
    definitions: list[MetricDefinition],
    seed: int,
    perturbations: list[PerturbationDefinition] | None = None,
    *,
    overridden: Collection[str] = (),
    ahead: Recomputed | None = None,
) -> MetricCheck:
    """Recompute every metric and CI from ``predictions.jsonl``; compare with ``metrics.json``.

    What the container reports for an ``overridden`` metric (a custom metric, recomputed
    in its own sandbox) is not compared: it is replaced, never trusted. ``ahead`` (begun
    while the container wound down, :mod:`runner.backends.metrics_ahead`) stands for the
    recomputation only if it was made from these very bytes, definitions and seed.
    """
    path = results / "predictions.jsonl"
    try:
        if ahead is not None and ahead.fits(path, definitions, seed):
            samples, ours = ahead.samples, list(ahead.metrics)
        else:
            samples = read_samples(path, definitions)
            ours = [m.as_dict() for m in compute_metrics(definitions, samples, seed)]
    except FileNotFoundError:
        return MetricCheck([], ["predictions.jsonl is missing: no per-sample outputs"])
    except (OSError, SampleFormatError) as exc:
        return MetricCheck([], [f"per-sample outputs unusable: {exc}"])
    reported = read_json(results / "metrics.json")
    theirs = _reported_metrics(reported)
    if theirs is None:
        return MetricCheck(ours, [_MALFORMED])
    theirs = [m for m in theirs if not (isinstance(m, dict) and m.get("name") in overridden)]
    problems = _compare_reported(ours, theirs, {})
    effects, more = _recompute_perturbations(
        results, definitions, perturbations or [], samples, reported, seed
    )
    return MetricCheck(ours, problems + more, effects)


def recompute_available(
    results: Path, definitions: list[MetricDefinition], seed: int
) -> MetricCheck:
    """The metrics the per-sample outputs can feed, when they cannot feed them all.

    For a run the agent reported as bad output: every metric whose fields are there is
    recomputed and compared with what the container reported, and ``unusable`` says why
    each of the others could not be. Outputs no metric can use give an empty check.
    """
    try:
        read = read_outputs(results / "predictions.jsonl", definitions)
    except (OSError, SampleFormatError):
        return MetricCheck([], [])
    values, unusable = compute_available(definitions, read.samples, seed, read.unusable)
    ours = [m.as_dict() for m in values]
    theirs = _reported_metrics(read_json(results / "metrics.json"))
    if theirs is None:
        return MetricCheck(ours, [_MALFORMED] if ours else [], unusable=unusable)
    return MetricCheck(ours, _compare_reported(ours, theirs, unusable), unusable=unusable)


# --------------------------------------------------------------------------- framed results

# The results frame is read with the one strict tar reader; names need only the structure
# rule here, because collect_results applies its own name rule right after.
FRAME_TAR_RULES = MemberRules(
    max_members=MAX_RESULT_FILES,
    max_file_bytes=MAX_RESULT_FILE_BYTES,
    portable_names=False,
    label="results entry",
)


def extract_results_frame(log_text: str, dest: Path) -> Collected:
    """Find the agent's results frame in a log stream, check it, and unpack it safely.

    The frame (:mod:`runner.shared.protocol`) is checked for size and checksum
    before the tar is opened; every member must be a regular file or directory
    with a relative, normalized, unique path; links, devices, absolute paths and
    ``..`` are refused and nothing is extracted from a frame with any such member.
    """
    out = Collected()
    try:
        data = decode_frame(log_text)
    except FrameError as exc:
        out.problems.append(str(exc))
        return out
    return _unpack(io.BytesIO(data), dest, out, what="results frame")


def _unpack(fileobj: IO[bytes], dest: Path, out: Collected, *, what: str) -> Collected:
    """Check every member of the results tar in ``fileobj``, then extract into ``dest``."""
    try:
        tar = open_tar_stream(fileobj)  # closed below
    except tarfile.TarError as exc:
        out.problems.append(f"{what} is not a tar archive: {exc}")
        return out
    with tar:
        try:
            members, problems = scan_members(tar, FRAME_TAR_RULES)
        except tarfile.TarError as exc:
            out.problems.append(f"{what} is not a readable tar archive: {exc}")
            return out
        clash = file_under_file(members)
        if clash:
            problems.append(f"results entry {clash[0]!r} lies under the file {clash[1]!r}")
        if problems:
            out.problems.extend(problems)
            return out
        dest.mkdir(parents=True, exist_ok=True)
        try:
            out.total_bytes = extract_members(tar, members, dest)
        except (tarfile.TarError, OSError) as exc:
            out.problems.append(f"{what} could not be unpacked: {exc}")
            return out
        out.files.extend(m.path for m in members)
    return out


class StreamReceiver:
    """One results stream (the agent's ``emit-results``) on its way in, checked as it comes.

    Bytes go to :meth:`feed` as they arrive; the payload (a tar) is spooled to a file in
    ``spool_dir``, never held in memory. :meth:`unpack` then requires the stream to have
    ended intact (sha256 and size of its trailer), checks every tar member and only then
    extracts, into a fresh directory that replaces ``dest`` whole: a stream cut half way,
    a bad checksum or one bad member leaves ``dest`` as it was. Nothing is hashed for the
    bundle here; the run workflow collects ``dest`` like any results directory.
    """

    def __init__(self, spool_dir: Path, max_bytes: int = MAX_RESULT_BYTES) -> None:
        spool_dir.mkdir(parents=True, exist_ok=True)
        self._dir = Path(tempfile.mkdtemp(prefix="results-stream-", dir=spool_dir))
        self._spool = (self._dir / "results.tar").open("xb")
        self._reader = StreamReader(max_bytes)
        self.error: str | None = None

    @property
    def received(self) -> int:
        """Payload bytes accepted so far."""
        return self._reader.size

    def feed(self, data: bytes) -> None:
        """Take the next bytes of the stream; a malformed stream is remembered, not raised."""
        if self.error is not None:
            return
        try:
            for piece in self._reader.feed(data):
                self._spool.write(piece)
        except FrameError as exc:
            self.error = str(exc)

    def unpack(self, dest: Path) -> Collected:
        """Check the ended stream and its tar; replace ``dest`` with its files (or keep it)."""
        out = Collected()
        try:
            self._spool.close()
            if self.error is None:
                try:
                    self._reader.finish()
                except FrameError as exc:
                    self.error = str(exc)
            if self.error is not None:
                out.problems.append(self.error)
                return out
            fresh = self._dir / "results"
            with (self._dir / "results.tar").open("rb") as fh:
                _unpack(fh, fresh, out, what="results stream")
            if out.problems:
                out.files.clear()
                return out
            fresh.mkdir(exist_ok=True)
            _replace_dir(fresh, dest)
            return out
        finally:
            self.discard()

    def discard(self) -> None:
        """Remove the spool (idempotent)."""
        self._spool.close()
        shutil.rmtree(self._dir, ignore_errors=True)


def _replace_dir(new: Path, dest: Path) -> None:
    """Put the directory ``new`` at ``dest``, replacing what was there, by renames."""
    old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
    if dest.exists():
        dest.rename(old)
    new.rename(dest)
    shutil.rmtree(old, ignore_errors=True)

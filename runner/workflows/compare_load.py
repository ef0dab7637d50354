"""Which runs ``evalrun compare`` reads: the group's runs (filtered), its run sets, samples.

Every bundle is opened with the caller's trust (signature and every hash checked) before
anything of it is read; per-sample outputs are read from the verified bundle, bounded.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from runner._internal.sanitize import one_line
from runner._internal.strict_json import load_json_strict
from runner.bundle.index import History
from runner.bundle.reader import OpenedBundle, Trust, open_bundle, read_predicate
from runner.bundle.run_records import RunFilter, RunRecord
from runner.bundle.store import Store
from runner.errors import IntegrityError, VerificationFailed
from runner.model.predicate import RunPredicate, RunSetPredicate
from runner.shared.sample_fields import Sample

# What a paired test reads of one run's per-sample outputs at most.
MAX_PAIRED_BYTES = 64 << 20
PREDICTIONS = "results/predictions.jsonl"


@dataclass(frozen=True)
class Selection:
    """Which runs of the group are compared; every field narrows, None means any."""

    spec: str | None = None
    backend: str | None = None
    since: str | None = None

    def words(self) -> tuple[str, ...]:
        """The selection as command-line flags (shown on every output)."""
        return tuple(
            f"--{name} {value}"
            for name, value in (
                ("spec", self.spec),
                ("backend", self.backend),
                ("since", self.since),
            )
            if value is not None
        )


@dataclass(frozen=True)
class GroupRun:
    run_id: str
    bundle_digest: str
    path: Path
    started: str
    predicate: RunPredicate
    backend: str | None = None
    opened: OpenedBundle | None = None


@dataclass(frozen=True)
class RunSetEntry:
    """A run set whose seeds are runs of the group: compared as one entry."""

    run_id: str
    bundle_digest: str
    started: str
    predicate: RunSetPredicate
    members: tuple[GroupRun, ...]


def load_group(
    store: Store, group: str, trust: Trust, selection: Selection | None = None
) -> tuple[list[GroupRun], list[tuple[str, str]]]:
    """The group's selected runs from the run index (oldest first), and those left out with why.

    Runs are found by the group their statement names and then opened with ``trust``:
    VerificationFailed (exit 3) naming every run of the group that does not verify.
    """
    runs: list[GroupRun] = []
    excluded: list[tuple[str, str]] = []
    failed: list[str] = []
    selection = selection or Selection()
    query = RunFilter(kind="run", spec=selection.spec, since=selection.since)
    for record in History(store).query(query):
        if selection.backend is not None and record.backend != selection.backend:
            continue
        try:
            found = read_predicate(record.path)
        except IntegrityError:
            continue
        if not isinstance(found, RunPredicate) or found.comparison_group != group:
            continue
        try:
            opened = open_bundle(record.path, trust)
        except IntegrityError as exc:
            failed.append(f"{record.run_id}: {one_line(exc.message, limit=200)}")
            continue
        predicate = opened.predicate
        if not isinstance(predicate, RunPredicate):
            continue
        if record.reproduction_of:
            excluded.append((record.run_id, f"a re-run of {record.reproduction_of}"))
            continue
        if predicate.outcome is None or not predicate.outcome.has_metrics:
            excluded.append((record.run_id, f"outcome {predicate.outcome}: no metrics"))
            continue
        runs.append(
            GroupRun(
                run_id=record.run_id,
                bundle_digest=record.bundle_digest,
                path=record.path,
                started=record.started or "",
                predicate=predicate,
                backend=record.backend,
                opened=opened,
            )
        )
    if failed:
        raise VerificationFailed(
            f"{len(failed)} run(s) of comparison group {group!r} do not verify; "
            "nothing was compared",
            problems=failed,
            bundle=group,
        )
    return runs, excluded


def load_run_sets(
    store: Store, runs: Sequence[GroupRun], trust: Trust, selection: Selection | None = None
) -> list[RunSetEntry]:
    """The verified run sets that hold at least one of ``runs`` as a seed (oldest first).

    A run set that does not verify is not used (its seeds stay single runs).
    """
    by_id = {r.run_id: r for r in runs}
    found: list[RunSetEntry] = []
    claimed: set[str] = set()
    selection = selection or Selection()
    query = RunFilter(kind="run_set", spec=selection.spec, since=selection.since)
    records: list[RunRecord] = History(store).query(query, sync=False)
    for record in records:
        try:
            opened = open_bundle(record.path, trust)
        except IntegrityError:
            continue
        predicate = opened.predicate
        if not isinstance(predicate, RunSetPredicate):
            continue
        members = tuple(
            by_id[m.run_id]
            for m in predicate.members
            if m.run_id in by_id and m.run_id not in claimed
        )
        if not members:
            continue
        claimed.update(m.run_id for m in members)
        found.append(
            RunSetEntry(
                run_id=record.run_id,
                bundle_digest=record.bundle_digest,
                started=record.started or "",
                predicate=predicate,
                members=members,
            )
        )
    return found


def samples_by_id(run: GroupRun) -> dict[str, Sample] | None:
    """The run's per-sample outputs by sample id (None: none, too large, not JSON lines, or
    without unique ids). Read as the signed bytes: IntegrityError (exit 3) if they are not."""
    if run.opened is None:
        return None
    data = run.opened.read_optional(PREDICTIONS, max_bytes=MAX_PAIRED_BYTES)
    if data is None:
        return None
    out: dict[str, Sample] = {}
    try:
        for line in data.decode("utf-8").splitlines():
            if not line.strip():
                continue
            row = load_json_strict(line)
            if not isinstance(row, dict) or "id" not in row or str(row["id"]) in out:
                return None
            out[str(row["id"])] = row
    except (UnicodeDecodeError, ValueError):
        return None
    return out or None

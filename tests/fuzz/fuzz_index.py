"""Fuzz target: the run history index (``history.sqlite``) and the statements it reads.

The first byte picks what the input is: ``S`` — the rest is the ``statement.json`` of a
third bundle in the store; anything else — the rest is the ``history.sqlite`` file
itself. Property: the records of ``runs ls --json`` and a lookup by run id always list
the two good runs; the lines of ``runs ls`` (laid out by SQLite from the stored cells)
come back; nothing raises.
"""

from __future__ import annotations

import os
import shutil

from harness import check, fuzz_signer, scratch
from seeds import PREDICATE

from runner._internal.tree import remove_tree
from runner.bundle.build import build_bundle
from runner.bundle.index import INDEX_NAME, History
from runner.bundle.run_records import RunFilter
from runner.bundle.store import Store

NAME = "index"
_HOME = scratch(NAME)
_STORE = Store(_HOME)
_RUNS = ["r-fuzz-a", "r-fuzz-b"]
for _run in _RUNS:
    with _STORE.staging_dir() as _stage:
        (_stage / "r.txt").write_text(_run)
        build_bundle(_stage, {**PREDICATE, "run_id": _run}, fuzz_signer(), _stage)
        _STORE.put(_stage)
_ODD = _STORE.bundles_dir / ("sha256-" + "0" * 64)
_INDEX = _HOME / INDEX_NAME


def _reset() -> None:
    for suffix in ("", "-journal", "-wal", "-shm"):
        path = _HOME / (INDEX_NAME + suffix)
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
    if _ODD.exists():
        remove_tree(_ODD)


def test_one_input(data: bytes) -> None:
    mode, body = data[:1], data[1:]
    _reset()
    if mode == b"S":
        _ODD.mkdir()
        (_ODD / "statement.json").write_bytes(body)
        os.chmod(_ODD, 0o755)
    else:
        _INDEX.write_bytes(body)
    history = History(_STORE)
    listed = sorted(r.run_id for r in history.query(RunFilter(kind=None)))
    assert set(_RUNS) <= set(listed), listed
    # runs ls: the lines SQLite lays out of the stored cells, however the file was made
    # (a row whose cells were damaged is not listed: no property on which runs appear)
    widths, lines = history.listing_lines(RunFilter(kind=None), (0,) * 7)
    assert len(widths) == 7 and all(isinstance(line, str) for line in lines)
    # a statement may claim a good run's id: the reference is then ambiguous (exit 2)
    found = check(history.lookup, _RUNS[1], allowed=(2,))
    assert found is None or found.run_id == _RUNS[1]


def seeds() -> dict[str, bytes]:
    _reset()
    History(_STORE).sync()
    index = _INDEX.read_bytes()
    statement = next(_STORE.bundles_dir.glob("sha256-*")) / "statement.json"
    return {"index": b"I" + index, "statement": b"S" + statement.read_bytes()}

"""The run index is a cache: whatever is found in its place, a listing works.

The rule (runner/bundle/index.py): a file that is not a usable index is thrown away and
rebuilt from the bundles; where no file can be (a directory, a FIFO) the index lives in
memory; a bundle whose record cannot be stored is unreadable, never fatal; values read
back are checked for their column's type.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
from pathlib import Path

import pytest
from history_fixtures import predicate, store_run

from runner.bundle.index import INDEX_NAME, History
from runner.bundle.run_records import RunFilter
from runner.bundle.signing import generate_keypair, load_signer
from runner.bundle.store import Store
from runner.cli.main import main

pytestmark = pytest.mark.unit

RUNS = ["r-" + c * 24 for c in "abc"]


def _keyed_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """An empty store (EVALRUN_HOME) with a signing key, and its signer."""
    home = tmp_path / "home"
    monkeypatch.setenv("EVALRUN_HOME", str(home))
    (home / "keys").mkdir(parents=True)
    generate_keypair(home / "keys" / "evalrun.key", home / "keys" / "evalrun.pub", "ed25519")
    return Store(home), load_signer(home / "keys" / "evalrun.key")


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Store:
    store, signer = _keyed_store(tmp_path, monkeypatch)
    for i, run_id in enumerate(RUNS):
        store_run(store, signer, predicate(run_id=run_id, **{"seeds.seed": i}))
    History(store).sync()
    return store


def _listed(store: Store) -> list[str]:
    return sorted(r.run_id for r in History(store).query(RunFilter(kind=None)))


def _index(store: Store) -> Path:
    return store.root / INDEX_NAME


def _damage_garbage(path: Path) -> None:
    path.write_bytes(b"not a database at all " * 512)


def _damage_truncated(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])


def _damage_zeroed_pages(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[100:] = bytes(len(data) - 100)
    path.write_bytes(bytes(data))


def _damage_schema_version(path: Path) -> None:
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE meta SET value = '0'")


def _damage_missing_table(path: Path) -> None:
    with sqlite3.connect(path) as conn:
        conn.execute("DROP TABLE metrics")


def _damage_odd_values(path: Path) -> None:
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE runs SET attempt = 'x', started = x'ff00', outcome = 7, seed = 1.5")
        conn.execute("UPDATE metrics SET value = 'high', passed = 'yes'")
        conn.execute("INSERT INTO runs (bundle_digest, run_id, kind) VALUES (NULL, 1, 2)")


def _damage_someone_elses_database(path: Path) -> None:
    path.unlink()
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE things (x)")


def _damage_empty_file(path: Path) -> None:
    path.write_bytes(b"")


@pytest.mark.parametrize(
    "damage",
    [
        _damage_garbage,
        _damage_truncated,
        _damage_zeroed_pages,
        _damage_schema_version,
        _damage_missing_table,
        _damage_odd_values,
        _damage_someone_elses_database,
        _damage_empty_file,
    ],
)
def test_a_damaged_index_is_rebuilt_and_lists_every_run(store: Store, damage) -> None:
    damage(_index(store))
    assert _listed(store) == RUNS
    assert History(store).lookup(RUNS[1]).run_id == RUNS[1]
    assert _listed(store) == RUNS  # and it stays usable


@pytest.mark.parametrize("kind", ["directory", "fifo"])
def test_no_file_in_the_index_place_means_an_index_in_memory(store: Store, kind: str) -> None:
    path = _index(store)
    path.unlink()
    if kind == "directory":
        path.mkdir()
        (path / "precious").write_text("never removed")
    else:
        os.mkfifo(path)
    assert _listed(store) == RUNS
    assert History(store).lookup(RUNS[2]).run_id == RUNS[2]
    if kind == "directory":
        assert (path / "precious").read_text() == "never removed"


def test_a_link_in_the_index_place_is_never_written_through(store: Store, tmp_path) -> None:
    target = tmp_path / "elsewhere.db"
    target.write_bytes(b"someone's file")
    path = _index(store)
    path.unlink()
    path.symlink_to(target)
    assert _listed(store) == RUNS
    assert target.read_bytes() == b"someone's file"


def test_one_odd_bundle_never_breaks_the_listing(store: Store) -> None:
    odd = store.bundles_dir / ("sha256-" + "0" * 64)
    shutil.copytree(store.bundles_dir / os.listdir(store.bundles_dir)[0], odd)
    os.chmod(odd, 0o755)
    os.chmod(odd / "statement.json", 0o644)
    (odd / "statement.json").write_text('{"predicate": [1, 2, 3]}')
    history = History(store)
    report = history.rebuild()
    assert report.unreadable == ("sha256:" + "0" * 64,)
    assert _listed(store) == RUNS


def test_cli_lists_and_reindexes_with_a_garbage_index(store: Store, capsys) -> None:
    _damage_garbage(_index(store))
    assert main(["runs", "ls"]) == 0
    out = capsys.readouterr().out
    assert all(run_id in out for run_id in RUNS)
    _index(store).unlink()
    _index(store).mkdir()
    assert main(["runs", "reindex", "--json"]) == 0
    assert main(["runs", "ls", "--json"]) == 0


def test_odd_listing_values_in_the_index_are_skipped_never_shown_raw(store: Store, capsys) -> None:
    """``runs ls`` reads each run's stored cells; a damaged or planted value there (not
    text in a cell, raw escapes) is skipped or shown escaped, never a crash."""
    from runner.render.run_list import HEADER_WIDTHS, format_lines, format_listing

    with sqlite3.connect(_index(store)) as conn:
        digests = [d for (d,) in conn.execute("SELECT bundle_digest FROM runs ORDER BY run_id")]
        conn.execute("UPDATE runs SET ls_spec = x'ff00' WHERE bundle_digest = ?", (digests[0],))
        conn.execute("UPDATE runs SET ls_bundle = NULL, ls_metrics = 7 WHERE bundle_digest = ?",
                     (digests[1],))
        conn.execute("UPDATE runs SET ls_run_id = ?, ls_spec = ? WHERE bundle_digest = ?",
                     ("r-planted\x1b[2J", "\u202es" * 90, digests[2]))
    history = History(store)
    rows = history.listing(RunFilter(kind=None))
    assert [row[0] for row in rows] == ["r-planted\x1b[2J"]
    assert format_listing(rows).startswith("run id")
    assert format_lines(*history.listing_lines(RunFilter(kind=None), HEADER_WIDTHS)) == (
        format_listing(rows)
    )
    assert main(["runs", "ls"]) == 0  # SafeStream escapes what the index was made to hold
    out = capsys.readouterr().out
    assert "r-planted\\x1b[2J" in out and "\\u202es" in out
    assert "\x1b" not in out and "\u202e" not in out


def test_the_stored_listing_is_the_table_of_the_records(tmp_path: Path, monkeypatch) -> None:
    """Cells made at indexing (escaped, cut) print the same table as the records do."""
    from runner.render.run_list import HEADER_WIDTHS, format_lines, format_listing, format_table

    store, signer = _keyed_store(tmp_path, monkeypatch)
    odd = {"spec.name": "evil\x1b]0;title\x07\nspec\u202e", "outcome": "passed"}
    store_run(store, signer, predicate(run_id="r-" + "d" * 24, **odd))
    store_run(store, signer, predicate(run_id="r-" + "e" * 24, **{"spec.name": "s" * 500}))
    # cells SQLite pads as Python does: width in code points (wide, combining, astral)
    wide = {"spec.name": "模型評估-e\u0301-🧪" * 3, "outcome": "passed"}
    store_run(store, signer, predicate(run_id="r-" + "f" * 24, **wide))
    history = History(store)
    listed = format_listing(history.listing(RunFilter(kind=None)))
    assert listed == format_table(history.query(RunFilter(kind=None)))
    assert format_lines(*history.listing_lines(RunFilter(kind=None), HEADER_WIDTHS)) == listed
    assert "模型評估" in listed
    assert "\x1b" not in listed and "\u202e" not in listed and "\\x1b" in listed
    assert "s" * 81 not in listed  # the spec cell is cut to its column's limit

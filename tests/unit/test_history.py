"""Run history: the SQLite index over the store, its filters, and rebuilding it from bundles."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest
from history_fixtures import predicate, store_run

from runner.cli.main import main
from runner.errors import InputError
from runner.bundle.index import History
from runner.bundle.locate import locate_bundle
from runner.bundle.run_records import RunFilter, normalize_time
from runner.bundle.signing import generate_keypair, load_signer
from runner.bundle.store import BundleNotFound, Store

pytestmark = pytest.mark.unit


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "home"
    monkeypatch.setenv("EVALRUN_HOME", str(home))
    return home


@pytest.fixture
def populated(home: Path):
    (home / "keys").mkdir(parents=True)
    generate_keypair(home / "keys" / "evalrun.key", home / "keys" / "evalrun.pub", "ed25519")
    signer = load_signer(home / "keys" / "evalrun.key")
    store = Store(home)
    runs = {
        "a": store_run(store, signer, predicate(run_id="r-aaaaaaaaaaaaaaaaaaaaaaaa")),
        "b": store_run(
            store,
            signer,
            predicate(
                run_id="r-bbbbbbbbbbbbbbbbbbbbbbbb",
                outcome="thresholds_failed",
                **{"seeds.seed": 7, "timestamps.started": "2026-11-22T09:00:00.000+00:00"},
            ),
        ),
        "c": store_run(
            store,
            signer,
            predicate(
                run_id="r-cccccccccccccccccccccccc",
                **{
                    "spec.name": "other-eval",
                    "model.sha256": "7" * 64,
                    "image.digest": "sha256:" + "6" * 64,
                    "image.ref": "127.0.0.1:5000/evalrun/other@sha256:" + "6" * 64,
                    "timestamps.started": "2026-11-25T23:59:00.000+00:00",
                },
            ),
        ),
    }
    datasets = predicate()["datasets"]
    datasets[0]["sha256"] = "5" * 64
    runs["d"] = store_run(
        store,
        signer,
        predicate(
            run_id="r-dddddddddddddddddddddddd",
            datasets=datasets,
            reproduction_of={"run_id": "r-aaaaaaaaaaaaaaaaaaaaaaaa"},
            reproduction={"verdict": "identical"},
            **{"timestamps.started": "2026-11-26T08:00:00.000+00:00"},
        ),
    )
    return store, runs


def ids(records) -> list[str]:
    return [r.run_id[2] for r in records]


def test_index_lists_every_stored_run_oldest_first(populated) -> None:
    store, _ = populated
    assert ids(History(store).query()) == ["a", "b", "c", "d"]


@pytest.mark.parametrize(
    ("flt", "expected"),
    [
        (RunFilter(spec="other-eval"), ["c"]),
        (RunFilter(outcome="thresholds_failed"), ["b"]),
        (RunFilter(model="7777777"), ["c"]),
        (RunFilter(model="sha256:" + "e" * 64), ["a", "b", "d"]),
        (RunFilter(dataset="555555"), ["d"]),
        (RunFilter(image="sha256:666666"), ["c"]),
        (RunFilter(since="2026-11-22"), ["b", "c", "d"]),
        (RunFilter(until="2026-11-25"), ["a", "b", "c"]),
        (RunFilter(since="2026-11-21", until="2026-11-25T12:00:00Z"), ["b"]),
        (RunFilter(reproduction_of="r-aaaaaaaaaaaaaaaaaaaaaaaa"), ["d"]),
        (RunFilter(spec="digits-logreg", limit=1), ["d"]),
    ],
)
def test_filters_narrow_by_spec_digests_outcome_and_date(populated, flt, expected) -> None:
    store, _ = populated
    assert ids(History(store).query(flt)) == expected


def test_index_records_metrics_datasets_and_reproduction_link(populated) -> None:
    store, runs = populated
    record = History(store).lookup("r-dddddddddddddddddddddddd")
    assert record.bundle_digest == runs["d"].digest
    assert record.path == runs["d"].path
    assert record.reproduction_of == "r-aaaaaaaaaaaaaaaaaaaaaaaa"
    assert record.reproduction_verdict == "identical"
    assert record.datasets == (("digits-test", "5" * 64, "test"),)
    assert [m.name for m in record.metrics] == ["accuracy", "macro-f1"]
    assert record.metrics[0].low == 0.9 and record.metrics[0].passed is True


def test_lookup_by_run_id_prefix_and_bundle_digest(populated) -> None:
    store, runs = populated
    history = History(store)
    assert history.lookup("r-bbbbbb").run_id == "r-bbbbbbbbbbbbbbbbbbbbbbbb"
    assert history.lookup(runs["c"].digest).run_id == "r-cccccccccccccccccccccccc"
    assert history.lookup(runs["c"].digest[7:19]).run_id == "r-cccccccccccccccccccccccc"
    with pytest.raises(BundleNotFound):
        history.lookup("r-zzzzzzzz")
    with pytest.raises(BundleNotFound):
        history.lookup("r-")  # too short to be a prefix: exact match only


def test_unknown_reference_is_bad_input(populated) -> None:
    store, _ = populated
    with pytest.raises(InputError) as exc:
        History(store).lookup("digits")  # not a run id or digest
    assert exc.value.exit_code == 2


def test_index_is_rebuilt_from_the_bundles_after_it_is_deleted(populated) -> None:
    store, _ = populated
    history = History(store)
    before = [r.as_dict() for r in history.query()]
    history.path.unlink()
    assert [r.as_dict() for r in History(store).query()] == before
    # a corrupt index file is a cache: replaced, not fatal
    history.path.write_bytes(b"not a database at all" * 100)
    assert [r.as_dict() for r in History(store).query()] == before


def test_index_follows_bundles_added_or_removed_behind_its_back(populated) -> None:
    store, runs = populated
    history = History(store)
    assert len(history.query()) == 4
    from runner._internal.tree import remove_tree

    remove_tree(runs["b"].path)
    assert ids(history.query()) == ["a", "c", "d"]
    with sqlite3.connect(history.path) as conn:
        assert conn.execute("SELECT count(*) FROM runs").fetchone()[0] == 3


def test_reindex_reports_count(populated) -> None:
    store, _ = populated
    report = History(store).rebuild()
    assert report.total == 4 and report.unreadable == ()


def test_cli_runs_ls_filters_and_json(populated, capsys) -> None:
    assert main(["runs", "ls", "--spec", "digits-logreg", "--since", "2026-11-21", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [r["run_id"][2] for r in out] == ["b", "d"]
    assert main(["runs", "ls"]) == 0
    table = capsys.readouterr().out
    assert "r-aaaaaaaaaaaaaaaaaaaaaaaa" in table and "↺identical" in table


@pytest.mark.parametrize(
    "flt",
    [
        RunFilter(),
        RunFilter(kind=None, limit=2),
        RunFilter(spec="digits-logreg", outcome="passed", since="2026-11-21"),
        RunFilter(spec="nothing-by-this-name"),
        RunFilter(model="7777"),  # not in the listing index: the table, laid out in Python
        RunFilter(dataset="5555"),
        RunFilter(reproduction_of="r-aaaaaaaaaaaaaaaaaaaaaaaa"),
    ],
)
def test_the_laid_out_listing_is_the_table_of_the_records(populated, flt) -> None:
    from runner.render.run_list import HEADER_WIDTHS, format_lines, format_listing, format_table

    store, _ = populated
    history = History(store)
    table = format_table(history.query(flt))
    assert format_listing(history.listing(flt)) == table
    assert format_lines(*history.listing_lines(flt, HEADER_WIDTHS)) == table


def test_cli_runs_ls_imports_no_models_signing_or_backends(populated) -> None:
    """``runs ls`` over an index in sync reads the index only: it must not pay for
    pydantic, the signing code or a backend client to start."""
    import os
    import subprocess
    import sys

    probe = (
        "import sys; from runner.cli.main import main; code = main(['runs', 'ls']); "
        "heavy = ('pydantic', 'cryptography', 'docker', 'kubernetes', 'runner.bundle.store'); "
        "print('IMPORTED', sorted(m for m in sys.modules if m.split('.')[0] in heavy "
        "or m == 'runner.bundle.store'), code)"
    )
    store, _ = populated
    History(store).sync()  # indexing a new bundle reads it (the models): not this case
    out = subprocess.run(
        [sys.executable, "-c", probe],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "EVALRUN_HOME": str(store.root)},
    ).stdout
    assert "r-aaaaaaaaaaaaaaaaaaaaaaaa" in out
    assert out.rstrip().endswith("IMPORTED [] 0"), out[-500:]


def test_cli_runs_show_prints_report_and_verification(populated, capsys) -> None:
    assert main(["runs", "show", "r-aaaaaaaa"]) == 0
    out = capsys.readouterr().out
    assert "# evalrun report — digits-logreg — r-aaaaaaaaaaaaaaaaaaaaaaaa" in out
    assert "verification: valid: signed by keyid" in out
    assert "| accuracy | primary | 0.9244 |" in out


def test_cli_runs_reindex(populated, capsys) -> None:
    assert main(["runs", "reindex", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["indexed"] == 4


def test_bad_date_is_bad_input() -> None:
    with pytest.raises(InputError):
        normalize_time("last tuesday")
    assert normalize_time("2026-11-26") == "2026-11-26T00:00:00.000+00:00"
    assert normalize_time("2026-11-26T10:00:00+02:00") == "2026-11-26T08:00:00.000+00:00"
    import datetime as dt

    week_ago = dt.datetime.fromisoformat(normalize_time("7d"))
    assert abs((dt.datetime.now(dt.UTC) - week_ago).total_seconds() - 7 * 86400) < 60


def test_locate_bundle_accepts_a_directory_and_a_tar(populated, tmp_path) -> None:
    store, runs = populated
    from runner.bundle.archive import write_bundle_tar

    assert locate_bundle(str(runs["a"].path), store).path == runs["a"].path
    tar = write_bundle_tar(runs["a"].path, tmp_path / "a.tar")
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    located = locate_bundle(str(tar), store, scratch)
    assert (located.path / "statement.json").read_bytes() == (
        runs["a"].path / "statement.json"
    ).read_bytes()


def test_concurrent_syncs_index_each_bundle_once(populated) -> None:
    import threading

    store, _ = populated
    errors: list[BaseException] = []

    def sync() -> None:
        try:
            History(store).sync()
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=sync) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    with sqlite3.connect(History(store).path) as conn:
        assert conn.execute("SELECT count(*) FROM runs").fetchone()[0] == 4
        assert conn.execute("SELECT count(*) FROM datasets").fetchone()[0] == 4
        assert conn.execute("SELECT count(*) FROM metrics").fetchone()[0] == 8

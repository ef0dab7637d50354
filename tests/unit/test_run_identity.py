"""The backend and where it runs are part of a run's identity (issue 19, item 4)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from inprocess_backend import KEY, SOURCE, InProcessBackend, pinned_world

from runner._internal.settings import Settings
from runner.bundle.index import History
from runner.bundle.run_records import RunFilter
from runner.bundle.signing import load_signer
from runner.bundle.store import Store
from runner.render.run_list import format_table
from runner.workflows.run import backend_target, run_id_for, run_evaluation

pytestmark = pytest.mark.unit
LOCK = "sha256:" + "1" * 64


class OtherBackend(InProcessBackend):
    """The same in-process agent under another backend name (no target of its own)."""

    name = "other"


class ClusterBackend(InProcessBackend):
    """The same in-process agent on a named target, as the Kubernetes backend is."""

    name = "kubernetes"

    def __init__(self, target: str) -> None:
        super().__init__()
        self.run_target = target


def test_run_id_of_the_embedded_default_is_the_one_runs_always_had():
    # the id before targets were part of it (pinned: stores hold runs under it)
    assert run_id_for(LOCK, 0) == run_id_for(LOCK, 0, None)
    assert run_id_for(LOCK, 0) == "r-" + __import__("hashlib").sha256(
        f"evalrun-run/v1\n{LOCK}\n0".encode()
    ).hexdigest()[:24]


def test_run_id_changes_with_the_target():
    a = run_id_for(LOCK, 0, "kubernetes https://10.0.0.1:6443 namespace evals")
    assert a != run_id_for(LOCK, 0)
    assert a != run_id_for(LOCK, 0, "kubernetes https://10.0.0.1:6443 namespace other")
    assert a != run_id_for(LOCK, 0, "kubernetes https://10.0.0.2:6443 namespace evals")
    assert a == run_id_for(LOCK, 0, "kubernetes https://10.0.0.1:6443 namespace evals")


def test_backend_target_is_what_the_backend_names():
    assert backend_target(InProcessBackend()) is None
    assert backend_target(ClusterBackend("k https://x namespace n")) == "k https://x namespace n"


@pytest.fixture
def world(tmp_path: Path):
    source = tmp_path / "source"
    shutil.copytree(SOURCE, source)
    home = tmp_path / "home"
    settings = Settings(home=home, cache=home / "cache", registry="127.0.0.1:5000")
    with pinned_world():
        yield source / "eval.yaml", settings, load_signer(KEY)


def test_a_run_on_another_backend_is_a_new_run_not_the_old_one(world):
    spec, settings, signer = world
    first = run_evaluation(spec, InProcessBackend(), signer, settings)
    assert not first.reused and first.predicate.backend == "inprocess"
    again = run_evaluation(spec, InProcessBackend(), signer, settings)
    assert again.reused and again.run_id == first.run_id
    # same id formula (no target), another backend: never the inprocess run returned
    other = run_evaluation(spec, OtherBackend(), signer, settings)
    assert not other.reused and other.run_id != first.run_id
    assert other.predicate.backend == "other" and other.predicate.attempt == 1
    assert run_evaluation(spec, OtherBackend(), signer, settings).run_id == other.run_id
    # a named target: its own run, the target signed into the predicate, found again
    cluster = run_evaluation(spec, ClusterBackend("k8s https://a namespace x"), signer, settings)
    assert not cluster.reused and cluster.run_id not in (first.run_id, other.run_id)
    assert cluster.predicate.backend_target == "k8s https://a namespace x"
    assert cluster.predicate.attempt == 0
    found = run_evaluation(spec, ClusterBackend("k8s https://a namespace x"), signer, settings)
    assert found.reused and found.run_id == cluster.run_id
    elsewhere = run_evaluation(spec, ClusterBackend("k8s https://a namespace y"), signer, settings)
    assert not elsewhere.reused and elsewhere.run_id != cluster.run_id
    # the embedded default's predicate has no target key at all (bytes as before)
    assert "backend_target" not in first.predicate.to_json()


def test_runs_ls_shows_backend_and_outcome(world):
    spec, settings, signer = world
    run_evaluation(spec, InProcessBackend(), signer, settings)
    run_evaluation(spec, OtherBackend(), signer, settings)
    records = History(Store(settings.home)).query(RunFilter())
    table = format_table(records)
    header = table.splitlines()[0].split()
    assert "backend" in header and "outcome" in header
    rows = table.splitlines()[2:]
    assert any("inprocess" in r and "passed" in r for r in rows)
    assert any(" other " in r and "passed" in r for r in rows)

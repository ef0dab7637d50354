"""evalrun compare answers questions: --metric, ties as ties, paired tests on shared
samples, run sets as one entry, filters (--spec, --backend, --since), --group-by model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from history_fixtures import predicate

from runner.bundle.build import build_bundle
from runner.bundle.signing import Verifier, generate_keypair, load_signer, load_verifier
from runner.bundle.store import Store
from runner.cli.main import main
from runner.errors import InputError
from runner.workflows.compare import Selection, compare_group, format_text, gate
from runner.workflows.compare_rank import paired_bootstrap

pytestmark = pytest.mark.unit

ACC = {"name": "accuracy", "compute": "accuracy", "direction": "higher_is_better"}


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "home"
    monkeypatch.setenv("EVALRUN_HOME", str(home))
    (home / "keys").mkdir(parents=True)
    generate_keypair(home / "keys" / "evalrun.key", home / "keys" / "evalrun.pub", "ed25519")
    return home


def _trust(home: Path) -> Verifier:
    return load_verifier(home / "keys" / "evalrun.pub")


def _seal(home: Path, pred: dict, samples: list[dict] | None = None) -> None:
    store = Store(home)
    with store.staging_dir() as stage:
        (stage / "spec.yaml").write_text("apiVersion: evalrun/v1\n")
        if samples is not None:
            (stage / "results").mkdir()
            (stage / "results" / "predictions.jsonl").write_text(
                "".join(json.dumps(s) + "\n" for s in samples)
            )
        build_bundle(stage, pred, load_signer(home / "keys" / "evalrun.key"), stage)
        store.put(stage)


def _run(
    home: Path,
    letter: str,
    value: float,
    low: float,
    high: float,
    *,
    f1: float = 0.5,
    samples: list[dict] | None = None,
    second: int = 0,
    **changes: object,
) -> str:
    run_id = "r-" + letter * 24
    pred = predicate(run_id=run_id, comparison_group="g", **changes)
    pred["metrics"][0].update(value=value, ci={**pred["metrics"][0]["ci"], "low": low, "high": high})
    pred["metrics"][1].update(value=f1, ci={**pred["metrics"][1]["ci"], "low": f1 - 0.01,
                                            "high": f1 + 0.01})
    pred["timestamps"]["started"] = f"2026-11-{20 + second:02d}T10:00:00.000+00:00"
    _seal(home, pred, samples)
    return run_id


def _hits(n: int, wrong: set[int]) -> list[dict]:
    return [{"id": f"s{i}", "label": 1, "prediction": 0 if i in wrong else 1} for i in range(n)]


def test_metric_ranks_by_the_named_metric_and_unknown_metric_is_refused(home):
    _run(home, "a", 0.95, 0.94, 0.96, f1=0.60)
    _run(home, "b", 0.90, 0.89, 0.91, f1=0.80, second=1)
    by_acc = compare_group(Store(home), "g", trust=_trust(home))
    assert [r.run_id[2] for r in by_acc.ranking] == ["a", "b"]
    by_f1 = compare_group(Store(home), "g", trust=_trust(home), metric="macro-f1")
    assert by_f1.metric == "macro-f1"
    assert [r.run_id[2] for r in by_f1.ranking] == ["b", "a"]
    with pytest.raises(InputError, match="has metric 'nope'") as exc:
        compare_group(Store(home), "g", trust=_trust(home), metric="nope")
    assert "accuracy, macro-f1" in exc.value.diagnostics()


def test_overlapping_intervals_are_shown_as_ties_sharing_a_rank(home):
    _run(home, "a", 0.90, 0.85, 0.95)
    _run(home, "b", 0.92, 0.87, 0.97, second=1)
    _run(home, "c", 0.60, 0.55, 0.65, second=2)
    c = compare_group(Store(home), "g", trust=_trust(home))
    assert [(r.run_id[2], r.rank, r.tied) for r in c.ranking] == [
        ("b", 1, True),
        ("a", 1, True),
        ("c", 3, False),
    ]
    text = format_text(c)
    ranks = {line.split()[1]: line.split()[0] for line in text.splitlines() if "  r-" in line}
    assert ranks == {"r-" + "b" * 24: "=1", "r-" + "a" * 24: "=1", "r-" + "c" * 24: "3"}
    # a tied candidate is not significantly worse than the leader: the gate passes
    assert gate(c, "r-" + "a" * 24).exit_code == 0
    assert gate(c, "r-" + "c" * 24).exit_code == 6


def test_paired_bootstrap_on_shared_samples_separates_runs_whose_intervals_overlap(home):
    # 200 shared samples: a misses 2, b misses 20; the recorded CIs are made to overlap,
    # so only the paired test can tell them apart
    a = _hits(200, set(range(2)))
    b = _hits(200, set(range(20)))
    _run(home, "a", 198 / 200, 0.80, 1.0, samples=a)
    _run(home, "b", 180 / 200, 0.80, 1.0, samples=b, second=1)
    c = compare_group(Store(home), "g", trust=_trust(home))
    leader, second = c.ranking
    assert leader.run_id[2] == "a" and second.rank == 2 and not second.tied
    assert second.significant_vs_leader is True
    assert second.test_vs_leader == "paired"
    assert second.paired_vs_leader is not None and second.paired_vs_leader.shared == 200
    assert second.paired_vs_leader.low > 0
    assert "paired, n=200" in format_text(c)
    # same verdict every time: the runner controls the resampling seed
    again = compare_group(Store(home), "g", trust=_trust(home))
    assert again.ranking[1].paired_vs_leader == second.paired_vs_leader


def test_paired_test_finds_no_difference_when_runs_err_on_the_same_samples(home):
    _run(home, "a", 0.9, 0.85, 0.95, samples=_hits(100, set(range(10))))
    _run(home, "b", 0.89, 0.84, 0.94, samples=_hits(100, set(range(11))), second=1)
    c = compare_group(Store(home), "g", trust=_trust(home))
    assert [r.rank for r in c.ranking] == [1, 1]
    assert c.ranking[1].test_vs_leader == "paired"


def test_paired_test_is_not_used_when_samples_do_not_give_the_recorded_value():
    a = {f"s{i}": {"id": f"s{i}", "label": 1, "prediction": 1} for i in range(10)}
    b = {f"s{i}": {"id": f"s{i}", "label": 1, "prediction": int(i > 0)} for i in range(10)}
    assert paired_bootstrap(ACC, a, b, recorded=(1.0, 0.9)) is not None
    assert paired_bootstrap(ACC, a, b, recorded=(0.5, 0.9)) is None
    # no shared ids, or a metric the catalogue cannot compute: no paired test
    c = {f"t{i}": v for i, v in enumerate(b.values())}
    assert paired_bootstrap(ACC, a, c) is None
    assert paired_bootstrap({"name": "x", "compute": "custom"}, a, b) is None


def test_filters_narrow_the_runs_and_are_shown(home):
    _run(home, "a", 0.90, 0.89, 0.91, backend="docker")
    _run(home, "b", 0.95, 0.94, 0.96, backend="kubernetes", second=2)
    _run(home, "c", 0.80, 0.79, 0.81, spec={"name": "other", "digest": "sha256:" + "a" * 64},
         backend="kubernetes", second=3)
    store, trust = Store(home), _trust(home)
    docker = compare_group(store, "g", trust=trust, selection=Selection(backend="docker"))
    assert [r.run_id[2] for r in docker.ranking] == ["a"]
    assert "selected: --backend docker" in format_text(docker)
    recent = compare_group(store, "g", trust=trust, selection=Selection(since="2026-11-22"))
    assert [r.run_id[2] for r in recent.ranking] == ["b", "c"]
    spec = compare_group(store, "g", trust=trust, selection=Selection(spec="other"))
    assert [r.run_id[2] for r in spec.ranking] == ["c"]
    with pytest.raises(InputError, match="--backend nothing"):
        compare_group(store, "g", trust=trust, selection=Selection(backend="nothing"))


def test_group_by_model_keeps_the_newest_run_of_each_model(home):
    other = {"path": "model/other.json", "sha256": "7" * 64, "size": 10}
    _run(home, "a", 0.95, 0.94, 0.96)
    _run(home, "b", 0.90, 0.89, 0.91, second=1)
    _run(home, "c", 0.70, 0.69, 0.71, model=other, second=2)
    c = compare_group(Store(home), "g", trust=_trust(home), group_by="model")
    assert [r.run_id[2] for r in c.ranking] == ["b", "c"]
    assert ("r-" + "a" * 24, "grouped by model: " + "r-" + "b" * 24 + " is newer") in c.excluded
    assert "model/other.json" in format_text(c)


def test_a_run_set_is_one_entry_instead_of_its_seeds(home):
    seeds = [
        _run(home, letter, v, v - 0.01, v + 0.01, seeds={"seed": s}, second=i)
        for i, (letter, v, s) in enumerate([("a", 0.90, 1), ("b", 0.92, 2)])
    ]
    _run(home, "c", 0.70, 0.69, 0.71, seeds={"seed": 3}, second=3)
    run_set = {
        "run_id": "rs-" + "s" * 20,
        "kind": "run_set",
        "spec": {"name": "digits-logreg"},
        "seeds": {"seeds": [1, 2]},
        "members": [{"seed": i + 1, "run_id": r, "outcome": "passed"} for i, r in enumerate(seeds)],
        "across_seeds": [
            {"name": "accuracy", "n": 2, "mean": 0.91, "sd": 0.014,
             "ci": {"low": 0.78, "high": 1.0, "level": 0.95, "method": "student_t"}}
        ],
        "outcome": "passed",
        "timestamps": {"started": "2026-11-25T10:00:00.000+00:00"},
    }
    _seal(home, run_set)
    c = compare_group(Store(home), "g", trust=_trust(home), allow=["seeds"])
    assert [(r.run_id, r.kind) for r in c.ranking] == [
        ("rs-" + "s" * 20, "run_set"),
        ("r-" + "c" * 24, "run"),
    ]
    assert c.ranking[0].value == 0.91
    assert {why for _, why in c.excluded} == {"a seed of run set " + "rs-" + "s" * 20}
    assert "(run set)" in format_text(c)


def test_cli_takes_metric_filters_and_grouping(home, capsys):
    _run(home, "a", 0.95, 0.94, 0.96, f1=0.60)
    _run(home, "b", 0.90, 0.89, 0.91, f1=0.80, second=3)
    args = ["compare", "g", "--metric", "macro-f1", "--since", "2026-11-21", "--group-by", "model"]
    assert main([*args, "--format", "json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["metric"] == "macro-f1" and out["group_by"] == "model"
    assert out["selection"] == ["--since 2026-11-21"]
    assert [r["run_id"] for r in out["ranking"]] == ["r-" + "b" * 24]
    assert main(["compare", "g", "--metric", "nope"]) == 2
    assert "nope" in capsys.readouterr().err

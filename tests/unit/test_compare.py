"""evalrun compare: comparability is checked before any ranking; --allow says so."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from history_fixtures import predicate, store_run

from runner.cli.main import main
from runner.workflows.compare import NotComparable, compare_group, format_markdown, format_text
from runner.errors import InputError
from runner.bundle.signing import Verifier, generate_keypair, load_signer, load_verifier
from runner.bundle.store import Store

pytestmark = pytest.mark.unit

STEP = {
    "name": "scale",
    "code": "prep.py",
    "code_digest": "sha256:" + "1" * 64,
    "kind": "file",
    "params": {"factor": 16},
}


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "home"
    monkeypatch.setenv("EVALRUN_HOME", str(home))
    (home / "keys").mkdir(parents=True)
    generate_keypair(home / "keys" / "evalrun.key", home / "keys" / "evalrun.pub", "ed25519")
    return home


def _trust(home: Path) -> Verifier:
    return load_verifier(home / "keys" / "evalrun.pub")


def _run(home: Path, letter: str, value: float, low: float, high: float, **changes) -> None:
    fields = {"comparison_group": "digits", "preprocessing": [STEP], **changes}
    pred = predicate(run_id="r-" + letter * 24, **fields)
    pred["metrics"][0].update(
        value=value, ci={**pred["metrics"][0]["ci"], "low": low, "high": high}
    )
    pred["timestamps"]["started"] = f"2026-11-20T10:00:0{ord(letter) - 97}.000+00:00"
    store_run(Store(home), load_signer(home / "keys" / "evalrun.key"), pred)


def test_comparable_runs_are_ranked_by_the_first_primary_metric(home):
    _run(home, "a", 0.90, 0.88, 0.92)
    _run(home, "b", 0.95, 0.93, 0.97)
    _run(home, "c", 0.91, 0.89, 0.96)
    _run(home, "d", 0.99, 0.98, 1.0, comparison_group="other")
    _run(home, "e", 0.99, 0.98, 1.0, outcome="evaluation_failed")
    c = compare_group(Store(home), "digits", trust=_trust(home))
    assert c.metric == "accuracy"
    assert [r.run_id[2] for r in c.ranking] == ["b", "c", "a"]
    assert [r.significant_vs_leader for r in c.ranking] == [None, False, True]
    assert c.ranking[1].significant_vs_next is False
    assert "non-overlapping confidence intervals" in format_text(c)
    assert c.allowed == ()
    assert c.excluded == (("r-" + "e" * 24, "outcome evaluation_failed: no metrics"),)


def test_lower_is_better_ranks_smallest_first(home):
    lower = [
        {
            **predicate()["metrics"][0],
            "name": "err",
            "compute": "error_rate",
            "direction": "lower_is_better",
        }
    ]
    _run(home, "a", 0.10, 0.08, 0.12, metrics=json.loads(json.dumps(lower)))
    _run(home, "b", 0.05, 0.04, 0.06, metrics=json.loads(json.dumps(lower)))
    c = compare_group(Store(home), "digits", trust=_trust(home))
    assert [r.run_id[2] for r in c.ranking] == ["b", "a"]
    assert c.ranking[1].significant_vs_leader is True


def test_different_preprocessing_is_refused_naming_the_field(home):
    _run(home, "a", 0.90, 0.88, 0.92)
    _run(home, "b", 0.95, 0.93, 0.97, preprocessing=[{**STEP, "params": {"factor": 8}}])
    with pytest.raises(NotComparable) as exc:
        compare_group(Store(home), "digits", trust=_trust(home))
    assert [d.field for d in exc.value.differences] == ["preprocessing"]
    assert exc.value.exit_code == 2
    assert "--allow preprocessing" in exc.value.diagnostics()


def test_allow_lets_the_difference_through_and_says_so(home):
    _run(home, "a", 0.90, 0.88, 0.92)
    _run(home, "b", 0.95, 0.93, 0.97, preprocessing=[{**STEP, "params": {"factor": 8}}])
    c = compare_group(Store(home), "digits", trust=_trust(home), allow=["preprocessing"])
    assert [d.field for d in c.allowed] == ["preprocessing"]
    assert "ALLOWED difference in preprocessing" in format_text(c)
    assert "ALLOWED difference in preprocessing" in format_markdown(c)


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"datasets.0.sha256": "0" * 64}, "datasets"),
        ({"datasets.0.split": "validation"}, "datasets"),
        ({"seeds.seed": 7}, "seeds"),
        ({"metrics.0.threshold": 0.5}, "primary_metrics"),
    ],
)
def test_each_comparability_field_is_checked(home, changes, field):
    _run(home, "a", 0.90, 0.88, 0.92)
    base = predicate()
    for key, value in changes.items():
        node = base
        *parents, last = key.split(".")
        for part in parents:
            node = node[int(part)] if part.isdigit() else node[part]
        node[last] = value
    _run(
        home,
        "b",
        0.95,
        0.93,
        0.97,
        datasets=base["datasets"],
        seeds=base["seeds"],
        metrics=base["metrics"],
    )
    with pytest.raises(NotComparable) as exc:
        compare_group(Store(home), "digits", trust=_trust(home))
    assert [d.field for d in exc.value.differences] == [field]


def test_supplementary_metrics_do_not_affect_comparability(home):
    defs = [
        {
            "name": "accuracy",
            "compute": "accuracy",
            "direction": "higher_is_better",
            "threshold": 0.9,
            "role": "primary",
            "ci": {"method": "bootstrap_percentile"},
        }
    ]
    _run(home, "a", 0.90, 0.88, 0.92, metric_definitions=defs)
    extra = {"name": "f1", "compute": "macro_f1", "role": "supplementary"}
    _run(home, "b", 0.95, 0.93, 0.97, metric_definitions=[*defs, extra])
    assert len(compare_group(Store(home), "digits", trust=_trust(home)).ranking) == 2


def test_unknown_group_and_unknown_allow_field_are_input_errors(home):
    with pytest.raises(InputError, match="no comparable runs"):
        compare_group(Store(home), "digits", trust=_trust(home))
    with pytest.raises(InputError, match="unknown field"):
        compare_group(Store(home), "digits", trust=_trust(home), allow=["model"])


def test_cli_refuses_with_exit_2_and_allows_with_json(home, capsys):
    _run(home, "a", 0.90, 0.88, 0.92)
    _run(home, "b", 0.95, 0.93, 0.97, seeds={"seed": 9})
    assert main(["compare", "digits"]) == 2
    assert "seeds" in capsys.readouterr().err
    assert main(["compare", "digits", "--json"]) == 2
    refusal = json.loads(capsys.readouterr().out)
    assert refusal["error"] == "not_comparable"
    assert refusal["differences"] == [
        {
            "field": "seeds",
            "variants": [
                {"value": {"seed": 1234}, "runs": ["r-" + "a" * 24]},
                {"value": {"seed": 9}, "runs": ["r-" + "b" * 24]},
            ],
        }
    ]
    assert main(["compare", "digits", "--allow", "seeds", "--format", "json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [d["field"] for d in out["allowed"]] == ["seeds"]
    assert out["ranking"][0]["run_id"] == "r-" + "b" * 24
    assert main(["compare", "digits", "--allow", "seeds", "--format", "md"]) == 0
    assert "| rank | run |" in capsys.readouterr().out

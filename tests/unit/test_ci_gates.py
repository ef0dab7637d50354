"""Exit codes a CI gate can use: ``evalrun diff`` and ``evalrun compare``.

diff A B: 0 when no gating metric of B regressed beyond A's confidence interval (and
--tolerance), 6 when one did (or vanished), 3 when a bundle does not verify, 2 for bad
input. compare GROUP: 0 ranked, 2 not comparable / no runs / candidate not ranked, 3 a
run does not verify, 6 the --candidate ranks significantly below the leader.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from history_fixtures import predicate, store_run

from runner.bundle.signing import generate_keypair, load_signer
from runner.bundle.store import Store
from runner.cli.main import main
from runner.model.predicate import RunPredicate
from runner.workflows.diff import diff_runs, format_diff

pytestmark = pytest.mark.unit

BASE = "r-" + "a" * 24


def _with_metric(run_id: str, value: float, low: float, high: float, **metric: object) -> dict:
    pred = predicate(run_id=run_id)
    pred["metrics"][0].update(
        value=value, ci={**pred["metrics"][0]["ci"], "low": low, "high": high}, **metric
    )
    return pred


def _diff(a: dict, b: dict, tolerance: float | None = None):
    return diff_runs(
        RunPredicate.model_validate(a), RunPredicate.model_validate(b), tolerance=tolerance
    )


@pytest.mark.parametrize(
    ("candidate", "tolerance", "code"),
    [
        ((0.92, 0.90, 0.95), None, 0),  # inside the baseline's CI: no regression
        ((0.95, 0.93, 0.97), None, 0),  # better
        ((0.85, 0.82, 0.88), None, 6),  # below the baseline's CI
        ((0.85, 0.82, 0.88), 0.1, 0),  # below the CI but within the tolerance
        ((0.85, 0.82, 0.88), 0.01, 6),  # beyond both
    ],
)
def test_diff_fails_the_gate_only_beyond_ci_and_tolerance(candidate, tolerance, code) -> None:
    a = _with_metric(BASE, 0.92, 0.90, 0.95)
    b = _with_metric("r-" + "b" * 24, *candidate)
    result = _diff(a, b, tolerance)
    assert result.exit_code == code
    assert [m.name for m in result.regressions] == (["accuracy"] if code else [])


def test_diff_respects_the_direction_and_ignores_non_gating_metrics() -> None:
    lower = {"direction": "lower_is_better"}
    a = _with_metric(BASE, 0.10, 0.08, 0.12, **lower)
    assert _diff(a, _with_metric("r-b", 0.05, 0.04, 0.06, **lower)).exit_code == 0
    assert _diff(a, _with_metric("r-b", 0.20, 0.18, 0.22, **lower)).exit_code == 6
    supplementary = {"role": "supplementary", "gating": False}
    a = _with_metric(BASE, 0.92, 0.90, 0.95, **supplementary)
    assert _diff(a, _with_metric("r-b", 0.10, 0.05, 0.15, **supplementary)).exit_code == 0


def test_a_gating_metric_missing_in_the_candidate_is_a_regression() -> None:
    a = _with_metric(BASE, 0.92, 0.90, 0.95)
    b = predicate(run_id="r-b", metrics=[predicate()["metrics"][1]])
    result = _diff(a, b)
    assert result.exit_code == 6 and [m.name for m in result.regressions] == ["accuracy"]
    assert "gate: FAIL" in format_diff(result)


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "home"
    monkeypatch.setenv("EVALRUN_HOME", str(home))
    (home / "keys").mkdir(parents=True)
    generate_keypair(home / "keys" / "evalrun.key", home / "keys" / "evalrun.pub", "ed25519")
    return home


def _store(home: Path, pred: dict, group: str | None = None, started: int = 0) -> None:
    if group:
        pred["comparison_group"] = group
    pred["timestamps"]["started"] = f"2026-11-20T10:00:{started:02d}.000+00:00"
    store_run(Store(home), load_signer(home / "keys" / "evalrun.key"), pred)


def test_cli_diff_exit_codes(home: Path, capsys) -> None:
    _store(home, _with_metric(BASE, 0.92, 0.90, 0.95))
    _store(home, _with_metric("r-" + "b" * 24, 0.80, 0.78, 0.82))
    assert main(["diff", BASE, "r-" + "b" * 24]) == 6
    assert "gate: FAIL" in capsys.readouterr().out
    assert main(["diff", "r-" + "b" * 24, BASE]) == 0
    assert "gate: pass" in capsys.readouterr().out
    assert main(["diff", BASE, "r-nothing-like-it"]) == 2


def test_cli_compare_gates_a_candidate(home: Path, capsys) -> None:
    _store(home, _with_metric("r-" + "a" * 24, 0.95, 0.93, 0.97), "g", 1)
    _store(home, _with_metric("r-" + "b" * 24, 0.94, 0.92, 0.96), "g", 2)
    _store(home, _with_metric("r-" + "c" * 24, 0.80, 0.78, 0.82), "g", 3)
    assert main(["compare", "g"]) == 0
    capsys.readouterr()
    assert main(["compare", "g", "--candidate", "newest"]) == 6  # c: disjoint, below a
    assert "gate: FAIL" in capsys.readouterr().out
    assert main(["compare", "g", "--candidate", "r-" + "b" * 24]) == 0  # overlaps the leader
    capsys.readouterr()
    assert main(["compare", "g", "--candidate", "r-" + "a" * 24, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["gate"]["rank"] == 1
    assert main(["compare", "g", "--candidate", "r-unknown"]) == 2


def test_cli_compare_json_carries_the_gate(home: Path, capsys) -> None:
    _store(home, _with_metric("r-" + "a" * 24, 0.95, 0.93, 0.97), "g", 1)
    _store(home, _with_metric("r-" + "c" * 24, 0.80, 0.78, 0.82), "g", 3)
    assert main(["compare", "g", "--candidate", "newest", "--json"]) == 6
    out = json.loads(capsys.readouterr().out)
    assert out["gate"]["candidate"] == "r-" + "c" * 24
    assert out["gate"]["significantly_worse"] is True and out["gate"]["exit_code"] == 6

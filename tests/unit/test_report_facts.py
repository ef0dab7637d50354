"""Reports show the same facts everywhere (issue 19, item 7): provenance in ``report.md``,
``evalrun report`` (Markdown and HTML) and ``runs show``; each metric plotted on its own
axis (0 to 1 only for metrics bounded to it)."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
from inprocess_backend import BUNDLES, PUBLIC_KEY

from runner.bundle.reader import open_bundle, read_predicate
from runner.bundle.signing import load_verifier
from runner.bundle.store import Store
from runner.cli.main import main
from runner.model.predicate import ConfidenceInterval, MetricResult, RunPredicate
from runner.render.html import render_html
from runner.render.run_report import load_report_data, render_markdown_full
from runner.render.svg import metric_axis, metrics_svg
from runner.shared.metric_catalogue import CATALOGUE, value_bounds

pytestmark = pytest.mark.unit

FACTS = (
    "fixture-user",
    "fixture-host",
    "2026-11-29T12:00:00.000+00:00",
    "https://ci.example/builds/7",
    "fixture for reading bundles made by older evalrun versions",
    "legacy-fixture",
    "prep/scale.py",
    "sha256:a7c9ac27ea12052eafac3f7e551bf86e0b1a7d7d6a240eb1cf278e3e807fec0b",
)


def test_provenance_of_report_md_is_in_every_report(tmp_path: Path, monkeypatch, capsys):
    report_md = (BUNDLES / "run" / "report.md").read_text()
    assert all(fact in report_md for fact in FACTS)  # what the bundle's report.md says
    data = load_report_data(open_bundle(BUNDLES / "run", load_verifier(PUBLIC_KEY)))
    full = render_markdown_full(data)
    page = render_html(data)
    assert "## Provenance" in full and "<h2>Provenance</h2>" in page
    for fact in FACTS:
        assert fact in full, fact
        assert fact in page, fact
    home = tmp_path / "home"
    monkeypatch.setenv("EVALRUN_HOME", str(home))
    (home / "keys").mkdir(parents=True)
    shutil.copy(PUBLIC_KEY, home / "keys" / "evalrun.pub")
    store = Store(home)
    with store.staging_dir() as stage:
        shutil.copytree(BUNDLES / "run", stage / "bundle")
        store.put(stage / "bundle")
    run_id = read_predicate(BUNDLES / "run").run_id
    assert main(["runs", "show", run_id]) == 0
    shown = capsys.readouterr().out
    for fact in FACTS:
        assert fact in shown, fact


def test_a_run_without_provenance_has_no_provenance_section():
    data = load_report_data(
        open_bundle(BUNDLES / "run-infrastructure-failure", load_verifier(PUBLIC_KEY))
    )
    predicate = data.predicate.model_copy(update={"provenance": type(data.predicate.provenance)()})
    from dataclasses import replace

    assert "## Provenance" not in render_markdown_full(replace(data, predicate=predicate))


def _metric(name: str, compute: str | None, value: float, low: float, high: float) -> MetricResult:
    return MetricResult(
        name=name, compute=compute, value=value,
        ci=ConfidenceInterval(low=low, high=high, level=0.95, method="bootstrap_percentile"),
    )


def test_each_metric_has_its_own_axis():
    accuracy = _metric("acc", "accuracy", 0.93, 0.91, 0.95)
    rmse = _metric("rmse", "rmse", 12.5, 11.0, 14.0)
    r2 = _metric("r2", "r2", 0.98, 0.97, 0.995)
    loss = _metric("ll", "log_loss", 0.05, 0.01, 0.09)
    custom = _metric("mine", None, 250.0, 240.0, 260.0)
    assert metric_axis(accuracy) == (0.0, 1.0)
    lo, hi = metric_axis(rmse)
    assert 0 < lo < 11.0 and 14.0 < hi < 20.0  # scaled to the data and its CI
    lo, hi = metric_axis(r2)
    assert 0.9 < lo < 0.97 and hi == 1.0  # never past the bound
    lo, hi = metric_axis(loss)
    assert lo == 0.0 and 0.09 < hi < 0.2  # never below 0
    lo, hi = metric_axis(custom)
    assert 200 < lo < 240 and 260 < hi < 300
    svg = metrics_svg([accuracy, rmse, custom])
    ticks = re.findall(r'fill="#555">([^<]+)</text>', svg)
    assert ticks[:3] == ["0", "0.5", "1"]  # accuracy: 0 to 1
    assert all(float(t) > 5 for t in ticks[3:6])  # rmse: its own scale, not 0-1
    assert all(float(t) > 100 for t in ticks[6:9])


def test_the_catalogue_knows_every_metrics_range():
    bounded = {c for c in CATALOGUE if value_bounds(c) == (0.0, 1.0)}
    assert {"accuracy", "f1", "roc_auc", "ece", "exact_match", "pass_at_k"} <= bounded
    assert {"log_loss", "mae", "rmse", "r2", "mean", "brier"}.isdisjoint(bounded)
    assert value_bounds("no-such-metric") is None and value_bounds(None) is None


def test_a_failed_runs_stderr_is_in_the_full_report_and_the_page():
    data = load_report_data(open_bundle(BUNDLES / "run", load_verifier(PUBLIC_KEY)))
    tail = ("Traceback (most recent call last):", "  File \"x.py\", line 1", "<b>Error</b>")
    from dataclasses import replace

    data = replace(data, predicate=data.predicate.model_copy(update={"stderr_tail": tail}))
    full = render_markdown_full(data)
    assert "## Evaluation stderr (last 3 lines)" in full
    assert '  File "x.py", line 1' in full.splitlines()
    page = render_html(data)
    assert "&lt;b&gt;Error&lt;/b&gt;" in page and "<b>Error</b>" not in page
    assert isinstance(data.predicate, RunPredicate)

"""evalrun report: self-contained, deterministic HTML and Markdown from a bundle."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from history_fixtures import predicate, store_run

from runner.cli.main import main
from runner.model.predicate import MetricResult, RunPredicate
from runner.render.markdown import render_markdown as _render_markdown
from runner.render.html import render_html
from runner.render.run_report import load_report_data, per_slice
from runner.bundle.reader import UNVERIFIED, open_bundle
from runner.render.svg import metrics_svg
from runner.bundle.signing import generate_keypair, load_signer
from runner.bundle.store import Store

pytestmark = pytest.mark.unit


def render_markdown(predicate: dict) -> str:
    return _render_markdown(RunPredicate.model_validate(predicate))


@pytest.fixture
def stored(tmp_path: Path, monkeypatch):
    home = tmp_path / "home"
    monkeypatch.setenv("EVALRUN_HOME", str(home))
    (home / "keys").mkdir(parents=True)
    generate_keypair(home / "keys" / "evalrun.key", home / "keys" / "evalrun.pub")
    return store_run(Store(home), load_signer(home / "keys" / "evalrun.key"), predicate())


def test_html_report_is_byte_identical_across_renders(stored, tmp_path) -> None:
    a, b = tmp_path / "a.html", tmp_path / "b.html"
    assert main(["report", stored.run_id, "-o", str(a)]) == 0
    assert main(["report", stored.digest, "--format", "html", "-o", str(b)]) == 0
    assert a.read_bytes() == b.read_bytes()
    assert main(["report", stored.run_id, "--format", "md", "-o", str(tmp_path / "a.md")]) == 0
    assert main(["report", stored.run_id, "--format", "md", "-o", str(tmp_path / "b.md")]) == 0
    assert (tmp_path / "a.md").read_bytes() == (tmp_path / "b.md").read_bytes()


def test_html_report_is_self_contained_and_complete(stored, tmp_path) -> None:
    out = tmp_path / "r.html"
    assert main(["report", stored.run_id, "-o", str(out)]) == 0
    html = out.read_text()
    # nothing outside the file: no scripts, no external URLs (only the SVG namespace)
    assert "<script" not in html
    urls = set(re.findall(r"(?:href|src)=\"([^\"]+)\"", html))
    assert urls == set()
    assert set(re.findall(r"https?://[^\"' <]+", html)) <= {"http://www.w3.org/2000/svg"}
    for expected in (
        "digits-logreg",
        stored.run_id,
        "valid: signed by keyid",
        "sha256:" + "e" * 64,  # model
        "sha256:" + "f" * 64,  # dataset
        "seed",
        "1234",
        "Debian GNU/Linux 12",
        "[0.9000, 0.9467] (95% bootstrap_percentile)",
        "Per-slice breakdown (by label)",
        "commit " + "1" * 40,
        "127.0.0.1:5000/evalrun/base@sha256:" + "9" * 64,
    ):
        assert expected in html, expected
    assert html.count("<svg") == 2


def test_report_refuses_a_bundle_that_does_not_verify(stored, tmp_path, capsys) -> None:
    other = tmp_path / "other"
    generate_keypair(other, tmp_path / "other.pub")
    out = tmp_path / "r.md"
    assert main(["report", stored.run_id, "--format", "md", "--pub", str(tmp_path / "other.pub"),
                 "-o", str(out)]) == 3
    assert not out.exists()
    assert "wrong key" in capsys.readouterr().err
    # asked for by name, it is shown, and says so loudly on stderr and in the report
    assert main(["report", stored.run_id, "--format", "md", "--no-verify", "-o", str(out)]) == 0
    assert "verification: NOT VERIFIED (--no-verify)" in out.read_text()
    assert "WARNING: --no-verify" in capsys.readouterr().err


def test_svg_plot_is_deterministic_text() -> None:
    metrics = [MetricResult.model_validate(m) for m in predicate()["metrics"]]
    assert metrics_svg(metrics) == metrics_svg(list(metrics))
    svg = metrics_svg(metrics)
    assert svg.startswith("<svg") and 'stroke-dasharray="3,2"' in svg  # threshold marks
    assert metrics_svg([]) == ""


def test_per_slice_uses_slice_field_when_present(tmp_path) -> None:
    path = tmp_path / "p.jsonl"
    path.write_text(
        '{"label": 1, "prediction": 1, "slice": "short"}\n'
        '{"label": 1, "prediction": 0, "slice": "long"}\n'
        '{"label": 0, "prediction": 0, "slice": "long"}\n'
        "not json\n"
    )
    key, rows = per_slice(path.read_bytes())
    assert key == "slice"
    assert [(r.name, r.n, r.correct) for r in rows] == [("long", 2, 1), ("short", 1, 1)]
    assert per_slice(None) == (None, ())
    assert per_slice(b"\xff\xfe not utf-8") == (None, ())


def test_reproduction_section_in_bundle_report() -> None:
    p = predicate(
        reproduction_of={"run_id": "r-orig", "bundle_digest": "sha256:" + "0" * 64},
        reproduction={
            "verdict": "identical",
            "reason": None,
            "metrics": [{"name": "accuracy", "original": 0.9, "rerun": 0.9, "delta": 0.0,
                         "verdict": "identical"}],
        },
    )
    md = render_markdown(p)
    assert "## Reproduction" in md and "re-run of `r-orig`" in md
    assert "| accuracy | 0.9000 | 0.9000 | 0.0000 | identical |" in md
    assert "## Reproduction" not in render_markdown(predicate())


def test_load_report_data_without_predictions(tmp_path, stored) -> None:
    data = load_report_data(open_bundle(stored.path, UNVERIFIED))
    assert data.slice_field == "label" and len(data.slices) == 3
    assert "Per-slice" in render_html(data)


AUDIT = {
    "kind": "audit",
    "run_id": "audit-000000000000000000000001",
    "started": "2026-11-26T03:17:00.000+00:00",
    "seed": 20261126,
    "sample": 2,
    "sampled_from": 9,
    "filters": {"since": "90d", "spec": None, "until": None, "tolerance": None},
    "outcome": "not_reproduced",
    "reproduced": 1,
    "failed": 1,
    "exit_code": 3,
    "runs": [
        {"run_id": "r-1", "spec": "digits-logreg", "reproduced": True, "category": "identical",
         "detail": "identical; re-run outcome passed", "rerun_id": "r-2"},
        {"run_id": "r-3", "spec": "digits-logreg", "reproduced": False,
         "category": "missing_artifact", "detail": "dataset digits-test: not found",
         "rerun_id": None},
    ],
    "timestamps": {"started": "2026-11-26T03:17:00.000+00:00"},
}


def test_audit_bundle_reports_in_html_and_terminal(tmp_path, monkeypatch, capsys) -> None:
    home = tmp_path / "home"
    monkeypatch.setenv("EVALRUN_HOME", str(home))
    (home / "keys").mkdir(parents=True)
    generate_keypair(home / "keys" / "evalrun.key", home / "keys" / "evalrun.pub")
    store_run(Store(home), load_signer(home / "keys" / "evalrun.key"), AUDIT)
    out = tmp_path / "audit.html"
    assert main(["report", AUDIT["run_id"], "-o", str(out)]) == 0
    html = out.read_text()
    assert "reproduction audit audit-000000000000000000000001" in html
    assert "missing_artifact: dataset digits-test: not found" in html and "<script" not in html
    assert main(["runs", "show", AUDIT["run_id"]]) == 0
    shown = capsys.readouterr().out
    assert "| r-3 | digits-logreg | NO | missing_artifact" in shown
    assert "verification: valid" in shown
    assert main(["runs", "ls", "--audits", "--json"]) == 0


def test_an_image_digest_names_its_newest_run(stored, capsys) -> None:
    # the fixture run's image digest is sha256:ccc…; `runs show IMAGE_DIGEST` finds it
    assert main(["runs", "show", "sha256:" + "c" * 64, "--json"]) == 0
    import json

    assert json.loads(capsys.readouterr().out)["predicate"]["run_id"] == stored.run_id

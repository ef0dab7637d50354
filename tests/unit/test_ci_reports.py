"""Reports CI systems render: `--junit FILE` (validated against the JUnit XSD) and the
Markdown step summary (`$GITHUB_STEP_SUMMARY`), sanitised (issue 16, item 2)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from ci_pipelines import metric, run_predicate_json, store_run
from key_fixtures import locked_example
from lxml import etree

from runner.bundle.signing import generate_keypair
from runner.cli.main import main
from runner.model.predicate import RunPredicate, RunSetPredicate, parse_predicate
from runner.render.junit import error_suite, reproduction_suite, run_set_suites, run_suite
from runner.render.junit_xml import render_junit
from runner.render.step_summary import md_text, rerun_summary, run_summary

pytestmark = pytest.mark.unit

XSD = Path(__file__).with_name("fixtures") / "junit" / "junit.xsd"
SCHEMA = etree.XMLSchema(etree.parse(str(XSD)))


def valid_junit(data: bytes) -> etree._Element:
    """Parse ``data``, validate it against the XSD, and check the counts the XSD cannot."""
    root = etree.fromstring(data)
    SCHEMA.assertValid(root)
    totals = {"tests": 0, "failures": 0, "errors": 0}
    for suite in root.iter("testsuite"):
        cases = suite.findall("testcase")
        counted = {
            "tests": len(cases),
            "failures": sum(1 for c in cases if c.find("failure") is not None),
            "errors": sum(1 for c in cases if c.find("error") is not None),
        }
        for key, value in counted.items():
            assert int(suite.get(key)) == value, (key, suite.get("name"))
            totals[key] += value
    for key, value in totals.items():
        assert int(root.get(key)) == value
    return root


def predicate(outcome: str = "passed", metrics: list[dict] | None = None, **extra: object):
    data = run_predicate_json(
        outcome, metrics if metrics is not None else [metric("accuracy", 0.97)], **extra
    )
    parsed = parse_predicate(data)
    assert isinstance(parsed, RunPredicate)
    return parsed


# --------------------------------------------------------------------------- JUnit


def test_a_passing_run_is_one_passing_case_per_gating_metric() -> None:
    p = predicate(metrics=[metric("accuracy", 0.97), metric("macro-f1", 0.96)])
    root = valid_junit(render_junit([run_suite(p, properties={"bundle_digest": "sha256:ab"})]))
    suite = root.find("testsuite")
    assert suite.get("name") == "digits-logreg"
    assert suite.get("timestamp") == "2025-03-01T10:00:00" and suite.get("time") == "90.500"
    assert suite.get("hostname") == "ci-runner-7"
    cases = suite.findall("testcase")
    assert [c.get("name") for c in cases] == ["accuracy", "macro-f1"]
    assert {c.get("classname") for c in cases} == {"evalrun.digits-logreg"}
    assert all(c.find("failure") is None and c.find("error") is None for c in cases)
    out = cases[0].findtext("system-out")
    assert "accuracy = 0.9700 (n=450)" in out
    assert "95% CI [0.9500, 0.9900] (bootstrap_percentile, 1000 resamples)" in out
    assert "threshold >= 0.9 (higher_is_better): met" in out
    props = {p.get("name"): p.get("value") for p in suite.iter("property")}
    assert props["run_id"] == p.run_id and props["outcome"] == "passed"
    assert props["exit_code"] == "0" and props["bundle_digest"] == "sha256:ab"


def test_a_missed_threshold_fails_with_expected_found_and_the_ci() -> None:
    p = predicate(
        "thresholds_failed",
        [
            metric("accuracy", 0.97),
            {**metric("error-rate", 0.2, 0.1), "direction": "lower_is_better", "passed": False},
            metric(
                "calibration",
                0.5,
                0.9,
                role="supplementary",
                gating=False,
                passed=None,
                threshold_met=False,
            ),
        ],
    )
    root = valid_junit(render_junit([run_suite(p)]))
    cases = {c.get("name"): c for c in root.iter("testcase")}
    assert set(cases) == {"accuracy", "error-rate"}  # the supplementary metric does not gate
    assert cases["accuracy"].find("failure") is None
    failure = cases["error-rate"].find("failure")
    assert failure.get("type") == "threshold_missed"
    assert failure.get("message") == (
        "expected error-rate <= 0.1, found 0.2000 "
        "(95% CI [0.1800, 0.2200] (bootstrap_percentile, 1000 resamples))"
    )
    assert "threshold <= 0.1 (lower_is_better): MISSED" in failure.text
    assert "not gating: calibration = 0.5000" in root.find("testsuite").findtext("system-out")


@pytest.mark.parametrize(
    ("outcome", "kind"),
    [
        ("evaluation_failed", "failure"),
        ("environment_mismatch", "error"),
        ("infrastructure_failure", "error"),
    ],
)
def test_a_run_without_a_verdict_is_one_failing_case_with_the_reason(outcome, kind) -> None:
    reason = "the evaluation exited 1: Traceback … ZeroDivisionError"
    p = predicate(outcome, metrics=[], reason=reason)
    root = valid_junit(render_junit([run_suite(p)]))
    (case,) = root.iter("testcase")
    problem = case.find(kind)
    assert problem is not None and problem.get("type") == outcome
    assert problem.get("message") == f"{outcome}: {reason}"
    assert f"exit code {p.exit_code}" in problem.text and p.run_id in problem.text


def test_an_exit_code_other_than_0_always_fails_the_report() -> None:
    # thresholds_failed with no metric marked failed (an odd bundle): still a failing case
    p = predicate("thresholds_failed", [metric("accuracy", 0.97)])
    root = valid_junit(render_junit([run_suite(p)]))
    assert int(root.get("failures")) + int(root.get("errors")) == 1
    # a run with no gating metric that passed: one passing case
    root = valid_junit(render_junit([run_suite(predicate("completed", metrics=[]))]))
    assert root.get("tests") == "1" and root.get("failures") == "0"


def test_old_bundles_without_roles_gate_on_every_metric() -> None:
    old = {"name": "accuracy", "value": 0.5, "threshold": 0.9, "passed": False}
    root = valid_junit(render_junit([run_suite(predicate("thresholds_failed", [old]))]))
    (case,) = root.iter("testcase")
    assert case.find("failure").get("message") == "expected accuracy >= 0.9, found 0.5000"


def test_hostile_strings_from_a_bundle_stay_valid_xml_and_are_bounded() -> None:
    reason = "boom\x00\x1b[31m ]]> <script>alert(1)</script> &amp; \ud800" + "x" * 5000
    p = predicate("evaluation_failed", metrics=[], reason=reason)
    data = render_junit([run_suite(p)])
    root = valid_junit(data)
    problem = next(root.iter("error"), None) or next(root.iter("failure"))
    assert "<script>alert(1)</script>" in problem.get("message")  # as text, escaped in XML
    assert b"<script>" not in data
    assert "\x00" not in problem.text and "\ufffd" in problem.text
    assert len(problem.get("message")) <= 1000


def test_run_sets_rerun_and_errors_render_valid_junit() -> None:
    member = {
        "seed": 1,
        "run_id": "r-a",
        "outcome": "passed",
        "metrics": [metric("accuracy", 0.97)],
    }
    failed = {"seed": 2, "run_id": "r-b", "outcome": "evaluation_failed", "reason": "OOM killed"}
    run_set = parse_predicate(
        {
            "kind": "run_set",
            "run_id": "rs-1",
            "spec": {"name": "digits"},
            "members": [member, failed],
            "outcome": "evaluation_failed",
            "exit_code": 6,
        }
    )
    assert isinstance(run_set, RunSetPredicate)
    rerun = predicate(
        "passed",
        reproduction_of={"run_id": "r-orig", "bundle_digest": "sha256:9"},
        reproduction={
            "verdict": "changed",
            "reason": "not reproduced: accuracy",
            "metrics": [
                {
                    "name": "accuracy",
                    "original": 0.97,
                    "rerun": 0.91,
                    "delta": -0.06,
                    "original_ci": [0.95, 0.99],
                    "rerun_ci": [0.89, 0.93],
                    "verdict": "changed",
                },
                {
                    "name": "macro-f1",
                    "original": 0.96,
                    "rerun": 0.96,
                    "delta": 0.0,
                    "verdict": "identical",
                },
            ],
        },
    )
    suites = [
        *run_set_suites(run_set),
        reproduction_suite(rerun, 6),
        error_suite(
            "evalrun run eval.yaml", error="invalid_spec", message="bad\nspec", exit_code=2
        ),
    ]
    root = valid_junit(render_junit(suites))
    assert [s.get("name") for s in root.iter("testsuite")] == [
        "digits seed 1",
        "digits seed 2",
        "digits-logreg reproduction",
        "evalrun run eval.yaml",
    ]
    cases = {(c.getparent().get("name"), c.get("name")): c for c in root.iter("testcase")}
    assert cases[("digits seed 2", "evaluation")].find("failure").get("message") == (
        "evaluation_failed: OOM killed"
    )
    changed = cases[("digits-logreg reproduction", "accuracy")].find("failure")
    assert changed.get("message") == (
        "expected accuracy to reproduce 0.9700 (CI [0.9500, 0.9900]), "
        "found 0.9100 (CI [0.8900, 0.9300]): changed"
    )
    assert cases[("digits-logreg reproduction", "macro-f1")].find("failure") is None
    assert (
        cases[("evalrun run eval.yaml", "evalrun run eval.yaml")].find("error").get("type")
        == "invalid_spec"
    )


def test_junit_is_deterministic() -> None:
    p = predicate("thresholds_failed", [metric("accuracy", 0.5)])
    assert render_junit([run_suite(p)]) == render_junit([run_suite(p)])


def test_the_schema_rejects_what_reporters_do_not_read() -> None:
    # the XSD bites: a suite without counts, a failure without a message
    bad_suite = b'<testsuites tests="0" failures="0" errors="0"><testsuite name="x"/></testsuites>'
    assert not SCHEMA.validate(etree.fromstring(bad_suite))
    good = etree.fromstring(
        render_junit([run_suite(predicate("thresholds_failed", [metric("a", 0.1)]))])
    )
    del next(good.iter("failure")).attrib["message"]
    assert not SCHEMA.validate(good)


# --------------------------------------------------------------------------- Markdown


def test_md_text_escapes_markdown_and_html_and_folds_lines() -> None:
    hostile = "<img src=x onerror=alert(1)> **bold** [x](javascript:alert(1)) | `code` $x$\nnext"
    text = md_text(hostile)
    assert "<img" not in text and "&lt;img" in text
    assert "\n" not in text
    for raw in ("**", "[x]", "`code`", "|", "$x$"):
        assert raw not in text.replace("\\" + raw[0], "")  # every special character escaped
    assert md_text("a" * 500).endswith("…") and len(md_text("a" * 500)) == 300


def test_the_step_summary_has_the_terminal_facts_with_bundle_strings_escaped() -> None:
    evil = "acc|<b>x</b>"
    p = predicate(
        "thresholds_failed",
        [metric(evil, 0.5)],
        reason="threshold missed: acc|<b>x</b>\n# injected heading",
    )
    text = run_summary(p, exit_code=6, bundle="/b/r-1", digest="sha256:ab", verified="valid (7)")
    assert "<b>" not in text and "\n# injected" not in text
    header = "| metric | role | value | confidence interval | threshold | verdict |"
    assert header in text
    row = next(line for line in text.splitlines() if line.startswith("| acc"))
    assert len(re.findall(r"(?<!\\)\|", row)) == 7  # six cells: the name's pipe is escaped
    assert "FAIL" in text and "| 0.5000 |" in text
    for fact in ("r-0123456789abcdef012345", "/b/r-1", "sha256:ab", "valid (7)"):
        assert fact in text


def test_the_rerun_summary_lists_each_metric_against_the_original() -> None:
    p = predicate(
        reproduction_of={"run_id": "r-orig"},
        reproduction={
            "verdict": "changed",
            "metrics": [
                {
                    "name": "accuracy",
                    "original": 0.97,
                    "rerun": 0.91,
                    "delta": -0.06,
                    "verdict": "changed",
                }
            ],
        },
    )
    text = rerun_summary(p, exit_code=6, bundle="/b", digest="sha256:1")
    assert "NOT REPRODUCED" in text
    assert "| accuracy | 0.9700 | 0.9100 | -0.0600 | changed |" in text


# --------------------------------------------------------------------------- the CLI


@pytest.fixture
def ci_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    key = generate_keypair(tmp_path / "ci.key", tmp_path / "ci.pub")
    monkeypatch.setenv("EVALRUN_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("CI", "true")
    monkeypatch.setenv("EVALRUN_KEY", key.private_path.read_text())
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(tmp_path / "summary.md"))
    monkeypatch.setenv("DOCKER_HOST", f"unix://{tmp_path}/no-docker.sock")
    return key


@pytest.mark.parametrize(("outcome", "code"), [("passed", 0), ("thresholds_failed", 6)])
def test_run_writes_junit_summary_and_tar_whatever_the_verdict(
    outcome, code, ci_env, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = locked_example(tmp_path / "digits")
    value = 0.97 if outcome == "passed" else 0.5
    run_id = store_run(
        tmp_path / "home",
        spec,
        ci_env.private_path,
        outcome,
        [metric("accuracy", value)],
        backend="docker",
    )
    (tmp_path / "summary.md").write_text("earlier step\n")
    argv = [
        "--json",
        "run",
        str(spec),
        "--junit",
        str(tmp_path / "reports" / "junit.xml"),
        "-o",
        f"{tmp_path}/reports/",
    ]
    assert main(argv) == code
    out = json.loads(capsys.readouterr().out)
    assert out["run_id"] == run_id and out["reused"] is True
    assert out["tar"] == str(tmp_path / "reports" / f"{run_id}.tar")
    root = valid_junit((tmp_path / "reports" / "junit.xml").read_bytes())
    (case,) = root.iter("testcase")
    assert (case.find("failure") is not None) == (code != 0)
    summary = (tmp_path / "summary.md").read_text()
    assert summary.startswith("earlier step\n### evalrun run: digits-logreg")
    assert ("PASS" if code == 0 else "FAIL") in summary and run_id in summary
    assert main(["verify", out["tar"], "--key", str(ci_env.public_path)]) == 0


def test_a_failed_run_gets_one_failing_case_and_a_summary(
    ci_env, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = locked_example(tmp_path / "digits")
    junit = tmp_path / "junit.xml"
    junit.write_text("stale")  # replaced, never appended to
    assert main(["run", str(spec), "--junit", str(junit), "--json"]) == 5  # no Docker engine
    out = json.loads(capsys.readouterr().out)
    root = valid_junit(junit.read_bytes())
    (case,) = root.iter("testcase")
    assert case.find("error").get("type") == "infrastructure_failure"
    assert out["reason"] in case.find("error").get("message")
    assert "NOT EVALUATED" in (tmp_path / "summary.md").read_text()


def test_an_error_before_any_bundle_is_one_error_case(
    ci_env, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    junit = tmp_path / "out" / "junit.xml"
    missing = tmp_path / "missing.yaml"
    assert main(["run", str(missing), "--junit", str(junit)]) == 2
    root = valid_junit(junit.read_bytes())
    (case,) = root.iter("testcase")
    error = case.find("error")
    assert error.get("type") == "invalid_spec" and str(missing) in error.text
    assert "ERROR (exit 2)" in (tmp_path / "summary.md").read_text()


def test_without_the_variable_no_summary_is_written(
    ci_env, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("GITHUB_STEP_SUMMARY")
    spec = locked_example(tmp_path / "digits")
    assert main(["run", str(spec)]) == 5
    assert not (tmp_path / "summary.md").exists()


def test_sweep_junit_has_a_suite_per_cell(
    ci_env, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = locked_example(tmp_path / "digits")
    matrix = tmp_path / "matrix.yaml"
    matrix.write_text("seed: [1, 2]\n")
    junit = tmp_path / "junit.xml"
    argv = ["sweep", str(spec), "--matrix", str(matrix), "--junit", str(junit), "--json"]
    assert main(argv) == 5  # no Docker engine: every cell a signed infrastructure failure
    cells = json.loads(capsys.readouterr().out)["cells"]
    root = valid_junit(junit.read_bytes())
    suites = root.findall("testsuite")
    assert [s.get("name") for s in suites] == ["digits-logreg [seed=1]", "digits-logreg [seed=2]"]
    runs = {p.get("value") for p in root.iter("property") if p.get("name") == "run_id"}
    assert runs == {c["run_id"] for c in cells}
    assert root.get("errors") == "2"
    summary = (tmp_path / "summary.md").read_text()
    assert "### evalrun sweep: digits-logreg" in summary and "seed=1" in summary

"""The CI examples (examples/ci/) parse, hold only evalrun command lines (and a little
bookkeeping), and run as their CI systems would run them (issue 16, item 1).

Here the job runs against a run already in the store (`evalrun run` returns it without
reaching a cluster); tests/k8s/test_ci_examples.py runs the same jobs on the test cluster.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
from ci_pipelines import (
    GITHUB_WORKFLOW,
    KUBECONFIG_TEXT,
    GITLAB_CI,
    LOCAL_EQUIVALENTS,
    checkout_copy,
    clean_env,
    evalrun_argv,
    evalrun_on_path,
    github_job,
    gitlab_job,
    is_bookkeeping,
    metric,
    run_github_job,
    run_gitlab_job,
    script_lines,
    store_run,
)
from key_fixtures import locked_example
from lxml import etree

from runner.bundle.signing import generate_keypair
from runner.cli.main import build_parser

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
SCHEMA = etree.XMLSchema(
    etree.parse(str(Path(__file__).with_name("fixtures") / "junit" / "junit.xsd"))
)


def _commands(lines: list[str]) -> list[list[str]]:
    """The evalrun argument lists of ``lines``; every other line must be bookkeeping."""
    found = []
    for line in lines:
        argv = evalrun_argv(line)
        if argv is None:
            assert is_bookkeeping(line), f"not an evalrun command line: {line!r}"
            continue
        try:
            build_parser().parse_args(argv)
        except SystemExit:
            pytest.fail(f"evalrun does not accept: {line}")
        found.append(argv)
    return found


def _check_pipeline_commands(commands: list[list[str]]) -> None:
    parser = build_parser()
    by_name = {argv[0]: parser.parse_args(argv) for argv in commands}
    assert list(by_name) == ["validate", "run", "verify", "report"]
    run = by_name["run"]
    assert run.backend == "kubernetes" and run.namespace == "$EVALRUN_NAMESPACE"
    assert run.junit == Path("reports/junit.xml") and run.out == "reports/bundle.tar"
    assert run.json is True and run.key is None  # the key comes from $EVALRUN_KEY
    assert str(by_name["verify"].bundle) == run.out and by_name["verify"].keyring is not None
    assert by_name["report"].out.parent == Path("reports")


def test_the_github_workflow_holds_only_known_evalrun_command_lines() -> None:
    job_env, steps = github_job()
    lines = [line for s in steps if s.run for line in script_lines(s.run)]
    _check_pipeline_commands(_commands(lines))
    for step in steps:
        assert (step.run is None) != (step.uses is None), step.name
        if step.uses:
            assert step.uses.split("@")[0] in LOCAL_EQUIVALENTS, step.uses
    upload = next(s for s in steps if (s.uses or "").startswith("actions/upload-artifact"))
    assert upload.condition == "always()" and upload.with_["path"] == "reports/"
    gate = steps[-1]
    assert gate.run is not None and "steps.run.outputs.exit_code" in gate.run
    assert job_env["EVALRUN_KEY"] == "${{ secrets.EVALRUN_KEY }}"


def test_the_gitlab_job_holds_only_known_evalrun_command_lines() -> None:
    job = gitlab_job()
    lines = [str(line) for line in job["script"]]
    _check_pipeline_commands(_commands(lines))
    assert lines[-1] == 'exit "$code"'
    artifacts = job["artifacts"]
    assert artifacts["when"] == "always" and artifacts["paths"] == ["reports/"]
    assert artifacts["reports"]["junit"] == "reports/junit.xml"
    assert "EVALRUN_KEY" not in job["variables"]  # a masked CI/CD variable, never in the file


@pytest.mark.parametrize("path", [GITHUB_WORKFLOW, GITLAB_CI], ids=["github", "gitlab"])
def test_each_example_shows_both_key_sources(path: Path) -> None:
    text = path.read_text()
    assert "EVALRUN_KEY" in text and "PEM" in text
    commented = [line.strip() for line in text.splitlines() if line.strip().startswith("#")]
    assert any(line.startswith('# EVALRUN_KEY: "pkcs11:token=') for line in commented)
    assert any("EVALRUN_PKCS11_PIN" in line for line in commented)


def test_the_command_lines_are_told_apart_from_shell_operators() -> None:
    line = 'evalrun run "$SPEC" -n "$NS" --json > reports/run.json || code=$?'
    assert evalrun_argv(line) == ["run", "$SPEC", "-n", "$NS", "--json"]
    assert evalrun_argv("echo evalrun") is None
    assert not is_bookkeeping("rm -rf /")


# --------------------------------------------------------------------------- run here


@pytest.fixture
def job_machine(tmp_path: Path):
    """A checkout copy whose spec is locked, a CI key pair whose public half is committed
    under examples/ci/trusted-keys, and a runner with evalrun on PATH."""
    workspace = checkout_copy(tmp_path / "checkout")
    shutil.rmtree(workspace / "examples" / "digits")
    spec = locked_example(workspace / "examples" / "digits")
    key = generate_keypair(tmp_path / "ci.key", tmp_path / "ci.pub")
    shutil.copy(key.public_path, workspace / "examples" / "ci" / "trusted-keys" / "ci.pub")
    bin_dir = evalrun_on_path(tmp_path / "bin", sys.executable)
    env = clean_env(bin_dir, tmp_path / "home")
    return workspace, spec, key, env


def _artifact_files(where: Path) -> set[str]:
    return {p.name for p in where.rglob("*") if p.is_file()}


@pytest.mark.parametrize(("outcome", "value"), [("passed", 0.97), ("thresholds_failed", 0.5)])
def test_the_github_job_runs_and_gates_on_the_exit_code(
    outcome: str, value: float, job_machine, tmp_path: Path
) -> None:
    workspace, spec, key, env = job_machine
    runner_temp = tmp_path / "runner-temp"
    run_id = store_run(
        runner_temp / "evalrun", spec, key.private_path, outcome, [metric("accuracy", value)]
    )
    result = run_github_job(
        workspace=workspace,
        runner_temp=runner_temp,
        base_env=env,
        secrets={"EVALRUN_KEY": key.private_path.read_text(), "KUBECONFIG_DATA": KUBECONFIG_TEXT},
        variables={"EVALRUN_NAMESPACE": "evals"},
        artifacts=tmp_path / "artifacts",
    )
    log = result.log()
    assert result.succeeded is (outcome == "passed"), log
    codes = {s.name: s.returncode for s in result.steps}
    assert codes["Run on the cluster"] == 0  # the exit code is kept, not raised, here
    assert codes["Verify the bundle with the trusted keys"] == 0, log
    assert codes["Upload the bundle and the reports"] == 0
    assert codes["Gate on the evaluation"] == (0 if outcome == "passed" else 6), log
    artifact = tmp_path / "artifacts" / "evalrun-4242"
    assert _artifact_files(artifact) == {"bundle.tar", "junit.xml", "run.json", "report.html"}
    out = json.loads((artifact / "reports" / "run.json").read_text())
    assert out["run_id"] == run_id and out["outcome"] == outcome
    SCHEMA.assertValid(etree.parse(str(artifact / "reports" / "junit.xml")))
    assert "### evalrun run: digits-logreg" in result.summary and run_id in result.summary
    kubeconfig = runner_temp / "kubeconfig"
    assert kubeconfig.read_text() == KUBECONFIG_TEXT + "\n" and kubeconfig.stat().st_mode & 0o077 == 0


@pytest.mark.parametrize(("outcome", "value"), [("passed", 0.97), ("thresholds_failed", 0.5)])
def test_the_gitlab_job_runs_and_gates_on_the_exit_code(
    outcome: str, value: float, job_machine, tmp_path: Path
) -> None:
    workspace, spec, key, env = job_machine
    run_id = store_run(
        workspace / ".evalrun", spec, key.private_path, outcome, [metric("accuracy", value)]
    )
    (tmp_path / "kubeconfig").write_text(KUBECONFIG_TEXT)
    result = run_gitlab_job(
        workspace=workspace,
        base_env=env,
        ci_variables={
            "EVALRUN_KEY": key.private_path.read_text(),
            "EVALRUN_NAMESPACE": "evals",
            "KUBECONFIG": str(tmp_path / "kubeconfig"),
        },
        artifacts=tmp_path / "artifacts",
    )
    log = result.log()
    assert result.succeeded is (outcome == "passed"), log
    assert result.steps[0].returncode == (0 if outcome == "passed" else 6), log
    assert _artifact_files(tmp_path / "artifacts") == {
        "bundle.tar",
        "junit.xml",
        "run.json",
        "report.html",
    }
    assert json.loads((workspace / "reports" / "run.json").read_text())["run_id"] == run_id
    assert result.junit is not None
    junit = etree.parse(str(result.junit))
    SCHEMA.assertValid(junit)
    assert (junit.find(".//failure") is not None) is (outcome != "passed")


def test_a_job_without_a_signing_key_fails_and_never_makes_one(job_machine, tmp_path) -> None:
    workspace, _, _, env = job_machine
    result = run_gitlab_job(
        workspace=workspace,
        base_env=env,
        ci_variables={"EVALRUN_NAMESPACE": "evals", "KUBECONFIG": str(tmp_path / "kc")},
        artifacts=tmp_path / "artifacts",
    )
    assert not result.succeeded
    error = json.loads((workspace / "reports" / "run.json").read_text())  # run --json
    assert error["error"] == "signing_key_required" and error["exit_code"] == 2
    assert not (workspace / ".evalrun" / "keys").exists()
    junit = etree.parse(str(workspace / "reports" / "junit.xml"))  # the failure is reported
    SCHEMA.assertValid(junit)
    assert junit.find(".//error").get("type") == "signing_key_required"

"""Provenance: who launched a run (user, host, CI identity), why, and preprocessing digests."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import yaml

from runner.errors import SpecError
from runner.build.preprocessing import code_digest, preprocessing_records
from runner.build.provenance import ci_identity, launcher, provenance, rationale
from runner.model.predicate import RunPredicate
from runner.render.markdown import render_markdown
from runner.model.spec import EvalSpec, parse_spec

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "digits" / "eval.yaml"


def _spec(**changes: object) -> EvalSpec:
    data = yaml.safe_load(EXAMPLE.read_text())
    for key, value in changes.items():
        if key.startswith("metadata."):
            data["metadata"][key.split(".", 1)[1]] = value
        else:
            data[key] = value
    return parse_spec(data, source="eval.yaml")


def test_existing_spec_digest_is_unchanged_by_the_new_optional_fields():
    data = yaml.safe_load(EXAMPLE.read_text())
    spec = parse_spec(data, source="eval.yaml")
    explicit = parse_spec(
        {
            **data,
            "preprocessing": [],
            "metrics": [{**m, "role": "primary"} for m in data["metrics"]],
        },
        source="eval.yaml",
    )
    assert explicit.digest() == spec.digest()
    assert b"provenance" not in spec.canonical_json()
    assert b"role" not in spec.canonical_json()


def test_github_actions_identity_names_run_and_job_url():
    env = {
        "GITHUB_ACTIONS": "true",
        "CI": "true",
        "GITHUB_SERVER_URL": "https://github.com",
        "GITHUB_REPOSITORY": "acme/models",
        "GITHUB_RUN_ID": "987",
        "GITHUB_WORKFLOW": "eval",
        "GITHUB_ACTOR": "alice",
        "GITHUB_SHA": "abc",
    }
    ci = ci_identity(env)
    assert ci is not None
    assert ci.system == "github_actions"
    assert ci.run_id == "987"
    assert ci.pipeline == "eval"
    assert ci.actor == "alice"
    assert ci.job_url == "https://github.com/acme/models/actions/runs/987"


@pytest.mark.parametrize(
    ("env", "system", "run_id", "job_url"),
    [
        (
            {
                "GITLAB_CI": "true",
                "CI_PIPELINE_ID": "55",
                "CI_JOB_ID": "7",
                "CI_JOB_URL": "https://gitlab.example/p/-/jobs/7",
            },
            "gitlab_ci",
            "7",
            "https://gitlab.example/p/-/jobs/7",
        ),
        (
            {
                "JENKINS_URL": "https://ci.example/",
                "BUILD_NUMBER": "12",
                "JOB_NAME": "eval",
                "BUILD_URL": "https://ci.example/job/eval/12/",
            },
            "jenkins",
            "12",
            "https://ci.example/job/eval/12/",
        ),
        (
            {
                "BUILDKITE": "true",
                "BUILDKITE_BUILD_NUMBER": "3",
                "BUILDKITE_JOB_ID": "j1",
                "BUILDKITE_BUILD_URL": "https://buildkite.com/acme/eval/builds/3",
            },
            "buildkite",
            "3",
            "https://buildkite.com/acme/eval/builds/3#j1",
        ),
        ({"CI": "true"}, "generic", None, None),
    ],
)
def test_ci_systems_are_recognised(env, system, run_id, job_url):
    ci = ci_identity(env)
    assert ci is not None
    assert (ci.system, ci.run_id, ci.job_url) == (system, run_id, job_url)


def test_no_ci_outside_ci():
    assert ci_identity({"CI": "false", "USER": "bob"}) is None
    who = launcher({"USER": "bob"})
    assert who.user == "bob"
    assert who.ci is None
    assert who.host


def test_cli_reason_wins_and_both_are_recorded():
    r = rationale("release candidate for v2", "re-check after data fix")
    assert r.to_json() == {
        "text": "re-check after data fix",
        "source": "cli",
        "cli": "re-check after data fix",
        "spec": "release candidate for v2",
    }
    assert rationale("from spec", None).source == "spec"
    assert rationale(None, "  ").text is None


def test_preprocessing_code_digest_for_file_and_directory(tmp_path):
    (tmp_path / "prep.py").write_text("x = 1\n")
    pkg = tmp_path / "features"
    pkg.mkdir()
    (pkg / "a.py").write_text("a\n")
    spec = _spec(
        preprocessing=[
            {"name": "scale", "code": "prep.py", "params": {"factor": 16}},
            {"name": "features", "code": "features"},
        ]
    )
    steps = preprocessing_records(spec, tmp_path)
    assert steps[0] == {
        "name": "scale",
        "code": "prep.py",
        "code_digest": "sha256:" + hashlib.sha256(b"x = 1\n").hexdigest(),
        "kind": "file",
        "params": {"factor": 16},
    }
    before = steps[1]["code_digest"]
    assert steps[1]["kind"] == "directory"
    (pkg / "a.py").write_text("b\n")
    assert code_digest(pkg) != before


def test_missing_preprocessing_code_is_a_spec_error(tmp_path):
    spec = _spec(preprocessing=[{"name": "scale", "code": "nope.py"}])
    with pytest.raises(SpecError) as exc:
        preprocessing_records(spec, tmp_path)
    assert "preprocessing[0].code" in exc.value.diagnostics()


@pytest.mark.parametrize("code", ["/etc/passwd", "../outside.py"])
def test_preprocessing_code_must_stay_inside_the_spec_directory(code):
    with pytest.raises(SpecError):
        _spec(preprocessing=[{"name": "scale", "code": code}])


def test_provenance_block_and_report_section():
    spec = _spec(**{"metadata.rationale": "release candidate", "metadata.comparison_group": "g1"})
    prov = provenance(
        spec,
        env={"USER": "carol", "CI": "true", "BUILD_URL": "https://ci.example/1"},
        launched_at="2026-11-26T10:00:00.000+00:00",
        evalrun_version="0.1.0",
        reason=None,
        preprocessing=[],
    )
    assert prov["launched_by"]["user"] == "carol"
    assert prov["launched_by"]["ci"]["job_url"] == "https://ci.example/1"
    assert prov["rationale"]["text"] == "release candidate"
    assert prov["comparison_group"] == "g1"
    md = render_markdown(
        RunPredicate.model_validate({"run_id": "r-prov", "provenance": prov, "metrics": []})
    )
    assert "## Provenance" in md
    assert "launched by: carol" in md
    assert "rationale: release candidate (from spec)" in md
    assert "https://ci.example/1" in md

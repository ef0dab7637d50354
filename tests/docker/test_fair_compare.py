"""Fair comparisons end to end: provenance and metric roles in the bundle, and
`evalrun compare` refusing runs with different preprocessing unless allowed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from conftest import EXAMPLE, predicate_of

pytestmark = pytest.mark.docker

CI_ENV = {
    "USER": "release-bot",
    "CI": "true",
    "GITHUB_ACTIONS": "true",
    "GITHUB_SERVER_URL": "https://github.com",
    "GITHUB_REPOSITORY": "acme/models",
    "GITHUB_RUN_ID": "4242",
    "GITHUB_WORKFLOW": "release-eval",
}


def _changes(factor: int) -> dict:
    example = yaml.safe_load((EXAMPLE / "eval.yaml").read_text())
    metrics = example["metrics"]
    # supplementary with an unreachable threshold: reported as missed, never gating
    metrics[1] = {**metrics[1], "role": "supplementary", "threshold": 0.9999}
    return {
        "metadata": {
            **example["metadata"],
            "comparison_group": "digits-fair",
            "rationale": "release candidate for v2",
        },
        "preprocessing": [{"name": "scale", "code": "app", "params": {"factor": factor}}],
        "metrics": metrics,
    }


def test_bundle_records_who_and_why_and_compare_refuses_other_preprocessing(variant, vcli):
    spec = variant(**_changes(16))
    code, out = vcli.json("run", str(spec), "--reason", "re-check after data fix", env=CI_ENV)
    assert code == 0, out
    bundle = Path(out["bundle"])
    pred = predicate_of(bundle)
    prov = pred["provenance"]
    assert prov["launched_by"]["user"] == "release-bot"
    assert prov["launched_by"]["host"]
    ci = prov["launched_by"]["ci"]
    assert ci["system"] == "github_actions" and ci["run_id"] == "4242"
    assert ci["job_url"] == "https://github.com/acme/models/actions/runs/4242"
    assert prov["rationale"] == {
        "text": "re-check after data fix",
        "source": "cli",
        "cli": "re-check after data fix",
        "spec": "release candidate for v2",
    }
    assert prov["evalrun_version"] == pred["evalrun_version"]
    [step] = pred["preprocessing"]
    assert step["name"] == "scale" and step["code_digest"].startswith("sha256:")
    roles = {m["name"]: (m["role"], m["passed"], m["threshold_met"]) for m in pred["metrics"]}
    assert roles == {
        "accuracy": ("primary", True, True),
        "macro-f1": ("supplementary", None, False),
    }
    report = (bundle / "report.md").read_text()
    assert "| macro-f1 | supplementary |" in report and "missed (not gating)" in report
    assert "re-check after data fix (from cli)" in report

    # same evaluation, other preprocessing parameters: not comparable
    spec.write_text(
        yaml.safe_dump(
            {**yaml.safe_load(spec.read_text()), "preprocessing": _changes(8)["preprocessing"]}
        )
    )
    assert vcli("lock", str(spec)).returncode == 0
    code, second = vcli.json("run", str(spec))
    assert code == 0, second
    refused = vcli("compare", "digits-fair")
    assert refused.returncode == 2, refused.stdout + refused.stderr
    assert "preprocessing" in refused.stderr and "--allow preprocessing" in refused.stderr
    allowed = vcli("compare", "digits-fair", "--allow", "preprocessing", "--format", "json")
    assert allowed.returncode == 0, allowed.stderr
    result = json.loads(allowed.stdout)
    assert [d["field"] for d in result["allowed"]] == ["preprocessing"]
    assert {r["run_id"] for r in result["ranking"]} == {out["run_id"], second["run_id"]}
    assert result["metric"] == "accuracy"


def test_changing_a_groups_primary_metric_needs_a_new_group_version(vcli, variant):
    example = yaml.safe_load((EXAMPLE / "eval.yaml").read_text())
    meta = {**example["metadata"], "comparison_group": "digits-versioned"}
    code, _ = vcli.json("run", str(variant(metadata=meta)))
    assert code == 0
    stricter = [dict(example["metrics"][0], threshold=0.91), example["metrics"][1]]
    spec = variant(metadata=meta, metrics=stricter)
    proc = vcli("run", str(spec))
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "digits-versioned" in proc.stderr and "accuracy" in proc.stderr
    assert "digits-versioned.v2" in proc.stderr
    code, out = vcli.json(
        "run",
        str(
            variant(metadata={**meta, "comparison_group": "digits-versioned.v2"}, metrics=stricter)
        ),
    )
    assert code == 0, out


def test_rerun_replays_the_preprocessing_code_carried_in_the_bundle(vcli, variant, tmp_path):
    spec = variant(**_changes(2))
    code, out = vcli.json("run", str(spec))
    assert code == 0, out
    bundle = Path(out["bundle"])
    assert (bundle / "preprocessing" / "app" / "evaluate.py").is_file()
    # the original checkout is gone: only the bundle and the inputs remain
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    for rel in ("model/weights.json", "data/digits_test.jsonl"):
        (inputs / Path(rel).name).write_bytes((spec.parent / rel).read_bytes())
    code, again = vcli.json("rerun", out["run_id"], "--inputs", str(inputs))
    assert code == 0, again
    assert again["verdict"] == "identical"

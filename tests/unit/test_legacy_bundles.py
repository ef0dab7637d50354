"""Bundles written by an older evalrun (db9e3c9, before typed predicates) still read.

The fixtures under ``fixtures/legacy/bundles`` were sealed by that evalrun with the
in-process backend (see ``fixtures/legacy/make_bundles.py``). Every consumer reads
them through the one reader, and today's builders, given the same run, sign the same
bytes.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
from inprocess_backend import BUNDLE_NAMES, BUNDLES, PUBLIC_KEY, SOURCE, run_sequence

from runner.bundle.index import History
from runner.bundle.run_records import RunFilter
from runner.bundle.reader import open_bundle, read_predicate
from runner.bundle.signing import load_verifier
from runner.bundle.store import Store
from runner.bundle.verify import verify_bundle
from runner.cli.main import main
from runner.model.outcome import Outcome
from runner.model.predicate import (
    SELF_ASSERTED,
    AuditPredicate,
    RunPredicate,
    RunSetPredicate,
    parse_predicate,
)
from runner.render.html import render_html
from runner.render.run_report import load_report_data, render_markdown_full
from runner.render.markdown import render_markdown
from runner.workflows.audit import render_audit_markdown
from runner.workflows.diff import diff_runs
from runner.workflows.runset import render_run_set

pytestmark = pytest.mark.unit

KINDS = {
    "run-infrastructure-failure": RunPredicate,
    "run": RunPredicate,
    "rerun": RunPredicate,
    "run-set": RunSetPredicate,
    "audit": AuditPredicate,
}


def raw_predicate(name: str) -> dict:
    return json.loads((BUNDLES / name / "statement.json").read_text())["predicate"]


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An evalrun home whose store holds every legacy bundle and trusts the fixture key."""
    home = tmp_path / "home"
    monkeypatch.setenv("EVALRUN_HOME", str(home))
    (home / "keys").mkdir(parents=True)
    shutil.copy(PUBLIC_KEY, home / "keys" / "evalrun.pub")
    store = Store(home)
    for name in BUNDLE_NAMES:
        with store.staging_dir() as stage:
            shutil.copytree(BUNDLES / name, stage / "bundle")
            store.put(stage / "bundle")
    return home


@pytest.mark.parametrize("name", BUNDLE_NAMES)
def test_legacy_bundle_verifies_and_reads_into_its_model(name: str) -> None:
    verified = verify_bundle(BUNDLES / name, load_verifier(PUBLIC_KEY))
    predicate = read_predicate(BUNDLES / name)
    assert type(predicate) is KINDS[name]
    assert predicate.run_id == verified.run_id
    # nothing the old evalrun signed is lost or changed by the model
    assert predicate.to_json() == raw_predicate(name)


def test_legacy_run_predicate_fields_are_typed() -> None:
    run = read_predicate(BUNDLES / "run")
    assert isinstance(run, RunPredicate)
    assert run.outcome is Outcome.PASSED and run.exit_code == 0
    assert [m.name for m in run.metrics] == ["accuracy", "macro-f1", "error-rate", "mean-score"]
    accuracy = run.metric("accuracy")
    assert accuracy is not None and accuracy.ci is not None and accuracy.ci.level == 0.95
    assert run.provenance.launched_by.user == "fixture-user"
    assert run.env.at("os.PRETTY_NAME") == "Debian GNU/Linux 12 (bookworm)"
    failed = read_predicate(BUNDLES / "run-infrastructure-failure")
    assert isinstance(failed, RunPredicate)
    assert failed.outcome is Outcome.INFRASTRUCTURE_FAILURE and failed.exit_code == 5
    assert failed.metrics == () and failed.sandbox.runtime_used is None
    rerun = read_predicate(BUNDLES / "rerun")
    assert isinstance(rerun, RunPredicate) and rerun.reproduction_of is not None
    assert rerun.reproduction_of.run_id == run.run_id
    assert rerun.reproduction is not None and rerun.reproduction.verdict == "identical"


@pytest.mark.parametrize("name", ["run", "rerun", "run-infrastructure-failure"])
def test_markdown_report_of_a_legacy_run_is_the_one_it_was_sealed_with(name: str) -> None:
    predicate = read_predicate(BUNDLES / name)
    assert isinstance(predicate, RunPredicate)
    assert render_markdown(predicate) == (BUNDLES / name / "report.md").read_text()


def test_run_set_and_audit_reports_are_the_ones_they_were_sealed_with() -> None:
    run_set = read_predicate(BUNDLES / "run-set")
    assert isinstance(run_set, RunSetPredicate)
    assert render_run_set(run_set) == (BUNDLES / "run-set" / "report.md").read_text()
    audit = read_predicate(BUNDLES / "audit")
    assert isinstance(audit, AuditPredicate)
    assert render_audit_markdown(audit) == (BUNDLES / "audit" / "report.md").read_text()


@pytest.mark.parametrize("name", ["run", "rerun", "run-infrastructure-failure"])
def test_html_and_full_markdown_reports_of_legacy_runs(name: str) -> None:
    data = load_report_data(open_bundle(BUNDLES / name, load_verifier(PUBLIC_KEY)))
    assert data.verification.startswith("valid: signed by keyid")
    page = render_html(data)
    assert data.predicate.run_id in page and "<script" not in page
    assert render_html(data) == page  # deterministic
    assert f"# evalrun report — legacy-digits — {data.predicate.run_id}" in (
        render_markdown_full(data)
    )


def test_legacy_run_diffed_against_itself_and_its_rerun() -> None:
    run, rerun = read_predicate(BUNDLES / "run"), read_predicate(BUNDLES / "rerun")
    assert isinstance(run, RunPredicate) and isinstance(rerun, RunPredicate)
    same = diff_runs(run, run)
    assert same.changes == () and {m.verdict for m in same.metrics} == {"identical"}
    moved = diff_runs(run, rerun)
    assert [c.field for c in moved.changes] == []  # same lineage, another attempt
    assert len(moved.metrics) == 4


def test_legacy_bundles_are_indexed(home: Path) -> None:
    records = {r.run_id: r for r in History(Store(home)).query(RunFilter(kind=None))}
    by_kind = {name: raw_predicate(name)["run_id"] for name in BUNDLE_NAMES}
    run = records[by_kind["run"]]
    assert run.kind == "run" and run.outcome == "passed" and run.attempt == 1
    assert run.spec_name == "legacy-digits" and run.seed == 1234
    assert [m.name for m in run.metrics] == ["accuracy", "macro-f1", "error-rate", "mean-score"]
    assert run.datasets == (
        ("digits-tiny", "363ea79cdea9ba55d4c1efee698cb8a2a70a09a6906963891b81960b66817b62", "test"),
    )
    rerun = records[by_kind["rerun"]]
    assert rerun.reproduction_of == run.run_id and rerun.reproduction_verdict == "identical"
    assert records[by_kind["run-set"]].kind == "run_set"
    assert records[by_kind["run-set"]].spec_name == "legacy-digits-seeds"
    audit = records[by_kind["audit"]]
    assert audit.kind == "audit" and audit.outcome == "reproduced" and audit.exit_code == 0
    assert records[by_kind["run-infrastructure-failure"]].exit_code == 5


@pytest.mark.parametrize("name", BUNDLE_NAMES)
def test_cli_reports_and_shows_legacy_bundles(home: Path, name: str, capsys) -> None:
    run_id = raw_predicate(name)["run_id"]
    out = home / f"{name}.html"
    assert main(["report", run_id, "-o", str(out)]) == 0
    assert run_id in out.read_text()
    capsys.readouterr()
    assert main(["runs", "show", run_id]) == 0
    assert "verification: valid" in capsys.readouterr().out
    assert main(["runs", "show", run_id, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["predicate"] == raw_predicate(name)


def test_cli_diff_of_legacy_run_and_rerun(home: Path, capsys) -> None:
    a, b = raw_predicate("run")["run_id"], raw_predicate("rerun")["run_id"]
    assert main(["diff", a, b, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [m["verdict"] for m in out["metrics"]] == ["identical"] * 4


def _as_legacy(predicate: dict, digests: dict[str, str]) -> dict:
    """Today's predicate in the legacy evalrun's terms: the fields added since taken out
    (the sandbox's network is now observed, the spec's kept as ``network_requested``; the
    self-asserted launcher is marked and bound to the signing key) and the digests of
    today's bundles (which hold those fields) replaced by the legacy ones."""
    data = json.loads(json.dumps(predicate))
    sandbox = data.get("sandbox")
    if isinstance(sandbox, dict) and "network_requested" in sandbox:
        sandbox["network"] = sandbox.pop("network_requested")  # legacy copied the spec's
    launched_by = data.get("provenance", {}).get("launched_by", {})
    assert launched_by.pop("evidence", SELF_ASSERTED) == SELF_ASSERTED
    launched_by.pop("signer_keyid", None)
    text = json.dumps(data)
    for today, legacy in digests.items():
        text = text.replace(today, legacy)
    return json.loads(text)


def test_todays_builders_sign_what_the_legacy_evalrun_signed(tmp_path: Path) -> None:
    source = tmp_path / "elsewhere" / "source"
    shutil.copytree(SOURCE, source)
    made = run_sequence(source, tmp_path / "home")
    names = ("run-infrastructure-failure", "run", "rerun", "audit")
    digests = {
        hashlib.sha256((made[n] / "statement.json").read_bytes()).hexdigest(): hashlib.sha256(
            (BUNDLES / n / "statement.json").read_bytes()
        ).hexdigest()
        for n in names
    }
    # the audit's id and its re-run derive from bundle digests too
    today_audit = json.loads((made["audit"] / "statement.json").read_text())["predicate"]
    legacy_audit = raw_predicate("audit")
    digests[today_audit["run_id"]] = legacy_audit["run_id"]
    for mine, theirs in zip(today_audit["runs"], legacy_audit["runs"], strict=True):
        for key in ("rerun_bundle", "rerun_id"):
            if mine.get(key):
                digests[mine[key]] = theirs[key]
    for name in names:
        # the same facts as then, plus the fields added since (and so other digests)
        today = json.loads((made[name] / "statement.json").read_text())["predicate"]
        assert _as_legacy(today, digests) == raw_predicate(name), name
        if name.startswith("run"):
            launched_by = today["provenance"]["launched_by"]
            assert launched_by["evidence"] == SELF_ASSERTED
            assert launched_by["signer_keyid"] == verify_bundle(
                made[name], load_verifier(PUBLIC_KEY)
            ).keyid
        # the report renders those facts exactly as the legacy evalrun did
        parsed = parse_predicate(_as_legacy(today, digests))
        rendered = (
            render_audit_markdown(parsed)
            if isinstance(parsed, AuditPredicate)
            else render_markdown(parsed)  # type: ignore[arg-type]
        )
        assert rendered == (BUNDLES / name / "report.md").read_text(), name
    # a run set's member runs are derived into specs with absolute input paths (sweep
    # cells), so their ids and digests depend on where the source lies; the rest is equal
    made_set = json.loads((made["run-set"] / "statement.json").read_text())["predicate"]
    legacy_set = raw_predicate("run-set")
    for predicate in (made_set, legacy_set):
        for member in predicate["members"]:
            member.pop("run_id")
            member.pop("bundle_digest")
    assert made_set == legacy_set

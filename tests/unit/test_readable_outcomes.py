"""Readable outcomes (issue 19, item 3): each failure says what it is, the stderr tail
shows intact, a wrong ``EVALRUN_DATA_*`` name gets a hint naming the real ones."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from inprocess_backend import BUNDLES, KEY, SOURCE, InProcessBackend, pinned_world

from runner._internal.settings import Settings
from runner.agent.hints import missing_input_hint
from runner.bundle.reader import read_predicate
from runner.bundle.signing import load_signer
from runner.model.outcome import Outcome
from runner.model.plan import BackendResult, RunPlan
from runner.model.predicate import RunPredicate
from runner.render.markdown import render_markdown, stderr_markdown
from runner.render.step_summary import run_summary, verdict_text
from runner.workflows.run import run_evaluation

pytestmark = pytest.mark.unit

TRACEBACK = (
    "Traceback (most recent call last):\n"
    '  File "/work/evaluate.py", line 9, in <module>\n'
    '    data = open(os.environ["EVALRUN_DATA_TEST"])\n'
    "  File \"<frozen os>\", line 714, in __getitem__\n"
    "KeyError: 'EVALRUN_DATA_TEST'\n"
)


def test_each_failure_has_its_own_verdict():
    texts = {
        o: verdict_text(o.exit_code, o.value, plain=True)
        for o in (
            Outcome.EVALUATION_FAILED,
            Outcome.TIMEOUT,
            Outcome.BAD_OUTPUT,
            Outcome.THRESHOLDS_FAILED,
        )
    }
    assert len(set(texts.values())) == 4
    assert "crashed" in texts[Outcome.EVALUATION_FAILED]
    assert "timed out" in texts[Outcome.TIMEOUT]
    assert "bad output" in texts[Outcome.BAD_OUTPUT]
    assert "thresholds" in texts[Outcome.THRESHOLDS_FAILED]
    assert all("thresholds" not in t for o, t in texts.items() if o is not Outcome.THRESHOLDS_FAILED)
    partial = verdict_text(6, "bad_output", plain=True, partial=True)
    assert "only some metrics could be computed" in partial
    # what is not a known outcome (a sweep's, an odd bundle's) falls back to the exit code
    assert verdict_text(6, "see the cells", plain=True).startswith("FAIL")
    assert verdict_text(5, "infrastructure_failure", plain=True).startswith("NOT EVALUATED")
    assert verdict_text(0, "passed", plain=True).startswith("PASS")


def test_hint_names_the_inputs_the_container_had(tmp_path: Path):
    env = {"EVALRUN_DATA_DIGITS_TEST": "/inputs/d", "EVALRUN_MODEL": "/inputs/m"}
    hint = missing_input_hint(
        stderr=TRACEBACK, command=["python", "x.py"], env=env, datasets={"digits-test": "/d"}
    )
    assert hint is not None
    assert "EVALRUN_DATA_TEST" in hint and "EVALRUN_DATA_DIGITS_TEST (input 'digits-test')" in hint
    # a name the script reads is found even when stderr does not name it
    script = tmp_path / "evaluate.py"
    script.write_text('path = os.environ.get("EVALRUN_DATA_VALIDATION")\n')
    hint = missing_input_hint(
        stderr="TypeError: expected str, not NoneType", command=["python", "evaluate.py"],
        env=env, datasets={"digits-test": "/d"}, cwd=tmp_path,
    )
    assert hint is not None and "EVALRUN_DATA_VALIDATION" in hint
    # names that exist, or none at all: no hint
    assert missing_input_hint(
        stderr="KeyError: 'EVALRUN_DATA_DIGITS_TEST'", command=["python", "evaluate.py"],
        env={**env, "EVALRUN_DATA_VALIDATION": "/v"}, datasets={}, cwd=tmp_path,
    ) is None
    # a directory, a fifo, a huge file named on the command line are not read
    assert missing_input_hint(
        stderr="", command=[str(tmp_path), "/dev/zero"], env=env, datasets={}
    ) is None


def test_stderr_fence_cannot_be_closed_by_the_text():
    predicate = RunPredicate(run_id="r-x", stderr_tail=("```", "````  <b>x</b>", "\tindented"))
    lines = stderr_markdown(predicate)
    fence = lines[3].removesuffix("text")
    assert fence == "`````" and lines[-1] == fence
    assert lines[4:-1] == ["```", "````  <b>x</b>", "    indented"]
    assert stderr_markdown(RunPredicate(run_id="r-x")) == []


class CrashingBackend(InProcessBackend):
    """The in-process agent, but the evaluation crashes reading a wrong input name."""

    def run(self, plan: RunPlan, results_dir: Path, **kwargs: Any) -> BackendResult:
        result = super().run(plan, results_dir, **kwargs)
        (results_dir / "metrics.json").unlink()
        (results_dir / "predictions.jsonl").unlink()
        (results_dir / "logs" / "evaluation.stderr").write_text(TRACEBACK)
        summary = json.loads((results_dir / "summary.json").read_text())
        summary.update(
            outcome="evaluation_failed",
            reason="evaluation command exited 1",
            hint="hint: the evaluation refers to EVALRUN_DATA_TEST, which this container "
            "did not have; it had EVALRUN_DATA_DIGITS_TINY (input 'digits-tiny')",
        )
        (results_dir / "summary.json").write_text(json.dumps(summary))
        return result.model_copy(update={"exit_code": 3})


def test_a_crash_says_so_with_its_stderr_intact_everywhere(tmp_path: Path, capsys):
    source = tmp_path / "source"
    shutil.copytree(SOURCE, source)
    home = tmp_path / "home"
    settings = Settings(home=home, cache=home / "cache", registry="127.0.0.1:5000")
    with pinned_world():
        ran = run_evaluation(source / "eval.yaml", CrashingBackend(), load_signer(KEY), settings)
    p = ran.predicate
    assert p.outcome is Outcome.EVALUATION_FAILED
    assert p.reason is not None
    assert p.reason.startswith("evaluation command exited 1: KeyError: 'EVALRUN_DATA_TEST'")
    assert "it had EVALRUN_DATA_DIGITS_TINY" in p.reason
    assert p.stderr_tail == tuple(TRACEBACK.rstrip().splitlines())
    report = (ran.bundle.path / "report.md").read_text()
    assert "## Evaluation stderr (last 5 lines)" in report
    assert '    data = open(os.environ["EVALRUN_DATA_TEST"])' in report.splitlines()
    summary = run_summary(p, exit_code=6, bundle="b", digest="d", verified="valid")
    assert "crashed" in summary and "  File \"/work/evaluate.py\", line 9, in <module>" in summary
    assert "did not meet its thresholds" not in summary
    from runner.render.junit import run_suite

    (case,) = run_suite(p).cases
    assert case.problem is not None and case.problem.type == "evaluation_failed"
    assert "KeyError: 'EVALRUN_DATA_TEST'" in case.problem.message
    assert '  File "/work/evaluate.py", line 9, in <module>' in case.problem.text.splitlines()


def test_reports_of_runs_without_a_tail_are_unchanged():
    # a run sealed before stderr tails existed renders byte for byte as it was sealed
    predicate = read_predicate(BUNDLES / "run")
    assert isinstance(predicate, RunPredicate) and predicate.stderr_tail is None
    assert render_markdown(predicate) == (BUNDLES / "run" / "report.md").read_text()


def test_the_real_agent_hints_at_a_wrong_input_name(tmp_path: Path, monkeypatch):
    import runner.agent.__main__ as agent
    from runner.workflows.judge import judge, read_container_report

    root = "sha256:" + "b" * 64
    monkeypatch.setattr(agent, "rootfs_digest", lambda _: (root, 1))
    # the full check runs in the agent's usage module (no digest table here)
    monkeypatch.setattr("runner.agent.usage.rootfs_digest", lambda _: (root, 1))
    monkeypatch.setattr(agent, "capture_environment", lambda _: {"gpu": {"visible": False}})
    script = tmp_path / "evaluate.py"
    script.write_text("import os\nprint('loading', file=__import__('sys').stderr)\n"
                      "open(os.environ['EVALRUN_DATA_TEST'])\n")
    import sys

    plan = RunPlan(
        run_id="r-1", attempt=0, image_ref="127.0.0.1:5000/evalrun/x@sha256:" + "a" * 64,
        expected_rootfs_digest=root, runtime="runc", command=[sys.executable, str(script)],
        params={}, seed=7, metrics=[], expect={}, inputs=[], timeout_s=60, cpus=1.0,
        memory_mib=256, pids=64, spec_digest="sha256:" + "c" * 64,
        lock_digest="sha256:" + "d" * 64, spec_name="x",
    )
    results = tmp_path / "results"
    results.mkdir()
    code = agent.run_plan(plan.agent_plan(), results)
    result = BackendResult(backend="t", exit_code=int(code), image_digest_confirmed=True,
                           runtime="runc")
    judged = judge(plan, result, [], read_container_report(results))
    assert judged is not None and judged.outcome is Outcome.EVALUATION_FAILED
    assert judged.reason is not None
    assert judged.reason.startswith(
        "evaluation command exited 1: KeyError: 'EVALRUN_DATA_TEST'; hint: the evaluation "
        "refers to EVALRUN_DATA_TEST, which this container did not have; it had no "
        "EVALRUN_DATA_* variable at all"
    )
    assert judged.stderr_tail[0] == "loading"
    assert judged.stderr_tail[1] == "Traceback (most recent call last):"
    assert judged.stderr_tail[-1] == "KeyError: 'EVALRUN_DATA_TEST'"


def test_an_agent_that_read_another_plan_than_was_sent_is_an_integrity_failure(
    tmp_path: Path, monkeypatch
):
    """The agent reports the sha256 of the plan bytes it read; the backend says what it
    handed over. A plan changed on its way (a ConfigMap replaced, a pod's annotation
    patched before the agent started) fails the run (exit 3), whatever the metrics."""
    import hashlib
    import sys

    import runner.agent.__main__ as agent
    from runner.shared.agent_plan import encode_agent_plan
    from runner.workflows.judge import judge, read_container_report

    root = "sha256:" + "b" * 64
    monkeypatch.setattr(agent, "rootfs_digest", lambda _: (root, 1))
    monkeypatch.setattr("runner.agent.usage.rootfs_digest", lambda _: (root, 1))
    monkeypatch.setattr(agent, "capture_environment", lambda _: {"gpu": {"visible": False}})
    plan = RunPlan(
        run_id="r-1", attempt=0, image_ref="127.0.0.1:5000/evalrun/x@sha256:" + "a" * 64,
        expected_rootfs_digest=root, runtime="runc", command=[sys.executable, "-c", "pass"],
        params={}, seed=7, metrics=[], expect={}, inputs=[], timeout_s=60, cpus=1.0,
        memory_mib=256, pids=64, spec_digest="sha256:" + "c" * 64,
        lock_digest="sha256:" + "d" * 64, spec_name="x",
    )
    sent = encode_agent_plan(plan.agent_plan())
    swapped = encode_agent_plan({**plan.agent_plan(), "seed": 8})
    verdicts = {}
    for name, handed in (("same", sent), ("swapped", swapped)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "plan.json").write_bytes(handed)
        results = tmp_path / name / "results"
        results.mkdir()
        code = agent.run(tmp_path / name / "plan.json", results)
        report = read_container_report(results)
        assert report.summary["plan_sha256"] == hashlib.sha256(handed).hexdigest()
        result = BackendResult(backend="t", exit_code=int(code), image_digest_confirmed=True,
                               runtime="runc",
                               details={"plan_sha256": hashlib.sha256(sent).hexdigest()})
        verdicts[name] = judge(plan, result, [], report)
    # the same plan: nothing to object to (the evaluation wrote no metrics: those decide)
    assert verdicts["same"] is None or verdicts["same"].outcome is not Outcome.INTEGRITY_FAILURE
    swapped_verdict = verdicts["swapped"]
    assert swapped_verdict is not None
    assert swapped_verdict.outcome is Outcome.INTEGRITY_FAILURE
    assert "ran another plan than the one evalrun sent" in (swapped_verdict.reason or "")

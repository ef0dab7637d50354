"""Live output on the Docker backend: the evaluation's lines reach the terminal and the
JSON-lines log while it runs, and the agent still keeps them in its signed files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.docker


def test_the_evaluations_output_streams_live_to_terminal_and_log(vcli, variant):
    spec = variant(params={"sleep_s": 2})
    proc = vcli("run", str(spec))  # human output: progress and live lines on stderr
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "\u2502 evaluate.py: scored" in proc.stderr
    bundle = Path(next(line.split()[-1] for line in proc.stdout.splitlines()
                       if line.startswith("bundle")))
    kept = (bundle / "results" / "logs" / "evaluation.stderr").read_text()
    assert "evaluate.py: scored" in kept

    logged = vcli("run", str(spec), "--rerun", "--json", "--log-json")
    assert logged.returncode == 0, logged.stderr
    records = [json.loads(x) for x in logged.stderr.splitlines() if x.startswith("{")]
    live = [r for r in records if r.get("event") == "evaluation_output"]
    scored = [r for r in live if r["line"].startswith("evaluate.py: scored")]
    assert scored and scored[0]["stream"] == "stderr"
    assert {r["run_id"] for r in live} == {json.loads(logged.stdout)["run_id"]}
    # it arrived while the container ran, before the runner collected the results
    collected = next(r["ts"] for r in records if r.get("event") == "results_collected")
    assert scored[0]["ts"] < collected

"""Issue 19 on the embedded default: readable outcomes, the backend in a run's identity,
and a lock that reuses an image built from the same inputs."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.docker

KUBECONFIG = """\
apiVersion: v1
kind: Config
clusters:
- name: nowhere
  cluster: {server: "https://127.0.0.1:9"}
contexts:
- name: nowhere
  context: {cluster: nowhere, user: nobody, namespace: evals}
current-context: nowhere
users:
- name: nobody
  user: {token: not-a-token}
"""


def test_another_backend_is_a_new_run_and_runs_ls_shows_the_backend(vcli, variant, tmp_path):
    spec = str(variant())
    code, docker_run = vcli.json("run", spec)
    assert code == 0, docker_run
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(KUBECONFIG)
    code, k8s_run = vcli.json("run", spec, "--backend", "kubernetes", "--kubeconfig", str(kubeconfig))
    # never the docker run handed back: a run of its own, on a cluster that is not there
    assert not k8s_run["reused"] and k8s_run["run_id"] != docker_run["run_id"], k8s_run
    assert k8s_run["outcome"] != "passed" and code != 0
    predicate = json.loads((Path(k8s_run["bundle"]) / "statement.json").read_text())["predicate"]
    assert predicate["backend"] == "kubernetes"
    assert predicate["backend_target"] == "kubernetes https://127.0.0.1:9 namespace evals"
    # the docker run is still the docker run
    code, again = vcli.json("run", spec)
    assert code == 0 and again["reused"] and again["run_id"] == docker_run["run_id"]
    table = vcli("runs", "ls").stdout.splitlines()
    assert table[0].split()[:6] == ["run", "id", "spec", "backend", "outcome", "started"]
    rows = {line.split()[0]: line.split() for line in table[2:]}
    assert rows[docker_run["run_id"]][2:4] == ["docker", "passed"]
    assert rows[k8s_run["run_id"]][2:4] == ["kubernetes", k8s_run["outcome"]]


def test_a_crash_says_so_with_its_stderr_and_the_inputs_it_had(vcli, variant):
    spec = variant(command=["python3", "-c", "import os\nopen(os.environ['EVALRUN_DATA_TEST'])"])
    proc = vcli("run", str(spec))
    assert proc.returncode == 6, proc.stderr
    out = proc.stdout
    assert "outcome  evaluation_failed — evaluation command exited 1: KeyError: 'EVALRUN_DATA_TEST'" in out
    assert "it had EVALRUN_DATA_DIGITS_TEST (input 'digits-test')" in out
    assert "the evaluation's stderr (last" in out
    assert "│ Traceback (most recent call last):" in out
    assert "│ KeyError: 'EVALRUN_DATA_TEST'" in out
    assert "verdict  FAIL: the evaluation crashed" in out and "thresholds" not in out
    code, summary = vcli.json("run", str(spec))
    report = (Path(summary["bundle"]) / "report.md").read_text()
    assert "## Evaluation stderr" in report and "KeyError: 'EVALRUN_DATA_TEST'" in report


def test_a_lock_with_unchanged_image_inputs_reuses_the_image(cli, locked_example, tmp_path):
    original = json.loads((locked_example / "eval.lock.json").read_text())["image"]["ref"]
    # a fresh copy: no previous lock to take the image from
    fresh = tmp_path / "fresh"
    shutil.copytree(locked_example, fresh, ignore=shutil.ignore_patterns("eval.lock.json"))
    times = []
    for _ in range(2):
        t0 = time.monotonic()
        code, out = cli.json("lock", str(fresh / "eval.yaml"))
        times.append((out.get("seconds"), round(time.monotonic() - t0, 2)))
        assert code == 0 and out["built"] is False, out
        assert out["image"] == original
    print(f"lock twice, (in-command s, wall s): {times}")
    assert all(seconds < 5 for seconds, _ in times)

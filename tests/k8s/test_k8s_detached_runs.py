"""Long runs under CI control on the real cluster: run --detach, status, logs, wait, cancel.

- detach returns once the Job is accepted; status says where the run is; logs shows the
  evaluation's output live and, once sealed, from the bundle; wait collects, seals and
  exits with the code the blocking run would have returned (0 passed, 6 thresholds);
  a repeated wait returns the same bundle.
- two concurrent waits on one run: exactly one seals, both return the same bundle.
- wait --timeout gives up with exit 124 and seals nothing.
- cancel deletes the Job and seals a signed `cancelled` bundle that `evalrun verify`
  accepts; a repeated cancel and a later wait return that same bundle; a wait following
  the run when it is cancelled seals it `cancelled` itself.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from kubernetes import client

pytestmark = pytest.mark.k8s

ROOT = Path(__file__).resolve().parents[2]
EVALRUN = [sys.executable, "-m", "runner.cli"]
RESTRICTED = [{"pod-security": "restricted", "default-deny": True}]


def _env(home: Path) -> dict[str, str]:
    env = {**os.environ, "EVALRUN_HOME": str(home), "PYTHONPATH": str(ROOT)}
    if not (home / "keys" / "evalrun.key").exists():
        # evalrun never creates a signing key without a terminal: make this store's key first
        made = subprocess.run(
            [*EVALRUN, "keys", "generate"], capture_output=True, text=True, env=env, cwd=ROOT
        )
        assert made.returncode == 0, made.stderr
    return env


def _evalrun(home: Path, *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*EVALRUN, *args],
        capture_output=True,
        text=True,
        env=_env(home),
        cwd=ROOT,
        timeout=timeout,
        check=False,
    )


def _spawn(home: Path, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [*EVALRUN, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(home),
        cwd=ROOT,
    )


@pytest.fixture(scope="module")
def locked_digits(cluster, tmp_path_factory) -> Path:
    """examples/digits locked once (image built and pushed to the cluster's registry)."""
    subprocess.run(["bash", str(ROOT / "scripts" / "host-up.sh")], check=True, capture_output=True)
    dest = tmp_path_factory.mktemp("detach") / "digits"
    import shutil

    shutil.copytree(
        ROOT / "examples" / "digits", dest, ignore=shutil.ignore_patterns("eval.lock.json")
    )
    spec = yaml.safe_load((dest / "eval.yaml").read_text())
    spec["image"]["template"] = str(ROOT / "images" / "python-eval.Dockerfile.j2")
    (dest / "eval.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    proc = _evalrun(tmp_path_factory.mktemp("home"), "lock", str(dest / "eval.yaml"))
    assert proc.returncode == 0, proc.stderr
    return dest


def _variant(base: Path, tmp: Path, name: str, **changes) -> Path:
    """The locked example with ``changes`` (its image by digest), locked again."""
    import shutil

    dest = tmp / name
    shutil.copytree(base, dest, ignore=shutil.ignore_patterns("eval.lock.json"))
    ref = json.loads((base / "eval.lock.json").read_text())["image"]["ref"]
    spec = yaml.safe_load((dest / "eval.yaml").read_text())
    spec["image"] = {"ref": ref}
    for key, value in changes.items():
        if key == "threshold":
            spec["metrics"][0]["threshold"] = value
        else:
            spec[key] = value
    (dest / "eval.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    proc = _evalrun(tmp / "lock-home", "lock", str(dest / "eval.yaml"))
    assert proc.returncode == 0, proc.stderr
    return dest / "eval.yaml"


def _cluster_args(cluster, namespace: str) -> list[str]:
    return ["--kubeconfig", str(cluster.kubeconfig), "-n", namespace]


def _batch(cluster) -> client.BatchV1Api:
    from kubernetes import config

    cfg = client.Configuration()
    config.load_kube_config(config_file=str(cluster.kubeconfig), client_configuration=cfg)
    return client.BatchV1Api(client.ApiClient(cfg))


def _detach(cluster, namespace: str, home: Path, spec: Path) -> str:
    t0 = time.monotonic()
    proc = _evalrun(
        home,
        "run",
        str(spec),
        "--backend",
        "kubernetes",
        "--detach",
        *_cluster_args(cluster, namespace),
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    run_id = proc.stdout.strip()
    assert run_id.startswith("r-") and len(run_id) == 26, proc.stdout
    # it returned once the Job was accepted, long before the evaluation could end
    assert time.monotonic() - t0 < 120
    return run_id


def _status(home: Path, run_id: str) -> dict:
    proc = _evalrun(home, "status", run_id, "--json")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads(proc.stdout)


@pytest.mark.parametrize("namespace", RESTRICTED, indirect=True)
def test_detach_status_logs_wait_seals_with_the_runs_exit_code(
    cluster, namespace, locked_digits, tmp_path
):
    spec = _variant(locked_digits, tmp_path, "slow", params={"sleep_s": 20})
    home = tmp_path / "home"
    run_id = _detach(cluster, namespace, home, spec)
    # detach again: the same run, no second Job
    again = _evalrun(
        home,
        "--json",
        "run",
        str(spec),
        "--backend",
        "kubernetes",
        "--detach",
        *_cluster_args(cluster, namespace),
    )
    assert again.returncode == 0 and json.loads(again.stdout)["state"] == "already submitted"
    assert len(_batch(cluster).list_namespaced_job(namespace).items) == 1

    status = _status(home, run_id)
    assert status["state"] in ("submitted", "pending", "running"), status
    assert status["kubernetes"]["job"] == f"evalrun-{run_id}"

    # live logs, followed until the evaluation ends (the agent's protocol lines hidden)
    live = _evalrun(home, "logs", run_id, "-f", timeout=300)
    assert live.returncode == 0, live.stderr
    assert "EVALRUN RESULTS" not in live.stdout

    waited = _evalrun(home, "--json", "wait", run_id, timeout=600)
    assert waited.returncode == 0, waited.stdout + waited.stderr
    out = json.loads(waited.stdout)
    assert out["run_id"] == run_id and out["outcome"] == "passed" and out["reused"] is False
    assert out["verified"].startswith("valid")
    pred = json.loads((Path(out["bundle"]) / "statement.json").read_text())["predicate"]
    assert pred["backend"] == "kubernetes" and pred["sandbox"]["runtime_used"] == "gvisor"

    # idempotent: the same bundle again, and status says sealed
    twice = _evalrun(home, "wait", run_id, "--json")
    assert twice.returncode == 0
    assert json.loads(twice.stdout)["bundle_digest"] == out["bundle_digest"]
    assert _status(home, run_id)["state"] == "sealed"
    # logs of a finished run: the evaluation's own output, from the verified bundle
    from_bundle = _evalrun(home, "logs", run_id, "--json")
    assert from_bundle.returncode == 0, from_bundle.stderr
    logs = json.loads(from_bundle.stdout)
    assert logs["source"] == "bundle" and logs["verified"].startswith("valid")
    stdout = (Path(out["bundle"]) / "results" / "logs" / "evaluation.stdout").read_text()
    assert logs["stdout"] == stdout


@pytest.mark.parametrize("namespace", RESTRICTED, indirect=True)
def test_wait_exits_like_the_blocking_run_on_missed_thresholds(
    cluster, namespace, locked_digits, tmp_path
):
    spec = _variant(locked_digits, tmp_path, "strict", threshold=0.999)
    home = tmp_path / "home"
    run_id = _detach(cluster, namespace, home, spec)
    waited = _evalrun(home, "--json", "wait", run_id)
    assert waited.returncode == 6, waited.stdout + waited.stderr
    assert json.loads(waited.stdout)["outcome"] == "thresholds_failed"
    # the blocking run of the same locked spec (another store) says the same
    blocking = _evalrun(
        tmp_path / "home2",
        "--json",
        "run",
        str(spec),
        "--backend",
        "kubernetes",
        *_cluster_args(cluster, namespace),
    )
    assert blocking.returncode == 6, blocking.stdout + blocking.stderr
    assert json.loads(blocking.stdout)["outcome"] == "thresholds_failed"


@pytest.mark.parametrize("namespace", RESTRICTED, indirect=True)
def test_two_concurrent_waits_one_seals_both_return_the_same_bundle(
    cluster, namespace, locked_digits, tmp_path
):
    spec = _variant(locked_digits, tmp_path, "pair", params={"sleep_s": 10})
    home = tmp_path / "home"
    run_id = _detach(cluster, namespace, home, spec)
    waits = [_spawn(home, "--json", "--log-json", "wait", run_id) for _ in range(2)]
    results = [(w.wait(timeout=600), *w.communicate()) for w in waits]
    outs = [json.loads(stdout) for _, stdout, _ in results]
    assert [code for code, _, _ in results] == [0, 0], results
    assert outs[0]["bundle_digest"] == outs[1]["bundle_digest"]
    assert sorted(o["reused"] for o in outs) == [False, True]  # exactly one sealed
    # one sealing in the structured logs of the two
    sealed = [
        line
        for _, _, stderr in results
        for line in stderr.splitlines()
        if '"event": "run_end"' in line or '"event":"run_end"' in line
    ]
    assert len(sealed) == 1, sealed


@pytest.mark.parametrize("namespace", RESTRICTED, indirect=True)
def test_cancel_deletes_the_job_and_seals_a_verifiable_cancelled_bundle(
    cluster, namespace, locked_digits, tmp_path
):
    spec = _variant(locked_digits, tmp_path, "cancel", params={"sleep_s": 120})
    home = tmp_path / "home"
    run_id = _detach(cluster, namespace, home, spec)
    batch = _batch(cluster)
    # a wait that gives up: exit 124, nothing sealed, the run goes on
    early = _evalrun(home, "--json", "wait", run_id, "--timeout", "3")
    assert early.returncode == 124, early.stdout + early.stderr
    assert json.loads(early.stdout)["error"] == "still_running"
    assert _status(home, run_id)["state"] in ("submitted", "pending", "running")
    cancelled = _evalrun(home, "--json", "cancel", run_id)
    assert cancelled.returncode == 0, cancelled.stdout + cancelled.stderr
    out = json.loads(cancelled.stdout)
    assert out["outcome"] == "cancelled" and out["cancelled_now"] and out["job_deleted"]
    deadline = time.monotonic() + 60
    while batch.list_namespaced_job(namespace).items and time.monotonic() < deadline:
        time.sleep(0.5)
    assert batch.list_namespaced_job(namespace).items == []
    verified = _evalrun(
        home, "--json", "verify", out["bundle"], "--key", str(home / "keys" / "evalrun.pub")
    )
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert json.loads(verified.stdout)["run_id"] == run_id
    pred = json.loads((Path(out["bundle"]) / "statement.json").read_text())["predicate"]
    assert pred["outcome"] == "cancelled" and pred["exit_code"] == 130
    # idempotent: cancel again and wait return the same sealed bundle
    twice = _evalrun(home, "--json", "cancel", run_id)
    assert twice.returncode == 0
    assert json.loads(twice.stdout)["bundle_digest"] == out["bundle_digest"]
    assert json.loads(twice.stdout)["cancelled_now"] is False
    waited = _evalrun(home, "--json", "wait", run_id)
    assert waited.returncode == 130, waited.stdout + waited.stderr
    assert json.loads(waited.stdout)["bundle_digest"] == out["bundle_digest"]


@pytest.mark.parametrize("namespace", RESTRICTED, indirect=True)
def test_cancel_while_a_wait_follows_the_run_the_waiter_seals_it_cancelled(
    cluster, namespace, locked_digits, tmp_path
):
    spec = _variant(locked_digits, tmp_path, "cancel-waited", params={"sleep_s": 120})
    home = tmp_path / "home"
    run_id = _detach(cluster, namespace, home, spec)
    waiter = _spawn(home, "--json", "wait", run_id)
    deadline = time.monotonic() + 120
    while _status(home, run_id)["state"] != "running" and time.monotonic() < deadline:
        time.sleep(1)
    cancelled = _evalrun(home, "--json", "cancel", run_id)
    assert cancelled.returncode == 0, cancelled.stdout + cancelled.stderr
    code = waiter.wait(timeout=300)
    stdout, stderr = waiter.communicate()
    assert code == 130, stdout + stderr
    assert json.loads(stdout)["outcome"] == "cancelled"
    assert json.loads(stdout)["bundle_digest"] == json.loads(cancelled.stdout)["bundle_digest"]

"""Faults provoked on the real cluster: out of memory, deadline, eviction, a 403 after the
Job was created, SIGTERM to the runner. Each ends in a signed bundle that says what
happened, with the exit code of DESIGN.md, and no Job left behind silently."""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from kubernetes import client

from .rbac import bind_runner_role
from .test_backend_kubernetes import (  # noqa: F401  (k8s_example is a fixture)
    EVALRUN,
    RESTRICTED,
    ROOT,
    _config,
    _evalrun,
    _run_args,
    _variant,
    k8s_example,
)

pytestmark = pytest.mark.k8s


def _predicate(out: dict) -> dict:
    return json.loads((Path(out["bundle"]) / "statement.json").read_text())["predicate"]


def _verified(home: Path, bundle: str) -> bool:
    return _evalrun(home, "verify", bundle, "--key", str(home / "keys" / "evalrun.pub")).returncode == 0


def _locked(k8s_example: Path, tmp_path: Path, **changes) -> tuple[Path, Path]:
    spec = _variant(k8s_example, tmp_path, **changes)
    home = tmp_path / "home"
    proc = _evalrun(home, "lock", str(spec))
    assert proc.returncode == 0, proc.stderr
    return spec, home


def _start(cluster, namespace: str, spec: Path, home: Path, *extra: str, kubeconfig=None):
    args = _run_args(cluster, namespace, spec, *extra)
    if kubeconfig is not None:
        args[args.index("--kubeconfig") + 1] = str(kubeconfig)
    return subprocess.Popen(
        [*EVALRUN, *args],
        cwd=ROOT,
        env={**os.environ, "EVALRUN_HOME": str(home)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_for(what: str, check, timeout: float = 120.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if found := check():
            return found
        time.sleep(0.5)
    pytest.fail(f"{what} never happened")


def _running_pod(core: client.CoreV1Api, namespace: str) -> str:
    def running() -> str | None:
        pods = core.list_namespaced_pod(namespace).items
        return next((p.metadata.name for p in pods if p.status.phase == "Running"), None)

    return _wait_for("a running pod", running)


def _jobs(batch: client.BatchV1Api, namespace: str) -> list:
    return [
        j for j in batch.list_namespaced_job(namespace).items if not j.metadata.deletion_timestamp
    ]


@pytest.mark.parametrize("runtime", ["gvisor", "runc"])
@pytest.mark.parametrize("namespace", RESTRICTED, indirect=True)
def test_evaluation_over_its_memory_limit_is_sealed_out_of_memory(
    cluster, namespace, k8s_example, tmp_path, runtime
):
    spec, home = _locked(
        k8s_example,
        tmp_path,
        params={"hog_mib": 1024},
        resources={"cpus": 1, "memory_mib": 256, "pids": 128},
        sandbox={"runtime": runtime, "network": "none"},
        retries=0,
    )
    proc = _evalrun(home, *_run_args(cluster, namespace, spec), timeout=400)
    assert proc.returncode == 6, proc.stdout + proc.stderr
    out = json.loads(proc.stdout)
    pred = _predicate(out)
    assert pred["outcome"] == "out_of_memory", pred["reason"]
    assert "out of memory" in pred["reason"] and "256 MiB" in pred["reason"], pred["reason"]
    details = pred["sandbox"]["details"]
    if runtime == "runc":  # the kubelet learns of the OOM kill and says so
        assert details["termination_reason"] == "OOMKilled", details
    else:  # the whole gVisor sandbox is killed; Kubernetes only sees "Error", exit 128/137
        assert details["container_exit_code"] in (128, 137), details
        assert "inferred" in pred["reason"], pred["reason"]
    assert _verified(home, out["bundle"])


@pytest.mark.parametrize("namespace", RESTRICTED, indirect=True)
def test_job_past_its_active_deadline_is_sealed_timeout(cluster, namespace, k8s_example, tmp_path):
    # the agent's own limit (timeout_s) is far away: Kubernetes' deadline must stop it
    spec, home = _locked(k8s_example, tmp_path, params={"sleep_s": 300}, timeout_s=600)
    t0 = time.monotonic()
    proc = _evalrun(home, *_run_args(cluster, namespace, spec, "--active-deadline", "20"))
    assert proc.returncode == 6, proc.stdout + proc.stderr
    assert time.monotonic() - t0 < 200
    out = json.loads(proc.stdout)
    pred = _predicate(out)
    assert pred["outcome"] == "timeout"
    assert "DeadlineExceeded" in pred["reason"] and "20 s" in pred["reason"], pred["reason"]
    assert pred["sandbox"]["details"]["job_condition"] == "DeadlineExceeded"
    assert _verified(home, out["bundle"])


@pytest.mark.parametrize("namespace", RESTRICTED, indirect=True)
def test_evicted_pod_is_reported_and_the_job_retries_it(cluster, namespace, k8s_example, tmp_path):
    spec, home = _locked(k8s_example, tmp_path, params={"sleep_s": 20})
    proc = _start(cluster, namespace, spec, home)
    core = client.CoreV1Api(client.ApiClient(_config(cluster)))
    victim = _running_pod(core, namespace)
    core.create_namespaced_pod_eviction(
        victim,
        namespace,
        client.V1Eviction(metadata=client.V1ObjectMeta(name=victim, namespace=namespace)),
    )
    stdout, stderr = proc.communicate(timeout=400)
    # Decided: an eviction is a disruption, not a failure of the evaluation; the Job's
    # podFailurePolicy ignores it and starts another pod, and the runner records it.
    assert proc.returncode == 0, stdout + stderr
    out = json.loads(stdout)
    details = _predicate(out)["sandbox"]["details"]
    assert details["pod"] != victim
    assert [(d["pod"], d["reason"]) for d in details["disruptions"]] == [
        (victim, "EvictionByEvictionAPI")
    ]
    log = (home / "logs" / "evalrun.jsonl").read_text()
    assert "pod_disrupted" in log and victim in log


@pytest.mark.parametrize("namespace", RESTRICTED, indirect=True)
def test_sigterm_to_the_runner_deletes_the_job_and_seals_interrupted(
    cluster, namespace, k8s_example, tmp_path
):
    spec, home = _locked(k8s_example, tmp_path, params={"sleep_s": 120})
    proc = _start(cluster, namespace, spec, home)
    api = client.ApiClient(_config(cluster))
    _running_pod(client.CoreV1Api(api), namespace)
    proc.send_signal(signal.SIGTERM)  # as a CI runner cancels a job
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stdout + stderr
    out = json.loads(stdout)
    pred = _predicate(out)
    assert pred["outcome"] == "interrupted"
    assert "SIGTERM" in pred["reason"] and "was deleted" in pred["reason"], pred["reason"]
    assert _jobs(client.BatchV1Api(api), namespace) == []
    assert list((home / "tmp").iterdir()) == []
    assert _verified(home, out["bundle"])


# ------------------------------------------------------------------ 403 after the create


def _service_account_kubeconfig(cluster, k8s_client, namespace: str, tmp_path: Path) -> Path:
    """A kubeconfig holding a real token of ServiceAccount ``evalrun-runner``, bound to a
    Role with the chart's rules."""
    bind_runner_role(k8s_client, namespace)
    core = client.CoreV1Api(k8s_client)
    token = core.create_namespaced_service_account_token(
        "evalrun-runner",
        namespace,
        client.AuthenticationV1TokenRequest(
            spec=client.V1TokenRequestSpec(audiences=[], expiration_seconds=3600)
        ),
    ).status.token
    cfg = _config(cluster)
    ca = Path(cfg.ssl_ca_cert).read_bytes()
    path = tmp_path / "runner.kubeconfig"
    path.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [
                    {
                        "name": "c",
                        "cluster": {
                            "server": cfg.host,
                            "certificate-authority-data": base64.b64encode(ca).decode(),
                        },
                    }
                ],
                "users": [{"name": "runner", "user": {"token": token}}],
                "contexts": [
                    {"name": "runner", "context": {"cluster": "c", "user": "runner"}}
                ],
                "current-context": "runner",
            }
        )
    )
    return path


@pytest.mark.parametrize("may_delete", [True, False], ids=["job-deleted", "job-left"])
@pytest.mark.parametrize("namespace", RESTRICTED, indirect=True)
def test_forbidden_after_the_job_was_created_fails_fast_and_says_where_the_job_is(
    cluster, namespace, k8s_client, k8s_example, tmp_path, may_delete
):
    kubeconfig = _service_account_kubeconfig(cluster, k8s_client, namespace, tmp_path)
    spec, home = _locked(k8s_example, tmp_path, params={"sleep_s": 300}, timeout_s=600)
    proc = _start(cluster, namespace, spec, home, kubeconfig=kubeconfig)
    batch = client.BatchV1Api(k8s_client)
    job = _wait_for("the Job's creation", lambda: _jobs(batch, namespace))[0].metadata.name
    _running_pod(client.CoreV1Api(k8s_client), namespace)
    # then the runner's Role loses get/list/watch on pods (and, in one case, Job deletion)
    rbac = client.RbacAuthorizationV1Api(k8s_client)
    role = rbac.read_namespaced_role("evalrun-runner", namespace)
    rules = [r for r in role.rules if r.resources != ["pods"]]
    if not may_delete:
        for r in rules:
            if r.resources == ["jobs"]:
                r.verbs = [v for v in r.verbs if v != "delete"]
    role.rules = rules
    rbac.replace_namespaced_role("evalrun-runner", namespace, role)
    t0 = time.monotonic()
    stdout, stderr = proc.communicate(timeout=300)
    assert time.monotonic() - t0 < 120  # the watch's next round (≤ 30 s), not the deadline
    assert proc.returncode == 5, stdout + stderr
    out = json.loads(stdout)
    pred = _predicate(out)
    assert pred["outcome"] == "infrastructure_failure"
    reason = pred["reason"]
    assert "forbidden" in reason and f"Job {job}" in reason and namespace in reason, reason
    assert "\n" not in out["reason"]
    if may_delete:
        assert "was deleted" in reason
        assert _jobs(batch, namespace) == []
    else:
        assert "LEFT" in reason and f"kubectl -n {namespace} delete job {job}" in reason
        assert [j.metadata.name for j in _jobs(batch, namespace)] == [job]
    assert list((home / "tmp").iterdir()) == []  # nothing half-written
    assert _verified(home, out["bundle"])

"""manifests/audit-cronjob.yaml in the real cluster: accepted, and its pod admitted as restricted."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest
import yaml
from kubernetes import client

pytestmark = pytest.mark.k8s

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("namespace", [{"pod-security": "restricted"}], indirect=True)
def test_audit_cronjob_applies_and_its_pod_passes_pod_security(cluster, namespace, k8s_client):
    docs = [d for d in yaml.safe_load_all((ROOT / "manifests" / "audit-cronjob.yaml").read_text())
            if d]
    for d in docs:
        d["metadata"]["namespace"] = namespace
    core = client.CoreV1Api(k8s_client)
    # the runner's ServiceAccount comes from manifests/evalrun.yaml
    core.create_namespaced_service_account(
        namespace, client.V1ServiceAccount(metadata=client.V1ObjectMeta(name="evalrun-runner"))
    )
    proc = subprocess.run(
        cluster.kubectl_cmd("apply", "--server-side", "--validate=strict", "-f", "-"),
        input=yaml.safe_dump_all(docs), capture_output=True, text=True, check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert "Warning" not in proc.stderr, proc.stderr  # no Pod Security warning on the template

    # a Job made from the CronJob gets its pod admitted under "restricted" enforcement
    proc = subprocess.run(
        cluster.kubectl_cmd("-n", namespace, "create", "job", "audit-now",
                            "--from=cronjob/evalrun-audit"),
        capture_output=True, text=True, check=False,
    )
    assert proc.returncode == 0, proc.stderr
    deadline = time.monotonic() + 60
    pods: list = []
    while time.monotonic() < deadline:
        pods = core.list_namespaced_pod(namespace, label_selector="job-name=audit-now").items
        if pods:
            break
        time.sleep(0.5)
    events = core.list_namespaced_event(namespace).items
    failed = [e.message for e in events if e.reason == "FailedCreate"]
    assert pods, f"no audit pod admitted: {failed}"
    spec = pods[0].spec
    assert spec.service_account_name == "evalrun-runner"
    assert spec.containers[0].args[0] == "audit"

"""A real evaluation through a Kueue queue on the real node: queued, admitted, sealed,
with the wait in the bundle's timestamps apart from the run."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest
from kubernetes import client

from .test_backend_kubernetes import (  # noqa: F401  (k8s_example is a fixture)
    EVALRUN,
    RESTRICTED,
    ROOT,
    _evalrun,
    _run_args,
    k8s_example,
)

pytestmark = pytest.mark.k8s
KUEUE_UP = ROOT / "tests" / "cluster" / "kueue-up.sh"
GROUP, VERSION = "kueue.x-k8s.io", "v1beta2"


@pytest.mark.parametrize("namespace", RESTRICTED, indirect=True)
def test_a_queued_run_is_sealed_with_its_queue_wait_apart(
    cluster, namespace, k8s_client, k8s_example, tmp_path
):
    proc = subprocess.run(["bash", str(KUEUE_UP)], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    custom = client.CustomObjectsApi(k8s_client)
    try:
        custom.create_cluster_custom_object(GROUP, VERSION, "resourceflavors", {
            "apiVersion": f"{GROUP}/{VERSION}", "kind": "ResourceFlavor",
            "metadata": {"name": "evalrun-real-node"}, "spec": {}})
    except client.ApiException as exc:
        if exc.status != 409:
            raise
    cq = f"cq-{namespace}"[:63]
    custom.create_cluster_custom_object(GROUP, VERSION, "clusterqueues", {
        "apiVersion": f"{GROUP}/{VERSION}", "kind": "ClusterQueue", "metadata": {"name": cq},
        "spec": {
            "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": namespace}},
            "stopPolicy": "Hold",
            # evalrun requests the node disk its results and inputs need: covered too
            "resourceGroups": [{"coveredResources": ["cpu", "memory", "ephemeral-storage"],
                                "flavors": [{"name": "evalrun-real-node", "resources": [
                                    {"name": "cpu", "nominalQuota": "4"},
                                    {"name": "memory", "nominalQuota": "16Gi"},
                                    {"name": "ephemeral-storage", "nominalQuota": "100Gi"}]}]}]}})
    custom.create_namespaced_custom_object(GROUP, VERSION, namespace, "localqueues", {
        "apiVersion": f"{GROUP}/{VERSION}", "kind": "LocalQueue",
        "metadata": {"name": "evals"}, "spec": {"clusterQueue": cq}})
    try:
        home = tmp_path / "home"
        _evalrun(home, "keys", "list")  # makes this store's key before the background run
        args = _run_args(cluster, namespace, k8s_example / "eval.yaml", "--queue", "evals",
                         "--stuck-after", "5")
        env_home = {"EVALRUN_HOME": str(home)}
        run = subprocess.Popen([*EVALRUN, *args], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, cwd=ROOT,
                               env={**os.environ, **env_home})
        time.sleep(15)
        assert run.poll() is None, run.communicate()
        custom.patch_cluster_custom_object(GROUP, VERSION, "clusterqueues", cq,
                                           {"spec": {"stopPolicy": "None"}})
        out, err = run.communicate(timeout=600)
        assert run.returncode == 0, out + err
        summary = json.loads(out)
        pred = json.loads((Path(summary["bundle"]) / "statement.json").read_text())["predicate"]
        stamps = pred["timestamps"]
        # held 15 s after the CLI started (it imports, verifies inputs, checks the
        # namespace before it submits): several seconds of that were spent queued
        assert stamps["queue_wait_s"] >= 4, stamps
        assert stamps["queued"] < stamps["container_started"] <= stamps["container_finished"]
        queue = pred["sandbox"]["details"]["queue"]
        assert queue["queue"] == "evals" and queue["admissions"] == 1
        assert queue["admitted_at"] == stamps["container_started"]
        # --json keeps stdout to the summary: the queue's progress is in the log
        events = [json.loads(line) for line in
                  (home / "logs" / "evalrun.jsonl").read_text().splitlines()]
        queued = [e for e in events if e.get("event") == "k8s_queued"]
        assert queued and queued[0]["message"].startswith("queued in evals"), queued
        assert any(e.get("event") == "k8s_admitted" for e in events)
    finally:
        custom.delete_cluster_custom_object(GROUP, VERSION, "clusterqueues", cq)

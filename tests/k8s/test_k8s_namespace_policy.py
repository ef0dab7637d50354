"""The namespace check on the real cluster: refused with exit 4 naming what is missing.

evalrun reads the target namespace before it submits anything (the Namespace's Pod
Security label, its NetworkPolicies, the RuntimeClass) and refuses a namespace that does
not enforce the spec's sandbox policy; the runner's RBAC from the chart allows exactly
those reads.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from kubernetes import client

from runner.backends.kubernetes import ClusterTarget, KubernetesBackend, namespace_policy
from runner.errors import NamespacePolicyUnmet
from runner.model.plan import PlanInput, PlanInputFile, RunPlan

from .rbac import allowed, bind_runner_role

pytestmark = pytest.mark.k8s

ROOT = Path(__file__).resolve().parents[2]
SOURCE = ROOT / "tests" / "unit" / "fixtures" / "legacy" / "source"
EVALRUN = [sys.executable, "-m", "runner.cli"]
SANDBOXED = [{"pod-security": "restricted", "default-deny": True}]


def _plan(tmp_path: Path) -> RunPlan:
    model = tmp_path / "w.json"
    model.write_text("{}")
    return RunPlan(
        run_id="r-nspolicy0000000000000000",
        attempt=0,
        image_ref="127.0.0.1:5000/evalrun/probe@sha256:" + "0" * 64,
        expected_rootfs_digest="sha256:" + "1" * 64,
        runtime="gvisor",
        command=["true"],
        params={},
        seed=0,
        metrics=[],
        expect={},
        timeout_s=60,
        cpus=0.1,
        memory_mib=64,
        pids=64,
        inputs=[
            PlanInput(
                role="model",
                name="model",
                host_path=model,
                sha256="2" * 64,
                files=(PlanInputFile(path="w.json", sha256="2" * 64, size=2),),
                artifact_ref="127.0.0.1:5000/evalrun/probe-inputs@sha256:" + "2" * 64,
            )
        ],
        spec_digest="sha256:" + "3" * 64,
        lock_digest="sha256:" + "4" * 64,
        spec_name="nspolicy",
    )


def test_a_run_into_a_namespace_without_the_label_is_refused_with_exit_4(
    cluster, namespace, k8s_client, tmp_path
) -> None:
    # a fresh namespace as a kubeconfig's default one often is: no label, no policy
    home = tmp_path / "home"
    source = tmp_path / "source"
    shutil.copytree(SOURCE, source)
    env = {**os.environ, "EVALRUN_HOME": str(home)}
    made = subprocess.run(
        [*EVALRUN, "keys", "generate"],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        check=False,
    )
    assert made.returncode == 0, made.stderr
    proc = subprocess.run(
        [
            *EVALRUN,
            "run",
            str(source / "eval.yaml"),
            "--backend",
            "kubernetes",
            "--kubeconfig",
            str(cluster.kubeconfig),
            "-n",
            namespace,
            "--json",
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 4, (proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr
    out = json.loads(proc.stdout)
    assert namespace in json.dumps(out) and "pod security" in json.dumps(out)
    assert "network" in json.dumps(out)
    # refused before anything was submitted
    assert client.BatchV1Api(k8s_client).list_namespaced_job(namespace).items == []
    assert (
        client.CoreV1Api(k8s_client)
        .list_namespaced_config_map(
            namespace, label_selector="app.kubernetes.io/managed-by=evalrun"
        )
        .items
        == []
    )


@pytest.mark.parametrize("namespace", SANDBOXED, indirect=True)
def test_a_sandboxed_namespace_passes_and_what_was_observed_is_recorded(
    cluster, namespace, tmp_path
) -> None:
    backend = KubernetesBackend(
        ClusterTarget(kubeconfig=str(cluster.kubeconfig), namespace=namespace)
    )
    plan = _plan(tmp_path)
    backend.preflight(plan)  # does not raise
    api, _ = backend._connect()
    policy = namespace_policy(api, namespace, plan)
    assert policy.unmet == [] and policy.network == "none"
    assert policy.egress_denied_by == ("default-deny-all",)
    assert {f.demand for f in policy.findings} == {"pod security", "network", "runtime class"}


@pytest.mark.parametrize("namespace", SANDBOXED, indirect=True)
def test_a_policy_that_opens_egress_is_refused_naming_it(
    cluster, namespace, k8s_client, tmp_path
) -> None:
    client.NetworkingV1Api(k8s_client).create_namespaced_network_policy(
        namespace,
        client.V1NetworkPolicy(
            metadata=client.V1ObjectMeta(name="allow-dns"),
            spec=client.V1NetworkPolicySpec(
                pod_selector=client.V1LabelSelector(),
                policy_types=["Egress"],
                egress=[
                    client.V1NetworkPolicyEgressRule(
                        ports=[client.V1NetworkPolicyPort(port=53, protocol="UDP")]
                    )
                ],
            ),
        ),
    )
    backend = KubernetesBackend(
        ClusterTarget(kubeconfig=str(cluster.kubeconfig), namespace=namespace)
    )
    with pytest.raises(NamespacePolicyUnmet) as exc:
        backend.preflight(_plan(tmp_path))
    assert exc.value.exit_code == 4 and "network" in exc.value.message
    assert "allow-dns" in exc.value.diagnostics()


@pytest.mark.parametrize("namespace", SANDBOXED, indirect=True)
def test_the_chart_role_allows_exactly_the_reads_the_check_needs(namespace, k8s_client) -> None:
    bind_runner_role(k8s_client, namespace)

    def may(ns: str, verb: str, resource: str, group: str = "", name: str = "") -> bool:
        return allowed(k8s_client, namespace, ns, verb, resource, group, name)

    assert may(namespace, "get", "namespaces", name=namespace)
    assert may(namespace, "list", "networkpolicies", group="networking.k8s.io")
    assert not may("kube-system", "get", "namespaces", name="kube-system")
    assert not may(namespace, "create", "networkpolicies", group="networking.k8s.io")

"""An input larger than any node's disk: the real scheduler refuses the run with a reason.

The Job requests its results volume plus its inputs as ``ephemeral-storage``; the
local node offers its real disk (a few hundred GiB), so a plan whose model is a
petabyte is Unschedulable before anything is pulled, and evalrun says which input
and how much disk, with exit 4, and deletes the Job.
"""

from __future__ import annotations

import pytest
from kubernetes import client

from runner.backends.kubernetes import ClusterTarget, KubernetesBackend
from runner.backends.manifests import job_name
from runner.errors import EnvironmentMismatch
from runner.model.plan import PlanInput, PlanInputFile, RunPlan

pytestmark = pytest.mark.k8s

RESTRICTED = [{"pod-security": "restricted", "default-deny": True}]
PIB = 1 << 50


def _plan(tmp_path, cluster) -> RunPlan:
    model = tmp_path / "w.bin"
    model.write_bytes(b"")
    return RunPlan(
        run_id="r-nodestorage0001",
        attempt=0,
        image_ref=cluster.probe_image,
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
        results_mib=64,
        inputs=[
            PlanInput(
                role="model",
                name="model",
                host_path=model,
                sha256="2" * 64,
                kind="directory",
                files=(
                    PlanInputFile(path="shard-1.safetensors", sha256="3" * 64, size=PIB),
                    PlanInputFile(path="shard-2.safetensors", sha256="4" * 64, size=PIB),
                ),
                artifact_ref=f"{cluster.registry}/evalrun/huge-inputs@sha256:" + "2" * 64,
            )
        ],
        spec_digest="sha256:" + "5" * 64,
        lock_digest="sha256:" + "6" * 64,
        spec_name="node-storage",
    )


@pytest.mark.parametrize("namespace", RESTRICTED, indirect=True)
def test_an_input_larger_than_the_node_disk_is_unschedulable_with_its_reason(
    cluster, namespace, k8s_client, tmp_path
):
    backend = KubernetesBackend(
        ClusterTarget(kubeconfig=str(cluster.kubeconfig), namespace=namespace),
        unschedulable_grace_s=3,
    )
    plan = _plan(tmp_path, cluster)
    with pytest.raises(EnvironmentMismatch) as exc:
        backend.run(plan, tmp_path / "results")
    message = str(exc.value)
    assert "Unschedulable" in message and "ephemeral-storage" in message, message
    need = 64 + 2 * PIB // (1 << 20)
    assert f"{need} MiB" in message, message
    hint = exc.value.diagnostics()
    assert "model 'model' 2097152.00 GiB" in hint and "results_mib" in hint, hint
    assert exc.value.exit_code == 4
    jobs = client.BatchV1Api(k8s_client).list_namespaced_job(namespace).items
    assert job_name(plan.run_id) not in {j.metadata.name for j in jobs}

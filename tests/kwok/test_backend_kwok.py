"""evalrun's Jobs on kwok fake GPU nodes: GPU Jobs land only on matching nodes."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from kubernetes import client

from runner.model.plan import PlanInput, RunPlan
from runner.backends.kubernetes import ClusterTarget, KubernetesBackend, shared_watch
from runner.backends.manifests import job_name

pytestmark = pytest.mark.kwok

H100 = "NVIDIA-H100-80GB-HBM3"
A100 = "NVIDIA-A100-SXM4-80GB"


def gpu_plan(tmp_path: Path, i: int, product: str, gpus: int = 1) -> RunPlan:
    model = tmp_path / "w.json"
    model.write_text("{}")
    return RunPlan(
        run_id=f"r-kwok{i:04d}{product[7:11].lower()}",
        attempt=0,
        image_ref="127.0.0.1:5000/evalrun/probe@sha256:" + "0" * 64,
        expected_rootfs_digest="sha256:" + "1" * 64,
        runtime="runc",
        command=["true"],
        params={},
        seed=0,
        metrics=[],
        expect={},
        timeout_s=60,
        cpus=0.1,
        memory_mib=64,
        pids=64,
        gpus=gpus,
        gpu_product=product,
        # kwok's fake kubelet never pulls: a digest reference is all the Job needs
        inputs=[PlanInput(role="model", name="model", host_path=model, sha256="2" * 64,
                          artifact_ref="127.0.0.1:5000/evalrun/kwok-inputs@sha256:" + "2" * 64)],
        spec_digest="sha256:" + "3" * 64,
        lock_digest="sha256:" + "4" * 64,
        spec_name="kwok",
    )


def test_gpu_jobs_land_only_on_matching_fake_gpu_nodes(cluster, k8s_client, namespace, tmp_path):
    backend = KubernetesBackend(
        ClusterTarget(kubeconfig=str(cluster.kubeconfig), namespace=namespace),
        extra_tolerations=(("kwok.x-k8s.io/node", "NoSchedule"),),
    )
    plans = [gpu_plan(tmp_path, i, H100 if i % 2 else A100, gpus=1 + i % 4) for i in range(12)]
    for plan in plans:
        backend.submit(plan)
        backend.submit(plan)  # idempotent: attaches, no duplicate
    api, ns = backend._connect()
    watch = shared_watch(api, ns)

    def all_complete():
        return all(
            any(
                c.type == "Complete" and c.status == "True"
                for c in (watch.job(job_name(p.run_id)).status.conditions or [])
            )
            if watch.job(job_name(p.run_id))
            else False
            for p in plans
        )

    assert watch.wait(all_complete, timeout=180), "kwok Jobs did not complete"
    core = client.CoreV1Api(k8s_client)
    nodes = {n.metadata.name: n for n in core.list_node(label_selector="type=kwok").items}
    for plan in plans:
        pods = watch.pods_of(plan.run_id)
        assert pods, plan.run_id
        node = nodes[pods[-1].spec.node_name]
        assert node.metadata.labels["nvidia.com/gpu.product"] == plan.gpu_product
    assert len(client.BatchV1Api(k8s_client).list_namespaced_job(ns).items) == len(plans)
    assert watch.pods.relists >= 1 and watch.jobs.relists >= 1


def test_shared_watch_is_one_per_namespace(cluster, namespace):
    backend = KubernetesBackend(
        ClusterTarget(kubeconfig=str(cluster.kubeconfig), namespace=namespace)
    )
    api, ns = backend._connect()
    t0 = time.monotonic()
    first = shared_watch(api, ns)
    assert shared_watch(api, ns) is first
    assert time.monotonic() - t0 < 30


def test_an_error_while_the_job_runs_deletes_it(cluster, k8s_client, namespace, tmp_path):
    """The runner's own work while the Job runs (``on_start``: what sealing needs) can fail
    like anything before the submission: the Job is deleted, never left running unwatched,
    and the error propagates."""
    backend = KubernetesBackend(
        ClusterTarget(kubeconfig=str(cluster.kubeconfig), namespace=namespace),
        extra_tolerations=(("kwok.x-k8s.io/node", "NoSchedule"),),
    )
    plan = gpu_plan(tmp_path, 9000, H100)
    calls = []

    def failing() -> None:
        calls.append(client.BatchV1Api(k8s_client).read_namespaced_job(
            job_name(plan.run_id), namespace).metadata.name)
        raise RuntimeError("could not prepare the sealing")

    with pytest.raises(RuntimeError, match="could not prepare the sealing"):
        backend.run(plan, tmp_path / "results", on_start=failing)
    assert calls == [job_name(plan.run_id)]  # called once the Job existed
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        names = [j.metadata.name for j in client.BatchV1Api(k8s_client).list_namespaced_job(
            namespace).items if j.metadata.deletion_timestamp is None]
        if job_name(plan.run_id) not in names:
            break
        time.sleep(0.5)
    else:
        pytest.fail(f"the Job {job_name(plan.run_id)} was left behind")

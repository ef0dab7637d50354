"""MIG shapes on kwok fake nodes: a MIG run asks for its profile's resource and lands
only where the device plugin (mixed strategy) advertises that profile."""

from __future__ import annotations

import pytest
from kubernetes import client
from .test_backend_kwok import H100, gpu_plan

from runner.backends.kubernetes import ClusterTarget, KubernetesBackend, shared_watch
from runner.backends.manifests import job_name

pytestmark = pytest.mark.kwok


def test_mig_nodes_advertise_their_profiles_as_gfd_labels_them(k8s_client):
    nodes = client.CoreV1Api(k8s_client).list_node(label_selector="type=kwok-mig").items
    by_name = {n.metadata.name: n for n in nodes}
    assert set(by_name) == {"kwok-mig-000", "kwok-mig-001"}
    small = by_name["kwok-mig-000"]
    assert small.status.allocatable["nvidia.com/mig-1g.10gb"] == "56"
    assert small.metadata.labels["nvidia.com/mig.strategy"] == "mixed"
    assert "nvidia.com/gpu" not in small.status.allocatable
    assert by_name["kwok-mig-001"].status.allocatable["nvidia.com/mig-3g.40gb"] == "16"


def test_mig_runs_land_on_nodes_with_their_profile(cluster, k8s_client, namespace, tmp_path):
    backend = KubernetesBackend(
        ClusterTarget(kubeconfig=str(cluster.kubeconfig), namespace=namespace),
        extra_tolerations=(("kwok.x-k8s.io/node", "NoSchedule"),),
    )
    plans = []
    for i, (profile, count) in enumerate([("1g.10gb", 2), ("3g.40gb", 1), ("1g.10gb", 7),
                                          ("3g.40gb", 4)]):
        plan = gpu_plan(tmp_path, 500 + i, H100, gpus=count)
        plans.append(plan.model_copy(update={"mig_profile": profile}))
    for plan in plans:
        backend.submit(plan)
    api, ns = backend._connect()
    watch = shared_watch(api, ns)

    def scheduled():
        return all(any(p.spec.node_name for p in watch.pods_of(plan.run_id)) for plan in plans)

    assert watch.wait(scheduled, timeout=180), "MIG Jobs were not scheduled"
    for plan in plans:
        pod = next(p for p in watch.pods_of(plan.run_id) if p.spec.node_name)
        expected = "kwok-mig-000" if plan.mig_profile == "1g.10gb" else "kwok-mig-001"
        assert pod.spec.node_name == expected, (plan.mig_profile, pod.spec.node_name)
        # the watch's slim cache keeps no container specs: read the pod from the API
        full = client.CoreV1Api(k8s_client).read_namespaced_pod(pod.metadata.name, ns)
        limits = full.spec.containers[0].resources.limits
        assert limits[f"nvidia.com/mig-{plan.mig_profile}"] == str(plan.gpus)
        assert job_name(plan.run_id) == pod.metadata.labels["job-name"]

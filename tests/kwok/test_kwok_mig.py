"""MIG shapes on kwok fake nodes: a MIG run asks for its profile's resource and lands
only where the device plugin (mixed strategy) advertises that profile."""

from __future__ import annotations

import threading
import time

import pytest
from kubernetes import client
from .test_backend_kwok import H100, gpu_plan

from runner.backends.kubernetes import ClusterTarget, KubernetesBackend, shared_watch
from runner.backends.manifests import job_name
from runner.errors import EnvironmentMismatch

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


def _blocker(namespace: str, count: int) -> client.V1Pod:
    """A pod (no Job: kwok keeps it Running) holding ``count`` 3g.40gb slices of
    kwok-mig-001, as another team's long evaluation would."""
    resource = {"nvidia.com/mig-3g.40gb": str(count)}
    return client.V1Pod(
        metadata=client.V1ObjectMeta(name="another-teams-run", namespace=namespace),
        spec=client.V1PodSpec(
            node_selector={"kubernetes.io/hostname": "kwok-mig-001"},
            tolerations=[
                client.V1Toleration(key="kwok.x-k8s.io/node", operator="Exists"),
                client.V1Toleration(key="nvidia.com/gpu", operator="Exists"),
            ],
            containers=[client.V1Container(
                name="eval", image="127.0.0.1:5000/evalrun/not-pulled-on-kwok:0",
                resources=client.V1ResourceRequirements(limits=resource, requests=resource))],
        ),
    )


def test_a_run_waits_for_slices_another_pod_holds_and_starts_when_they_are_free(
    cluster, k8s_client, namespace, tmp_path
):
    """Every 3g.40gb slice is in use: the run's pod is Unschedulable, but only for now (the
    scheduler says a node has room once pods leave). It waits past --stuck-after, says so
    once, and runs when the slices are free; a run asking for more slices than any node
    has is still refused after --stuck-after."""
    core = client.CoreV1Api(k8s_client)
    core.create_namespaced_pod(namespace, _blocker(namespace, 16))
    lines: list[str] = []
    backend = KubernetesBackend(
        ClusterTarget(kubeconfig=str(cluster.kubeconfig), namespace=namespace),
        extra_tolerations=(("kwok.x-k8s.io/node", "NoSchedule"),),
        unschedulable_grace_s=1.0,
        output=lambda line: lines.append(line.text),
    )
    plan = gpu_plan(tmp_path, 600, H100, gpus=2).model_copy(update={"mig_profile": "3g.40gb"})
    results: list = []
    errors: list = []

    def run() -> None:
        try:
            results.append(backend.run(plan, tmp_path / "results"))
        except Exception as exc:  # reported by the assertions below
            errors.append(exc)

    runner = threading.Thread(target=run, daemon=True)
    runner.start()
    deadline = time.monotonic() + 60
    while not any("waits for capacity in use by other pods" in x for x in lines):
        assert not errors, errors
        assert time.monotonic() < deadline, lines
        time.sleep(0.2)
    said = next(x for x in lines if "waits for capacity" in x)
    assert "Insufficient nvidia.com/mig-3g.40gb" in said and "No preemption victims" in said
    time.sleep(5)  # five times --stuck-after
    assert runner.is_alive() and not errors, (errors, lines)
    core.delete_namespaced_pod("another-teams-run", namespace, grace_period_seconds=0)
    runner.join(120)
    assert not errors, errors
    assert results, "the run did not end once the slices were free"
    details = results[0].details
    assert details["job_condition"] == "Complete", details
    (message,) = details["capacity_waits"].values()  # recorded in the signed details
    assert "Insufficient nvidia.com/mig-3g.40gb" in message and message in said
    assert sum("waits for capacity" in x for x in lines) == 1, lines

    # more slices than kwok-mig-001 has: never schedulable, refused once the grace is over
    greedy = gpu_plan(tmp_path, 601, H100, gpus=17).model_copy(
        update={"mig_profile": "3g.40gb"})
    t0 = time.monotonic()
    with pytest.raises(EnvironmentMismatch) as refused:
        backend.run(greedy, tmp_path / "results-greedy")
    assert "Unschedulable" in str(refused.value) and time.monotonic() - t0 < 60

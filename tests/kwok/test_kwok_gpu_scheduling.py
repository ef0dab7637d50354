"""kwok fake GPU nodes: readiness and GPU-aware scheduling of Jobs."""

from __future__ import annotations

import pytest
from kubernetes import client, watch

pytestmark = pytest.mark.kwok

H100 = "NVIDIA-H100-80GB-HBM3"
GPU_TOLERATIONS = [
    client.V1Toleration(key="nvidia.com/gpu", operator="Exists", effect="NoSchedule"),
    client.V1Toleration(key="kwok.x-k8s.io/node", operator="Exists", effect="NoSchedule"),
]


def is_ready(node: client.V1Node) -> bool:
    return any(c.type == "Ready" and c.status == "True" for c in node.status.conditions or [])


def test_fifty_kwok_gpu_nodes_are_ready(k8s_client):
    nodes = client.CoreV1Api(k8s_client).list_node(label_selector="type=kwok").items

    assert len(nodes) >= 50
    assert all(is_ready(n) for n in nodes), [n.metadata.name for n in nodes if not is_ready(n)]
    assert {n.status.allocatable["nvidia.com/gpu"] for n in nodes} == {"8"}
    assert all(n.metadata.labels["nvidia.com/cuda.driver.major"] for n in nodes)
    assert {t.key for n in nodes for t in n.spec.taints} >= {"nvidia.com/gpu", "kwok.x-k8s.io/node"}


def test_gpu_job_with_product_selector_is_scheduled_onto_matching_kwok_node(k8s_client, namespace):
    core, batch = client.CoreV1Api(k8s_client), client.BatchV1Api(k8s_client)
    job = client.V1Job(
        metadata=client.V1ObjectMeta(name="gpu-eval"),
        spec=client.V1JobSpec(
            backoff_limit=0,
            template=client.V1PodTemplateSpec(
                spec=client.V1PodSpec(
                    restart_policy="Never",
                    node_selector={"nvidia.com/gpu.product": H100},
                    tolerations=GPU_TOLERATIONS,
                    containers=[
                        client.V1Container(
                            name="eval",
                            image="127.0.0.1:5000/evalrun/not-pulled-on-kwok:0",
                            resources=client.V1ResourceRequirements(
                                limits={"nvidia.com/gpu": "1"}, requests={"nvidia.com/gpu": "1"}
                            ),
                        )
                    ],
                )
            ),
        ),
    )

    batch.create_namespaced_job(namespace, job)
    node_name = None
    for event in watch.Watch().stream(
        core.list_namespaced_pod, namespace, label_selector="job-name=gpu-eval", timeout_seconds=120
    ):
        pod = event["object"]
        if pod.spec.node_name and pod.status.phase in ("Running", "Succeeded"):
            node_name = pod.spec.node_name
            break
    assert node_name, "the GPU Job's pod was never scheduled and started"
    node = core.read_node(node_name)
    # kwok's pod-complete stage finishes Job pods, so the Job itself completes.
    outcome = None
    for event in watch.Watch().stream(
        batch.list_namespaced_job,
        namespace,
        field_selector="metadata.name=gpu-eval",
        timeout_seconds=120,
    ):
        conditions = event["object"].status.conditions or []
        done = [
            c.type for c in conditions if c.type in ("Complete", "Failed") and c.status == "True"
        ]
        if done:
            outcome = done[0]
            break

    assert outcome == "Complete"
    assert node.metadata.labels["type"] == "kwok"
    assert node.metadata.labels["nvidia.com/gpu.product"] == H100

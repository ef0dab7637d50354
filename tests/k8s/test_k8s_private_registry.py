"""The cluster pulls evalrun's images from a TLS registry with credentials, through the
image pull Secret evalrun puts on every Job.

The registry is a real docker-registry over TLS with htpasswd auth (tests/cluster/
private_registry.py). The node's containerd trusts its test CA through a hosts.toml
under the cluster's certs.d (containerd's config_path, read on every pull; written
here, removed after). The probe image is copied into it with evalrun's own client.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import time
from collections.abc import Iterator

import pytest
from kubernetes import client
from private_registry import PrivateRegistry, running_registry

from runner.backends.kubernetes import ClusterTarget, KubernetesBackend, shared_watch
from runner.model.plan import RunPlan

from .shared_cluster import copy_image

pytestmark = pytest.mark.k8s
SECRET = "evalrun-private-registry"


@pytest.fixture(scope="module")
def private(cluster, tmp_path_factory) -> Iterator[tuple[PrivateRegistry, str]]:
    """The TLS registry, the probe image copied into it, and containerd trusting its CA."""
    base = tmp_path_factory.mktemp("private-registry")
    with running_registry(base, auth="basic") as reg:
        config = reg.docker_config(base / "docker")
        old = os.environ.get("DOCKER_CONFIG")
        os.environ["DOCKER_CONFIG"] = str(config)
        hosts = cluster.state_dir / "containerd" / "certs.d" / reg.addr
        try:
            ref = copy_image(cluster.probe_image, reg.addr, "evalrun/probe")
            hosts.mkdir(parents=True, exist_ok=True)
            (hosts / "ca.crt").write_bytes(reg.ca_pem)
            (hosts / "hosts.toml").write_text(
                f'server = "https://{reg.addr}"\n\n[host."https://{reg.addr}"]\n'
                f'  capabilities = ["pull", "resolve"]\n  ca = "{hosts / "ca.crt"}"\n'
            )
            yield reg, ref
        finally:
            shutil.rmtree(hosts, ignore_errors=True)
            if old is None:
                os.environ.pop("DOCKER_CONFIG", None)
            else:
                os.environ["DOCKER_CONFIG"] = old


def _plan(ref: str, run_id: str) -> RunPlan:
    return RunPlan(
        run_id=run_id, attempt=0, image_ref=ref, expected_rootfs_digest="sha256:" + "1" * 64,
        runtime="runc", command=["true"], params={}, seed=0, metrics=[], expect={},
        inputs=[], timeout_s=60, cpus=0.1, memory_mib=64, pids=64,
        spec_digest="sha256:" + "3" * 64, lock_digest="sha256:" + "4" * 64, spec_name="private",
    )


def _pull_outcome(watch, run_id: str, timeout: float = 120) -> str:
    """'pulled' once the container left its waiting state, else the waiting reason."""
    deadline = time.monotonic() + timeout
    last = "no pod"
    while time.monotonic() < deadline:
        for pod in watch.pods_of(run_id):
            for status in pod.status.container_statuses or []:
                if status.image_id or (status.state and not status.state.waiting):
                    return "pulled"
                if status.state and status.state.waiting:
                    last = f"{status.state.waiting.reason}: {status.state.waiting.message}"
                    if status.state.waiting.reason in ("ErrImagePull", "ImagePullBackOff"):
                        return last
        time.sleep(1)
    return last


def test_jobs_pull_from_a_tls_registry_through_the_named_pull_secret(
    cluster, k8s_client, namespace, private
):
    reg, ref = private
    auth = base64.b64encode(f"{reg.username}:{reg.password}".encode()).decode()
    client.CoreV1Api(k8s_client).create_namespaced_secret(namespace, client.V1Secret(
        metadata=client.V1ObjectMeta(name=SECRET), type="kubernetes.io/dockerconfigjson",
        data={".dockerconfigjson": base64.b64encode(json.dumps(
            {"auths": {reg.addr: {"auth": auth}}}).encode()).decode()}))
    target = ClusterTarget(kubeconfig=str(cluster.kubeconfig), namespace=namespace)
    with_secret = KubernetesBackend(target, image_pull_secrets=(SECRET,))
    without = KubernetesBackend(target)

    # first without: once the node holds the image, a pull would no longer be asked for
    without.submit(_plan(ref, "r-private-without"))
    api, ns = with_secret._connect()
    watch = shared_watch(api, ns)
    refused = _pull_outcome(watch, "r-private-without")
    assert refused.startswith(("ErrImagePull", "ImagePullBackOff")), refused
    with_secret.submit(_plan(ref, "r-private-with"))
    assert _pull_outcome(watch, "r-private-with") == "pulled"
    # the watch keeps a slim projection of each pod: read the pull secrets from the API
    name = watch.pods_of("r-private-with")[-1].metadata.name
    pod = client.CoreV1Api(api).read_namespaced_pod(name, ns)
    assert [s.name for s in pod.spec.image_pull_secrets] == [SECRET]

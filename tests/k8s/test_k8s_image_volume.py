"""Kubernetes image volumes (``volumes[].image``) on the local cluster: inputs as OCI artifacts.

The runtime (containerd 2.x) mounts an image volume by unpacking the artifact like an
image, so only some manifest shapes work (docs/data.md, "Image volumes: what the runtime
accepts (measured)"; ``tests/cluster/imagevol_matrix.py`` re-measures all of them):

- accepted: an image config with ``rootfs.diff_ids`` and one tar layer per file; an
  ``artifactType`` of evalrun's own may be set (``image-artifact``);
- refused: the empty config ``application/vnd.oci.empty.v1+json`` with tar layers
  (``artifact-tar``): the pod stays Pending with CreateContainerError;
- silently empty: raw-file layers (``artifact-raw``, what ``oras push`` writes).
"""

from __future__ import annotations

import hashlib
import json
import secrets
import subprocess
import time

import cluster as cluster_mod
import imagevol
import pytest
from kubernetes import client

pytestmark = pytest.mark.k8s

NON_ROOT = client.V1SecurityContext(
    allow_privilege_escalation=False,
    run_as_non_root=True,
    run_as_user=65534,
    capabilities=client.V1Capabilities(drop=["ALL"]),
    seccomp_profile=client.V1SeccompProfile(type="RuntimeDefault"),
)


def input_files() -> dict[str, bytes]:
    nonce = secrets.token_hex(8)  # fresh content: a digest no node has pulled yet
    return {
        "hello.txt": f"hello {nonce}\n".encode(),
        "model/shard-00001-of-00002.safetensors": secrets.token_bytes(512 << 10),
        "model/shard-00002-of-00002.safetensors": bytes(range(256)) * 1024,
        "data/test.jsonl": b'{"x": 1}\n{"x": 2}\n',
    }


def image_volume_pod(name: str, ref: str, probe: str, runtime_class: str | None) -> client.V1Pod:
    mount = [client.V1VolumeMount(name="inputs", mount_path="/inputs", read_only=True)]

    def container(cname: str, args: list[str], security=NON_ROOT) -> client.V1Container:
        return client.V1Container(
            name=cname, image=probe, args=args, volume_mounts=mount, security_context=security
        )

    return client.V1Pod(
        metadata=client.V1ObjectMeta(name=name),
        spec=client.V1PodSpec(
            restart_policy="Never",
            runtime_class_name=runtime_class,
            automount_service_account_token=False,
            termination_grace_period_seconds=0,
            containers=[
                container("tree", ["tree", "/inputs"]),
                container("cat", ["cat", "/inputs/hello.txt"]),
                # As root (CAP_DAC_OVERRIDE), so only the read-only mount can refuse the write;
                # uid 65534 gets "permission denied" under gVisor before the ro check.
                container("write", ["write", "/inputs/new-file"], security=None),
            ],
            volumes=[
                client.V1Volume(
                    name="inputs",
                    image=client.V1ImageVolumeSource(reference=ref, pull_policy="IfNotPresent"),
                )
            ],
        ),
    )


def tree(core: client.CoreV1Api, ns: str, pod: str) -> tuple[dict[str, dict], dict]:
    entries, mount = {}, {}
    for line in core.read_namespaced_pod_log(pod, ns, container="tree").splitlines():
        record = json.loads(line)
        if "mount" in record:
            mount = record["mount"]
        else:
            entries[record["path"]] = record
    return entries, mount


def wait_for_waiting_reason(core: client.CoreV1Api, ns: str, pod: str, timeout_s: float = 120):
    """The first container waiting reason that means 'will not start', with its message."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = core.read_namespaced_pod(pod, ns).status
        for cs in status.container_statuses or []:
            waiting = cs.state.waiting if cs.state else None
            if waiting and waiting.reason in {"CreateContainerError", "ErrImagePull"}:
                return status.phase, waiting.reason, waiting.message
        time.sleep(1)
    raise AssertionError(f"pod {ns}/{pod} did not report a start error within {timeout_s}s")


def test_image_volume_feature_is_enabled_in_apiserver_and_kubelet(cluster):
    gate = 'kubernetes_feature_enabled{name="ImageVolume",stage="BETA"} 1'

    def metrics(path: str) -> str:
        return subprocess.run(
            cluster.kubectl_cmd("get", "--raw", path),
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
        ).stdout

    assert gate in metrics("/metrics")
    assert gate in metrics(f"/api/v1/nodes/{cluster.node_name}/proxy/metrics")


@pytest.mark.parametrize("runtime_class", ["gvisor", None], ids=["gvisor", "runc"])
def test_pod_reads_input_artifact_from_image_volume_byte_for_byte_and_read_only(
    cluster, k8s_client, namespace, runtime_class
):
    files = input_files()
    ref = imagevol.push(
        cluster.registry, "evalrun/test-image-volume", secrets.token_hex(4), "image-artifact", files
    )
    core = client.CoreV1Api(k8s_client)
    core.create_namespaced_pod(
        namespace, image_volume_pod("reader", ref, cluster.probe_image, runtime_class)
    )

    cluster_mod.wait_for_pod(core, namespace, "reader", timeout_s=180)

    entries, mount = tree(core, namespace, "reader")
    files_seen = {p: e for p, e in entries.items() if e["type"] == "file"}
    assert set(files_seen) == set(files)
    for path, data in files.items():
        entry = files_seen[path]
        # Hashed inside the pod by uid 65534 from the bytes it read.
        assert entry["sha256"] == hashlib.sha256(data).hexdigest(), path
        owner = (entry["uid"], entry["gid"])
        assert (entry["size"], entry["mode"], owner) == (len(data), "0644", (0, 0)), path
    assert {p: e["mode"] for p, e in entries.items() if e["type"] == "dir"} == {
        ".": "0755",
        "model": "0755",
        "data": "0755",
    }
    assert "ro" in mount["options"].split(","), mount
    assert mount["fstype"] == ("9p" if runtime_class == "gvisor" else "overlay"), mount
    assert core.read_namespaced_pod_log("reader", namespace, container="cat") == (
        files["hello.txt"].decode()
    )
    write = core.read_namespaced_pod_log("reader", namespace, container="write")
    assert "read-only file system" in write, write


def test_empty_config_artifact_is_refused_by_the_runtime(cluster, k8s_client, namespace):
    """Pins the limit of containerd 2.4: no rootfs.diff_ids, so no unpack; the pod never starts."""
    ref = imagevol.push(
        cluster.registry,
        "evalrun/test-image-volume",
        secrets.token_hex(4),
        "artifact-tar",
        input_files(),
    )
    core = client.CoreV1Api(k8s_client)
    core.create_namespaced_pod(
        namespace, image_volume_pod("refused", ref, cluster.probe_image, "gvisor")
    )

    phase, reason, message = wait_for_waiting_reason(core, namespace, "refused")

    assert (phase, reason) == ("Pending", "CreateContainerError")
    assert "mismatched image rootfs and manifest layers" in message, message


def test_raw_layer_artifact_mounts_as_an_empty_directory(cluster, k8s_client, namespace):
    """oras-style raw layers are not layers to containerd: the pod starts and sees nothing."""
    ref = imagevol.push(
        cluster.registry,
        "evalrun/test-image-volume",
        secrets.token_hex(4),
        "artifact-raw",
        input_files(),
    )
    core = client.CoreV1Api(k8s_client)
    core.create_namespaced_pod(namespace, image_volume_pod("empty", ref, cluster.probe_image, None))

    pod = cluster_mod.wait_for_pod(
        core, namespace, "empty", phases=("Succeeded", "Failed"), timeout_s=180
    )

    entries, _ = tree(core, namespace, "empty")
    assert list(entries) == ["."]
    cat = core.read_namespaced_pod_log("empty", namespace, container="cat")
    assert "no such file or directory" in cat, cat
    assert pod.status.phase == "Failed"  # only because cat found nothing

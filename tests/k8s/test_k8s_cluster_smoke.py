"""Smoke tests of the local cluster (tests/cluster/up.sh): real pods, gVisor, admission, watches."""

from __future__ import annotations

import json
import secrets
import threading
import time

import cluster as cluster_mod
import pytest
import urllib3
from kubernetes import client, watch
from kubernetes.client.rest import ApiException

pytestmark = pytest.mark.k8s

RESTRICTED_SECURITY = client.V1SecurityContext(
    allow_privilege_escalation=False,
    run_as_non_root=True,
    run_as_user=65534,
    capabilities=client.V1Capabilities(drop=["ALL"]),
    seccomp_profile=client.V1SeccompProfile(type="RuntimeDefault"),
)


def probe_pod(
    name: str,
    image: str,
    args: list[str],
    runtime_class: str | None = None,
    security: client.V1SecurityContext | None = RESTRICTED_SECURITY,
) -> client.V1Pod:
    return client.V1Pod(
        metadata=client.V1ObjectMeta(name=name),
        spec=client.V1PodSpec(
            restart_policy="Never",
            runtime_class_name=runtime_class,
            automount_service_account_token=False,
            termination_grace_period_seconds=0,
            containers=[
                client.V1Container(name="probe", image=image, args=args, security_context=security)
            ],
        ),
    )


def run_to_completion(
    core: client.CoreV1Api, ns: str, pod: client.V1Pod, phases: tuple[str, ...] = ("Succeeded",)
) -> tuple[client.V1Pod, str]:
    core.create_namespaced_pod(ns, pod)
    done = cluster_mod.wait_for_pod(core, ns, pod.metadata.name, phases=phases, timeout_s=180)
    return done, core.read_namespaced_pod_log(pod.metadata.name, ns)


def test_pod_runs_registry_image_by_digest_and_reports_that_digest(cluster, k8s_client, namespace):
    nonce = secrets.token_hex(8)
    # A fresh image (unique content, so a digest nothing has pulled before).
    ref = cluster_mod.push_probe_image(
        cluster, "evalrun/smoke-digest", nonce, extra_files={"/nonce": nonce.encode()}
    )
    digest = ref.split("@", 1)[1]
    core = client.CoreV1Api(k8s_client)

    pod, logs = run_to_completion(core, namespace, probe_pod("by-digest", ref, ["cat", "/nonce"]))

    assert logs.strip() == nonce
    (status,) = pod.status.container_statuses
    assert status.image_id.endswith("@" + digest), status.image_id
    assert status.image_id.startswith(f"{cluster.registry}/evalrun/smoke-digest@")


def test_gvisor_runtimeclass_pod_runs_under_gvisor(cluster, k8s_client, namespace):
    core = client.CoreV1Api(k8s_client)

    _, logs = run_to_completion(
        core,
        namespace,
        probe_pod("gvisor-dmesg", cluster.probe_image, ["dmesg"], runtime_class="gvisor"),
    )

    assert "Starting gVisor" in logs, logs


def test_gvisor_pod_has_no_network_while_runc_pod_reaches_the_node(cluster, k8s_client, namespace):
    # The kubelet listens on the node IP: reachable from a runc pod over the CNI
    # bridge, unreachable from a gVisor pod (runsc --network=none).
    core = client.CoreV1Api(k8s_client)
    node = core.read_node(cluster.node_name)
    node_ip = next(a.address for a in node.status.addresses if a.type == "InternalIP")
    target = f"{node_ip}:{node.status.daemon_endpoints.kubelet_endpoint.port}"

    _, runc_logs = run_to_completion(
        core, namespace, probe_pod("runc-connect", cluster.probe_image, ["connect", target])
    )
    gvisor_pod, gvisor_logs = run_to_completion(
        core,
        namespace,
        probe_pod(
            "gvisor-connect", cluster.probe_image, ["connect", target], runtime_class="gvisor"
        ),
        phases=("Failed",),
    )

    assert runc_logs.strip() == "connected"
    assert "connect failed" in gvisor_logs, gvisor_logs
    assert gvisor_pod.status.container_statuses[0].state.terminated.exit_code == 1


@pytest.mark.parametrize("namespace", [{"pod-security": "restricted"}], indirect=True)
def test_restricted_namespace_rejects_privileged_pod(cluster, k8s_client, namespace):
    core = client.CoreV1Api(k8s_client)
    privileged = probe_pod(
        "privileged",
        cluster.probe_image,
        ["sleep", "1"],
        security=client.V1SecurityContext(privileged=True),
    )

    with pytest.raises(ApiException) as rejected:
        core.create_namespaced_pod(namespace, privileged)
    # The same pod, restricted-compliant, is admitted: the rejection is Pod Security's.
    core.create_namespaced_pod(
        namespace, probe_pod("compliant", cluster.probe_image, ["sleep", "1"]), dry_run="All"
    )

    assert rejected.value.status == 403
    message = json.loads(rejected.value.body)["message"]
    assert 'violates PodSecurity "restricted:' in message
    assert "privileged" in message


def test_networkpolicy_objects_are_accepted(k8s_client, namespace):
    net = client.NetworkingV1Api(k8s_client)
    deny_all = client.V1NetworkPolicy(
        metadata=client.V1ObjectMeta(name="default-deny"),
        spec=client.V1NetworkPolicySpec(
            pod_selector=client.V1LabelSelector(), policy_types=["Ingress", "Egress"]
        ),
    )

    net.create_namespaced_network_policy(namespace, deny_all)

    stored = net.read_namespaced_network_policy("default-deny", namespace)
    assert stored.spec.policy_types == ["Ingress", "Egress"]


class RelistingWatcher(threading.Thread):
    """List, then watch from the list's resourceVersion; on any break, list again."""

    def __init__(self, core: client.CoreV1Api, ns: str) -> None:
        super().__init__(daemon=True)
        self.core, self.ns = core, ns
        self.seen: set[str] = set()
        self.lists = 0
        self.breaks: list[str] = []
        self.stopping = threading.Event()
        self.changed = threading.Condition()

    def run(self) -> None:
        while not self.stopping.is_set():
            try:
                listed = self.core.list_namespaced_config_map(self.ns, _request_timeout=10)
                self.lists += 1
                self._saw(cm.metadata.name for cm in listed.items)
                for event in watch.Watch().stream(
                    self.core.list_namespaced_config_map,
                    self.ns,
                    resource_version=listed.metadata.resource_version,
                    timeout_seconds=120,
                    _request_timeout=150,
                ):
                    if event["type"] == "ERROR":  # e.g. 410 Gone: resourceVersion too old
                        break
                    self._saw([event["object"].metadata.name])
                    if self.stopping.is_set():
                        return
                self.breaks.append("stream ended")
            except (ApiException, urllib3.exceptions.HTTPError, OSError) as e:
                self.breaks.append(type(e).__name__)
                time.sleep(0.5)

    def _saw(self, names) -> None:
        with self.changed:
            self.seen.update(names)
            self.changed.notify_all()

    def wait_seen(self, name: str, timeout_s: float) -> bool:
        with self.changed:
            return self.changed.wait_for(lambda: name in self.seen, timeout=timeout_s)


def test_watch_survives_apiserver_restart_by_relisting(cluster, k8s_client, namespace):
    core = client.CoreV1Api(k8s_client)
    watcher = RelistingWatcher(core, namespace)
    watcher.start()
    try:
        core.create_namespaced_config_map(
            namespace, client.V1ConfigMap(metadata=client.V1ObjectMeta(name="before"))
        )
        assert watcher.wait_seen("before", 30)
        lists_before = watcher.lists

        cluster_mod.restart_component("kube-apiserver")
        core.create_namespaced_config_map(
            namespace, client.V1ConfigMap(metadata=client.V1ObjectMeta(name="after"))
        )

        assert watcher.wait_seen("after", 60), (watcher.seen, watcher.breaks)
        assert watcher.breaks, "the watch never noticed the API server going away"
        assert watcher.lists > lists_before
    finally:
        watcher.stopping.set()
        core.create_namespaced_config_map(  # wakes the watch so the thread can exit
            namespace, client.V1ConfigMap(metadata=client.V1ObjectMeta(name="stop"))
        )
        watcher.join(timeout=30)

"""NetworkPolicy is enforced on the real node (kube-router's firewall controller)."""

from __future__ import annotations

import cluster as cluster_mod
import pytest
from kubernetes import client

pytestmark = pytest.mark.k8s

SECURITY = client.V1SecurityContext(
    allow_privilege_escalation=False,
    run_as_non_root=True,
    run_as_user=65534,
    capabilities=client.V1Capabilities(drop=["ALL"]),
)


def pod(name: str, image: str, args: list[str], labels: dict[str, str]) -> client.V1Pod:
    return client.V1Pod(
        metadata=client.V1ObjectMeta(name=name, labels=labels),
        spec=client.V1PodSpec(
            restart_policy="Never",
            automount_service_account_token=False,
            termination_grace_period_seconds=0,
            containers=[
                client.V1Container(name="probe", image=image, args=args, security_context=SECURITY)
            ],
        ),
    )


class Connector:
    """Starts one-shot client pods that try to reach ``target``."""

    def __init__(self, core: client.CoreV1Api, ns: str, image: str, target: str) -> None:
        self.core, self.ns, self.image, self.target = core, ns, image, target
        self.count = 0

    def connects(self, labels: dict[str, str], retry_s: int = 0) -> bool:
        self.count += 1
        name = f"client-{self.count}"
        args = ["connect", self.target, str(retry_s)]
        self.core.create_namespaced_pod(self.ns, pod(name, self.image, args, labels))
        done = cluster_mod.wait_for_pod(
            self.core, self.ns, name, phases=("Succeeded", "Failed"), timeout_s=120
        )
        return bool(done.status.phase == "Succeeded")

    def denied_within(self, labels: dict[str, str], attempts: int = 4) -> bool:
        # kube-router programs iptables asynchronously after the policy appears.
        return any(not self.connects(labels) for _ in range(attempts))


def test_networkpolicy_ingress_is_enforced_between_pods(cluster, k8s_client, namespace):
    core, net = client.CoreV1Api(k8s_client), client.NetworkingV1Api(k8s_client)
    core.create_namespaced_pod(
        namespace, pod("server", cluster.probe_image, ["serve", ":8080"], {"app": "server"})
    )
    server = cluster_mod.wait_for_pod(core, namespace, "server", phases=("Running",))
    connector = Connector(core, namespace, cluster.probe_image, f"{server.status.pod_ip}:8080")
    allowed_labels, other_labels = {"role": "client"}, {"role": "stranger"}

    open_before = connector.connects(other_labels)
    net.create_namespaced_network_policy(
        namespace,
        client.V1NetworkPolicy(
            metadata=client.V1ObjectMeta(name="default-deny-ingress"),
            spec=client.V1NetworkPolicySpec(
                pod_selector=client.V1LabelSelector(), policy_types=["Ingress"]
            ),
        ),
    )
    denied_after_deny_all = connector.denied_within(other_labels)
    net.create_namespaced_network_policy(
        namespace,
        client.V1NetworkPolicy(
            metadata=client.V1ObjectMeta(name="allow-clients"),
            spec=client.V1NetworkPolicySpec(
                pod_selector=client.V1LabelSelector(match_labels={"app": "server"}),
                policy_types=["Ingress"],
                ingress=[
                    client.V1NetworkPolicyIngressRule(
                        _from=[
                            client.V1NetworkPolicyPeer(
                                pod_selector=client.V1LabelSelector(match_labels=allowed_labels)
                            )
                        ]
                    )
                ],
            ),
        ),
    )
    # A new client pod is only in the policy's peer set once kube-router has seen it.
    allowed_client_connects = connector.connects(allowed_labels, retry_s=30)
    stranger_still_denied = not connector.connects(other_labels)

    assert open_before, "without a policy the server must be reachable"
    assert denied_after_deny_all, "default-deny ingress was not enforced"
    assert allowed_client_connects, "the allow rule for role=client was not applied"
    assert stranger_still_denied

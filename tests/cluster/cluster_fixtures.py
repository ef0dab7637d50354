"""pytest fixtures for tests against the local cluster (imported by the k8s/kwok conftests).

- ``cluster``: session-scoped ``ClusterInfo``; starts the cluster or reuses a running one.
  If it cannot start, every test using it errors with the component's log tail
  (CI fails; it never skips).
- ``k8s_client``: a ``kubernetes.client.ApiClient`` for the cluster's admin kubeconfig.
- ``namespace``: a fresh namespace per test, deleted afterwards. Pod Security labels
  can be requested with ``@pytest.mark.parametrize("namespace", [{"pod-security": "restricted"}],
  indirect=True)``, and ``"default-deny": True`` adds the chart's default-deny
  NetworkPolicy (what evalrun's preflight demands of a namespace it runs in).
"""

from __future__ import annotations

import re
import secrets
import time
from collections.abc import Iterator

import cluster as _cluster
import pytest
from kubernetes import client, config


@pytest.fixture(scope="session")
def cluster() -> _cluster.ClusterInfo:
    try:
        return _cluster.ensure_cluster()
    except _cluster.ClusterStartError as e:
        pytest.fail(f"local Kubernetes cluster did not start:\n{e}", pytrace=False)


@pytest.fixture(scope="session")
def k8s_client(cluster: _cluster.ClusterInfo) -> Iterator[client.ApiClient]:
    api = config.new_client_from_config(config_file=str(cluster.kubeconfig))
    yield api
    api.close()


@pytest.fixture
def namespace(request: pytest.FixtureRequest, k8s_client: client.ApiClient) -> Iterator[str]:
    options = getattr(request, "param", None) or {}
    core = client.CoreV1Api(k8s_client)
    base = re.sub(r"[^a-z0-9-]+", "-", request.node.name.lower()).strip("-")[:40].strip("-")
    name = f"t-{base}-{secrets.token_hex(3)}"
    labels = {"evalrun.dev/test": "true"}
    if level := options.get("pod-security"):
        labels |= {
            f"pod-security.kubernetes.io/{mode}": level for mode in ("enforce", "warn", "audit")
        }
    core.create_namespace(
        client.V1Namespace(metadata=client.V1ObjectMeta(name=name, labels=labels))
    )
    if options.get("default-deny"):
        client.NetworkingV1Api(k8s_client).create_namespaced_network_policy(
            name,
            client.V1NetworkPolicy(
                metadata=client.V1ObjectMeta(name="default-deny-all"),
                spec=client.V1NetworkPolicySpec(
                    pod_selector=client.V1LabelSelector(), policy_types=["Ingress", "Egress"]
                ),
            ),
        )
    # Pods are rejected until the controller-manager has created the default ServiceAccount.
    deadline = time.monotonic() + 60
    while not core.list_namespaced_service_account(
        name, field_selector="metadata.name=default"
    ).items:
        assert time.monotonic() < deadline, f"no default ServiceAccount in {name} after 60s"
        time.sleep(0.2)
    yield name
    core.delete_namespace(
        name, body=client.V1DeleteOptions(grace_period_seconds=0, propagation_policy="Background")
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if not core.list_namespace(field_selector=f"metadata.name={name}").items:
            return
        time.sleep(0.5)
    pytest.fail(f"namespace {name} still terminating after 120s", pytrace=False)

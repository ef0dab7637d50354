"""The chart's runner Role bound to a ServiceAccount in a test's namespace, in effect."""

from __future__ import annotations

import time
from pathlib import Path

import yaml
from kubernetes import client

ROOT = Path(__file__).resolve().parents[2]
RUNNER = "evalrun-runner"


def runner_identity(namespace: str) -> tuple[str, list[str]]:
    """The user and groups the API server gives ServiceAccount ``evalrun-runner``."""
    user = f"system:serviceaccount:{namespace}:{RUNNER}"
    return user, ["system:serviceaccounts", f"system:serviceaccounts:{namespace}"]


def allowed(
    api: client.ApiClient, namespace: str, ns: str, verb: str, resource: str,
    group: str = "", name: str = "",
) -> bool:
    """Whether the runner's ServiceAccount (of ``namespace``) may ``verb`` in ``ns``."""
    user, groups = runner_identity(namespace)
    review = client.AuthorizationV1Api(api).create_subject_access_review(
        client.V1SubjectAccessReview(
            spec=client.V1SubjectAccessReviewSpec(
                user=user,
                groups=groups,
                resource_attributes=client.V1ResourceAttributes(
                    namespace=ns, verb=verb, resource=resource, group=group, name=name or None
                ),
            )
        )
    )
    return bool(review.status.allowed)


def bind_runner_role(api: client.ApiClient, namespace: str, timeout_s: float = 30.0) -> None:
    """ServiceAccount, Role (the rules of manifests/evalrun.yaml) and RoleBinding, returned
    once the authorizer grants the binding: its informer sees a new binding a moment after
    the create returns, and a check (or a run) in that moment is refused."""
    docs = list(yaml.safe_load_all((ROOT / "manifests" / "evalrun.yaml").read_text()))
    role = next(d for d in docs if d and d["kind"] == "Role")
    core, rbac = client.CoreV1Api(api), client.RbacAuthorizationV1Api(api)
    core.create_namespaced_service_account(
        namespace, client.V1ServiceAccount(metadata=client.V1ObjectMeta(name=RUNNER))
    )
    rbac.create_namespaced_role(namespace, {**role, "metadata": {"name": RUNNER}})
    rbac.create_namespaced_role_binding(
        namespace,
        {
            "metadata": {"name": RUNNER},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": RUNNER},
            "subjects": [{"kind": "ServiceAccount", "name": RUNNER, "namespace": namespace}],
        },
    )
    deadline = time.monotonic() + timeout_s
    while not allowed(api, namespace, namespace, "create", "jobs", group="batch"):
        if time.monotonic() > deadline:
            raise AssertionError(
                f"RoleBinding {namespace}/{RUNNER} not in effect after {timeout_s} s"
            )
        time.sleep(0.2)

"""charts/evalrun and manifests/: linted, rendered, identical, installed into the real cluster."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml
from kubernetes import client

pytestmark = pytest.mark.k8s

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "evalrun"


def _helm(cluster, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(cluster.helm), *args],
        capture_output=True,
        text=True,
        check=False,
        env={"KUBECONFIG": str(cluster.kubeconfig), "HOME": "/tmp", "PATH": "/usr/bin:/bin"},
    )


def _docs(text: str) -> list[dict]:
    return [d for d in yaml.safe_load_all(text) if d]


def test_chart_lints(cluster):
    proc = _helm(cluster, "lint", "--strict", str(CHART))
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_plain_manifests_equal_the_default_render(cluster):
    proc = _helm(cluster, "template", "evalrun", str(CHART))
    assert proc.returncode == 0, proc.stderr
    rendered = _docs(proc.stdout)
    checked_in = _docs((ROOT / "manifests" / "evalrun.yaml").read_text())
    assert rendered == checked_in, "regenerate manifests/evalrun.yaml from the chart"
    kinds = sorted(d["kind"] for d in rendered)
    assert kinds == sorted(
        [
            "Namespace",
            "ServiceAccount",
            "Role",
            "RoleBinding",
            "ClusterRole",
            "ClusterRoleBinding",
            "NetworkPolicy",
            "RuntimeClass",
            "ResourceQuota",
            "LimitRange",
        ]
    )
    ns = next(d for d in rendered if d["kind"] == "Namespace")
    assert ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    role = next(d for d in rendered if d["kind"] == "Role")
    resources = {r for rule in role["rules"] for r in rule["resources"]}
    assert "secrets" not in resources and "*" not in resources


@pytest.mark.parametrize("namespace", [{"pod-security": "restricted"}], indirect=True)
def test_chart_installs_and_the_runner_cannot_read_secrets(cluster, namespace, k8s_client):
    release = f"evalrun-{namespace[-6:]}"
    proc = _helm(
        cluster,
        "install",
        release,
        str(CHART),
        "--namespace",
        namespace,
        "--set",
        f"namespace.name={namespace}",
        "--set",
        "namespace.create=false",
        "--set",
        "runtimeClass.create=false",
        "--wait",
        "--timeout",
        "60s",
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    try:
        authz = client.AuthorizationV1Api(k8s_client)
        sa = f"system:serviceaccount:{namespace}:evalrun-runner"

        def allowed(verb: str, resource: str, group: str = "", sub: str = "") -> bool:
            review = client.V1SubjectAccessReview(
                spec=client.V1SubjectAccessReviewSpec(
                    user=sa,
                    groups=["system:serviceaccounts"],
                    resource_attributes=client.V1ResourceAttributes(
                        namespace=namespace,
                        verb=verb,
                        resource=resource,
                        group=group,
                        subresource=sub or None,
                    ),
                )
            )
            return authz.create_subject_access_review(review).status.allowed

        assert allowed("create", "jobs", "batch")
        assert allowed("watch", "pods")
        assert allowed("get", "pods", sub="log")
        # results leave held pods by exec (websocket: get, plus create since 1.35) ...
        assert allowed("create", "pods", sub="exec")
        assert allowed("get", "pods", sub="exec")
        # ... and that is all it adds: no Secrets, no pods of its own, no attach
        assert not allowed("get", "secrets")
        assert not allowed("list", "secrets")
        assert not allowed("watch", "secrets")
        assert not allowed("create", "pods")
        assert not allowed("create", "pods", sub="attach")
        assert not allowed("patch", "configmaps")
        policies = client.NetworkingV1Api(k8s_client).list_namespaced_network_policy(namespace)
        deny = next(p for p in policies.items if p.metadata.name == "default-deny-all")
        assert sorted(deny.spec.policy_types) == ["Egress", "Ingress"]
    finally:
        _helm(cluster, "uninstall", release, "--namespace", namespace)


def test_audit_cronjob_is_opt_in_and_digest_pinned(cluster):
    image = "127.0.0.1:5000/evalrun/runner@sha256:" + "a" * 64
    proc = _helm(cluster, "template", "evalrun", str(CHART), "--set", "audit.enabled=true",
                 "--set", f"audit.image={image}")
    assert proc.returncode == 0, proc.stderr
    cron = next(d for d in _docs(proc.stdout) if d["kind"] == "CronJob")
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"
    job = cron["spec"]["jobTemplate"]["spec"]
    assert job["backoffLimit"] == 0
    container = job["template"]["spec"]["containers"][0]
    assert container["image"] == image and container["args"][0] == "audit"
    tagged = _helm(cluster, "template", "evalrun", str(CHART), "--set", "audit.enabled=true",
                   "--set", "audit.image=127.0.0.1:5000/evalrun/runner:latest")
    assert tagged.returncode != 0 and "pinned by digest" in tagged.stderr


def test_two_tenants_each_run_in_their_own_namespace_and_read_nothing_of_the_other(
    cluster, k8s_client
):
    import secrets as _secrets

    suffix = _secrets.token_hex(3)
    team_a, team_b = f"t-tenant-a-{suffix}", f"t-tenant-b-{suffix}"
    release = f"tenants-{suffix}"
    proc = _helm(
        cluster, "install", release, str(CHART), "--namespace", "default",
        "--set", f"namespace.name=t-tenant-main-{suffix}",
        "--set", "runtimeClass.create=false", "--set", "quota.create=false",
        "--set", "limitRange.create=false", "--set", "networkPolicy.defaultDeny=false",
        "--set", "runner.readNodes=false",
        "--set", f"tenants[0].name={team_a}", "--set", "tenants[0].quota.gpus=16",
        "--set", f"tenants[1].name={team_b}", "--set", "tenants[1].quota.gpus=8",
        "--set", "tenants[1].runners[0].kind=Group",
        "--set", f"tenants[1].runners[0].name=team-b-{suffix}",
        "--wait", "--timeout", "60s",
    )
    try:
        assert proc.returncode == 0, proc.stdout + proc.stderr
        authz = client.AuthorizationV1Api(k8s_client)
        core = client.CoreV1Api(k8s_client)

        def allowed(user: str, groups: list[str], ns: str, verb: str, resource: str,
                    group: str = "", sub: str = "") -> bool:
            review = client.V1SubjectAccessReview(spec=client.V1SubjectAccessReviewSpec(
                user=user, groups=groups, resource_attributes=client.V1ResourceAttributes(
                    namespace=ns, verb=verb, resource=resource, group=group,
                    subresource=sub or None)))
            return authz.create_subject_access_review(review).status.allowed

        for own, other in ((team_a, team_b), (team_b, team_a)):
            sa = f"system:serviceaccount:{own}:evalrun-runner"
            groups = ["system:serviceaccounts", f"system:serviceaccounts:{own}"]
            assert allowed(sa, groups, own, "create", "jobs", "batch")
            assert allowed(sa, groups, own, "get", "pods", sub="log")
            assert allowed(sa, groups, own, "list", "workloads", "kueue.x-k8s.io")
            for verb in ("get", "list", "watch"):
                assert not allowed(sa, groups, own, verb, "secrets")
                assert not allowed(sa, groups, other, verb, "secrets")
                assert not allowed(sa, groups, other, verb, "jobs", "batch")
                assert not allowed(sa, groups, other, verb, "pods")
            assert not allowed(sa, groups, other, "get", "pods", sub="log")
            assert not allowed(sa, groups, other, "create", "jobs", "batch")
            quota = core.read_namespaced_resource_quota("evalrun", own)
            assert quota.spec.hard["requests.nvidia.com/gpu"] == ("16" if own == team_a else "8")
            ns = core.read_namespace(own)
            assert ns.metadata.labels["pod-security.kubernetes.io/enforce"] == "restricted"
            policies = client.NetworkingV1Api(k8s_client).list_namespaced_network_policy(own)
            assert [p.metadata.name for p in policies.items] == ["default-deny-all"]
        # a team's people, bound through `runners`, get the same rights in their namespace only
        person = ("alice", [f"team-b-{suffix}"])
        assert allowed(*person, team_b, "create", "jobs", "batch")
        assert not allowed(*person, team_a, "list", "jobs", "batch")
        assert not allowed(*person, team_b, "get", "secrets")
    finally:
        _helm(cluster, "uninstall", release, "--namespace", "default", "--wait")

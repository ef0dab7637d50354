"""The runner's RBAC grows only by what results-by-exec needs (pods/exec) and what the
namespace-policy check reads (its namespace, its NetworkPolicies), in both forms.

The k8s tier renders the chart with the pinned helm, compares it with manifests/, and asks
the real API server (SubjectAccessReview) what the ServiceAccount may do; this tier pins the
rules themselves, so a widened Role fails without a cluster.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]

# Exactly what `evalrun run --backend kubernetes` calls in its namespace.
EXPECTED_RULES = {
    ("batch", "jobs"): {"create", "get", "list", "watch", "patch", "delete"},
    ("", "pods"): {"get", "list", "watch"},
    ("", "pods/log"): {"get"},
    ("", "pods/exec"): {"create", "get"},
    ("", "configmaps"): {"create", "get", "delete"},
    ("", "events"): {"get", "list", "watch"},
    # the preflight's namespace-policy check (runner/backends/namespace_policy.py)
    ("", "namespaces"): {"get"},
    ("networking.k8s.io", "networkpolicies"): {"list"},
    # why a queued run waits (runner/adapters/kueue.py): its Workload, its LocalQueue
    ("kueue.x-k8s.io", "workloads"): {"get", "list"},
    ("kueue.x-k8s.io", "localqueues"): {"get", "list"},
}


def _role() -> dict:
    docs = [d for d in yaml.safe_load_all((ROOT / "manifests" / "evalrun.yaml").read_text()) if d]
    (role,) = [d for d in docs if d["kind"] == "Role" and d["metadata"]["name"] == "evalrun-runner"]
    return role


def _grants(role: dict) -> dict[tuple[str, str], set[str]]:
    grants: dict[tuple[str, str], set[str]] = {}
    for rule in role["rules"]:
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                grants.setdefault((group, resource), set()).update(rule["verbs"])
    return grants


def test_the_runner_may_exec_and_nothing_more_than_it_needs():
    grants = _grants(_role())
    assert grants == EXPECTED_RULES
    assert not any(resource == "secrets" or "*" in (resource, *verbs)
                   for (_, resource), verbs in grants.items())
    assert "create" not in grants[("", "pods")]  # exec into its own pods, never new pods
    assert "patch" not in grants[("", "configmaps")]  # the ConfigMap is created owned


def test_chart_and_plain_manifests_grant_the_same_rules():
    # the chart's Roles (main namespace and every tenant) include one helper
    templates = ROOT / "charts" / "evalrun" / "templates"
    plain = (ROOT / "manifests" / "evalrun.yaml").read_text()
    helper = re.search(r'define "evalrun.runnerRules" -\}\}\n(.*?)\n\{\{- end',
                       (templates / "_helpers.tpl").read_text(), re.S)
    assert helper
    chart_rules = "\n".join(f"  {line}" for line in helper[1].splitlines())
    for name in ("rbac.yaml", "tenants.yaml"):
        assert 'rules:\n  {{- include "evalrun.runnerRules"' in (templates / name).read_text()

    def rules_block(text: str) -> str:
        match = re.search(r"name: evalrun-runner\n.*?rules:\n(.*?)\n---", text, re.S)
        assert match, "no evalrun-runner Role"
        return match[1]

    assert chart_rules == rules_block(plain[plain.index("kind: Role\n"):])

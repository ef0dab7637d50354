"""Claims observed, not copied: the namespace check, the recorded network, the launcher.

The rule: before a Kubernetes run is submitted, runner.backends.namespace_policy decides
from the objects read (pure: objects in, findings out) whether the namespace enforces
the sandbox policy; the backend refuses with exit 4 naming each demand not met, and
records what it observed (``sandbox.network``, ``sandbox.details.namespace_policy``)
instead of the spec's claim. ``provenance.launched_by`` says it is self-asserted and is
bound to the signing key, which verification checks.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from runner.backends.namespace_policy import (
    NamespaceObjects,
    check_namespace,
    runtime_class_of,
    selects,
)
from runner.build.provenance import launcher
from runner.errors import NamespacePolicyUnmet, VerificationFailed
from runner.model.plan import BackendResult
from runner.model.predicate import SELF_ASSERTED

pytestmark = pytest.mark.unit

POD = {"app.kubernetes.io/managed-by": "evalrun", "evalrun.dev/run-id": "r-1"}
RESTRICTED_NS = {
    "metadata": {"name": "ev", "labels": {"pod-security.kubernetes.io/enforce": "restricted"}}
}
DENY_ALL = {
    "metadata": {"name": "default-deny-all"},
    "spec": {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]},
}


def _policy(name: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {"metadata": {"name": name}, "spec": spec}


def _check(
    ns: dict | None = RESTRICTED_NS,
    policies: list | None = None,
    *,
    runtime_class: str | None = "gvisor",
    found: bool | None = True,
    network: str = "none",
):
    objects = NamespaceObjects(
        namespace="ev",
        namespace_object=ns,
        network_policies=[DENY_ALL] if policies is None else policies,
        runtime_class=runtime_class,
        runtime_class_found=found,
    )
    return check_namespace(objects, pod_labels=POD, network=network)


def test_the_chart_namespace_meets_every_demand_and_says_network_none() -> None:
    policy = _check()
    assert policy.unmet == []
    assert policy.network == "none"
    assert policy.egress_denied_by == ("default-deny-all",)
    assert policy.enforce() is policy


@pytest.mark.parametrize(
    ("ns", "policies", "found", "unmet"),
    [
        ({"metadata": {"name": "default"}}, None, True, ["pod security"]),
        (
            {"metadata": {"labels": {"pod-security.kubernetes.io/enforce": "baseline"}}},
            None,
            True,
            ["pod security"],
        ),
        (RESTRICTED_NS, [], True, ["network"]),
        (RESTRICTED_NS, None, False, ["runtime class"]),
        (
            {"metadata": {"name": "default"}},
            [],
            False,
            ["pod security", "network", "runtime class"],
        ),
        (None, None, True, ["pod security"]),
        (RESTRICTED_NS, "unreadable", True, ["network"]),
    ],
    ids=[
        "no-label",
        "baseline",
        "no-policy",
        "no-runtimeclass",
        "default-namespace",
        "ns-forbidden",
        "policies-forbidden",
    ],
)
def test_each_missing_demand_is_named(ns, policies, found, unmet) -> None:
    policy = _check(ns, None if policies == "unreadable" else policies, found=found)
    if policies == "unreadable":
        policy = check_namespace(
            NamespaceObjects("ev", ns, None, "gvisor", found), pod_labels=POD, network="none"
        )
    assert [f.demand for f in policy.unmet] == unmet
    with pytest.raises(NamespacePolicyUnmet) as exc:
        policy.enforce()
    assert exc.value.exit_code == 4
    assert "\n" not in exc.value.message and "'ev'" in exc.value.message
    for demand in unmet:
        assert demand in exc.value.message
    assert [p["demand"] for p in exc.value.as_dict()["unmet"]] == unmet  # type: ignore[index]


@pytest.mark.parametrize(
    "extra",
    [
        _policy(
            "allow-dns",
            {
                "podSelector": {},
                "policyTypes": ["Egress"],
                "egress": [{"ports": [{"port": 53, "protocol": "UDP"}]}],
            },
        ),
        _policy(
            "allow-all-out",
            {"podSelector": {"matchLabels": {"evalrun.dev/run-id": "r-1"}}, "egress": [{}]},
        ),
        _policy(
            "odd-selector",
            {
                "podSelector": {"matchExpressions": [{"key": "x", "operator": "Weird"}]},
                "policyTypes": ["Egress"],
                "egress": [{}],
            },
        ),
    ],
)
def test_any_policy_that_may_allow_egress_to_the_pods_fails_network(extra) -> None:
    policy = _check(policies=[DENY_ALL, extra])
    assert [f.demand for f in policy.unmet] == ["network"]
    assert extra["metadata"]["name"] in policy.unmet[0].observed
    assert policy.network is None


def test_policies_that_do_not_select_the_pods_do_not_count() -> None:
    other = {"podSelector": {"matchLabels": {"app": "web"}}, "policyTypes": ["Egress"]}
    policy = _check(policies=[_policy("web-only", other)])
    assert [f.demand for f in policy.unmet] == ["network"]
    opened = _policy("web-out", {**other, "egress": [{}]})
    assert _check(policies=[DENY_ALL, opened]).unmet == []


def test_ingress_only_deny_does_not_deny_egress() -> None:
    ingress = _policy("deny-in", {"podSelector": {}, "policyTypes": ["Ingress"]})
    policy = _check(policies=[ingress])
    assert [f.demand for f in policy.unmet] == ["network"]
    assert policy.ingress_denied_by == ("deny-in",)


@pytest.mark.parametrize(
    ("selector", "expected"),
    [
        ({}, True),
        ({"matchLabels": {"evalrun.dev/run-id": "r-1"}}, True),
        ({"matchLabels": {"evalrun.dev/run-id": "r-2"}}, False),
        (
            {
                "matchExpressions": [
                    {"key": "evalrun.dev/run-id", "operator": "In", "values": ["r-1", "r-9"]}
                ]
            },
            True,
        ),
        (
            {
                "matchExpressions": [
                    {"key": "evalrun.dev/run-id", "operator": "NotIn", "values": ["r-1"]}
                ]
            },
            False,
        ),
        ({"matchExpressions": [{"key": "team", "operator": "DoesNotExist"}]}, True),
        ({"matchExpressions": [{"key": "team", "operator": "Exists"}]}, False),
        ({"matchExpressions": [{"key": "x", "operator": "Gt"}]}, None),
        ("not a selector", None),
    ],
)
def test_label_selectors_match_as_the_api_server_does(selector, expected) -> None:
    assert selects(selector, POD) is expected


def test_a_spec_that_allows_network_needs_no_deny_policy() -> None:
    assert _check(policies=[], network="egress").unmet == []


def test_no_runtime_class_for_runc_and_unreadable_ones_are_left_to_admission() -> None:
    assert [f.demand for f in _check(runtime_class=None).findings] == ["pod security", "network"]
    assert _check(found=None).unmet == []


def test_the_observed_policy_replaces_the_spec_claim_in_the_backend_result() -> None:
    result = BackendResult(
        backend="kubernetes",
        exit_code=0,
        image_digest_confirmed=True,
        runtime="gvisor",
        details={"job": "j"},
    )
    recorded = _check().observed(result)
    assert recorded.network == "none"
    facts = recorded.details["namespace_policy"]
    assert facts["egress_denied_by"] == ["default-deny-all"] and recorded.details["job"] == "j"
    json.dumps(recorded.details)  # plain JSON, as the predicate holds it


def test_runtime_class_of_a_plan() -> None:
    class Plan:
        runtime, runtime_class = "gvisor", None

    assert runtime_class_of(Plan()) == "gvisor"  # type: ignore[arg-type]
    Plan.runtime, Plan.runtime_class = "runc", "nvidia"
    assert runtime_class_of(Plan()) == "nvidia"  # type: ignore[arg-type]
    Plan.runtime_class = None
    assert runtime_class_of(Plan()) is None  # type: ignore[arg-type]


# --- chart and manifests grant exactly the reads the check needs --------------------------


ROOT = Path(__file__).resolve().parents[2]


# the chart's Roles include the rules helper (two spaces less indented than in manifests/)
@pytest.mark.parametrize(("path", "pad"), [("charts/evalrun/templates/_helpers.tpl", "  "),
                                           ("manifests/evalrun.yaml", "    ")])
def test_the_runner_role_may_read_its_namespace_and_list_network_policies(
    path: str, pad: str
) -> None:
    text = (ROOT / path).read_text()
    assert f'resources: ["namespaces"]\n{pad}verbs: ["get"]' in text
    assert f'apiGroups: ["networking.k8s.io"]\n{pad}resources: ["networkpolicies"]\n' in text
    assert f'resources: ["networkpolicies"]\n{pad}verbs: ["list"]' in text


# --- launched_by: self-asserted, bound to the signing key ---------------------------------


def test_the_launcher_is_marked_self_asserted_and_bound_to_the_key() -> None:
    env = {"USER": "alice\udcff", "CI": "true", "BUILD_URL": "https://ci/1"}
    found = launcher(env, signer_keyid="ab" * 32)
    assert found.evidence == SELF_ASSERTED and found.signer_keyid == "ab" * 32
    assert found.user == "alice\\udcff"  # undecodable bytes recorded escaped, never a crash
    assert launcher(env).evidence is None  # without a key: no binding claimed


def test_verification_refuses_a_launcher_bound_to_another_key(tmp_path: Path) -> None:
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "fuzz"))
    from harness import fuzz_signer
    from seeds import PREDICATE

    from runner.bundle.build import build_bundle
    from runner.bundle.verify import verify_bundle

    signer = fuzz_signer()
    predicate = copy.deepcopy(PREDICATE)
    predicate["provenance"] = {
        "launched_by": {"user": "alice", "evidence": SELF_ASSERTED, "signer_keyid": "0" * 64}
    }
    content = tmp_path / "b"
    content.mkdir()
    (content / "r.txt").write_text("x")
    build_bundle(content, predicate, signer, content)
    with pytest.raises(VerificationFailed) as exc:
        verify_bundle(content, signer.verifier())
    assert any("launched_by is bound to keyid 000" in p for p in exc.value.problems)
    predicate["provenance"]["launched_by"]["signer_keyid"] = signer.keyid
    good = tmp_path / "g"
    good.mkdir()
    (good / "r.txt").write_text("x")
    build_bundle(good, predicate, signer, good)
    assert verify_bundle(good, signer.verifier()).keyid == signer.keyid

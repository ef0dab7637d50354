"""Does the namespace enforce what the run's sandbox policy demands? A pure check.

Objects in — the Namespace, its NetworkPolicies and whether the RuntimeClass exists, as
the API server returned them (plain JSON, ``None`` where the runner could not read
them) — findings out. No client in sight: :mod:`runner.adapters.kubernetes` reads the
objects, the Kubernetes backend's preflight calls :func:`check_namespace` before it
submits anything and refuses (exit 4, naming every demand not met) unless all are met,
and what was observed goes into the bundle's sandbox facts instead of the spec's claim.

What a run demands of its namespace:

- **pod security** — the namespace enforces the ``restricted`` Pod Security level
  (label ``pod-security.kubernetes.io/enforce: restricted``);
- **network** (``sandbox.network: none``) — egress of the run's pods is denied: a
  NetworkPolicy whose pod selector matches the pod's labels has the ``Egress`` policy
  type, and no NetworkPolicy that may select them allows any egress (policies add up:
  one allowing rule opens the network, whatever denies it elsewhere);
- **runtime class** — the RuntimeClass the plan names (``gvisor`` for the gvisor
  runtime) exists.

Ingress is observed and recorded too; a run does not depend on it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from runner._internal.foreign import KubeObject
from runner.errors import NamespacePolicyUnmet
from runner.model.backend_details import FindingRecord, NamespacePolicyRecord
from runner.model.plan import BackendResult, RunPlan

PSA_ENFORCE = "pod-security.kubernetes.io/enforce"
RBAC_HINT = (
    "the runner needs get on namespaces and list on networkpolicies in the target namespace "
    "(charts/evalrun or manifests/evalrun.yaml grant both)"
)
SETUP_HINT = (
    "run evaluations in a namespace set up by charts/evalrun or manifests/evalrun.yaml "
    "(Pod Security restricted, default-deny NetworkPolicy, RuntimeClass gvisor), e.g. -n evalrun"
)


@dataclass(frozen=True)
class NamespaceObjects:
    """What the runner read of the target namespace; None where it could not read it."""

    namespace: str
    namespace_object: KubeObject | None
    network_policies: Sequence[KubeObject] | None
    runtime_class: str | None = None
    runtime_class_found: bool | None = None
    unreadable: tuple[str, ...] = ()


@dataclass(frozen=True)
class Finding:
    """One demand of the sandbox policy, and what was found."""

    demand: str
    met: bool
    observed: str
    required: str

    def as_json(self) -> FindingRecord:
        return {
            "demand": self.demand,
            "met": self.met,
            "observed": self.observed,
            "required": self.required,
        }


@dataclass(frozen=True)
class NamespacePolicy:
    """The findings for one namespace and one run's pods."""

    namespace: str
    findings: tuple[Finding, ...]
    egress_denied_by: tuple[str, ...] = ()
    ingress_denied_by: tuple[str, ...] = ()

    @property
    def unmet(self) -> list[Finding]:
        return [f for f in self.findings if not f.met]

    @property
    def network(self) -> str | None:
        """``none`` when egress was observed denied for the run's pods, else None."""
        met = {f.demand: f.met for f in self.findings}
        return "none" if met.get("network") else None

    def enforce(self) -> NamespacePolicy:
        """This policy if every demand is met; EnvironmentMismatch (exit 4) naming the rest."""
        unmet = self.unmet
        if unmet:
            unreadable = any(f.observed.startswith("could not") for f in unmet)
            raise NamespacePolicyUnmet(
                self.namespace, unmet, hint=RBAC_HINT if unreadable else SETUP_HINT
            )
        return self

    def as_json(self) -> NamespacePolicyRecord:
        """What the bundle's ``sandbox.details.namespace_policy`` records."""
        return {
            "namespace": self.namespace,
            "findings": [f.as_json() for f in self.findings],
            "egress_denied_by": list(self.egress_denied_by),
            "ingress_denied_by": list(self.ingress_denied_by),
        }

    def observed(self, result: BackendResult) -> BackendResult:
        """``result`` with the network observed here and the findings in its details."""
        return result.model_copy(
            update={
                "network": self.network,
                "details": {**result.details, "namespace_policy": self.as_json()},
            }
        )


# --------------------------------------------------------------------------- label selectors


def selects(selector: object, labels: Mapping[str, str]) -> bool | None:
    """Whether a LabelSelector matches ``labels``; None when it cannot be told (malformed)."""
    if not isinstance(selector, Mapping):
        return None
    match_labels = selector.get("matchLabels") or selector.get("match_labels") or {}
    expressions = selector.get("matchExpressions") or selector.get("match_expressions") or []
    if not isinstance(match_labels, Mapping) or not isinstance(expressions, list):
        return None
    for key, value in match_labels.items():
        if labels.get(str(key)) != value:
            return False
    for expression in expressions:
        if not isinstance(expression, Mapping):
            return None
        key, operator = expression.get("key"), expression.get("operator")
        values = expression.get("values") or []
        if not isinstance(key, str) or not isinstance(values, list):
            return None
        present = key in labels
        if operator == "In":
            matched = present and labels[key] in values
        elif operator == "NotIn":
            matched = not present or labels[key] not in values
        elif operator == "Exists":
            matched = present
        elif operator == "DoesNotExist":
            matched = not present
        else:
            return None
        if not matched:
            return False
    return True


def _policy_types(spec: Mapping[str, Any]) -> set[str]:
    """The policy types in force (defaults as the API server applies them)."""
    found = spec.get("policyTypes", spec.get("policy_types"))
    if isinstance(found, list) and found:
        return {t for t in found if isinstance(t, str)}
    types = {"Ingress"}
    if spec.get("egress"):
        types.add("Egress")
    return types


def _name(policy: KubeObject) -> str:
    metadata = policy.get("metadata")
    name = metadata.get("name") if isinstance(metadata, Mapping) else None
    return str(name) if name else "(unnamed)"


# --------------------------------------------------------------------------- the check


def _pod_security(objects: NamespaceObjects) -> Finding:
    required = f"label {PSA_ENFORCE}: restricted"
    if objects.namespace_object is None:
        return Finding("pod security", False, "could not read the namespace", required)
    metadata = objects.namespace_object.get("metadata")
    labels = metadata.get("labels") if isinstance(metadata, Mapping) else None
    level = labels.get(PSA_ENFORCE) if isinstance(labels, Mapping) else None
    if level == "restricted":
        return Finding("pod security", True, f"{PSA_ENFORCE}: restricted", required)
    shown = f"{PSA_ENFORCE}: {level}" if level is not None else f"no {PSA_ENFORCE} label"
    return Finding("pod security", False, shown, required)


def _directional(
    policies: Sequence[KubeObject], pod_labels: Mapping[str, str], direction: str
) -> tuple[list[str], list[str]]:
    """(policies isolating the pods in ``direction``, policies that may allow traffic there)."""
    rules_key = "egress" if direction == "Egress" else "ingress"
    isolating: list[str] = []
    allowing: list[str] = []
    for policy in policies:
        spec = policy.get("spec")
        if not isinstance(spec, Mapping):
            continue
        if direction not in _policy_types(spec):
            continue
        selected = selects(spec.get("podSelector", spec.get("pod_selector")), pod_labels)
        if selected is False:
            continue
        rules = spec.get(rules_key)
        if rules:  # any rule allows some traffic; one that cannot be read may allow it too
            allowing.append(_name(policy))
        elif selected:
            isolating.append(_name(policy))
    return isolating, allowing


def check_namespace(
    objects: NamespaceObjects, *, pod_labels: Mapping[str, str], network: str
) -> NamespacePolicy:
    """The findings for a run whose pods carry ``pod_labels`` and whose spec demands
    ``network`` (``none``), given what was read of the namespace."""
    findings = [_pod_security(objects)]
    egress_by: list[str] = []
    ingress_by: list[str] = []
    if objects.network_policies is None:
        findings.append(
            Finding(
                "network",
                False,
                "could not list the namespace's NetworkPolicies",
                "a NetworkPolicy denying all egress of the run's pods",
            )
        )
    else:
        egress_by, egress_open = _directional(objects.network_policies, pod_labels, "Egress")
        ingress_by, _ = _directional(objects.network_policies, pod_labels, "Ingress")
        required = "a NetworkPolicy denying all egress of the run's pods, none allowing any"
        if network != "none":
            findings.append(Finding("network", True, f"spec allows network {network!r}", required))
        elif egress_open:
            findings.append(
                Finding(
                    "network",
                    False,
                    f"NetworkPolicy {', '.join(sorted(egress_open))} allows egress",
                    required,
                )
            )
        elif not egress_by:
            findings.append(
                Finding("network", False, "no NetworkPolicy denies the pods' egress", required)
            )
        else:
            findings.append(
                Finding(
                    "network",
                    True,
                    f"egress denied by NetworkPolicy {', '.join(sorted(egress_by))}",
                    required,
                )
            )
    if objects.runtime_class is not None:
        required = f"RuntimeClass {objects.runtime_class!r}"
        if objects.runtime_class_found is False:
            findings.append(Finding("runtime class", False, "no such RuntimeClass", required))
        elif objects.runtime_class_found is None:
            # cluster-scoped and maybe not readable: admission refuses a pod naming none
            findings.append(
                Finding("runtime class", True, "not readable; admission enforces it", required)
            )
        else:
            findings.append(Finding("runtime class", True, "exists", required))
    return NamespacePolicy(
        namespace=objects.namespace,
        findings=tuple(findings),
        egress_denied_by=tuple(sorted(egress_by)),
        ingress_denied_by=tuple(sorted(ingress_by)),
    )


def runtime_class_of(plan: RunPlan) -> str | None:
    """The RuntimeClass a plan's pods name (None: the cluster's default runtime)."""
    if plan.runtime == "gvisor" or plan.runtime_class:
        return plan.runtime_class or "gvisor"
    return None


__all__ = [
    "Finding",
    "NamespaceObjects",
    "NamespacePolicy",
    "check_namespace",
    "runtime_class_of",
    "selects",
]

"""manifests/audit-cronjob.yaml: a scheduled audit that fails loudly and runs restricted."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from runner.cli.main import build_parser

pytestmark = pytest.mark.unit
MANIFEST = Path(__file__).resolve().parents[2] / "manifests" / "audit-cronjob.yaml"


def docs() -> dict[str, dict]:
    return {d["kind"]: d for d in yaml.safe_load_all(MANIFEST.read_text()) if d}


def test_cronjob_never_retries_or_overlaps_an_audit() -> None:
    cron = docs()["CronJob"]["spec"]
    assert cron["concurrencyPolicy"] == "Forbid"
    assert cron["jobTemplate"]["spec"]["backoffLimit"] == 0
    assert len(cron["schedule"].split()) == 5


def test_audit_pod_uses_the_runner_account_and_may_only_reach_api_and_registry() -> None:
    all_docs = docs()
    pod = all_docs["CronJob"]["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    runner = yaml.safe_load_all((MANIFEST.parent / "evalrun.yaml").read_text())
    accounts = {d["metadata"]["name"] for d in runner if d and d["kind"] == "ServiceAccount"}
    assert pod["serviceAccountName"] in accounts
    policy = all_docs["NetworkPolicy"]["spec"]
    labels = all_docs["CronJob"]["spec"]["jobTemplate"]["spec"]["template"]["metadata"]["labels"]
    assert policy["podSelector"]["matchLabels"].items() <= labels.items()
    ports = {p["port"] for rule in policy["egress"] for p in rule["ports"]}
    assert ports == {53, 443, 6443, 5000}
    assert policy["ingress"] == []


def test_audit_pod_meets_pod_security_restricted() -> None:
    pod = docs()["CronJob"]["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    (container,) = pod["containers"]
    sc = container["securityContext"]
    assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"]["drop"] == ["ALL"]
    assert sc["readOnlyRootFilesystem"] is True
    assert "@sha256:" in container["image"]  # pinned by digest, never a tag
    assert all("hostPath" not in v for v in pod["volumes"])


def test_cronjob_arguments_parse_as_an_evalrun_audit() -> None:
    pod = docs()["CronJob"]["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["command"] == ["evalrun"]
    args = build_parser().parse_args(container["args"])
    assert args.fn.__name__ == "cmd_audit"
    assert args.backend == "kubernetes" and args.sample == 5 and args.json
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["EVALRUN_INPUTS"] == "/inputs" and env["EVALRUN_HOME"] == "/var/lib/evalrun"

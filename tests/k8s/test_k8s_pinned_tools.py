"""The pinned helm and cosign builds work against the local cluster."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from kubernetes import client

pytestmark = pytest.mark.k8s

TRIVIAL_CHART = Path(__file__).resolve().parents[1] / "cluster" / "charts" / "trivial"


def helm(cluster, tmp_path: Path, *args: str) -> str:
    env = {
        "HOME": str(tmp_path),
        "PATH": "/usr/bin:/bin",
        "HELM_CACHE_HOME": str(tmp_path / "cache"),
        "HELM_CONFIG_HOME": str(tmp_path / "cfg"),
        "HELM_DATA_HOME": str(tmp_path / "data"),
    }
    result = subprocess.run(
        [str(cluster.helm), "--kubeconfig", str(cluster.kubeconfig), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=180,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_pinned_helm_renders_and_installs_trivial_chart(cluster, k8s_client, namespace, tmp_path):
    assert cluster.versions["HELM_VERSION"] in helm(cluster, tmp_path, "version", "--short")

    rendered = helm(
        cluster, tmp_path, "template", "smoke", str(TRIVIAL_CHART), "--set", "greeting=rendered"
    )
    helm(
        cluster,
        tmp_path,
        "install",
        "smoke",
        str(TRIVIAL_CHART),
        "--namespace",
        namespace,
        "--set",
        "greeting=installed",
        "--wait",
        "--timeout",
        "60s",
    )
    installed = client.CoreV1Api(k8s_client).read_namespaced_config_map("smoke-trivial", namespace)
    listed = helm(cluster, tmp_path, "list", "--namespace", namespace, "--short")
    helm(cluster, tmp_path, "uninstall", "smoke", "--namespace", namespace, "--wait")

    assert "kind: ConfigMap" in rendered and 'greeting: "rendered"' in rendered
    assert installed.data == {"greeting": "installed"}
    assert listed.split() == ["smoke"]


def test_pinned_cosign_is_built_and_reports_its_version(cluster):
    result = subprocess.run(
        [str(cluster.cosign), "version"], capture_output=True, text=True, timeout=60, check=False
    )

    assert result.returncode == 0, result.stderr
    assert cluster.versions["COSIGN_VERSION"] in result.stdout + result.stderr

"""An auditor verifies evalrun bundles with cosign alone, and evalrun signs with a key held
in a Kubernetes Secret — with the pinned cosign and the real cluster of this tier."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from kubernetes import client

from runner.bundle.build import build_bundle
from runner.bundle.signing import ALGORITHMS, generate_keypair, load_signer

pytestmark = pytest.mark.k8s

ROOT = Path(__file__).resolve().parents[2]
PREDICATE_TYPE = "https://evalrun.dev/EvalRun/v1"


@pytest.fixture(params=ALGORITHMS)
def sealed(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[Path, Path]:
    """A bundle as evalrun seals it, and the public key that verifies it."""
    info = generate_keypair(tmp_path / "signer.key", tmp_path / "signer.pub", request.param)
    content = tmp_path / "bundle"
    (content / "results").mkdir(parents=True)
    (content / "results" / "metrics.json").write_text('{"accuracy": 0.97}\n')
    (content / "report.md").write_text("# Report\n")
    predicate = {"run_id": "r-cosign", "outcome": "passed"}
    build_bundle(content, predicate, load_signer(info.private_path), content)
    return content, info.public_path


def cosign(cluster, tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {"HOME": str(tmp_path), "PATH": "/usr/bin:/bin", "SIGSTORE_NO_CACHE": "1"}
    return subprocess.run(
        [str(cluster.cosign), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )


def verify_blob_attestation(
    cluster, tmp_path: Path, public: Path, signature_flag: str, signature: Path, blob: Path
) -> subprocess.CompletedProcess[str]:
    return cosign(
        cluster,
        tmp_path,
        "verify-blob-attestation",
        "--key",
        str(public),
        signature_flag,
        str(signature),
        "--type",
        PREDICATE_TYPE,
        "--insecure-ignore-tlog=true",
        str(blob),
    )


def test_cosign_verifies_the_sigstore_bundle_without_deprecated_flags(
    cluster, sealed: tuple[Path, Path], tmp_path: Path
) -> None:
    bundle, public = sealed
    proc = verify_blob_attestation(
        cluster,
        tmp_path,
        public,
        "--bundle",
        bundle / "envelope.sigstore.json",
        bundle / "manifest.json",
    )
    assert proc.returncode == 0, proc.stderr
    assert "Verified OK" in proc.stdout + proc.stderr
    assert "deprecated" not in proc.stderr


def test_cosign_verifies_the_dsse_envelope_through_the_deprecated_signature_flag(
    cluster, sealed: tuple[Path, Path], tmp_path: Path
) -> None:
    bundle, public = sealed
    proc = verify_blob_attestation(
        cluster,
        tmp_path,
        public,
        "--signature",
        bundle / "envelope.dsse.json",
        bundle / "manifest.json",
    )
    assert proc.returncode == 0, proc.stderr
    assert "Verified OK" in proc.stdout + proc.stderr
    assert "deprecated" in proc.stderr  # why envelope.sigstore.json exists


def test_cosign_rejects_another_key_and_a_changed_manifest(
    cluster, sealed: tuple[Path, Path], tmp_path: Path
) -> None:
    bundle, public = sealed
    other = generate_keypair(tmp_path / "other.key", tmp_path / "other.pub")
    sigstore = bundle / "envelope.sigstore.json"
    wrong_key = verify_blob_attestation(
        cluster, tmp_path, other.public_path, "--bundle", sigstore, bundle / "manifest.json"
    )
    assert wrong_key.returncode != 0
    changed = tmp_path / "manifest.json"
    changed.write_bytes((bundle / "manifest.json").read_bytes() + b" ")
    wrong_blob = verify_blob_attestation(cluster, tmp_path, public, "--bundle", sigstore, changed)
    assert wrong_blob.returncode != 0


def _evalrun(cluster, tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EVALRUN_") and k != "CI"}
    return subprocess.run(
        [sys.executable, "-m", "runner.cli", *args, "--kubeconfig", str(cluster.kubeconfig)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
        env={**env, "EVALRUN_HOME": str(tmp_path / "home"), "PYTHONPATH": str(ROOT)},
        timeout=120,
        check=False,
    )


def test_a_signing_key_is_read_from_a_kubernetes_secret(
    cluster, k8s_client, namespace: str, tmp_path: Path
) -> None:
    main = generate_keypair(tmp_path / "main.key", tmp_path / "main.pub")
    alt = generate_keypair(tmp_path / "alt.key", tmp_path / "alt.pub", "ed25519")
    client.CoreV1Api(k8s_client).create_namespaced_secret(
        namespace,
        client.V1Secret(
            metadata=client.V1ObjectMeta(name="evalrun-signer"),
            data={
                "evalrun.key": base64.b64encode(main.private_path.read_bytes()).decode(),
                "alt.pem": base64.b64encode(alt.private_path.read_bytes()).decode(),
            },
        ),
    )
    default_field = _evalrun(
        cluster, tmp_path, "keys", "describe", f"k8s://{namespace}/evalrun-signer", "--json"
    )
    assert default_field.returncode == 0, default_field.stderr
    described = json.loads(default_field.stdout)
    assert described["keyid"] == main.keyid
    assert described["source"] == f"k8s://{namespace}/evalrun-signer/evalrun.key"
    assert "PRIVATE" not in default_field.stdout

    named = _evalrun(
        cluster, tmp_path, "keys", "describe", f"k8s://{namespace}/evalrun-signer/alt.pem", "--json"
    )
    assert named.returncode == 0, named.stderr
    assert json.loads(named.stdout)["keyid"] == alt.keyid

    missing = _evalrun(cluster, tmp_path, "keys", "describe", f"k8s://{namespace}/nope")
    assert missing.returncode == 2 and "not found" in missing.stderr
    no_field = _evalrun(
        cluster, tmp_path, "keys", "describe", f"k8s://{namespace}/evalrun-signer/tls.key"
    )
    assert no_field.returncode == 2
    assert "has no field 'tls.key'" in no_field.stderr and "alt.pem, evalrun.key" in no_field.stderr

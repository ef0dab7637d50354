"""The CI examples of examples/ci/ run on the test cluster, as their CI systems would run them.

Each job's steps are taken from its YAML and run in order in a clean environment (no
EVALRUN_* of this process, evalrun of this checkout on PATH) in a fresh copy of the
checkout, with the CI-provided variables set to test values: the kubeconfig of the test
cluster, a namespace prepared for evalrun, the signing key as a secret. The spec is
locked first (the image built and pushed to the cluster's registry), as the repository
would have it committed.

- GitHub Actions, the key as a PEM secret in $EVALRUN_KEY: the run passes, the gate
  passes, the bundle verifies with the committed trusted key, the artifacts hold the
  bundle, the JUnit report, the run summary and the HTML report; the step summary is
  written.
- GitLab CI, the key in a PKCS#11 token (SoftHSM; the private key never leaves it), and
  a spec whose threshold cannot be met: the job fails on the run's exit code (6) after
  the bundle verified, and the artifacts and the JUnit report (with the failure) are kept;
  an auditor verifies the bundle with the public key and cosign alone.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from lxml import etree

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "unit"))

from ci_pipelines import (  # noqa: E402
    checkout_copy,
    clean_env,
    evalrun_on_path,
    run_github_job,
    run_gitlab_job,
)

from runner._internal.settings import Settings  # noqa: E402
from runner.bundle.signing import generate_keypair  # noqa: E402

pytestmark = pytest.mark.k8s

# what the preflight demands of a namespace: Pod Security restricted, default-deny egress
RESTRICTED = [{"pod-security": "restricted", "default-deny": True}]
SCHEMA = etree.XMLSchema(
    etree.parse(str(ROOT / "tests" / "unit" / "fixtures" / "junit" / "junit.xsd"))
)
SOFTHSM = "/usr/lib/softhsm/libsofthsm2.so"
TOKEN, OBJECT, PIN = "evalrun-ci", "evalrun-signer", "135790"
# what examples/ci shows, commented, for a key in a token
TOKEN_URI = f"pkcs11:token={TOKEN};object={OBJECT}"
ARTIFACTS = {"bundle.tar", "junit.xml", "run.json", "report.html"}


def _evalrun(env: dict[str, str], *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["evalrun", *args],
        env=env,
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )


@pytest.fixture(scope="module")
def locked_checkout(cluster, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A checkout copy with examples/digits locked (image in the cluster's registry) and
    examples/digits-strict, the same evaluation with a threshold it cannot meet."""
    subprocess.run(["bash", str(ROOT / "scripts" / "host-up.sh")], check=True, capture_output=True)
    base = tmp_path_factory.mktemp("ci")
    checkout = checkout_copy(base / "checkout")
    strict = checkout / "examples" / "digits-strict"
    shutil.copytree(checkout / "examples" / "digits", strict)
    spec = yaml.safe_load((strict / "eval.yaml").read_text())
    spec["metadata"]["name"] = "digits-strict"
    spec["metrics"][0]["threshold"] = 0.999
    (strict / "eval.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    bin_dir = evalrun_on_path(base / "bin", sys.executable)
    # the developer's machine: its own home, and the shared wheel and base-image cache
    env = clean_env(
        bin_dir,
        base / "dev-home",
        EVALRUN_HOME=str(base / "dev-evalrun"),
        EVALRUN_CACHE=str(Settings().cache),
    )
    for path in ("examples/digits/eval.yaml", "examples/digits-strict/eval.yaml"):
        proc = _evalrun(env, "lock", path, cwd=checkout)
        assert proc.returncode == 0, proc.stdout + proc.stderr
    return checkout


@pytest.fixture
def workspace(locked_checkout: Path, tmp_path: Path) -> Path:
    """The job's own fresh copy of the (locked) checkout."""
    dest = tmp_path / "workspace"
    shutil.copytree(locked_checkout, dest)
    return dest


def _artifact_names(where: Path) -> set[str]:
    return {p.name for p in where.rglob("*") if p.is_file()}


@pytest.mark.parametrize("namespace", RESTRICTED, indirect=True)
def test_the_github_workflow_gates_a_run_on_the_cluster_with_a_pem_secret(
    cluster, namespace: str, workspace: Path, tmp_path: Path
) -> None:
    key = generate_keypair(tmp_path / "ci.key", tmp_path / "ci.pub")
    shutil.copy(key.public_path, workspace / "examples" / "ci" / "trusted-keys" / "ci.pub")
    bin_dir = evalrun_on_path(tmp_path / "bin", sys.executable)
    result = run_github_job(
        workspace=workspace,
        runner_temp=tmp_path / "runner-temp",
        base_env=clean_env(bin_dir, tmp_path / "home"),
        secrets={
            "EVALRUN_KEY": key.private_path.read_text(),
            "KUBECONFIG_DATA": cluster.kubeconfig.read_text(),
        },
        variables={"EVALRUN_NAMESPACE": namespace},
        artifacts=tmp_path / "artifacts",
    )
    log = result.log()
    assert result.succeeded, log
    codes = {s.name: s.returncode for s in result.steps}
    assert codes["Gate on the evaluation"] == 0, log
    artifact = tmp_path / "artifacts" / "evalrun-4242"
    assert _artifact_names(artifact) == ARTIFACTS, log
    out = json.loads((artifact / "reports" / "run.json").read_text())
    assert out["outcome"] == "passed" and out["exit_code"] == 0, out
    assert out["verified"].startswith("valid") and out["reused"] is False
    junit = etree.parse(str(artifact / "reports" / "junit.xml"))
    SCHEMA.assertValid(junit)
    assert [c.get("name") for c in junit.iter("testcase")] == ["accuracy", "macro-f1"]
    assert junit.find(".//failure") is None and junit.find(".//error") is None
    assert "### evalrun run: digits-logreg" in result.summary and out["run_id"] in result.summary
    # the bundle says which CI launched it and where it ran
    extracted = tmp_path / "extracted"
    extracted.mkdir()
    subprocess.run(
        ["tar", "-xf", str(artifact / "reports" / "bundle.tar"), "-C", str(extracted)], check=True
    )
    predicate = json.loads((extracted / "statement.json").read_text())["predicate"]
    assert predicate["backend"] == "kubernetes"
    assert predicate["provenance"]["launched_by"]["ci"]["system"] == "github_actions"


@pytest.fixture
def token(tmp_path: Path) -> dict[str, str]:
    """A SoftHSM token holding an EC P-256 key pair made in the token; its environment."""
    if not Path(SOFTHSM).is_file() or shutil.which("softhsm2-util") is None:
        pytest.fail("softhsm2 is not installed: run scripts/test-deps.sh", pytrace=False)
    (tmp_path / "tokens").mkdir()
    conf = tmp_path / "softhsm2.conf"
    conf.write_text(f"directories.tokendir = {tmp_path / 'tokens'}\nobjectstore.backend = file\n")
    env = {**os.environ, "SOFTHSM2_CONF": str(conf)}
    subprocess.run(
        [
            "softhsm2-util",
            "--init-token",
            "--free",
            "--label",
            TOKEN,
            "--pin",
            PIN,
            "--so-pin",
            "24681357",
        ],
        env=env,
        check=True,
        capture_output=True,
    )
    make = (
        "import pkcs11, sys\n"
        "from pkcs11 import Attribute, KeyType\n"
        "from pkcs11.util.ec import encode_named_curve_parameters\n"
        "token = pkcs11.lib(sys.argv[1]).get_token(token_label=sys.argv[2])\n"
        "with token.open(rw=True, user_pin=sys.argv[3]) as s:\n"
        "    p = s.create_domain_parameters(KeyType.EC, {Attribute.EC_PARAMS:\n"
        "        encode_named_curve_parameters('secp256r1')}, local=True)\n"
        "    p.generate_keypair(store=True, label=sys.argv[4], private_template={\n"
        "        Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: False})\n"
    )
    subprocess.run([sys.executable, "-c", make, SOFTHSM, TOKEN, PIN, OBJECT], env=env, check=True)
    return {"SOFTHSM2_CONF": str(conf)}


@pytest.mark.parametrize("namespace", RESTRICTED, indirect=True)
def test_the_gitlab_job_fails_on_missed_thresholds_with_the_key_in_a_token(
    cluster, namespace: str, workspace: Path, token: dict[str, str], tmp_path: Path
) -> None:
    bin_dir = evalrun_on_path(tmp_path / "bin", sys.executable)
    runner_env = clean_env(bin_dir, tmp_path / "home", **token)  # the HSM is the runner's
    exported = _evalrun(
        {**runner_env, "EVALRUN_HOME": str(tmp_path / "keys-home")},
        "keys",
        "public-key",
        TOKEN_URI,
        "--out",
        str(workspace / "examples" / "ci" / "trusted-keys" / "hsm.pub"),
        cwd=workspace,
    )
    assert exported.returncode == 0, exported.stderr
    result = run_gitlab_job(
        workspace=workspace,
        base_env=runner_env,
        ci_variables={
            "SPEC": "examples/digits-strict/eval.yaml",  # a pipeline variable wins over the job's
            "EVALRUN_KEY": TOKEN_URI,
            "EVALRUN_PKCS11_PIN": PIN,
            "EVALRUN_PKCS11_MODULE": SOFTHSM,
            "KUBECONFIG": str(cluster.kubeconfig),
            "EVALRUN_NAMESPACE": namespace,
        },
        artifacts=tmp_path / "artifacts",
    )
    log = result.log()
    assert not result.succeeded and result.steps[0].returncode == 6, log
    assert PIN not in log
    assert _artifact_names(tmp_path / "artifacts") == ARTIFACTS, log
    out = json.loads((workspace / "reports" / "run.json").read_text())
    assert out["outcome"] == "thresholds_failed" and out["exit_code"] == 6, out
    # verified with the committed public key before the job failed on the exit code
    assert "reports/bundle.tar: valid" in result.steps[0].output, log
    assert result.junit is not None
    junit = etree.parse(str(result.junit))
    SCHEMA.assertValid(junit)
    failure = junit.find(".//testcase[@name='accuracy']/failure")
    assert failure is not None and failure.get("message").startswith("expected accuracy >= 0.999")
    assert junit.find(".//testcase[@name='macro-f1']/failure") is None
    # an auditor verifies the token-signed bundle with the public key and cosign alone
    bundle = tmp_path / "audited"
    bundle.mkdir()
    subprocess.run(
        ["tar", "-xf", str(tmp_path / "artifacts" / "reports" / "bundle.tar"), "-C", str(bundle)],
        check=True,
    )
    cosign = subprocess.run(
        [
            str(cluster.cosign),
            "verify-blob-attestation",
            "--key",
            str(workspace / "examples" / "ci" / "trusted-keys" / "hsm.pub"),
            "--bundle",
            str(bundle / "envelope.sigstore.json"),
            "--type",
            "https://evalrun.dev/EvalRun/v1",
            "--insecure-ignore-tlog=true",
            str(bundle / "manifest.json"),
        ],
        env={"HOME": str(tmp_path), "PATH": "/usr/bin:/bin", "SIGSTORE_NO_CACHE": "1"},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert cosign.returncode == 0 and "Verified OK" in cosign.stdout + cosign.stderr, cosign.stderr

"""Private registries: TLS with a test CA and credentials from the Docker config.

A real ``docker-registry`` over TLS, with htpasswd (Basic) or token (Bearer) auth,
started per module (tests/cluster/private_registry.py). The registry client reads
credentials and CA the way Docker does; dockerd trusts the CA through
/etc/docker/certs.d/ADDR (written by the fixture, removed after).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from conftest import EXAMPLE, ROOT, Cli, with_signing_key

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "cluster"))
from private_registry import PrivateRegistry, running_registry

from runner.adapters import registry, registry_blobs, registry_stream
from runner.adapters.registry_auth import Authorizer
from runner.errors import RegistryAccessDenied, RegistryUntrusted

pytestmark = pytest.mark.docker


@pytest.fixture(scope="module")
def basic_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrivateRegistry]:
    with running_registry(tmp_path_factory.mktemp("reg"), auth="basic") as reg:
        yield reg


@pytest.fixture(scope="module")
def token_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrivateRegistry]:
    with running_registry(tmp_path_factory.mktemp("reg"), auth="token") as reg:
        yield reg


@pytest.fixture(autouse=True)
def fresh_authorizer(monkeypatch: pytest.MonkeyPatch) -> None:
    # each test starts with nothing remembered, as a new evalrun process does
    monkeypatch.setattr(registry, "AUTHORIZER", Authorizer())


def _round_trip(reg: PrivateRegistry, repo: str = "evalrun/private") -> None:
    name = registry.ImageName(reg.addr, repo)
    config = json.dumps({"architecture": "amd64", "os": "linux"}).encode()
    config_digest = "sha256:" + hashlib.sha256(config).hexdigest()
    registry_blobs.put_blob_bytes(name, config_digest, config)
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": registry.OCI_MANIFEST,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": config_digest, "size": len(config)},
        "layers": [],
    }).encode()
    digest = registry.put_manifest(name, "v1", manifest, registry.OCI_MANIFEST)
    assert registry.resolve_tag(name, "v1") == digest
    assert registry.get_manifest_bytes(name, digest) == manifest
    assert registry_blobs.get_blob_bytes(name, config_digest) == config
    stream = registry_stream.stream_blob(name, config_digest)
    assert b"".join(stream.chunks) == config


def test_basic_auth_over_tls_with_credentials_from_the_docker_config(
    basic_registry: PrivateRegistry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DOCKER_CONFIG", str(basic_registry.docker_config(tmp_path / "docker")))
    _round_trip(basic_registry)


def test_bearer_tokens_are_fetched_for_the_scope_the_registry_names(
    token_registry: PrivateRegistry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DOCKER_CONFIG", str(token_registry.docker_config(tmp_path / "docker")))
    token_registry.token_requests.clear()
    _round_trip(token_registry, "evalrun/tokens")
    # the registry names the actions in no fixed order (its set is a Go map)
    scopes = {(s.rpartition(":")[0], frozenset(s.rpartition(":")[2].split(",")))
              for s in token_registry.token_requests}
    assert ("repository:evalrun/tokens", frozenset({"pull", "push"})) in scopes, scopes
    # tokens are reused: not one per request
    assert len(token_registry.token_requests) <= 3, token_registry.token_requests


def test_credential_helper_supplies_the_credentials(
    basic_registry: PrivateRegistry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = basic_registry.docker_config(tmp_path / "docker", credentials=False)
    (config / "config.json").write_text(
        json.dumps({"credHelpers": {basic_registry.addr: "evaltest"}})
    )
    helper_bin = tmp_path / "bin"
    helper_bin.mkdir()
    helper = helper_bin / "docker-credential-evaltest"
    answer = json.dumps({"ServerURL": basic_registry.addr, "Username": basic_registry.username,
                         "Secret": basic_registry.password})
    helper.write_text(
        "#!/bin/sh\n[ \"$1\" = get ] || exit 1\n"
        f"read -r server\n[ \"$server\" = {basic_registry.addr} ] || "
        "{ echo 'credentials not found in native keychain'; exit 1; }\n"
        f"echo '{answer}'\n"
    )
    helper.chmod(helper.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("DOCKER_CONFIG", str(config))
    monkeypatch.setenv("PATH", f"{helper_bin}:{os.environ['PATH']}")
    _round_trip(basic_registry, "evalrun/helper")


def test_no_credentials_is_access_denied_naming_the_registry(
    basic_registry: PrivateRegistry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = basic_registry.docker_config(tmp_path / "docker", credentials=False)
    monkeypatch.setenv("DOCKER_CONFIG", str(config))
    with pytest.raises(RegistryAccessDenied) as caught:
        registry.resolve_tag(registry.ImageName(basic_registry.addr, "evalrun/x"), "v1")
    assert caught.value.exit_code == 4
    assert basic_registry.addr in caught.value.message and "docker login" in str(caught.value.hint)


def test_wrong_password_is_refused_not_retried_forever(
    basic_registry: PrivateRegistry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = basic_registry.docker_config(tmp_path / "docker", password="not-the-password")
    monkeypatch.setenv("DOCKER_CONFIG", str(config))
    with pytest.raises(RegistryAccessDenied) as caught:
        registry.resolve_tag(registry.ImageName(basic_registry.addr, "evalrun/x"), "v1")
    assert "refused the credentials" in caught.value.message
    assert basic_registry.password not in repr(caught.value.as_dict())


def test_registry_certificate_without_its_ca_is_untrusted(
    basic_registry: PrivateRegistry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = basic_registry.docker_config(tmp_path / "docker", ca=False)
    # a loopback registry without a certs.d entry is spoken to over http: name it by https
    (config / "certs.d" / basic_registry.addr).mkdir(parents=True)
    monkeypatch.setenv("DOCKER_CONFIG", str(config))
    with pytest.raises(RegistryUntrusted) as caught:
        registry.resolve_tag(registry.ImageName(basic_registry.addr, "evalrun/x"), "v1")
    assert caught.value.exit_code == 4 and "certs.d" in str(caught.value.hint)


# --------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def private_cli(host, basic_registry: PrivateRegistry,
                tmp_path_factory: pytest.TempPathFactory) -> Cli:
    """A fresh store whose registry is the private one, with the Docker config to reach it."""
    base = tmp_path_factory.mktemp("private")
    config = basic_registry.docker_config(base / "docker")
    basic_registry.trust_in_dockerd()
    home = base / "home"
    env = {**os.environ, "EVALRUN_HOME": str(home), "DOCKER_CONFIG": str(config),
           "EVALRUN_REGISTRY": basic_registry.addr}
    return with_signing_key(Cli(home=home, env=env))


def test_lock_run_push_pull_and_rerun_through_the_private_registry(
    private_cli: Cli, basic_registry: PrivateRegistry, tmp_path: Path
) -> None:
    dest = tmp_path / "digits"
    shutil.copytree(EXAMPLE, dest, ignore=shutil.ignore_patterns("eval.lock.json", "__pycache__"))
    spec = yaml.safe_load((dest / "eval.yaml").read_text())
    spec["image"]["template"] = str(ROOT / "images" / "python-eval.Dockerfile.j2")
    spec["image"]["repository"] = f"{basic_registry.addr}/evalrun"
    (dest / "eval.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    proc = private_cli("lock", str(dest / "eval.yaml"))
    assert proc.returncode == 0, proc.stderr
    ref = json.loads((dest / "eval.lock.json").read_text())["image"]["ref"]
    assert ref.startswith(basic_registry.addr + "/"), ref

    code, run = private_cli.json("run", str(dest / "eval.yaml"))
    assert code == 0, run
    code, pushed = private_cli.json("push", run["run_id"])
    assert code == 0, pushed
    assert pushed["reference"].startswith(basic_registry.addr + "/")

    trust = ("--pub", str(private_cli.pub))
    other_home = tmp_path / "other"
    other = with_signing_key(Cli(home=other_home,
                                 env={**private_cli.env, "EVALRUN_HOME": str(other_home)}))
    code, pulled = other.json("pull", pushed["reference"], *trust)
    assert code == 0, pulled
    assert pulled[0]["bundle_digest"] == run["bundle_digest"]
    code, out = other.json("rerun", pushed["reference"], "--inputs", str(dest), *trust)
    assert code == 0, out
    assert out["verdict"] == "identical"

    # the same pull without credentials: refused with exit 4, naming the registry
    bare = basic_registry.docker_config(tmp_path / "bare", credentials=False)
    proc = other("pull", pushed["reference"], *trust, env={"DOCKER_CONFIG": str(bare)})
    assert proc.returncode == 4, proc.stderr
    assert basic_registry.addr in proc.stderr and "Traceback" not in proc.stderr

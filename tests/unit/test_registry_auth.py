"""Where registry credentials and trust come from: the Docker config, as Docker reads it."""

from __future__ import annotations

import base64
import json

import pytest

from runner.adapters import registry_auth
from runner.adapters.registry_auth import (
    Credentials,
    credentials_for,
    parse_challenge,
    scheme,
)
from runner.errors import InputError, RegistryAccessDenied

pytestmark = pytest.mark.unit
REG = "registry.example.com:5443"


@pytest.fixture
def config(tmp_path, monkeypatch):
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path))
    monkeypatch.setattr(registry_auth, "_SYSTEM_CERTS_D", tmp_path / "system-certs.d")

    def write(data):
        (tmp_path / "config.json").write_text(json.dumps(data))
        return tmp_path

    return write


def test_auth_entries_in_each_spelling_docker_login_wrote(config):
    pair = base64.b64encode(b"alice:s3cret:with:colons").decode()
    for key in (REG, f"https://{REG}", f"https://{REG}/v1/"):
        config({"auths": {key: {"auth": pair}}})
        assert credentials_for(REG) == Credentials("alice", "s3cret:with:colons")
    config({"auths": {REG: {"username": "bob", "password": "pw"}}})
    assert credentials_for(REG) == Credentials("bob", "pw")
    config({"auths": {REG: {"identitytoken": "refresh"}}})
    assert credentials_for(REG).identity_token == "refresh"
    config({"auths": {"other.example.com": {"auth": pair}}})
    assert credentials_for(REG) is None


def test_no_docker_config_means_no_credentials(tmp_path, monkeypatch):
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "absent"))
    assert credentials_for(REG) is None


def test_a_broken_docker_config_is_an_input_error_naming_the_file(config):
    path = config({}) / "config.json"
    path.write_text("{not json")
    with pytest.raises(InputError) as caught:
        credentials_for(REG)
    assert str(path) in caught.value.message
    config({"auths": {REG: {"auth": "!!!not base64"}}})
    with pytest.raises(InputError, match="base64"):
        credentials_for(REG)


def test_a_named_credential_helper_that_is_missing_is_access_denied(config, monkeypatch):
    config({"credHelpers": {REG: "nosuchhelper"}})
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(RegistryAccessDenied, match="docker-credential-nosuchhelper"):
        credentials_for(REG)


def test_secrets_never_show_in_repr():
    assert "hunter2" not in repr(Credentials("u", "hunter2"))


def test_challenges_parse_quoted_and_bare_parameters():
    kind, params = parse_challenge(
        'Bearer realm="https://auth.example.com/token",service="reg",'
        'scope="repository:a/b:pull,push"')
    assert kind == "bearer"
    assert params == {"realm": "https://auth.example.com/token", "service": "reg",
                      "scope": "repository:a/b:pull,push"}
    assert parse_challenge('Basic realm="x"') == ("basic", {"realm": "x"})


def test_loopback_is_plain_http_unless_a_ca_is_configured_for_it(config):
    root = config({})
    assert scheme("127.0.0.1:5000") == "http" and scheme(REG) == "https"
    (root / "certs.d" / "127.0.0.1:5443").mkdir(parents=True)
    assert scheme("127.0.0.1:5443") == "https"


def test_a_basic_challenge_without_credentials_names_the_registry_and_docker_login(config):
    config({})
    with pytest.raises(RegistryAccessDenied) as caught:
        registry_auth.Authorizer().answer(REG, "evalrun/x", 'Basic realm="r"')
    assert REG in caught.value.message and "docker login" in str(caught.value.hint)
    assert caught.value.exit_code == 4

"""Registry HTTP errors are translated in the adapter, with registry, repository and status.

No registry: ``urlopen`` is replaced by one that fails the way a real one does.
The docker tier runs the same code against the real local registry.
"""

from __future__ import annotations

import io
import urllib.error
from email.message import Message
from pathlib import Path
from typing import Any

import pytest

from runner._internal.retry import transient_policy
from runner.adapters import registry, registry_blobs
from runner.errors import (
    InfrastructureError,
    RegistryAPIError,
    TransientInfrastructureError,
    TransientRegistryError,
)

pytestmark = pytest.mark.unit

NAME = registry.ImageName("127.0.0.1:5000", "evalrun/digits")
DIGEST = "sha256:" + "a" * 64


def _http_error(url: str, code: int) -> urllib.error.HTTPError:
    return urllib.error.HTTPError(url, code, "status", Message(), io.BytesIO(b"{}"))


def _failing(exc_for: Any) -> Any:
    def urlopen(req: Any, timeout: float = 0) -> Any:
        raise exc_for(req.full_url)

    return urlopen


def test_server_error_is_transient_and_names_registry_repository_status(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(
        registry, "_urlopen", _failing(lambda url: _http_error(url, 503))
    )
    url = f"http://127.0.0.1:5000/v2/evalrun/digits/manifests/{DIGEST}"
    with pytest.raises(TransientRegistryError) as caught:
        registry._send("HEAD", url)
    err = caught.value
    assert err.message == "registry answered 503"
    assert (err.registry, err.repository, err.status, err.url) == (
        "127.0.0.1:5000",
        "evalrun/digits",
        503,
        url,
    )
    assert isinstance(err.__cause__, urllib.error.HTTPError)
    assert err.as_dict()["repository"] == "evalrun/digits"


def test_client_error_is_an_answer_for_the_caller_to_judge(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(
        registry, "_urlopen", _failing(lambda url: _http_error(url, 404))
    )
    response = registry._send("HEAD", "http://127.0.0.1:5000/v2/evalrun/digits/blobs/x")
    assert response.status == 404 and response.body == b"{}"


def test_unreachable_registry_is_transient_with_a_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(
        registry,
        "_urlopen",
        _failing(lambda url: urllib.error.URLError(ConnectionRefusedError(111, "refused"))),
    )
    with pytest.raises(TransientRegistryError) as caught:
        registry._send("GET", "http://127.0.0.1:5000/v2/")
    err = caught.value
    assert err.message.startswith("registry unreachable: ")
    assert err.registry == "127.0.0.1:5000" and err.repository is None
    assert err.hint and "make host-up" in err.hint


def test_blob_download_refused_is_permanent_and_server_errors_are_retried(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(
        registry, "_urlopen", _failing(lambda url: _http_error(url, 403))
    )
    with pytest.raises(RegistryAPIError) as refused:
        registry_blobs.get_blob(NAME, DIGEST, tmp_path / "blob")
    assert refused.value.status == 403 and refused.value.repository == "evalrun/digits"
    assert not isinstance(refused.value, TransientInfrastructureError)

    calls: list[str] = []

    def flaky(req: Any, timeout: float = 0) -> Any:
        calls.append(req.full_url)
        raise _http_error(req.full_url, 502)

    monkeypatch.setattr(registry, "_urlopen", flaky)
    no_wait = transient_policy(sleep=lambda _s: None)
    monkeypatch.setattr(registry, "_retry_policy", lambda: no_wait)
    with pytest.raises(InfrastructureError) as gave_up:
        registry_blobs.get_blob(NAME, DIGEST, tmp_path / "blob")
    assert len(calls) > 1 and "still failing after retries" in gave_up.value.message
    assert gave_up.value.fields["registry"] == "127.0.0.1:5000"

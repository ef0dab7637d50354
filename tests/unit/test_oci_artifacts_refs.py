"""Which command-line references are registry references (the rest are paths, run ids, digests)."""

from __future__ import annotations

import pytest

from runner.bundle.oci_artifacts import is_registry_ref

pytestmark = pytest.mark.unit
D = "sha256:" + "a" * 64


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (f"127.0.0.1:5000/evalrun/digits-logreg@{D}", True),
        (f"registry.example.com/team/model@{D}", True),
        (f"localhost/evalrun/x@{D}", True),
        (D, False),  # a bare digest: bundle or image digest, not a registry
        ("r-5e12959e12e5336c8969ac0c", False),
        (f"evalrun/digits@{D}", False),  # no registry host
        ("127.0.0.1:5000/evalrun/digits:latest", False),  # tags are never references here
        (f"127.0.0.1:5000/evalrun/digits@sha256:{'a' * 63}", False),
    ],
)
def test_registry_references_are_host_repo_at_digest(text, expected) -> None:
    assert is_registry_ref(text) is expected


def test_an_existing_local_path_is_never_a_registry_ref(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    name = f"localhost/x@{D}"
    (tmp_path / "localhost").mkdir()
    (tmp_path / name).mkdir()
    assert is_registry_ref(name) is False

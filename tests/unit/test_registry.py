"""The one OCI registry client, against an in-memory registry behind its urlopen seam.

The docker tier runs it against the real registry; here every status, retry and
digest check is exercised without a network (the unit tier runs under unshare -n).
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from runner._internal.retry import transient_policy
from runner.adapters import registry, registry_blobs
from runner.adapters.registry import ImageName
from runner.bundle import oci_artifacts
from runner.bundle.build import build_bundle
from runner.bundle.signing import Signer
from runner.bundle.store import Store
from runner.errors import InfrastructureError, IntegrityError, VerificationFailed

pytestmark = pytest.mark.unit

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
NAME = ImageName("127.0.0.1:5000", "evalrun/model")


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


class _Answer:
    def __init__(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.status, self.headers, self._body = status, headers, io.BytesIO(body)

    def read(self, n: int = -1) -> bytes:
        return self._body.read(n)

    def __enter__(self) -> _Answer:
        return self

    def __exit__(self, *exc: object) -> None:
        return None


class FakeRegistry:
    """Enough of the distribution API: manifests, blobs, monolithic uploads, mounts, referrers."""

    def __init__(self, *, referrers_api: bool = False) -> None:
        self.referrers_api = referrers_api
        self.blobs: dict[tuple[str, str], bytes] = {}
        self.manifests: dict[tuple[str, str], tuple[str, bytes]] = {}
        self.uploads: dict[str, str] = {}
        self.calls: list[tuple[str, str]] = []
        self.failures: list[BaseException] = []
        self.corrupt: set[str] = set()

    def __call__(self, req: urllib.request.Request, timeout: float) -> _Answer:
        method, url = req.get_method(), req.full_url
        self.calls.append((method, url))
        if self.failures:
            raise self.failures.pop(0)
        status, headers, body = self._handle(method, url, req.data, req.headers)
        if status >= 400:
            raise urllib.error.HTTPError(url, status, "no", headers, io.BytesIO(body))  # type: ignore[arg-type]
        return _Answer(status, headers, b"" if method == "HEAD" else body)

    def _handle(
        self, method: str, url: str, data: Any, headers: dict[str, str]
    ) -> tuple[int, dict[str, str], bytes]:
        parts = urllib.parse.urlsplit(url)
        query = dict(urllib.parse.parse_qsl(parts.query))
        body = data.read() if hasattr(data, "read") else (data or b"")
        if m := re.fullmatch(r"/v2/(.+)/blobs/uploads/(\w*)", parts.path):
            repo, upload = m[1], m[2]
            if method == "POST" and "mount" in query:
                if (query["from"], query["mount"]) in self.blobs:
                    self.blobs[repo, query["mount"]] = self.blobs[query["from"], query["mount"]]
                    return 201, {}, b""
            if method == "POST":
                self.uploads[f"u{len(self.uploads)}"] = repo
                return 202, {"Location": f"/v2/{repo}/blobs/uploads/u{len(self.uploads) - 1}"}, b""
            if method == "PUT" and upload in self.uploads:
                if sha(body) != query["digest"]:
                    return 400, {}, b'{"errors":[{"code":"DIGEST_INVALID"}]}'
                self.blobs[repo, query["digest"]] = body
                return 201, {"Docker-Content-Digest": query["digest"]}, b""
            return 404, {}, b""
        m = re.fullmatch(r"/v2/(.+)/(manifests|blobs|referrers)/([^/]+)", parts.path)
        assert m, url
        repo, kind, ref = m[1], m[2], m[3]
        if kind == "blobs":
            blob = self.blobs.get((repo, ref))
            if blob is None:
                return 404, {}, b""
            if ref in self.corrupt:
                blob = blob[:-1] + bytes([blob[-1] ^ 1])
            return 200, {"Content-Length": str(len(blob))}, blob
        if kind == "referrers":
            if not self.referrers_api:
                return 404, {}, b""
            listed = [
                {"mediaType": mt, "digest": sha(b), "size": len(b),
                 "artifactType": json.loads(b).get("artifactType")}
                for (r, key), (mt, b) in sorted(self.manifests.items())
                if r == repo and key.startswith("sha256:")
                and (json.loads(b).get("subject") or {}).get("digest") == ref
            ]
            index = json.dumps({"schemaVersion": 2, "manifests": listed}).encode()
            return 200, {"Content-Type": OCI_INDEX}, index
        if method == "PUT":
            media_type = headers.get("Content-type", "")
            self.manifests[repo, ref] = self.manifests[repo, sha(body)] = (media_type, body)
            return 201, {"Docker-Content-Digest": sha(body)}, b""
        found = self.manifests.get((repo, ref))
        if found is None:
            return 404, {}, b""
        media_type, stored = found
        return 200, {"Content-Type": media_type, "Docker-Content-Digest": sha(stored),
                     "Content-Length": str(len(stored))}, stored


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> FakeRegistry:
    fake = FakeRegistry()
    monkeypatch.setattr(registry, "_urlopen", fake)
    monkeypatch.setattr(registry, "_retry_policy", lambda: transient_policy(sleep=lambda _: None))
    return fake


# --- blobs and manifests -----------------------------------------------------------------


def test_push_blob_uploads_once_then_finds_it(fake: FakeRegistry, tmp_path: Path) -> None:
    blob = tmp_path / "layer"
    blob.write_bytes(b"layer bytes" * 1000)
    digest = sha(blob.read_bytes())
    assert registry_blobs.push_blob(NAME, digest, blob.stat().st_size, blob) == "uploaded"
    assert registry_blobs.push_blob(NAME, digest, blob.stat().st_size, blob) == "exists"
    assert fake.blobs[NAME.repository, digest] == blob.read_bytes()


def test_push_blob_mounts_from_a_sibling_repository(fake: FakeRegistry) -> None:
    fake.blobs["evalrun/base", sha(b"base")] = b"base"
    assert registry_blobs.push_blob(NAME, sha(b"base"), 4, None, mount_from=["evalrun/base"]) == (
        "mounted"
    )


def test_an_upload_the_registry_refuses_names_the_blob(fake: FakeRegistry) -> None:
    with pytest.raises(InfrastructureError, match="registry refused blob") as err:
        registry_blobs.put_blob_bytes(NAME, sha(b"other"), b"config")
    assert "DIGEST_INVALID" in str(err.value.fields["detail"])


def test_get_blob_checks_the_digest_while_downloading(fake: FakeRegistry, tmp_path: Path) -> None:
    fake.blobs[NAME.repository, sha(b"payload")] = b"payload"
    registry_blobs.get_blob(NAME, sha(b"payload"), tmp_path / "ok")
    assert (tmp_path / "ok").read_bytes() == b"payload"
    fake.corrupt.add(sha(b"payload"))
    with pytest.raises(IntegrityError, match="does not match its digest"):
        registry_blobs.get_blob(NAME, sha(b"payload"), tmp_path / "bad")
    with pytest.raises(IntegrityError):
        registry_blobs.get_blob_bytes(NAME, sha(b"payload"))


def test_manifests_by_tag_and_digest(fake: FakeRegistry) -> None:
    body = b'{"schemaVersion":2}'
    assert registry.resolve_tag(NAME, "v1") is None
    assert registry.put_manifest(NAME, "v1", body, OCI_MANIFEST) == sha(body)
    assert registry.resolve_tag(NAME, "v1") == sha(body)
    assert registry.manifest_exists(NAME, sha(body))
    assert not registry.manifest_exists(NAME, sha(b"x"))
    assert registry.get_manifest_bytes(NAME, sha(body)) == body
    assert registry.find_manifest(NAME, "v2") is None
    ref = registry.manifest_ref(NAME, "v1")
    assert ref == registry.ManifestRef(OCI_MANIFEST, sha(body), len(body))
    assert registry.referrers(NAME, sha(body)) is None  # no referrers API: the fallback applies


# --- errors: translated once, transient ones retried ------------------------------------


def test_connection_failures_are_retried_then_succeed(fake: FakeRegistry) -> None:
    fake.failures = [urllib.error.URLError("refused"), ConnectionResetError("reset")]
    assert registry.resolve_tag(NAME, "missing") is None
    assert len(fake.calls) == 3


def test_a_5xx_that_persists_becomes_a_permanent_infrastructure_error(
    fake: FakeRegistry,
) -> None:
    fake.failures = [
        urllib.error.HTTPError("u", 503, "busy", {}, io.BytesIO(b"")) for _ in range(10)  # type: ignore[arg-type]
    ]
    with pytest.raises(InfrastructureError, match="still failing after retries") as err:
        registry_blobs.blob_exists(NAME, sha(b"x"))
    assert err.value.exit_code == 5
    assert isinstance(err.value.__cause__, InfrastructureError)


def test_an_unexpected_4xx_is_permanent_and_not_retried(
    fake: FakeRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake.failures = [urllib.error.HTTPError("u", 401, "auth", {}, io.BytesIO(b""))]  # type: ignore[arg-type]
    with pytest.raises(InfrastructureError, match="registry answered 401 for blob"):
        registry_blobs.blob_exists(NAME, sha(b"x"))
    assert len(fake.calls) == 1


# --- bundles as OCI artifacts, through the same client -------------------------------------


def _bundle(tmp_path: Path, signer: Signer, image_ref: str) -> Path:
    content = tmp_path / "bundle"
    (content / "results").mkdir(parents=True)
    (content / "results" / "metrics.json").write_text('{"metrics": []}\n')
    (content / "report.md").write_text("# run\n")
    predicate = {"run_id": "run-1", "image": {"ref": image_ref}, "outcome": "completed",
                 "spec": {"name": "digits"}, "timestamps": {"started": "2025-01-01T00:00:00Z"}}
    build_bundle(content, predicate, signer, content)
    return content


@pytest.mark.parametrize("referrers_api", [False, True], ids=["fallback-tag", "referrers-api"])
def test_push_then_pull_a_bundle_through_the_one_client(
    fake: FakeRegistry, tmp_path: Path, referrers_api: bool
) -> None:
    fake.referrers_api = referrers_api
    image = b'{"schemaVersion":2,"mediaType":"' + OCI_MANIFEST.encode() + b'"}'
    registry.put_manifest(NAME, sha(image), image, OCI_MANIFEST)
    signer = Signer.from_private_key(ed25519.Ed25519PrivateKey.generate())
    bundle = _bundle(tmp_path, signer, f"{NAME}@{sha(image)}")
    (tmp_path / "scratch").mkdir()
    pushed = oci_artifacts.push_bundle(bundle, tmp_path / "scratch")
    assert pushed.referrers_fallback is not referrers_api
    assert not pushed.already_present
    again = tmp_path / "scratch2"
    again.mkdir()
    assert oci_artifacts.push_bundle(bundle, again).already_present

    store = Store(tmp_path / "home")
    pulled = oci_artifacts.pull_bundle(f"{NAME}@{sha(image)}", store, signer.verifier())
    assert [p.run_id for p in pulled] == ["run-1"]
    assert (pulled[0].stored.path / "report.md").read_text() == "# run\n"

    other = Signer.from_private_key(ed25519.Ed25519PrivateKey.generate())
    with pytest.raises(VerificationFailed, match="no bundle attached"):
        oci_artifacts.pull_bundle(f"{NAME}@{sha(image)}", Store(tmp_path / "h2"), other.verifier())


def test_a_tampered_bundle_blob_is_refused_before_it_is_unpacked(
    fake: FakeRegistry, tmp_path: Path
) -> None:
    image = b'{"schemaVersion":2}'
    registry.put_manifest(NAME, sha(image), image, OCI_MANIFEST)
    signer = Signer.from_private_key(ed25519.Ed25519PrivateKey.generate())
    (tmp_path / "scratch").mkdir()
    pushed = oci_artifacts.push_bundle(
        _bundle(tmp_path, signer, f"{NAME}@{sha(image)}"), tmp_path / "scratch"
    )
    manifest = json.loads(fake.manifests[NAME.repository, pushed.manifest_digest][1])
    fake.corrupt.add(manifest["layers"][0]["digest"])
    with pytest.raises(IntegrityError, match="does not match its digest"):
        oci_artifacts.fetch_bundle(pushed.reference, tmp_path / "fetched")
    assert not (tmp_path / "fetched").exists()

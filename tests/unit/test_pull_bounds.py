"""``pull`` from a hostile registry: bounded, one level deep, verified before unpacking.

The rule (runner/bundle/oci_artifacts/, runner/adapters/registry.py): every JSON
document a registry sends is read to at most 4 MiB and parsed strictly; descriptors are
checked (sha256 digest, declared size within bounds) before any download; a blob is
never read beyond its declared size; referrers are followed one level, each digest once,
at most MAX_ATTACHED; the bundle tar is verified as downloaded, before it is extracted;
a truncated or odd tar is exit 3 in one line.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519
from test_registry import NAME, OCI_INDEX, OCI_MANIFEST, FakeRegistry, _bundle

from runner._internal.retry import transient_policy
from runner.adapters import registry, registry_blobs
from runner.bundle import oci_artifacts
from runner.bundle.archive import write_bundle_tar
from runner.bundle.signing import Signer
from runner.bundle.store import Store
from runner.cli.main import main
from runner.errors import EvalrunError, InputError, IntegrityError, VerificationFailed

pytestmark = pytest.mark.unit


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> FakeRegistry:
    fake = FakeRegistry()
    monkeypatch.setattr(registry, "_urlopen", fake)
    monkeypatch.setattr(registry, "_retry_policy", lambda: transient_policy(sleep=lambda _: None))
    return fake


@pytest.fixture
def signer() -> Signer:
    return Signer.from_private_key(ed25519.Ed25519PrivateKey.generate())


def _manifest(fake: FakeRegistry, body: dict | bytes, media_type: str = OCI_MANIFEST) -> str:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    fake.manifests[NAME.repository, sha(raw)] = (media_type, raw)
    return f"{NAME}@{sha(raw)}"


def _artifact(fake: FakeRegistry, layer: bytes, *, size: int | None = None) -> str:
    fake.blobs[NAME.repository, sha(layer)] = layer
    return _manifest(
        fake,
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "artifactType": oci_artifacts.ARTIFACT_TYPE,
            "config": {"mediaType": oci_artifacts.CONFIG_TYPE, "digest": sha(b"{}"), "size": 2},
            "layers": [
                {
                    "mediaType": oci_artifacts.LAYER_TYPE,
                    "digest": sha(layer),
                    "size": len(layer) if size is None else size,
                }
            ],
        },
    )


def _blob_gets(fake: FakeRegistry) -> list[str]:
    return [url for method, url in fake.calls if method == "GET" and "/blobs/" in url]


def _bundle_tar(tmp_path: Path, signer: Signer) -> bytes:
    bundle = _bundle(tmp_path, signer, f"{NAME}@sha256:" + "c" * 64)
    return write_bundle_tar(bundle, tmp_path / "b.tar").read_bytes()


def _refused(exc: EvalrunError) -> None:
    assert exc.exit_code == 3 and "\n" not in exc.message


def test_a_registry_sending_more_than_declared_is_cut_off(
    fake: FakeRegistry, tmp_path: Path, signer: Signer, monkeypatch
) -> None:
    layer = _bundle_tar(tmp_path, signer)
    ref = _artifact(fake, layer, size=1024)  # declares 1 KiB, serves the whole tar
    sent: list[int] = []
    original = registry_blobs.get_blob

    def spy(name, digest, dest, *, max_bytes=None):  # type: ignore[no-untyped-def]
        try:
            original(name, digest, dest, max_bytes=max_bytes)
        finally:
            sent.append(dest.stat().st_size if dest.exists() else 0)

    monkeypatch.setattr(registry_blobs, "get_blob", spy)
    with pytest.raises(IntegrityError, match="larger than the 1024 bytes") as exc:
        oci_artifacts.pull_bundle(ref, Store(tmp_path / "h"), signer.verifier())
    _refused(exc.value)
    assert sent and sent[0] <= 1024
    bundles = tmp_path / "h" / "bundles"
    assert not bundles.exists() or not any(bundles.iterdir())


@pytest.mark.parametrize("size", [0, -1, oci_artifacts.MAX_BUNDLE_TAR_BYTES + 1, "12", True, 1.5])
def test_a_declared_size_out_of_bounds_is_refused_before_any_download(
    fake: FakeRegistry, tmp_path: Path, signer: Signer, size: object
) -> None:
    ref = _artifact(fake, b"x" * 10, size=size)  # type: ignore[arg-type]
    with pytest.raises(IntegrityError, match="declares") as exc:
        oci_artifacts.pull_bundle(ref, Store(tmp_path / "h"), signer.verifier())
    _refused(exc.value)
    assert _blob_gets(fake) == []


@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        b"[1, 2]",
        b'{"layers": "nope"}',
        b'{"artifactType": "application/vnd.evalrun.bundle.v1", "layers": [{"mediaType": '
        b'"application/vnd.evalrun.bundle.v1.tar", "digest": "../../../v2/x", "size": 1}]}',
        b'{"artifactType": "application/vnd.evalrun.bundle.v1", "layers": [7]}',
        b'{"a": 1, "a": 2}',
        b'{"size": NaN}',
        b"[" * 100_000,
    ],
)
def test_odd_manifests_end_in_one_line_integrity_errors(
    fake: FakeRegistry, tmp_path: Path, signer: Signer, body: bytes
) -> None:
    ref = _manifest(fake, body)
    with pytest.raises((IntegrityError, InputError)) as exc:
        oci_artifacts.pull_bundle(ref, Store(tmp_path / "h"), signer.verifier())
    assert exc.value.exit_code in (2, 3) and "\n" not in exc.value.message
    assert _blob_gets(fake) == []


def test_a_manifest_larger_than_4_mib_is_not_read(fake: FakeRegistry, tmp_path, signer) -> None:
    ref = _manifest(fake, b'{"pad": "' + b"x" * (5 << 20) + b'"}')
    with pytest.raises(IntegrityError, match="more than") as exc:
        oci_artifacts.pull_bundle(ref, Store(tmp_path / "h"), signer.verifier())
    _refused(exc.value)


def test_referrers_are_followed_one_level_each_digest_once(
    fake: FakeRegistry, tmp_path: Path, signer: Signer
) -> None:
    fake.referrers_api = False  # the fallback index, which a registry writes freely
    image = json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST}).encode()
    image_ref = _manifest(fake, image)
    # an "attached bundle" that is really another image, whose own index points back
    other = json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST, "x": 1}).encode()
    _manifest(fake, other)
    listed = [
        {"mediaType": OCI_MANIFEST, "digest": sha(other), "size": len(other),
         "artifactType": oci_artifacts.ARTIFACT_TYPE},
        {"mediaType": OCI_MANIFEST, "digest": sha(image), "size": len(image),
         "artifactType": oci_artifacts.ARTIFACT_TYPE},
    ] * 3
    index = json.dumps({"schemaVersion": 2, "manifests": listed}).encode()
    for subject in (sha(image), sha(other)):
        fake.manifests[NAME.repository, subject.replace(":", "-")] = (OCI_INDEX, index)
    with pytest.raises(VerificationFailed, match="no bundle attached") as exc:
        oci_artifacts.pull_bundle(image_ref, Store(tmp_path / "h"), signer.verifier())
    _refused(exc.value)
    gets = [url for method, url in fake.calls if method == "GET" and "/manifests/sha256:" in url]
    assert len(gets) == len(set(gets)) == 2  # the image once, the other artifact once


def test_at_most_max_attached_bundles_are_fetched(
    fake: FakeRegistry, tmp_path: Path, signer: Signer, monkeypatch
) -> None:
    monkeypatch.setattr(oci_artifacts.pull, "MAX_ATTACHED", 5)
    fake.referrers_api = False
    image = json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST}).encode()
    image_ref = _manifest(fake, image)
    listed = [
        {"mediaType": OCI_MANIFEST, "digest": "sha256:" + f"{i:064x}", "size": 10,
         "artifactType": oci_artifacts.ARTIFACT_TYPE}
        for i in range(1000)
    ]
    index = json.dumps({"schemaVersion": 2, "manifests": listed}).encode()
    fake.manifests[NAME.repository, sha(image).replace(":", "-")] = (OCI_INDEX, index)
    with pytest.raises(VerificationFailed):
        oci_artifacts.pull_bundle(image_ref, Store(tmp_path / "h"), signer.verifier())
    gets = [url for method, url in fake.calls if method == "GET" and "/manifests/sha256:" in url]
    assert len(gets) == 1 + 5


def _tar_with(members: list[tuple[str, bytes]], *, truncate: int = 0) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    data = buffer.getvalue()
    return data[: len(data) - truncate] if truncate else data


@pytest.mark.parametrize(
    "layer",
    [
        _tar_with([("statement.json", b"{}" * 5000)], truncate=9000),
        _tar_with([("a" * 300, b"x")]),
        _tar_with([("d/" * 100 + "f", b"x")]),
        _tar_with([("../escape", b"x")]),
        b"\0" * 512 + b"garbage",
        b"not a tar at all",
    ],
    ids=["truncated", "long-name", "deep", "dotdot", "zero-block", "garbage"],
)
def test_odd_bundle_layers_are_exit_3_in_one_line_and_leave_nothing(
    fake: FakeRegistry, tmp_path: Path, signer: Signer, layer: bytes
) -> None:
    ref = _artifact(fake, layer)
    store = Store(tmp_path / "h")
    with pytest.raises(IntegrityError) as exc:
        oci_artifacts.pull_bundle(ref, store, signer.verifier())
    _refused(exc.value)
    assert not (store.bundles_dir.exists() and any(store.bundles_dir.iterdir()))
    assert not (store.tmp_dir.exists() and any(store.tmp_dir.iterdir()))


def test_a_good_bundle_still_pulls_and_a_truncated_tar_fetch_is_exit_3(
    fake: FakeRegistry, tmp_path: Path, signer: Signer, monkeypatch, capsys
) -> None:
    layer = _bundle_tar(tmp_path, signer)
    ref = _artifact(fake, layer)
    pulled = oci_artifacts.pull_bundle(ref, Store(tmp_path / "h"), signer.verifier())
    assert [p.run_id for p in pulled] == ["run-1"]
    bad = _artifact(fake, layer[: len(layer) // 2])
    home = tmp_path / "cli"
    (home / "keys").mkdir(parents=True)
    (home / "keys" / "evalrun.pub").write_bytes(signer.verifier().public_pem())
    monkeypatch.setenv("EVALRUN_HOME", str(home))
    assert main(["pull", bad]) == 3
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.startswith("evalrun: error: ")
    assert main(["verify", bad, "--key", str(home / "keys" / "evalrun.pub")]) == 3

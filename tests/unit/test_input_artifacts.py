"""Inputs as OCI artifacts: the pure layer/manifest builder, and publish + oci:// read-back
against the in-memory registry behind the registry client's urlopen seam."""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from test_registry import FakeRegistry, _Answer

from runner._internal.cas import ContentStore
from runner._internal.input_artifact import (
    ARTIFACT_TYPE,
    CONFIG_TYPE,
    FILE_SHA256,
    INPUT_DIGEST,
    INPUT_KIND,
    LAYER_TYPE,
    TITLE,
    Layer,
    build_artifact,
    layer_layout,
    parse_manifest,
)
from runner._internal.input_tree import InputFile, scan_tree
from runner._internal.retry import transient_policy
from runner.adapters import registry
from runner.adapters.input_artifacts import (
    inputs_repository,
    layer_of,
    oci_resolver,
    publish_input,
)
from runner.adapters.registry import ImageName
from runner.adapters.sources import SourceOptions, acquire
from runner.errors import DigestMismatch, InfrastructureError, InputError, IntegrityError

pytestmark = pytest.mark.unit

REPO = ImageName("127.0.0.1:5000", "evalrun/demo-inputs")


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --------------------------------------------------------------------------- pure builder


@pytest.mark.parametrize("size", [0, 1, 511, 512, 513, 70_000])
@pytest.mark.parametrize("path", ["w.bin", "deep/er/shard-00001.safetensors", "ü/" + "n" * 120])
def test_a_layer_is_a_tar_holding_just_the_file(path, size):
    data = os.urandom(size)
    layout = layer_layout(path, size)
    blob = layout.header + data + layout.tail
    assert len(blob) == layout.blob_size and len(blob) % 512 == 0
    with tarfile.open(fileobj=io.BytesIO(blob), mode="r:") as tar:
        (member,) = tar.getmembers()
        assert member.name == path and member.isreg() and member.size == size
        assert member.mode == 0o444 and member.uid == member.gid == 0 and member.mtime == 0
        assert tar.extractfile(member).read() == data  # type: ignore[union-attr]
    # a pure function of (path, size): the same file always gives the same layer
    assert layer_layout(path, size) == layout


def _layers(files: dict[str, bytes]) -> list[Layer]:
    out = []
    for path, data in files.items():
        layout = layer_layout(path, len(data))
        blob = layout.header + data + layout.tail
        out.append(
            Layer(
                InputFile(path=path, sha256=sha(data), size=len(data)),
                "sha256:" + sha(blob),
                len(blob),
            )
        )
    return out


def test_artifact_manifest_is_deterministic_and_lists_files_in_path_order():
    files = {"b.bin": b"bb", "a/x.json": b"{}", "a.txt": b"a"}
    layers = _layers(files)
    one = build_artifact("directory", "sha256:" + "1" * 64, layers, {"role": "model"})
    two = build_artifact("directory", "sha256:" + "1" * 64, layers[::-1], {"role": "model"})
    assert one.manifest == two.manifest and one.digest == two.digest
    manifest = json.loads(one.manifest)
    assert manifest["artifactType"] == ARTIFACT_TYPE
    assert [layer["annotations"][TITLE] for layer in manifest["layers"]] == [
        "a.txt",
        "a/x.json",
        "b.bin",
    ]
    assert {layer["mediaType"] for layer in manifest["layers"]} == {LAYER_TYPE}
    assert manifest["layers"][0]["annotations"][FILE_SHA256] == sha(b"a")
    assert manifest["annotations"] == {
        INPUT_KIND: "directory",
        INPUT_DIGEST: "sha256:" + "1" * 64,
        "org.evalrun.input.role": "model",
    }
    # an image config listing the layers as diff ids: what containerd unpacks for volumes
    config = json.loads(one.config)
    assert manifest["config"]["mediaType"] == CONFIG_TYPE
    assert config["rootfs"]["diff_ids"] == [layer["digest"] for layer in manifest["layers"]]
    assert config["os"] == "linux"
    listing = parse_manifest(one.manifest)
    assert listing.kind == "directory" and listing.digest == "sha256:" + "1" * 64
    assert [layer.file for layer in listing.layers] == [layer.file for layer in one.layers]


def test_oras_style_raw_file_layers_are_read_as_files():
    body = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.empty.v1+json", "digest": "x", "size": 2},
            "layers": [
                {
                    "mediaType": "application/vnd.oci.image.layer.v1.tar",
                    "digest": "sha256:" + sha(b"raw"),
                    "size": 3,
                    "annotations": {TITLE: "model.bin"},
                }
            ],
        }
    ).encode()
    listing = parse_manifest(body)
    assert listing.kind == "file" and listing.layers[0].raw
    assert listing.layers[0].file == InputFile(path="model.bin", sha256=sha(b"raw"), size=3)


def _manifest_with(layer: dict) -> bytes:
    return json.dumps({"schemaVersion": 2, "layers": [layer]}).encode()


@pytest.mark.parametrize(
    "layer, problem",
    [
        ({"digest": "sha256:" + "0" * 64, "size": 1, "annotations": {}}, "title"),
        (
            {"digest": "sha256:" + "0" * 64, "size": 1, "annotations": {TITLE: "../etc/x"}},
            "clean relative path",
        ),
        (
            {"digest": "sha256:" + "0" * 64, "size": 1, "annotations": {TITLE: "/abs"}},
            "clean relative path",
        ),
        (
            {
                "mediaType": LAYER_TYPE,
                "digest": "sha256:" + "0" * 64,
                "size": 10,
                "annotations": {TITLE: "a", FILE_SHA256: "0" * 64, "org.evalrun.file.size": "1"},
            },
            "not that of evalrun's layer",
        ),
        ({"digest": "md5:00", "size": 1, "annotations": {TITLE: "a"}}, "not sha256"),
    ],
)
def test_manifests_that_are_not_input_artifacts_are_refused(layer, problem):
    with pytest.raises(ValueError, match=problem):
        parse_manifest(_manifest_with(layer))


# --------------------------------------------------------------------------- against a registry


class RangedRegistry(FakeRegistry):
    """The in-memory registry, plus ranged blob reads and cut-off answers."""

    def __init__(self) -> None:
        super().__init__()
        self.cuts: list[int] = []  # next big blob GETs send this many bytes, then fail
        self.ranges: list[str] = []

    def __call__(self, req: urllib.request.Request, timeout: float) -> _Answer:
        method, url = req.get_method(), req.full_url
        path = urllib.parse.urlsplit(url).path
        if method == "GET" and "/blobs/sha256:" in path and "/uploads/" not in path:
            self.calls.append((method, url))
            if self.failures:
                raise self.failures.pop(0)
            repo, digest = path.removeprefix("/v2/").split("/blobs/")
            blob = self.blobs.get((repo, digest))
            if blob is None:
                raise urllib.error.HTTPError(url, 404, "no", {}, io.BytesIO(b""))  # type: ignore[arg-type]
            if digest in self.corrupt:
                blob = blob[:-1] + bytes([blob[-1] ^ 1])
            rng = req.headers.get("Range")
            status, headers = 200, {"Content-Length": str(len(blob))}
            if rng:
                self.ranges.append(rng)
                start = int(rng.removeprefix("bytes=").rstrip("-"))
                headers = {"Content-Range": f"bytes {start}-{len(blob) - 1}/{len(blob)}"}
                status, blob = 206, blob[start:]
            answer = _Answer(status, headers, blob)
            if self.cuts and len(blob) > self.cuts[0]:
                cut, whole = self.cuts.pop(0), answer._body

                def read(n: int = -1) -> bytes:
                    if whole.tell() >= cut:
                        raise ConnectionResetError("cut")
                    return whole.read(min(n if n > 0 else cut, cut - whole.tell()))

                answer.read = read  # type: ignore[method-assign]
            return answer
        return super().__call__(req, timeout)


@pytest.fixture
def reg(monkeypatch: pytest.MonkeyPatch) -> RangedRegistry:
    fake = RangedRegistry()
    monkeypatch.setattr(registry, "_urlopen", fake)
    monkeypatch.setattr(registry, "_retry_policy", lambda: transient_policy(sleep=lambda _: None))
    return fake


def _opts(attempts: int = 4) -> SourceOptions:
    return SourceOptions(
        retry_policy=lambda: transient_policy(attempts=attempts, sleep=lambda _: None)
    )


def _checkpoint(root: Path) -> dict[str, bytes]:
    files = {
        "config.json": b'{"layers": 2}',
        "model-00001-of-00002.safetensors": os.urandom(300_000),
        "model-00002-of-00002.safetensors": os.urandom(200_001),
        "tokenizer/vocab.txt": b"a\nb\n",
        "tokenizer/empty": b"",
    }
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return files


def _publish_dir(tmp_path: Path, reg: RangedRegistry) -> tuple[ContentStore, str, str, dict]:
    src = tmp_path / "ckpt"
    files = _checkpoint(src)
    store = ContentStore(tmp_path / "cache-a")
    got = acquire(
        str(src), scan_tree(src, what="m").digest, field="model", spec_dir=tmp_path, store=store
    )
    pub = publish_input(
        store,
        REPO,
        kind="directory",
        digest=got.digest,
        files=got.files,
        annotations={"role": "model", "name": "model"},
    )
    assert not pub.already_present and pub.uploaded_bytes > sum(map(len, files.values()))
    return store, got.digest, pub.reference, files


def test_publish_then_fetch_by_digest_into_an_empty_cache(reg, tmp_path):
    store, digest, ref, files = _publish_dir(tmp_path, reg)
    assert ref.startswith("127.0.0.1:5000/evalrun/demo-inputs@sha256:")
    # a second publish of the same input sends no blob and finds the manifest
    before = [c for c in reg.calls if c[0] in ("PUT", "POST")]
    again = publish_input(
        store,
        REPO,
        kind="directory",
        digest=digest,
        files=store.tree_files(digest) or (),
        annotations={"role": "model", "name": "model"},
    )
    assert again.already_present and again.reference == ref and again.uploaded_bytes == 0
    assert [c for c in reg.calls if c[0] in ("PUT", "POST")] == before
    # an empty machine gets the very tree back, verified
    empty = ContentStore(tmp_path / "cache-b")
    seen: list[tuple[int, int | None]] = []
    got = acquire(
        f"oci://{ref}",
        digest,
        field="model",
        spec_dir=tmp_path,
        store=empty,
        oci=oci_resolver(),
        options=_opts(),
        progress=lambda d, t: seen.append((d, t)),
    )
    assert got.kind == "directory" and got.digest == digest
    for rel, data in files.items():
        assert (got.path / rel).read_bytes() == data
    assert scan_tree(got.path, what="fetched").digest == digest
    assert seen[-1][0] == seen[-1][1] == sum(map(len, files.values()))


def test_published_file_input_mounts_as_its_name(reg, tmp_path):
    data = b"w" * 1000
    (tmp_path / "weights.json").write_bytes(data)
    store = ContentStore(tmp_path / "cache")
    got = acquire("weights.json", sha(data), field="model", spec_dir=tmp_path, store=store)
    pub = publish_input(
        store,
        REPO,
        kind="file",
        digest=got.digest,
        files=got.files,
        annotations={"role": "model", "name": "model"},
    )
    manifest = json.loads(reg.manifests[REPO.repository, pub.reference.split("@")[1]][1])
    assert [layer["annotations"][TITLE] for layer in manifest["layers"]] == ["weights.json"]
    layer = reg.blobs[REPO.repository, manifest["layers"][0]["digest"]]
    with tarfile.open(fileobj=io.BytesIO(layer)) as tar:
        assert tar.getnames() == ["weights.json"]
    fetched = acquire(
        f"oci://{pub.reference}",
        sha(data),
        field="model",
        spec_dir=tmp_path,
        store=ContentStore(tmp_path / "other"),
        oci=oci_resolver(),
        options=_opts(),
    )
    assert fetched.kind == "file" and fetched.path.read_bytes() == data


def test_layer_digest_is_computed_once_per_file(reg, tmp_path):
    store, digest, _, _ = _publish_dir(tmp_path, reg)
    entry = (store.tree_files(digest) or ())[0]
    first = layer_of(store, entry)
    store.blob_path(entry.sha256).chmod(0o000)  # remembered: the blob is not read again
    try:
        assert layer_of(store, entry) == first
    finally:
        store.blob_path(entry.sha256).chmod(0o444)


def test_a_blob_altered_in_the_registry_is_refused_and_nothing_is_cached(reg, tmp_path):
    _, digest, ref, _ = _publish_dir(tmp_path, reg)
    manifest = json.loads(reg.manifests[REPO.repository, ref.split("@")[1]][1])
    shard = next(x for x in manifest["layers"] if x["annotations"][TITLE].startswith("model-00002"))
    reg.corrupt.add(shard["digest"])
    empty = ContentStore(tmp_path / "cache-b")
    with pytest.raises(IntegrityError) as err:
        acquire(
            f"oci://{ref}",
            digest,
            field="model",
            spec_dir=tmp_path,
            store=empty,
            oci=oci_resolver(),
            options=_opts(),
        )
    assert err.value.exit_code == 3
    assert "model-00002-of-00002.safetensors" in err.value.message
    assert empty.tree_files(digest) is None
    assert not any(
        empty.blob_path(f["annotations"][FILE_SHA256]).exists()
        for f in manifest["layers"]
        if f is shard
    )


def test_a_manifest_that_is_not_the_pinned_input_fetches_no_blob(reg, tmp_path):
    _, _digest, ref, _ = _publish_dir(tmp_path, reg)
    calls = len(reg.calls)
    with pytest.raises(DigestMismatch):
        acquire(
            f"oci://{ref}",
            "e" * 64,
            field="model",
            spec_dir=tmp_path,
            store=ContentStore(tmp_path / "c"),
            oci=oci_resolver(),
            options=_opts(),
        )
    assert not [c for c in reg.calls[calls:] if "/blobs/" in c[1]]


def test_a_cut_download_resumes_with_a_range_and_still_checks_the_layer(reg, tmp_path):
    _, digest, ref, files = _publish_dir(tmp_path, reg)
    reg.cuts = [150_000]
    got = acquire(
        f"oci://{ref}",
        digest,
        field="model",
        spec_dir=tmp_path,
        store=ContentStore(tmp_path / "c"),
        oci=oci_resolver(),
        options=_opts(),
    )
    assert (got.path / "model-00001-of-00002.safetensors").read_bytes() == files[
        "model-00001-of-00002.safetensors"
    ]
    ranged = [c for c in reg.calls if c[0] == "GET" and "/blobs/" in c[1]]
    assert len(ranged) == len(files) + 1  # one retry…
    (rng,) = reg.ranges
    assert int(rng.removeprefix("bytes=").rstrip("-")) > 100_000  # …resumed, not restarted


def test_an_unreachable_registry_is_exit_5_after_bounded_retries(reg, tmp_path):
    _, digest, ref, _ = _publish_dir(tmp_path, reg)
    reg.failures = [urllib.error.URLError("connection refused")] * 50
    with pytest.raises(InfrastructureError) as err:
        acquire(
            f"oci://{ref}",
            digest,
            field="model",
            spec_dir=tmp_path,
            store=ContentStore(tmp_path / "c"),
            oci=oci_resolver(),
            options=_opts(),
        )
    assert err.value.exit_code == 5 and "still failing after retries" in err.value.message


def test_a_deleted_artifact_is_an_input_error(reg, tmp_path):
    ref = f"{REPO}@sha256:" + "f" * 64
    with pytest.raises(InputError, match="not in its registry"):
        acquire(
            f"oci://{ref}",
            "0" * 64,
            field="model",
            spec_dir=tmp_path,
            store=ContentStore(tmp_path / "c"),
            oci=oci_resolver(),
            options=_opts(),
        )


def test_inputs_live_next_to_the_image():
    assert str(inputs_repository("127.0.0.1:5000/evalrun/digits-logreg")) == (
        "127.0.0.1:5000/evalrun/digits-logreg-inputs"
    )

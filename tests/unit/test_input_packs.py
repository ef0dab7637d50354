"""Inputs of many files: packed into at most MAX_LAYERS layers, and read back file by file.

A node mounts each layer of an input artifact as an overlay lower directory and fails
past a few hundred (docs/data.md), so a dataset directory of thousands of files must
not become thousands of layers. Inputs of up to MAX_LAYERS files keep one layer each
(their artifacts, and so their digests, are unchanged).
"""

from __future__ import annotations

import io
import json
import random
import tarfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_input_artifacts import REPO, _opts
from test_input_artifacts import reg as reg

from runner._internal.cas import ContentStore
from runner._internal.input_artifact import (
    MAX_LAYERS,
    PACK_FILES,
    PACK_TARGET,
    TITLE,
    group_files,
    parse_manifest,
)
from runner._internal.input_tree import InputFile, scan_tree
from runner.adapters.input_artifacts import oci_resolver, publish_input
from runner.adapters.sources import acquire
from runner.errors import IntegrityError

pytestmark = pytest.mark.unit


def _file(path: str, size: int) -> InputFile:
    return InputFile(path=path, sha256=f"{size:064x}"[-64:], size=size)


def test_up_to_max_layers_files_keep_one_layer_each():
    files = [_file(f"f{i:04d}", i) for i in range(MAX_LAYERS)]
    assert group_files(files) == [(f,) for f in files]


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.integers(min_value=0, max_value=1 << 24), min_size=MAX_LAYERS + 1, max_size=1500)
)
def test_any_many_files_fit_in_max_layers_in_path_order(sizes):
    files = [_file(f"d/{i:05d}.bin", size) for i, size in enumerate(sizes)]
    groups = group_files(files)
    assert len(groups) <= 2 * PACK_TARGET + 1 <= MAX_LAYERS
    assert [f for g in groups for f in g] == sorted(files, key=lambda f: f.path.encode())
    share = -(-sum(sizes) // PACK_TARGET)
    for g in groups:
        if len(g) == 1 and g[0].size >= max(1, share):
            continue
        assert all(f.size < max(1, share) for f in g)


def _dataset(root: Path, n: int, seed: int = 7) -> dict[str, bytes]:
    rng = random.Random(seed)
    files = {f"images/{i:04d}.bin": rng.randbytes(rng.randrange(0, 3000)) for i in range(n)}
    files["images/0042.bin"] = b"\0" * 1024  # whole blocks: no padding
    files["labels.jsonl"] = b'{"id": 1}\n' * 5000
    files["shard-big.bin"] = rng.randbytes(400_000)
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return files


def _publish(tmp_path: Path, n: int):
    src = tmp_path / "data"
    files = _dataset(src, n)
    store = ContentStore(tmp_path / "cache-a")
    got = acquire(
        str(src), scan_tree(src, what="d").digest, field="dataset d", spec_dir=tmp_path, store=store
    )
    pub = publish_input(
        store,
        REPO,
        kind="directory",
        digest=got.digest,
        files=got.files,
        annotations={"role": "dataset", "name": "d"},
    )
    return got.digest, pub.reference, files


def _manifest(fake, ref: str) -> dict:
    return json.loads(fake.manifests[REPO.repository, ref.split("@")[1]][1])


def test_a_directory_of_many_files_is_published_packed_and_fetched_back(reg, tmp_path):
    digest, ref, files = _publish(tmp_path, 600)
    manifest = _manifest(reg, ref)
    layers = manifest["layers"]
    assert len(layers) <= MAX_LAYERS
    packs = [x for x in layers if PACK_FILES in x["annotations"]]
    assert packs and all(x["annotations"][TITLE].startswith(".evalrun-pack-") for x in packs)
    alone = [x["annotations"][TITLE] for x in layers if PACK_FILES not in x["annotations"]]
    assert "shard-big.bin" in alone and "labels.jsonl" in alone
    listing = parse_manifest(reg.manifests[REPO.repository, ref.split("@")[1]][1])
    assert sorted(f.path for layer in listing.layers for f in layer.files) == sorted(files)
    # a plain tar reader gets each pack's files back (what `oras pull` + `tar -xf` does)
    blob = reg.blobs[REPO.repository, packs[0]["digest"]]
    with tarfile.open(fileobj=io.BytesIO(blob)) as tar:
        members = json.loads(packs[0]["annotations"][PACK_FILES])
        assert tar.getnames() == [m[0] for m in members]
        first = tar.extractfile(members[0][0])
        assert first is not None and first.read() == files[members[0][0]]
    # an empty machine gets the very tree back, every file checked
    got = acquire(
        f"oci://{ref}",
        digest,
        field="dataset d",
        spec_dir=tmp_path,
        store=ContentStore(tmp_path / "cache-b"),
        oci=oci_resolver(),
        options=_opts(),
    )
    assert scan_tree(got.path, what="fetched").digest == digest
    for rel, data in files.items():
        assert (got.path / rel).read_bytes() == data
    # publishing again sends nothing
    again = publish_input(
        ContentStore(tmp_path / "cache-a"),
        REPO,
        kind="directory",
        digest=digest,
        files=got.files,
        annotations={"role": "dataset", "name": "d"},
    )
    assert again.already_present and again.reference == ref


def test_a_pack_altered_in_the_registry_is_refused_and_nothing_is_cached(reg, tmp_path):
    digest, ref, _ = _publish(tmp_path, 300)
    packs = [x for x in _manifest(reg, ref)["layers"] if PACK_FILES in x["annotations"]]
    reg.corrupt.add(packs[-1]["digest"])  # the last byte: in the end blocks or a file
    reg.corrupt.add(packs[0]["digest"])
    blob = bytearray(reg.blobs[REPO.repository, packs[0]["digest"]])
    blob[600] ^= 1  # inside the first member's content (its header is 512 bytes or more)
    reg.blobs[REPO.repository, packs[0]["digest"]] = bytes(blob)
    empty = ContentStore(tmp_path / "cache-b")
    with pytest.raises(IntegrityError) as err:
        acquire(
            f"oci://{ref}",
            digest,
            field="dataset d",
            spec_dir=tmp_path,
            store=empty,
            oci=oci_resolver(),
            options=_opts(),
        )
    assert err.value.exit_code == 3
    assert empty.tree_files(digest) is None


def test_a_cut_pack_download_resumes_by_range(reg, tmp_path):
    digest, ref, _ = _publish(tmp_path, 300)
    reg.cuts = [700]
    got = acquire(
        f"oci://{ref}",
        digest,
        field="dataset d",
        spec_dir=tmp_path,
        store=ContentStore(tmp_path / "c"),
        oci=oci_resolver(),
        options=_opts(),
    )
    assert scan_tree(got.path, what="fetched").digest == digest
    assert reg.ranges


@pytest.mark.parametrize(
    ("listing", "problem"),
    [
        ("not json", "not JSON"),
        ("[]", "two or more"),
        ('[["b", "' + "1" * 64 + '", 1], ["a", "' + "1" * 64 + '", 1]]', "path order"),
        ('[["a", "' + "1" * 64 + '", 1], ["../x", "' + "1" * 64 + '", 1]]', "escapes"),
        ('[["a", "' + "1" * 64 + '", 1], ["b", "' + "1" * 64 + '", 99]]', "size"),
        ('[["a", "' + "1" * 64 + '", true], ["b", "' + "1" * 64 + '", 1]]', "[path, sha256"),
    ],
)
def test_odd_pack_annotations_are_refused(listing, problem):
    body = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "layers": [
                {
                    "mediaType": "application/vnd.oci.image.layer.v1.tar",
                    "digest": "sha256:" + "2" * 64,
                    "size": 4096,
                    "annotations": {TITLE: ".evalrun-pack-x.tar", PACK_FILES: listing},
                }
            ],
        }
    ).encode()
    with pytest.raises(ValueError, match=problem.replace("[", r"\[")):
        parse_manifest(body)

"""Fuzz target: ``pull`` against an in-memory registry that answers what the input says.

The input is split (length-prefixed, 3 parts): the artifact manifest the reference names,
the blob every blob request gets, and the referrers index of the fallback tag. The
reference is the manifest's own digest, so digest checks pass and the fuzzer reaches
the parsing, bounds, referrer walk, tar verification and extraction behind them.
Property: the pulled bundles, or an evalrun error with exit 2 or 3 in one line.
"""

from __future__ import annotations

import hashlib
import io
import re
import urllib.error
import urllib.request
from typing import Any

from harness import check, fuzz_verifier, scratch

from runner._internal.retry import transient_policy
from runner._internal.tree import remove_tree
from runner.adapters import registry
from runner.bundle import oci_artifacts
from runner.bundle.store import Store

NAME = "pull"
_HOME = scratch(NAME)
_REPO = "evalrun/fuzz"
_VERIFIER = fuzz_verifier()
OCI_INDEX = "application/vnd.oci.image.index.v1+json"


def _sha(data: bytes) -> str:
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


class _Registry:
    def __init__(self, manifest: bytes, blob: bytes, index: bytes) -> None:
        self.manifest, self.blob, self.index = manifest, blob, index

    def __call__(self, req: urllib.request.Request, timeout: float) -> _Answer:
        url = req.full_url
        match = re.search(r"/(manifests|blobs|referrers)/([^/?]+)$", url)
        kind, ref = (match[1], match[2]) if match else ("", "")
        if kind == "manifests" and ref == _sha(self.manifest):
            body, media = self.manifest, "application/vnd.oci.image.manifest.v1+json"
        elif kind == "manifests" and ref.startswith("sha256-"):
            body, media = self.index, OCI_INDEX
        elif kind == "blobs":
            body, media = self.blob, "application/octet-stream"
        else:
            raise urllib.error.HTTPError(url, 404, "no", {}, io.BytesIO(b""))  # type: ignore[arg-type]
        headers = {"Content-Type": media, "Docker-Content-Digest": _sha(body)}
        return _Answer(200, headers, b"" if req.get_method() == "HEAD" else body)


def _parts(data: bytes) -> list[bytes]:
    parts = []
    for _ in range(2):
        size = int.from_bytes(data[:3], "big")
        parts.append(data[3 : 3 + size])
        data = data[3 + size :]
    return [*parts, data]


def frame_parts(manifest: bytes, blob: bytes, index: bytes) -> bytes:
    return b"".join(len(p).to_bytes(3, "big") + p for p in (manifest, blob)) + index


def test_one_input(data: bytes) -> None:
    manifest, blob, index = _parts(data)
    urlopen, policy = registry._urlopen, registry._retry_policy
    registry._urlopen = _Registry(manifest, blob, index)  # type: ignore[assignment]
    registry._retry_policy = lambda: transient_policy(sleep=lambda _: None)  # type: ignore[assignment]
    store = Store(_HOME / "store")
    try:
        check(
            oci_artifacts.pull_bundle,
            f"127.0.0.1:5000/{_REPO}@{_sha(manifest)}",
            store,
            _VERIFIER,
        )
    finally:
        registry._urlopen, registry._retry_policy = urlopen, policy  # type: ignore[method-assign]
        if store.root.exists():
            remove_tree(store.root)


def seeds() -> dict[str, bytes]:
    import json

    from seeds import bundle_tar

    tar = bundle_tar()
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "artifactType": oci_artifacts.ARTIFACT_TYPE,
            "config": {"mediaType": oci_artifacts.CONFIG_TYPE, "digest": _sha(b"{}"), "size": 2},
            "layers": [
                {"mediaType": oci_artifacts.LAYER_TYPE, "digest": _sha(tar), "size": len(tar)}
            ],
        }
    ).encode()
    image = b'{"schemaVersion": 2}'
    listed: list[Any] = [
        {
            "mediaType": "x",
            "digest": _sha(manifest),
            "size": len(manifest),
            "artifactType": oci_artifacts.ARTIFACT_TYPE,
        }
    ]
    index = json.dumps({"schemaVersion": 2, "manifests": listed}).encode()
    return {
        "bundle-artifact": frame_parts(manifest, tar, index),
        "image-with-referrers": frame_parts(image, tar, index),
    }

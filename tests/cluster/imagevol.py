"""Push files to the local registry in the OCI manifest shapes the image-volume tests compare.

Standard library only (like ``oci.py``, whose blob/manifest helpers it uses). Every
shape carries one layer per file with the file's path in the
``org.opencontainers.image.title`` annotation; they differ in config and layer form:

``artifact-tar``    OCI artifact: empty config (``application/vnd.oci.empty.v1+json``),
                    ``artifactType: application/vnd.evalrun.input.v1``, each layer an
                    uncompressed tar (``application/vnd.oci.image.layer.v1.tar``) holding one file.
``artifact-raw``    the same with each layer the file's raw bytes (what ``oras push`` writes),
                    media type ``application/octet-stream``.
``image``           a plain image: image config (linux/amd64, ``rootfs.diff_ids``), tar layers,
                    no ``artifactType``.
``image-artifact``  the image shape plus ``artifactType: application/vnd.evalrun.input.v1``.

Results of running each shape as a Kubernetes image volume: docs/data.md, "Image
volumes: what the runtime accepts (measured)".
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import json
import tarfile
from collections.abc import Mapping
from pathlib import Path
from types import ModuleType

ARTIFACT_TYPE = "application/vnd.evalrun.input.v1"
EMPTY_CONFIG_TYPE = "application/vnd.oci.empty.v1+json"
EMPTY_CONFIG = b"{}"
IMAGE_CONFIG_TYPE = "application/vnd.oci.image.config.v1+json"
TAR_LAYER = "application/vnd.oci.image.layer.v1.tar"
RAW_LAYER = "application/octet-stream"
MANIFEST_TYPE = "application/vnd.oci.image.manifest.v1+json"
TITLE = "org.opencontainers.image.title"
SHAPES = ("artifact-tar", "artifact-raw", "image", "image-artifact")


def _oci() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "evalrun_cluster_oci", Path(__file__).resolve().parent / "oci.py"
    )
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def file_tar(path: str, content: bytes, mode: int = 0o644) -> bytes:
    """An uncompressed, reproducible tar holding one regular file at ``path``."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo(path.lstrip("/"))
        info.size, info.mode, info.mtime = len(content), mode, 0
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        tar.addfile(info, io.BytesIO(content))
    return raw.getvalue()


def build(shape: str, files: Mapping[str, bytes]) -> tuple[bytes, dict[str, bytes]]:
    """The manifest (bytes) and every blob it names (digest -> bytes) for ``shape``."""
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")
    blobs: dict[str, bytes] = {}
    layers = []
    diff_ids = []
    for path in sorted(files):
        blob = files[path] if shape == "artifact-raw" else file_tar(path, files[path])
        digest = _digest(blob)
        blobs[digest] = blob
        diff_ids.append(digest)  # uncompressed tar: the layer digest is its diff_id
        layers.append(
            {
                "mediaType": RAW_LAYER if shape == "artifact-raw" else TAR_LAYER,
                "digest": digest,
                "size": len(blob),
                "annotations": {TITLE: path.lstrip("/")},
            }
        )
    manifest: dict[str, object] = {"schemaVersion": 2, "mediaType": MANIFEST_TYPE}
    if shape.startswith("artifact-"):
        config, config_type = EMPTY_CONFIG, EMPTY_CONFIG_TYPE
    else:
        config = json.dumps(
            {
                "architecture": "amd64",
                "os": "linux",
                "config": {},
                "rootfs": {"type": "layers", "diff_ids": diff_ids},
            },
            sort_keys=True,
            separators=(",", ":"),
        ).encode()
        config_type = IMAGE_CONFIG_TYPE
    if shape != "image":
        manifest["artifactType"] = ARTIFACT_TYPE
    blobs[_digest(config)] = config
    manifest["config"] = {"mediaType": config_type, "digest": _digest(config), "size": len(config)}
    manifest["layers"] = layers
    return json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode(), blobs


def push(registry: str, repository: str, tag: str, shape: str, files: Mapping[str, bytes]) -> str:
    """Push ``files`` in ``shape``; return ``registry/repository@sha256:<manifest digest>``."""
    oci = _oci()
    manifest, blobs = build(shape, files)
    base = f"http://{registry}"
    for blob in blobs.values():
        oci._push_blob(base, repository, blob)
    oci._request(
        "PUT",
        f"{base}/v2/{repository}/manifests/{tag}",
        data=manifest,
        headers={"Content-Type": MANIFEST_TYPE},
    )
    return f"{registry}/{repository}@{_digest(manifest)}"

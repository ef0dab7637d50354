"""Publish evaluation inputs as OCI artifacts the node can mount as image volumes.

For the k8s tier and benchmarks/bench_k8s_data.py, until (and besides) ``evalrun lock``
publishing them: one uncompressed, deterministic tar layer per file (the file at its
relative path, mode 0444, uid/gid 0, mtime 0), titled with its path, streamed from disk
(shards of GiB are fine). The manifest is shape (d) of docs/data.md ("image-artifact": a
real image config whose ``rootfs.diff_ids`` list the layers, plus ``artifactType``
``application/vnd.evalrun.input.v1``), the one containerd 2.4 mounts that is still marked
as evalrun's; ``shape="image"`` leaves out ``artifactType`` (shape (c)). In-memory shapes,
including the ones that do not mount, are in ``imagevol.py``.

Returns the ``PlanInput`` the Kubernetes backend mounts (``artifact_ref`` by digest).
"""

from __future__ import annotations

import hashlib
import json
import tarfile
import tempfile
from pathlib import Path
from typing import Literal

from runner.adapters.registry import ImageName, put_manifest
from runner.adapters.registry_blobs import push_blob, put_blob_bytes
from runner.model.plan import PlanInput, PlanInputFile

ARTIFACT_TYPE = "application/vnd.evalrun.input.v1"
MANIFEST = "application/vnd.oci.image.manifest.v1+json"
LAYER = "application/vnd.oci.image.layer.v1.tar"
IMAGE_CONFIG = "application/vnd.oci.image.config.v1+json"
Shape = Literal["artifact", "image"]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _layer(src: Path, rel: str, dest: Path) -> tuple[str, int]:
    """A deterministic tar holding ``src`` at ``rel``; (sha256 hex, size)."""
    info = tarfile.TarInfo(rel)
    info.size = src.stat().st_size
    info.mode, info.mtime, info.uid, info.gid, info.uname, info.gname = 0o444, 0, 0, 0, "", ""
    with (
        dest.open("wb") as raw,
        tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar,
        src.open("rb") as fh,
    ):
        tar.addfile(info, fh)
    return _sha256(dest), dest.stat().st_size


def publish_input(
    registry: str,
    repository: str,
    role: Literal["model", "dataset"],
    name: str,
    path: Path,
    *,
    shape: Shape = "artifact",
) -> PlanInput:
    """Publish ``path`` (a file, or every file under a directory) and describe it as an input."""
    target = ImageName.parse(f"{registry}/{repository}")
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    rels = [p.relative_to(path).as_posix() if path.is_dir() else path.name for p in files]
    layers, plan_files = [], []
    with tempfile.TemporaryDirectory(prefix="evalrun-input-") as tmp:
        for index, (src, rel) in enumerate(zip(files, rels, strict=True)):
            tar = Path(tmp) / f"{index}.tar"
            digest, size = _layer(src, rel, tar)
            push_blob(target, f"sha256:{digest}", size, tar)
            tar.unlink()
            file_sha = _sha256(src)
            layers.append({
                "mediaType": LAYER, "digest": f"sha256:{digest}", "size": size,
                "annotations": {"org.opencontainers.image.title": rel,
                                "org.evalrun.file.sha256": file_sha},
            })
            plan_files.append(PlanInputFile(path=rel, sha256=file_sha, size=src.stat().st_size))
    config = json.dumps({
        "architecture": "amd64", "os": "linux", "config": {},
        "rootfs": {"type": "layers", "diff_ids": [layer["digest"] for layer in layers]},
    }, sort_keys=True, separators=(",", ":")).encode()
    config_digest = "sha256:" + hashlib.sha256(config).hexdigest()
    put_blob_bytes(target, config_digest, config)
    manifest: dict = {
        "schemaVersion": 2,
        "mediaType": MANIFEST,
        "config": {"mediaType": IMAGE_CONFIG, "digest": config_digest, "size": len(config)},
        "layers": layers,
        "annotations": {"org.evalrun.input.role": role, "org.evalrun.input.name": name},
    }
    if shape == "artifact":
        manifest["artifactType"] = ARTIFACT_TYPE
    body = json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode()
    manifest_digest = "sha256:" + hashlib.sha256(body).hexdigest()
    put_manifest(target, manifest_digest, body, MANIFEST)
    if path.is_dir():
        from runner._internal.input_tree import InputFile, tree_digest

        tree = [InputFile(path=f.path, sha256=f.sha256, size=f.size) for f in plan_files]
        sha = tree_digest(tree)
        kind: Literal["file", "directory"] = "directory"
    else:
        sha, kind = plan_files[0].sha256, "file"
    return PlanInput(
        role=role, name=name, host_path=path, sha256=sha.removeprefix("sha256:"), kind=kind,
        file_name=None if path.is_dir() else path.name, files=tuple(plan_files),
        artifact_ref=f"{registry}/{repository}@{manifest_digest}",
    )

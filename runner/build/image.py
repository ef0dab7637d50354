"""The hermetic image build: Docker without network, then evalrun's own assembly and push.

Docker runs the network-less install of the staged context (:mod:`runner.build.context`);
evalrun then re-writes the layers Docker added and the config deterministically
(:mod:`runner._internal.oci`) and pushes them itself over the registry HTTP API, so the
**manifest digest** is a pure function of the build inputs. The engine pulls the image by
that digest and the **rootfs content digest** is measured on it by the agent;
:func:`image_reproducibility` is what a bundle records about the image from its lock.
"""

from __future__ import annotations

import io
import json
import tarfile
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from runner._internal import oci
from runner._internal.settings import Settings
from runner._internal.strict_json import load_json_strict

# runner/workflows/run.py and rerun.py import sha256_file from here; they are being changed on
# another branch, so this re-export stays until their imports move to runner._internal.tree.
from runner._internal.tree import sha256_file as sha256_file
from runner.adapters import registry, registry_blobs
from runner.adapters.docker_engine import connect, docker_call, translated
from runner.build.context import BUILD_EPOCH, BuildInputs, stage_context
from runner.errors import EvalrunError, InfrastructureError, InputError, IntegrityError
from runner.model.base import parse_digest_ref
from runner.model.predicate_parts import image_reproducibility as image_reproducibility
from runner.shared.rootfs_table import TABLE_PATH, table_digest

# image_reproducibility, re-exported above, is a pure function of the lock: it lives in the
# model, so that sealing a run never loads the build (Jinja2, the registry client).

Progress = Callable[[str], None]


def _noop(_: str) -> None:
    return None


def push_image(
    repo: str, tag: str, image: oci.AssembledImage, *, base_repo: str | None = None
) -> str:
    """Push an assembled image through the registry HTTP API; returns its manifest digest.

    Layers without a local file are the base image's: mounted from ``base_repo``
    when it is on the same registry, else copied from there. The digest is
    computed here from the bytes we wrote; the registry must agree.
    """
    name = registry.ImageName.parse(repo)
    source = registry.ImageName.parse(base_repo) if base_repo else None
    mount_from = [source.repository] if source and source.registry == name.registry else []
    for layer in image.layers:
        if layer.path is None and source is not None and not mount_from:
            if not registry_blobs.blob_exists(name, layer.digest):
                with tempfile.TemporaryDirectory(prefix="evalrun-blob-") as tmp:
                    copy = Path(tmp) / "blob"
                    registry_blobs.get_blob(source, layer.digest, copy)
                    registry_blobs.push_blob(name, layer.digest, layer.size, copy)
            continue
        registry_blobs.push_blob(name, layer.digest, layer.size, layer.path, mount_from=mount_from)
    registry_blobs.put_blob_bytes(name, image.config_digest, image.config)
    reported = registry.put_manifest(name, tag, image.manifest, oci.OCI_MANIFEST)
    resolved = registry.resolve_tag(name, tag)
    if (reported and reported != image.digest) or resolved != image.digest:
        raise IntegrityError(
            f"registry digest for {repo}:{tag} does not match the assembled manifest",
            expected=image.digest,
            found=reported or resolved,
        )
    return image.digest


def ensure_local(client: Any, ref: str, progress: Progress = _noop) -> None:
    """Make the engine hold ``repo@sha256`` (pulled from the registry if absent)."""
    try:
        with translated(f"inspect {ref}"):
            client.images.get(ref)
            return
    except EvalrunError:
        pass
    repo, digest = parse_digest_ref(ref)
    progress(f"pulling {ref}")
    errors: list[str] = []

    def do_pull() -> None:
        for chunk in client.api.pull(repo, tag=digest, stream=True, decode=True):
            if "errorDetail" in chunk or "error" in chunk:
                errors.append(
                    str((chunk.get("errorDetail") or {}).get("message") or chunk.get("error"))
                )

    docker_call(f"pull {ref}", do_pull)
    if errors:
        raise InfrastructureError(f"pull of {ref} failed: {errors[-1]}")


@dataclass(frozen=True)
class BuiltImage:
    ref: str
    rootfs_digest: str
    inputs_digest: str
    skipped: bool
    config_digest: str | None = None
    layers: tuple[str, ...] = ()


def _docker_build(client: Any, context: Path, tag: str, nocache: bool, progress: Progress) -> None:
    """Build with the network off; a stream ``errorDetail`` is a failed build, always."""
    # A failed build must never leave an older image under this tag to be used.
    try:
        with translated("remove stale tag"):
            client.api.remove_image(tag, noprune=True)
    except EvalrunError:
        pass
    errors: list[str] = []
    tail: list[str] = []

    def do_build() -> None:
        stream = client.api.build(
            path=str(context),
            tag=tag,
            network_mode="none",
            rm=True,
            forcerm=True,
            pull=False,
            nocache=nocache,
            decode=True,
            buildargs={"SOURCE_DATE_EPOCH": str(BUILD_EPOCH)},
        )
        for chunk in stream:
            if "errorDetail" in chunk or "error" in chunk:
                errors.append(
                    str((chunk.get("errorDetail") or {}).get("message") or chunk.get("error"))
                )
            text = chunk.get("stream", "")
            if text.strip():
                tail.append(text.rstrip())
                if text.startswith("Step "):
                    progress("  " + text.strip())

    progress(f"building {tag} (network disabled)")
    docker_call(f"build {tag}", do_build, retries=False)
    if errors:
        try:
            with translated("remove failed tag"):
                client.api.remove_image(tag, noprune=True)
        except EvalrunError:
            pass
        raise InputError(
            f"image build failed: {errors[-1].strip()}",
            build_log_tail="\n".join(tail[-15:]),
        )


def _agent_in_image(client: Any, ref: str, runtime: str, command: str, what: str) -> bytes:
    """The stdout of the agent's ``command`` run in the image (read-only, no network)."""

    def run() -> bytes:
        out: bytes = client.containers.run(
            ref,
            [command],
            remove=True,
            network_mode="none",
            read_only=True,
            tmpfs={"/tmp": "rw,size=16m"},
            runtime=runtime,
            stdout=True,
            stderr=False,
            cap_drop=["ALL"],
            security_opt=["no-new-privileges"],
        )
        return out

    return docker_call(f"{what} of {ref}", run, retries=False)


def measure_rootfs(client: Any, ref: str, runtime: str) -> str:
    """Run the agent in the image (read-only, no network) to compute its rootfs digest."""
    out = _agent_in_image(client, ref, runtime, "rootfs-digest", "measure rootfs")
    data = json.loads(out.decode().strip().splitlines()[-1])
    digest: str = data["rootfs_digest"]
    return digest


def measure_table(client: Any, ref: str, runtime: str) -> bytes:
    """Run the agent in the image (read-only, no network) to print its rootfs digest table."""
    return _agent_in_image(client, ref, runtime, "rootfs-table", "measure the rootfs table")


def table_layer(table: bytes, workdir: Path) -> oci.Blob:
    """One deterministic layer holding the digest table at ``TABLE_PATH`` (outside the digest)."""
    raw = workdir / "table-layer.raw.tar"
    parts = TABLE_PATH.strip("/").split("/")
    with tarfile.open(raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for depth in range(1, len(parts)):
            info = tarfile.TarInfo("/".join(parts[:depth]))
            info.type, info.mode = tarfile.DIRTYPE, 0o755
            tar.addfile(info)
        info = tarfile.TarInfo("/".join(parts))
        info.size, info.mode = len(table), 0o444
        tar.addfile(info, io.BytesIO(table))
    with raw.open("rb") as src:
        blob = oci.normalize_layer(src, workdir / "table-layer.tar", BUILD_EPOCH)
    raw.unlink()
    return blob


def with_table(image: oci.AssembledImage, table: bytes, workdir: Path) -> oci.AssembledImage:
    """``image`` plus the layer carrying its digest table."""
    config = json.loads(image.config)
    blob = table_layer(table, workdir)
    history = [h.get("created_by", "") for h in config.get("history", [])]
    return oci.assemble(
        [*image.layers, blob],
        config.get("config") or {},
        BUILD_EPOCH,
        [*history, "evalrun rootfs digest table"],
        [*config["rootfs"]["diff_ids"], blob.digest],
    )


def _base_layers(base_ref: str) -> tuple[list[oci.Blob], list[str], list[str]]:
    """The base image's layers (registry-held blobs), diff ids and history lines."""
    repo, digest = parse_digest_ref(base_ref)
    name = registry.ImageName.parse(repo)
    manifest: oci.ImageManifest = load_json_strict(registry.get_manifest_bytes(name, digest))
    if "layers" not in manifest:
        raise InputError(f"base image {base_ref} is an index, not a single-platform image")
    config: oci.ImageConfig = load_json_strict(
        registry_blobs.get_blob_bytes(name, manifest["config"]["digest"])
    )
    layers = [
        oci.Blob(
            None, d["digest"], int(d["size"]), oci.LAYER_TYPES.get(d["mediaType"], d["mediaType"])
        )
        for d in manifest["layers"]
    ]
    diff_ids = list(config["rootfs"]["diff_ids"])
    history = [
        h.get("created_by", "") for h in config.get("history", []) if not h.get("empty_layer")
    ]
    if len(history) != len(layers):
        history = [f"base layer {i}" for i in range(1, len(layers) + 1)]
    return layers, diff_ids, history


def assemble_from_build(
    client: Any, tag: str, base_ref: str, workdir: Path, progress: Progress = _noop
) -> oci.AssembledImage:
    """``docker save`` the built image and re-write its build layers deterministically.

    The base layers are taken from the base image in the registry (byte-identical
    by digest); the layers Docker added are normalized; the config keeps only the
    runtime fields (env, entrypoint, cmd, user, workdir, labels) with fixed times.
    """
    base_layers, base_diff_ids, base_history = _base_layers(base_ref)
    saved_path = workdir / "saved.tar"
    progress("exporting the build layers (docker save)")
    docker_call(
        f"save {tag}",
        lambda: oci.copy_stream(client.api.get_image(tag, chunk_size=1 << 20), saved_path),
        retries=False,
    )
    layers, diff_ids, history = list(base_layers), list(base_diff_ids), list(base_history)
    with tarfile.open(saved_path, mode="r:") as archive:
        saved = oci.read_saved(archive)
        n = len(base_layers)
        built_from = saved.config["rootfs"]["diff_ids"][:n]
        if built_from != base_diff_ids:
            raise IntegrityError(
                "the Docker build did not start from the locked base layers",
                expected=base_diff_ids,
                found=built_from,
            )
        for i, member in enumerate(saved.layer_members[n:], start=1):
            with oci.open_member(archive, member) as src:
                blob = oci.normalize_layer(src, workdir / f"layer-{i}.tar", BUILD_EPOCH)
            assert blob.path is not None
            if oci.empty_layer(blob.path):
                continue
            layers.append(blob)
            diff_ids.append(blob.digest)
            history.append(f"evalrun build layer {len(layers) - n}")
    saved_path.unlink()
    config = saved.config.get("config") or {}
    return oci.assemble(layers, config, BUILD_EPOCH, history, diff_ids)


def build_image(
    inputs: BuildInputs,
    settings: Settings,
    *,
    client: Any | None = None,
    nocache: bool = False,
    tag_suffix: str = "",
    measure: bool = True,
    progress: Progress = _noop,
) -> BuiltImage:
    """Render, build hermetically, assemble deterministically, push, measure the rootfs.

    Docker runs the network-less install; the pushed image is evalrun's own
    assembly, so its digest is a pure function of the build inputs.
    """
    client = client or connect()
    inputs_digest = inputs.digest()
    repo = f"{inputs.spec.image.repository}/{inputs.spec.metadata.name}"
    tag = f"in-{inputs_digest[:24]}{tag_suffix}"
    ensure_local(client, inputs.base.ref, progress)
    rootfs = ""
    with tempfile.TemporaryDirectory(prefix="evalrun-build-") as tmp:
        context, work = Path(tmp) / "context", Path(tmp) / "layers"
        context.mkdir()
        work.mkdir()
        stage_context(inputs, context, settings)
        build_tag = f"{repo}:build-{inputs_digest[:24]}{tag_suffix}"
        _docker_build(client, context, build_tag, nocache, progress)
        image = assemble_from_build(client, build_tag, inputs.base.ref, work, progress)
        base_repo = parse_digest_ref(inputs.base.ref)[0]
        progress(f"pushing {repo}:{tag}-content ({image.digest})")
        digest = push_image(repo, f"{tag}-content", image, base_repo=base_repo)
        if measure:
            # the table is measured on the pushed content, then added in a layer of its own
            content_ref = f"{repo}@{digest}"
            ensure_local(client, content_ref, progress)
            progress("measuring the rootfs digest table")
            table = measure_table(client, content_ref, "runc")
            rootfs = table_digest(table.splitlines(keepends=True))
            image = with_table(image, table, work)
            progress(f"pushing {repo}:{tag} ({image.digest})")
            digest = push_image(repo, tag, image, base_repo=base_repo)
    ref = f"{repo}@{digest}"
    return BuiltImage(
        ref=ref,
        rootfs_digest=rootfs,
        inputs_digest=inputs_digest,
        skipped=False,
        config_digest=image.config_digest,
        layers=tuple(b.digest for b in image.layers),
    )

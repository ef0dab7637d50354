"""Pulling bundle artifacts: by their digest, or every bundle attached to an image.

Nothing a registry sends is trusted: documents are read strictly and bounded, every
blob is checked against its digest and declared size while downloading, and the bundle
tar is verified (signature, manifest, every file) before anything is extracted or
enters the store. Attached artifacts are followed one level deep, at most
:data:`MAX_ATTACHED`, and only the bundles the given key signed are kept.
"""

from __future__ import annotations

import hashlib
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from runner._internal.sanitize import one_line
from runner._internal.tree import remove_tree
from runner.adapters import registry, registry_blobs
from runner.adapters.registry import ImageName
from runner.bundle.archive import extract_bundle_tar
from runner.bundle.oci_artifacts.documents import (
    ARTIFACT_TYPE,
    LAYER_TYPE,
    MAX_REFERENCE_CHARS,
    REFERENCE,
    JsonObject,
    Progress,
    descriptors_in,
    digest_of,
    fallback_tag,
    is_bundle_manifest,
    read_document,
)
from runner.bundle.signing import TrustedKeys
from runner.bundle.store import Store, StoredBundle
from runner.bundle.verify import verify_bundle
from runner.errors import InputError, IntegrityError, VerificationFailed
from runner.model.base import parse_digest_ref

# What a pull reads at most before the bundle is verified: a registry's JSON documents
# (manifests, indexes), the attached bundles of one image, and one bundle tar.
MAX_DOCUMENT_BYTES = registry.MAX_MANIFEST_BYTES
MAX_ATTACHED = 256
MAX_BUNDLE_TAR_BYTES = 8 << 30


def _listed_referrers(name: ImageName, digest: str, reference: str) -> list[JsonObject]:
    listed = registry.referrers(name, digest)
    if listed is None:
        found = registry.find_manifest(name, fallback_tag(digest))
        if found is None:
            return []
        listed = descriptors_in(read_document(found[1], "referrers index", reference), "manifests")
    return [d for d in listed if isinstance(d, dict)]


def bundle_referrers(image_ref: str) -> list[JsonObject]:
    """Descriptors of the evalrun bundles attached to the image ``repo@sha256:…``."""
    repo, digest = parse_digest_ref(image_ref)
    name = ImageName.parse(repo)
    return [
        m
        for m in _listed_referrers(name, digest, image_ref)
        if m.get("artifactType") == ARTIFACT_TYPE
    ]


@dataclass(frozen=True)
class PulledBundle:
    """One bundle :func:`pull_bundle` stored: the artifact it came from and the run."""

    reference: str
    stored: StoredBundle
    run_id: str


def _manifest_of(reference: str) -> tuple[ImageName, str, JsonObject]:
    """The manifest named by ``reference`` (``repo@sha256:…``), checked against its digest."""
    match = REFERENCE.match(reference.strip()) if len(reference) <= MAX_REFERENCE_CHARS else None
    if not match:
        raise InputError(
            f"not a registry reference by digest: {one_line(reference, limit=80)!r}"
            + (f" ({len(reference)} characters)" if len(reference) > MAX_REFERENCE_CHARS else ""),
            hint="expected host:port/repository@sha256:<64 hex>",
        )
    name = ImageName.parse(match["repo"])
    found = registry.find_manifest(name, match["digest"])
    if found is None:
        raise InputError("no such manifest in the registry", reference=reference)
    _, body = found
    if "sha256:" + hashlib.sha256(body).hexdigest() != match["digest"]:
        raise IntegrityError(
            "the registry returned a manifest with another digest", reference=reference
        )
    return name, match["digest"], read_document(body, "manifest", reference)


def _bundle_layer(reference: str, data: Mapping[str, object]) -> tuple[str, int]:
    """(digest, size) of the one bundle tar layer, its size bounded before any download."""
    layers = descriptors_in(data, "layers")
    if len(layers) != 1 or layers[0].get("mediaType") != LAYER_TYPE:
        raise IntegrityError(
            "bundle artifact must have exactly one bundle tar layer", reference=reference
        )
    digest = digest_of(layers[0], reference)
    size = layers[0].get("size")
    if isinstance(size, bool) or not isinstance(size, int) or not 0 < size <= MAX_BUNDLE_TAR_BYTES:
        raise IntegrityError(
            f"the bundle layer declares {one_line(size, limit=40)} bytes; a bundle tar is "
            f"1 to {MAX_BUNDLE_TAR_BYTES} bytes",
            reference=reference,
        )
    return digest, size


def _download_tar(
    name: ImageName, reference: str, data: Mapping[str, object], scratch: Path
) -> Path:
    """Download the bundle tar: never more bytes than its descriptor declares, digest-checked."""
    digest, size = _bundle_layer(reference, data)
    tar_path = scratch / "bundle.tar"
    registry_blobs.get_blob(name, digest, tar_path, max_bytes=size)
    return tar_path


def _extract(tar_path: Path, dest: Path, reference: str) -> None:
    try:
        extract_bundle_tar(tar_path, dest)
    except IntegrityError as exc:
        exc.fields.setdefault("reference", reference)
        raise
    except InputError as exc:  # not a tar at all: what the registry sent is not a bundle
        raise IntegrityError(
            f"the bundle layer is not a bundle tar: {exc.message}", reference=reference
        ) from exc


def fetch_bundle(reference: str, dest: Path) -> Path:
    """Download the bundle artifact ``reference`` and extract it into the new directory ``dest``.

    Every blob is checked against its digest and its declared size; the bundle itself is
    NOT verified — pass ``dest`` to :func:`runner.bundle.verify.verify_bundle` (what
    ``evalrun verify REF`` does).
    """
    name, _, data = _manifest_of(reference)
    if not is_bundle_manifest(data):
        raise InputError(
            "not an evalrun bundle artifact (an image? `evalrun pull` lists its bundles)",
            reference=reference,
        )
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="fetch-", dir=dest.parent) as tmp:
        _extract(_download_tar(name, reference, data, Path(tmp)), dest, reference)
    return dest


def pull_bundle(
    reference: str,
    store: Store,
    verifier: TrustedKeys,
    *,
    progress: Progress = lambda _: None,
) -> list[PulledBundle]:
    """Fetch the bundle artifact ``reference`` into the store, verified.

    If ``reference`` is an evaluated image rather than a bundle, every bundle attached
    to it is pulled: one level deep (an attached artifact that is not itself a bundle is
    skipped, never followed), each digest once, at most :data:`MAX_ATTACHED`. The
    bundle tar is verified as downloaded, before anything is extracted. Returns what was
    stored (already stored: no-op).
    """
    name, digest, data = _manifest_of(reference)
    if is_bundle_manifest(data):
        return [_pull_one(name, digest, data, store, verifier, progress)]
    attached = bundle_referrers(reference)
    if not attached:
        raise InputError(
            "the image has no evalrun bundles attached",
            reference=reference,
            hint="`evalrun push RUN` attaches a run's bundle to its image",
        )
    if len(attached) > MAX_ATTACHED:
        progress(f"{len(attached)} bundles attached; pulling the first {MAX_ATTACHED}")
    progress(f"{min(len(attached), MAX_ATTACHED)} bundle(s) attached to {reference}")
    pulled: list[PulledBundle] = []
    refused: list[str] = []
    seen: set[str] = {digest}
    for entry in attached[:MAX_ATTACHED]:
        try:
            entry_digest = digest_of(entry, reference)
        except IntegrityError as exc:
            refused.append(exc.message)
            continue
        if entry_digest in seen:
            continue
        seen.add(entry_digest)
        ref = f"{name}@{entry_digest}"
        try:
            _, _, entry_data = _manifest_of(ref)
            if not is_bundle_manifest(entry_data):
                # listed as a bundle but is not one: never followed further
                raise IntegrityError("an attached artifact is not an evalrun bundle", reference=ref)
            pulled.append(_pull_one(name, entry_digest, entry_data, store, verifier, progress))
        except (IntegrityError, InputError) as exc:
            # anyone with push rights can attach a bundle: keep only what this key signed
            refused.append(f"{ref}: {exc.message}")
            progress(f"skipped {ref}: {exc.message}")
    if not pulled:
        raise VerificationFailed(
            "no bundle attached to the image verifies with this key",
            problems=refused,
            bundle=reference,
        )
    return pulled


def _pull_one(
    name: ImageName,
    digest: str,
    data: Mapping[str, object],
    store: Store,
    verifier: TrustedKeys,
    progress: Progress,
) -> PulledBundle:
    reference = f"{name}@{digest}"
    store.tmp_dir.mkdir(parents=True, exist_ok=True)
    staged = Path(tempfile.mkdtemp(prefix="stage-", dir=store.tmp_dir))
    try:
        tar_path = _download_tar(name, reference, data, staged)
        # verified as the tar that was downloaded: nothing is unpacked before that
        try:
            verified = verify_bundle(tar_path, verifier)
        except InputError as exc:  # not a tar at all: what the registry sent is not a bundle
            raise IntegrityError(
                f"the bundle layer is not a bundle tar: {exc.message}", reference=reference
            ) from exc
        annotations = data.get("annotations")
        annotated = (
            annotations.get("dev.evalrun.bundle-digest") if isinstance(annotations, dict) else None
        )
        if annotated and annotated != verified.bundle_digest:
            raise IntegrityError(
                "the artifact's annotation names another bundle",
                expected=one_line(annotated, limit=100),
                found=verified.bundle_digest,
            )
        bundle_dir = staged / "bundle"
        _extract(tar_path, bundle_dir, reference)
        tar_path.unlink()
        stored = store.put(bundle_dir)
    finally:
        remove_tree(staged)
    progress(f"pulled {stored.run_id} → {stored.path}")
    return PulledBundle(reference=reference, stored=stored, run_id=stored.run_id)

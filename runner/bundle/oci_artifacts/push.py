"""Pushing a bundle as an OCI artifact attached to the image it evaluated.

The bundle's deterministic tar is the one layer of an image manifest with
``artifactType`` :data:`~runner.bundle.oci_artifacts.documents.ARTIFACT_TYPE` whose
``subject`` is the evaluated image, so the OCI referrers API lists a model image's
evaluations. Everything in the manifest comes from the bundle (no push time): pushing
the same bundle twice gives the same digest and the second push is a no-op. Registries
without the referrers API get the OCI 1.1 fallback index, updated here.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from runner.adapters import registry, registry_blobs
from runner.adapters.registry import ImageName
from runner.bundle.archive import write_bundle_tar
from runner.bundle.oci_artifacts.documents import (
    ARTIFACT_TYPE,
    CONFIG_TYPE,
    LAYER_TYPE,
    OCI_INDEX,
    OCI_MANIFEST,
    BundleConfig,
    Descriptor,
    OciImageIndex,
    OciImageManifest,
    Progress,
    canonical_json,
    descriptors_in,
    fallback_tag,
    read_document,
)
from runner.bundle.reader import predicate_of, read_predicate
from runner.bundle.signing import TrustedKeys
from runner.bundle.verify import verify_bundle
from runner.errors import InputError, IntegrityError
from runner.model.base import parse_digest_ref
from runner.model.predicate import AuditPredicate, RunPredicate


@dataclass(frozen=True)
class PushedBundle:
    """What :func:`push_bundle` did: the artifact's reference and digest, and its subject."""

    reference: str
    manifest_digest: str
    subject: str
    already_present: bool
    referrers_fallback: bool


def push_bundle(
    bundle: Path,
    scratch: Path,
    *,
    progress: Progress = lambda _: None,
    verifier: TrustedKeys | None = None,
) -> PushedBundle:
    """Push a (verified) bundle directory as an OCI artifact referring to its image.

    With ``verifier``, the tar that is uploaded is itself verified first, and what the
    artifact's config and annotations say is read from that verification: exactly the
    bytes that were checked leave the machine.
    """
    tar_path = scratch / "bundle.tar"
    write_bundle_tar(bundle, tar_path)
    if verifier is not None:
        verified = verify_bundle(tar_path, verifier)
        predicate = predicate_of(verified.statement)
        statement_digest = verified.bundle_digest
    else:
        predicate = read_predicate(bundle)
        statement_digest = (
            "sha256:" + hashlib.sha256((bundle / "statement.json").read_bytes()).hexdigest()
        )
    image_ref = predicate.image.ref if isinstance(predicate, RunPredicate) else None
    if image_ref is None:
        raise InputError("the bundle names no image to attach to", bundle=str(bundle))
    repo, image_digest = parse_digest_ref(image_ref)
    name = ImageName.parse(repo)
    subject = registry.manifest_ref(name, image_digest)
    if subject is None:
        raise IntegrityError(
            "the evaluated image is not in the registry; cannot attach the bundle to it",
            image=image_ref,
        )
    h = hashlib.sha256()
    with tar_path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    layer = Descriptor(
        LAYER_TYPE,
        "sha256:" + h.hexdigest(),
        tar_path.stat().st_size,
        annotations=(("org.opencontainers.image.title", f"{predicate.run_id}.bundle.tar"),),
    )
    spec_name = predicate.spec.name if not isinstance(predicate, AuditPredicate) else None
    outcome = None if predicate.outcome is None else str(predicate.outcome)
    config_document: BundleConfig = {
        "run_id": predicate.run_id,
        "bundle_digest": statement_digest,
        "spec": spec_name,
        "outcome": outcome,
        "kind": predicate.kind,
    }
    config_body = canonical_json(config_document)
    config = Descriptor(
        CONFIG_TYPE, "sha256:" + hashlib.sha256(config_body).hexdigest(), len(config_body)
    )
    annotations: dict[str, str] = {
        "dev.evalrun.run-id": predicate.run_id,
        "dev.evalrun.bundle-digest": statement_digest,
        "dev.evalrun.outcome": str(outcome),
        "dev.evalrun.spec": str(spec_name),
    }
    started = predicate.timestamps.started
    if started is not None:
        annotations["org.opencontainers.image.created"] = started
    manifest: OciImageManifest = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "artifactType": ARTIFACT_TYPE,
        "config": config.as_json(),
        "layers": [layer.as_json()],
        "subject": Descriptor(subject.media_type, subject.digest, subject.size).as_json(),
        "annotations": annotations,
    }
    body = canonical_json(manifest)
    digest = "sha256:" + hashlib.sha256(body).hexdigest()
    reference = f"{name}@{digest}"
    present = registry.manifest_ref(name, digest) is not None
    if present:
        progress(f"{reference} is already in the registry")
    else:
        registry_blobs.put_blob_bytes(name, config.digest, config_body)
        progress(f"uploading the bundle ({layer.size} bytes)")
        registry_blobs.push_blob(name, layer.digest, layer.size, tar_path)
        pushed = registry.put_manifest(name, digest, body, OCI_MANIFEST)
        if pushed != digest:
            raise IntegrityError(
                "the registry stored the artifact under another digest",
                expected=digest,
                found=pushed,
            )
    fallback = registry.referrers(name, subject.digest) is None
    if fallback:
        _add_to_fallback_index(
            name,
            subject.digest,
            Descriptor(
                OCI_MANIFEST,
                digest,
                len(body),
                artifact_type=ARTIFACT_TYPE,
                annotations=tuple(sorted(annotations.items())),
            ),
        )
    return PushedBundle(
        reference=reference,
        manifest_digest=digest,
        subject=f"{name}@{subject.digest}",
        already_present=present,
        referrers_fallback=fallback,
    )


def _add_to_fallback_index(name: ImageName, subject: str, entry: Descriptor) -> None:
    tag = fallback_tag(subject)
    found = registry.find_manifest(name, tag)
    # entries other pushers listed are kept as the registry had them
    manifests: list[Mapping[str, object]] = []
    if found is not None:
        document = read_document(found[1], "referrers index", str(name))
        manifests = [*descriptors_in(document, "manifests")]
    if any(m.get("digest") == entry.digest for m in manifests):
        return
    manifests.append(entry.as_json())
    manifests.sort(key=lambda m: str(m.get("digest")))
    index: OciImageIndex = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": manifests}
    registry.put_manifest(name, tag, canonical_json(index), OCI_INDEX)

"""Bundles as OCI artifacts in the registry that holds the evaluated images.

A bundle is pushed into the evaluated image's repository as an OCI image
manifest with ``artifactType`` :data:`ARTIFACT_TYPE`, whose one layer is the
bundle's deterministic tar and whose ``subject`` is the evaluated image's
manifest — so the OCI referrers mechanism lists a model image's evaluations.
Everything in the manifest comes from the bundle (no push time), so pushing the
same bundle twice gives the same digest and the second push is a no-op.

Registries without the referrers API (distribution 2.x, the embedded default)
get the OCI 1.1 fallback: an image index tagged ``sha256-<subject hex>``
listing the referrers, updated on push.

Pulling verifies every blob against its digest while downloading, then the
bundle itself (signature, manifest, every file) before it enters the store.
"""

from __future__ import annotations

import hashlib
import json
import re
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from runner._internal.sanitize import one_line
from runner.adapters import registry
from runner.adapters.registry import ImageName
from runner.bundle.build import extract_bundle_tar, remove_tree, write_bundle_tar
from runner.bundle.metadata import load_json_strict
from runner.bundle.reader import predicate_of, read_predicate
from runner.bundle.signing import TrustedKeys
from runner.bundle.store import Store, StoredBundle
from runner.bundle.verify import verify_bundle
from runner.errors import InputError, IntegrityError, VerificationFailed
from runner.model.predicate import AuditPredicate, RunPredicate
from runner.model.spec import parse_digest_ref

ARTIFACT_TYPE = "application/vnd.evalrun.bundle.v1"
CONFIG_TYPE = "application/vnd.evalrun.bundle.config.v1+json"
LAYER_TYPE = "application/vnd.evalrun.bundle.v1.tar"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
# No registry reference is longer (the distribution spec bounds repository names).
MAX_REFERENCE_CHARS = 4096
_REF = re.compile(r"^(?P<repo>[^@\s]+)@(?P<digest>sha256:[0-9a-f]{64})$")
Progress = Callable[[str], None]


def is_registry_ref(text: str) -> bool:
    """Whether ``text`` looks like ``host[:port]/repo@sha256:…`` (and is not a local path)."""
    match = _REF.match(text.strip())
    if not match or len(text) > MAX_REFERENCE_CHARS:
        return False
    try:
        if Path(text).exists():
            return False
    except (OSError, ValueError):  # not a name a local path can have: not a local path
        pass
    first = match["repo"].split("/", 1)[0]
    return "/" in match["repo"] and ("." in first or ":" in first or first == "localhost")


@dataclass(frozen=True)
class Descriptor:
    media_type: str
    digest: str
    size: int
    artifact_type: str | None = None
    annotations: tuple[tuple[str, str], ...] = ()

    def as_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "mediaType": self.media_type,
            "digest": self.digest,
            "size": self.size,
        }
        if self.artifact_type:
            data["artifactType"] = self.artifact_type
        if self.annotations:
            data["annotations"] = dict(self.annotations)
        return data


@dataclass(frozen=True)
class PushedBundle:
    reference: str
    manifest_digest: str
    subject: str
    already_present: bool
    referrers_fallback: bool


def _canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def _fallback_tag(subject: str) -> str:
    return subject.replace(":", "-")


# --------------------------------------------------------------------------- push


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
    config_body = _canonical(
        {
            "run_id": predicate.run_id,
            "bundle_digest": statement_digest,
            "spec": spec_name,
            "outcome": outcome,
            "kind": predicate.kind,
        }
    )
    config = Descriptor(
        CONFIG_TYPE, "sha256:" + hashlib.sha256(config_body).hexdigest(), len(config_body)
    )
    annotations = {
        "dev.evalrun.run-id": predicate.run_id,
        "dev.evalrun.bundle-digest": statement_digest,
        "dev.evalrun.outcome": str(outcome),
        "dev.evalrun.spec": str(spec_name),
    }
    started = predicate.timestamps.started
    if started is not None:
        annotations["org.opencontainers.image.created"] = started
    manifest = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "artifactType": ARTIFACT_TYPE,
        "config": config.as_json(),
        "layers": [layer.as_json()],
        "subject": Descriptor(subject.media_type, subject.digest, subject.size).as_json(),
        "annotations": annotations,
    }
    body = _canonical(manifest)
    digest = "sha256:" + hashlib.sha256(body).hexdigest()
    reference = f"{name}@{digest}"
    present = registry.manifest_ref(name, digest) is not None
    if present:
        progress(f"{reference} is already in the registry")
    else:
        registry.put_blob_bytes(name, config.digest, config_body)
        progress(f"uploading the bundle ({layer.size} bytes)")
        registry.push_blob(name, layer.digest, layer.size, tar_path)
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
    tag = _fallback_tag(subject)
    found = registry.find_manifest(name, tag)
    manifests: list[dict[str, Any]] = []
    if found is not None:
        manifests = _descriptors(_document(found[1], "referrers index", str(name)), "manifests")
    if any(m.get("digest") == entry.digest for m in manifests):
        return
    manifests.append(entry.as_json())
    manifests.sort(key=lambda m: str(m.get("digest")))
    index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": manifests}
    registry.put_manifest(name, tag, _canonical(index), OCI_INDEX)


# --------------------------------------------------------------------------- pull

# What a pull reads at most before the bundle is verified: a registry's JSON documents
# (manifests, indexes), the attached bundles of one image, and one bundle tar.
MAX_DOCUMENT_BYTES = registry.MAX_MANIFEST_BYTES
MAX_ATTACHED = 256
MAX_BUNDLE_TAR_BYTES = 8 << 30
_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")


def _document(body: bytes, what: str, reference: str) -> dict[str, Any]:
    """A registry's JSON document (strict: no duplicate keys, no NaN), an object."""
    try:
        data = load_json_strict(body)
    except ValueError as exc:
        raise IntegrityError(
            f"the registry's {what} is not valid JSON: {one_line(exc, limit=120)}",
            reference=one_line(reference, limit=200),
        ) from None
    if not isinstance(data, dict):
        raise IntegrityError(
            f"the registry's {what} is not a JSON object", reference=one_line(reference, limit=200)
        )
    return data


def _descriptors(data: Mapping[str, Any], key: str) -> list[dict[str, Any]]:
    """The descriptor objects listed under ``key`` (anything else there is ignored)."""
    found = data.get(key)
    if not isinstance(found, list):
        return []
    return [d for d in found if isinstance(d, dict)]


def _digest_of(descriptor: Mapping[str, Any], reference: str) -> str:
    digest = descriptor.get("digest")
    if not isinstance(digest, str) or not _DIGEST.match(digest):
        raise IntegrityError(
            f"a descriptor names no sha256 digest: {one_line(digest, limit=80)!r}",
            reference=one_line(reference, limit=200),
        )
    return digest


def _listed_referrers(name: ImageName, digest: str, reference: str) -> list[dict[str, Any]]:
    listed = registry.referrers(name, digest)
    if listed is None:
        found = registry.find_manifest(name, _fallback_tag(digest))
        if found is None:
            return []
        listed = _descriptors(_document(found[1], "referrers index", reference), "manifests")
    return [d for d in listed if isinstance(d, dict)]


def bundle_referrers(image_ref: str) -> list[dict[str, Any]]:
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
    reference: str
    stored: StoredBundle
    run_id: str


def _is_bundle_manifest(data: Mapping[str, Any]) -> bool:
    config = data.get("config")
    config_type = config.get("mediaType") if isinstance(config, dict) else None
    return data.get("artifactType") == ARTIFACT_TYPE or config_type == CONFIG_TYPE


def _manifest_of(reference: str) -> tuple[ImageName, str, dict[str, Any]]:
    """The manifest named by ``reference`` (``repo@sha256:…``), checked against its digest."""
    match = _REF.match(reference.strip()) if len(reference) <= MAX_REFERENCE_CHARS else None
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
    return name, match["digest"], _document(body, "manifest", reference)


def _bundle_layer(reference: str, data: Mapping[str, Any]) -> tuple[str, int]:
    """(digest, size) of the one bundle tar layer, its size bounded before any download."""
    layers = _descriptors(data, "layers")
    if len(layers) != 1 or layers[0].get("mediaType") != LAYER_TYPE:
        raise IntegrityError(
            "bundle artifact must have exactly one bundle tar layer", reference=reference
        )
    digest = _digest_of(layers[0], reference)
    size = layers[0].get("size")
    if isinstance(size, bool) or not isinstance(size, int) or not 0 < size <= MAX_BUNDLE_TAR_BYTES:
        raise IntegrityError(
            f"the bundle layer declares {one_line(size, limit=40)} bytes; a bundle tar is "
            f"1 to {MAX_BUNDLE_TAR_BYTES} bytes",
            reference=reference,
        )
    return digest, size


def _download_tar(name: ImageName, reference: str, data: Mapping[str, Any], scratch: Path) -> Path:
    """Download the bundle tar: never more bytes than its descriptor declares, digest-checked."""
    digest, size = _bundle_layer(reference, data)
    tar_path = scratch / "bundle.tar"
    registry.get_blob(name, digest, tar_path, max_bytes=size)
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
    if not _is_bundle_manifest(data):
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
    if _is_bundle_manifest(data):
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
            entry_digest = _digest_of(entry, reference)
        except IntegrityError as exc:
            refused.append(exc.message)
            continue
        if entry_digest in seen:
            continue
        seen.add(entry_digest)
        ref = f"{name}@{entry_digest}"
        try:
            _, _, entry_data = _manifest_of(ref)
            if not _is_bundle_manifest(entry_data):
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
    data: Mapping[str, Any],
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


__all__ = [
    "ARTIFACT_TYPE",
    "PulledBundle",
    "PushedBundle",
    "bundle_referrers",
    "fetch_bundle",
    "is_registry_ref",
    "pull_bundle",
    "push_bundle",
]

"""The OCI documents a bundle artifact is made of, and strict reading of a registry's.

What evalrun writes has the shapes of the OCI image spec (v1.1): a descriptor
(:class:`OciDescriptor`), an image manifest (:class:`OciImageManifest`) with
``artifactType`` and ``subject``, an image index (:class:`OciImageIndex`, the referrers
fallback), and the artifact's config blob (:class:`BundleConfig`). All are written as
canonical JSON (:func:`canonical_json`), so the same bundle always gives the same digest.

What a registry sends back is untrusted: :func:`read_document` parses it strictly into
a :data:`JsonObject` (no duplicate keys, no NaN), and every field is checked where it is
used (:func:`descriptors_in`, :func:`digest_of`, :func:`is_bundle_manifest`), never
assumed to have the shape evalrun would have written.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, NotRequired, TypedDict

from runner._internal.sanitize import one_line
from runner.bundle.metadata import load_json_strict
from runner.errors import IntegrityError

ARTIFACT_TYPE = "application/vnd.evalrun.bundle.v1"
CONFIG_TYPE = "application/vnd.evalrun.bundle.config.v1+json"
LAYER_TYPE = "application/vnd.evalrun.bundle.v1.tar"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
# No registry reference is longer (the distribution spec bounds repository names).
MAX_REFERENCE_CHARS = 4096
REFERENCE = re.compile(r"^(?P<repo>[^@\s]+)@(?P<digest>sha256:[0-9a-f]{64})$")
_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")

JsonObject = dict[str, object]
"""A JSON object a registry sent: parsed strictly, its fields not yet checked."""


class OciDescriptor(TypedDict):
    """An OCI content descriptor (image spec ``descriptor.md``), as evalrun writes one."""

    mediaType: str
    digest: str
    size: int
    artifactType: NotRequired[str]
    annotations: NotRequired[dict[str, str]]


class OciImageManifest(TypedDict):
    """An OCI image manifest carrying an artifact (``artifactType``) about a ``subject``."""

    schemaVersion: Literal[2]
    mediaType: str
    artifactType: str
    config: OciDescriptor
    layers: list[OciDescriptor]
    subject: OciDescriptor
    annotations: dict[str, str]


class OciImageIndex(TypedDict):
    """An OCI image index: here the referrers fallback tagged ``sha256-<subject hex>``.

    Entries other pushers listed are kept exactly as the registry had them (unchecked).
    """

    schemaVersion: Literal[2]
    mediaType: str
    manifests: list[Mapping[str, object]]


class BundleConfig(TypedDict):
    """The artifact's config blob: which run, which bundle, how it ended."""

    run_id: str
    bundle_digest: str
    spec: str | None
    outcome: str | None
    kind: str


@dataclass(frozen=True)
class Descriptor:
    """A descriptor to write (:meth:`as_json` gives its OCI JSON form)."""

    media_type: str
    digest: str
    size: int
    artifact_type: str | None = None
    annotations: tuple[tuple[str, str], ...] = ()

    def as_json(self) -> OciDescriptor:
        """The OCI JSON form; ``artifactType`` and ``annotations`` only when set."""
        data: OciDescriptor = {
            "mediaType": self.media_type,
            "digest": self.digest,
            "size": self.size,
        }
        if self.artifact_type:
            data["artifactType"] = self.artifact_type
        if self.annotations:
            data["annotations"] = dict(self.annotations)
        return data


def canonical_json(obj: OciImageManifest | OciImageIndex | BundleConfig) -> bytes:
    """The canonical bytes of a document: sorted keys, no spaces, no NaN."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def fallback_tag(subject: str) -> str:
    """The tag of the referrers fallback index for ``subject`` (``sha256-<hex>``)."""
    return subject.replace(":", "-")


def is_registry_ref(text: str) -> bool:
    """Whether ``text`` looks like ``host[:port]/repo@sha256:…`` (and is not a local path)."""
    match = REFERENCE.match(text.strip())
    if not match or len(text) > MAX_REFERENCE_CHARS:
        return False
    try:
        if Path(text).exists():
            return False
    except (OSError, ValueError):  # not a name a local path can have: not a local path
        pass
    first = match["repo"].split("/", 1)[0]
    return "/" in match["repo"] and ("." in first or ":" in first or first == "localhost")


# --------------------------------------------------------------------------- reading


def read_document(body: bytes, what: str, reference: str) -> JsonObject:
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


def descriptors_in(data: Mapping[str, object], key: str) -> list[JsonObject]:
    """The descriptor objects listed under ``key`` (anything else there is ignored)."""
    found = data.get(key)
    if not isinstance(found, list):
        return []
    return [d for d in found if isinstance(d, dict)]


def digest_of(descriptor: Mapping[str, object], reference: str) -> str:
    """The descriptor's ``digest``, which must be ``sha256:<64 hex>``; else IntegrityError."""
    digest = descriptor.get("digest")
    if not isinstance(digest, str) or not _DIGEST.match(digest):
        raise IntegrityError(
            f"a descriptor names no sha256 digest: {one_line(digest, limit=80)!r}",
            reference=one_line(reference, limit=200),
        )
    return digest


def is_bundle_manifest(data: Mapping[str, object]) -> bool:
    """Whether a manifest says it is an evalrun bundle (artifactType or config media type)."""
    config = data.get("config")
    config_type = config.get("mediaType") if isinstance(config, dict) else None
    return data.get("artifactType") == ARTIFACT_TYPE or config_type == CONFIG_TYPE


Progress = Callable[[str], None]
"""Where push and pull report what they are doing, one line at a time."""

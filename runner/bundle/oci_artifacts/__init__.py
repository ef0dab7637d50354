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

The package, by responsibility: :mod:`~runner.bundle.oci_artifacts.documents` (the OCI
document shapes evalrun writes, and strict reading of what a registry sends),
:mod:`~runner.bundle.oci_artifacts.push` and :mod:`~runner.bundle.oci_artifacts.pull`.
Import from here.
"""

from runner.bundle.oci_artifacts.documents import (
    ARTIFACT_TYPE,
    CONFIG_TYPE,
    LAYER_TYPE,
    MAX_REFERENCE_CHARS,
    OCI_INDEX,
    OCI_MANIFEST,
    BundleConfig,
    Descriptor,
    OciDescriptor,
    OciImageIndex,
    OciImageManifest,
    Progress,
    is_registry_ref,
)
from runner.bundle.oci_artifacts.pull import (
    MAX_ATTACHED,
    MAX_BUNDLE_TAR_BYTES,
    MAX_DOCUMENT_BYTES,
    PulledBundle,
    bundle_referrers,
    fetch_bundle,
    pull_bundle,
)
from runner.bundle.oci_artifacts.push import PushedBundle, push_bundle

__all__ = [
    "ARTIFACT_TYPE",
    "CONFIG_TYPE",
    "LAYER_TYPE",
    "MAX_ATTACHED",
    "MAX_BUNDLE_TAR_BYTES",
    "MAX_DOCUMENT_BYTES",
    "MAX_REFERENCE_CHARS",
    "OCI_INDEX",
    "OCI_MANIFEST",
    "BundleConfig",
    "Descriptor",
    "OciDescriptor",
    "OciImageIndex",
    "OciImageManifest",
    "Progress",
    "PulledBundle",
    "PushedBundle",
    "bundle_referrers",
    "fetch_bundle",
    "is_registry_ref",
    "pull_bundle",
    "push_bundle",
]

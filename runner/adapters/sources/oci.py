"""``oci://`` inputs: an artifact in a registry, fetched through a resolver plug-in.

The registry client owns the protocol (:mod:`runner.adapters.input_artifacts` provides
the :data:`OciResolver`); this module checks the artifact's listing against the pinned
digest first, then streams only the blobs the cache lacks, verifying every byte.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from runner._internal.cas import ContentStore
from runner._internal.input_tree import (
    InputFile,
    tree_digest,
)
from runner.adapters.sources.transfer import (
    AcquiredInput,
    ByteStream,
    Meter,
    SourceOptions,
    digest_mismatch,
    fetch_blob,
    file_result,
    tree_result,
)
from runner.errors import (
    InputError,
)
from runner.model.input_uri import (
    OciUri,
)


@dataclass(frozen=True)
class RemoteListing:
    """What an OCI resolver found: the files of the artifact and a way to read each."""

    kind: Literal["file", "directory"]
    files: tuple[InputFile, ...]
    """Every file: its path (the layer's title), sha256 (the layer digest) and size."""
    open_file: Callable[[InputFile, int], ByteStream]
    """``open_file(entry, offset)`` streams one file's bytes from ``offset``."""


OciResolver = Callable[[OciUri], RemoteListing]
"""Plug-in for ``oci://`` inputs (owned by the registry client). Given the reference,
it fetches the manifest *by its digest* (verifying it), and returns a
:class:`RemoteListing` (one file for kind ``file``). It transfers no blob itself:
:func:`acquire` checks the listing against the pinned digest first, then streams only
the blobs missing from the cache through ``open_file``, verifying every byte. Raise
:class:`~runner.errors.TransientInfrastructureError` for retryable failures, InputError
for a missing artifact, InfrastructureError otherwise."""


def acquire_oci(
    uri: OciUri,
    want: str,
    *,
    field: str,
    store: ContentStore,
    meter: Meter,
    options: SourceOptions,
    oci: OciResolver | None,
) -> AcquiredInput:
    """The ``oci://`` artifact pinned by ``want``: its listing checked, missing blobs fetched."""
    source = str(uri)
    # The name of a file input comes from the URI alone, so a cache hit locks the same.
    name = uri.repository.rsplit("/", 1)[-1]
    cached = store.tree_files(want)
    if cached is not None:
        return tree_result(store, want, cached, source=source)
    if store.has_blob(want):
        return file_result(store, want, name=name, source=source)
    if oci is None:
        raise InputError(
            f"{field}: oci:// inputs need the registry client, which this command lacks",
            field=field,
            uri=source,
        )
    listing = oci(uri)
    if listing.kind == "file":
        if len(listing.files) != 1:
            raise InputError(
                f"{field}: {source} is a file artifact with {len(listing.files)} files"
            )
        found = f"sha256:{listing.files[0].sha256}"
    else:
        try:
            found = tree_digest(listing.files)
        except ValueError as exc:
            raise InputError(f"{field}: {source} lists its files badly ({exc})") from None
    if found != want:
        raise digest_mismatch(field, want, found, source, "the artifact is not the pinned input")
    missing = {f.sha256: f for f in listing.files if not store.has_blob(f.sha256)}
    meter.grow(sum(f.size for f in missing.values()))
    for entry in missing.values():
        fetch_blob(
            store,
            f"sha256:{entry.sha256}",
            functools.partial(listing.open_file, entry),
            what=f"{field}: {entry.path}",
            source=source,
            options=options,
            meter=meter,
        )
    if listing.kind == "file":
        return file_result(store, want, name=name, source=source)
    store.materialize_tree(listing.files, what=field)
    return tree_result(store, want, listing.files, source=source)

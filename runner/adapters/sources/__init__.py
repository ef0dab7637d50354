"""Where inputs come from: fetch an input URI into the cache and verify it.

A model or dataset input is named by a URI (parsed by :mod:`runner.model.input_uri`,
re-exported here) and pinned by a digest:

==========================  ===========  ===============================================
URI                         kind         pinned by
==========================  ===========  ===============================================
``path``, ``file://path``   file or dir  sha256 of the bytes / tree digest (see below)
``https://host/path``       file         sha256 of the bytes
``s3://bucket/key``         file         sha256 of the bytes
``s3://bucket/prefix/``     directory    tree digest over every object under the prefix
``oci://reg/repo@sha256:…`` either       as above; the registry side is a plug-in
==========================  ===========  ===============================================

The tree digest is ``evalrun-input-tree/v1`` (:mod:`runner._internal.input_tree`), the
same wherever the directory lives. :func:`acquire` is the one entry point: it fetches
(streaming, bounded retries, resume where the server allows), verifies against the
declared digest while the bytes stream into the content-addressed cache
(:mod:`runner._internal.cas`), and returns an :class:`AcquiredInput` whose ``path`` is a
verified, read-only blob or tree. Remote inputs already in the cache are found by
digest without any network; local inputs are always re-hashed, so an edited file is
reported instead of silently replaced by its cached old bytes.

Errors (all name the input): a bad URI or digest, a missing file, a 4xx answer or a
directory entry that escapes its root → :class:`~runner.errors.InputError` (exit 2);
wrong bytes → :class:`~runner.errors.DigestMismatch` (exit 3, nothing cached); a
source still unreachable after retries, or a server whose TLS certificate is not
trusted → :class:`~runner.errors.InfrastructureError` (exit 5) naming the URL.
SDK and urllib3 errors are translated here and nowhere else.

The package, by responsibility: :mod:`~runner.adapters.sources.transfer` (the contract
every source keeps: options, streams, resumable transfer, cached results), then one
module per source kind: :mod:`~runner.adapters.sources.local`,
:mod:`~runner.adapters.sources.https`, :mod:`~runner.adapters.sources.s3`,
:mod:`~runner.adapters.sources.oci`. Import from here.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from runner._internal.cas import ContentStore
from runner.adapters.sources.local import acquire_local
from runner.adapters.sources.oci import OciResolver, RemoteListing, acquire_oci
from runner.adapters.sources.transfer import (
    AcquiredInput,
    ByteStream,
    Meter,
    Opener,
    Progress,
    SourceOptions,
    stream_into,
)
from runner.model.input_uri import (
    HttpsUri,
    InputUri,
    LocalUri,
    OciUri,
    S3Uri,
    parse_expected_digest,
    parse_input_uri,
)

if TYPE_CHECKING:
    from runner.model.spec import ArtifactSpec


def source_options(artifact: ArtifactSpec, spec_dir: Path) -> SourceOptions:
    """How to reach one input: its spec's ``ca_file`` and ``endpoint`` over the defaults."""
    return SourceOptions(
        ca_file=(spec_dir / artifact.ca_file).resolve() if artifact.ca_file else None,
        s3_endpoint=artifact.endpoint,
    )


def acquire(
    uri: str,
    expected: str,
    *,
    field: str,
    spec_dir: Path,
    store: ContentStore,
    progress: Progress | None = None,
    options: SourceOptions | None = None,
    oci: OciResolver | None = None,
) -> AcquiredInput:
    """Fetch (if needed), verify and cache one input; return where its verified bytes are.

    ``uri`` is the input URI, ``expected`` its pinned digest (``<hex>`` or ``sha256:<hex>``:
    a file's sha256, or a directory's tree digest), ``field`` names it in every error
    (``model``, ``datasets[0] (digits)``). Relative paths resolve against ``spec_dir``.
    ``progress(done, total)`` is called as bytes are hashed or transferred. ``oci``
    resolves ``oci://`` inputs; without it they are refused. Errors: see module docs.
    """
    options = options or SourceOptions()
    parsed = parse_input_uri(uri, field=f"{field}.uri")
    want = parse_expected_digest(expected, field=f"{field}.sha256")
    meter = Meter(progress, None)
    if isinstance(parsed, LocalUri):
        return acquire_local(parsed, want, field=field, spec_dir=spec_dir, store=store, meter=meter)
    if isinstance(parsed, HttpsUri):
        # imported here: urllib3 and the TLS setup load only for an https input
        from runner.adapters.sources.https import acquire_https

        return acquire_https(parsed, want, field=field, store=store, meter=meter, options=options)
    if isinstance(parsed, S3Uri):
        # imported here: the S3 client library costs every other command ~0.2 s to load
        from runner.adapters.sources.s3 import acquire_s3

        return acquire_s3(parsed, want, field=field, store=store, meter=meter, options=options)
    return acquire_oci(
        parsed, want, field=field, store=store, meter=meter, options=options, oci=oci
    )


__all__ = [
    "AcquiredInput",
    "ByteStream",
    "HttpsUri",
    "InputUri",
    "LocalUri",
    "OciResolver",
    "OciUri",
    "Opener",
    "Progress",
    "RemoteListing",
    "S3Uri",
    "SourceOptions",
    "acquire",
    "http_pool",
    "https_opener",
    "parse_expected_digest",
    "parse_input_uri",
    "s3_client",
    "s3_endpoint",
    "s3_opener",
    "source_options",
    "stream_into",
    "tls_context",
]


def __getattr__(name: str) -> Any:
    """The HTTPS and S3 helpers, loaded on first use (see :func:`acquire`)."""
    if name in ("http_pool", "https_opener", "tls_context"):
        from runner.adapters.sources import https

        return getattr(https, name)
    if name in ("s3_client", "s3_endpoint", "s3_opener"):
        from runner.adapters.sources import s3

        return getattr(s3, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

"""Input URIs: how a model or dataset input names where it comes from.

One parser for every place a URI is read (the spec's validation, ``evalrun lock``,
the fetchers in :mod:`runner.adapters.sources`):

==========================  ===========  ===============================================
URI                         kind         pinned by
==========================  ===========  ===============================================
``path``, ``file://path``   file or dir  sha256 of the bytes / tree digest
``https://host/path``       file         sha256 of the bytes
``s3://bucket/key``         file         sha256 of the bytes
``s3://bucket/prefix/``     directory    tree digest over every object under the prefix
``oci://reg/repo@sha256:…`` either       as above (an input published as an OCI artifact)
==========================  ===========  ===============================================

Parsing is pure (no file system, no network); a bad URI is an
:class:`~runner.errors.InputError` naming the field.
"""

from __future__ import annotations

import re
import urllib.parse
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from runner._internal.input_tree import check_relative_path
from runner.errors import InputError

_HEX_DIGEST = re.compile(r"^(?:sha256:)?([0-9a-f]{64})$")
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9._-]{1,61}[a-z0-9]$")
_REGISTRY = re.compile(
    r"^(?:[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?|\[[0-9A-Fa-f:.]+\])(?::\d+)?$"
)
_REPOSITORY = re.compile(
    r"^[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*$"
)
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class LocalUri(_Frozen):
    """A local file or directory; relative paths are relative to the spec's directory."""

    scheme: Literal["file"] = "file"
    path: str = Field(min_length=1, description="As written, without a file:// prefix.")

    def resolve(self, spec_dir: Path) -> Path:
        """The absolute path (links in the path itself resolved, nothing below it)."""
        return (spec_dir / self.path).resolve()


class HttpsUri(_Frozen):
    """One file served over HTTPS."""

    # built on first use: a run of local inputs never makes one
    model_config = ConfigDict(defer_build=True)

    scheme: Literal["https"] = "https"
    url: str

    @property
    def redacted(self) -> str:
        """The URL without query or fragment (a presigned URL's query is a credential)."""
        parts = urllib.parse.urlsplit(self.url)
        return urllib.parse.urlunsplit((parts.scheme, parts.netloc, parts.path, "", ""))

    @property
    def name(self) -> str:
        """The last path segment, as a file name."""
        last = urllib.parse.unquote(urllib.parse.urlsplit(self.url).path.rsplit("/", 1)[-1])
        return safe_file_name(last)


class S3Uri(_Frozen):
    """An object (``s3://bucket/key``) or every object under a prefix (``…/prefix/``)."""

    # built on first use: a run of local inputs never makes one
    model_config = ConfigDict(defer_build=True)

    scheme: Literal["s3"] = "s3"
    bucket: str
    key: str = Field(description="Object key, or a prefix ending in '/' ('' = whole bucket).")

    @property
    def is_prefix(self) -> bool:
        """Whether this names a directory (every object under the prefix)."""
        return self.key == "" or self.key.endswith("/")

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.key}"


class OciUri(_Frozen):
    """An input published as an OCI artifact, pinned by its manifest digest."""

    # built on first use: a run of local inputs never makes one
    model_config = ConfigDict(defer_build=True)

    scheme: Literal["oci"] = "oci"
    registry: str
    repository: str
    digest: str

    @property
    def reference(self) -> str:
        """``registry/repository@sha256:…``."""
        return f"{self.registry}/{self.repository}@{self.digest}"

    def __str__(self) -> str:
        return f"oci://{self.reference}"


InputUri = LocalUri | HttpsUri | S3Uri | OciUri


def safe_file_name(name: str) -> str:
    """``name`` if it is one safe path component, else ``"input"`` (a file input's name)."""
    try:
        return check_relative_path(name) if "/" not in name else "input"
    except ValueError:
        return "input"


def parse_input_uri(uri: str, *, field: str) -> InputUri:
    """Parse an input URI (path, ``file://``, ``https://``, ``s3://``, ``oci://``).

    Raises :class:`~runner.errors.InputError` naming ``field`` (e.g. ``model.uri``) for
    an empty URI, an unsupported scheme, credentials in a URL, a bucket or registry
    reference that is malformed, or an ``oci://`` reference not pinned by digest.
    """

    def bad(reason: str, hint: str | None = None) -> InputError:
        return InputError(f"{field}: {reason}", field=field, uri=uri, hint=hint)

    if not uri or uri != uri.strip() or any(ord(c) < 0x20 for c in uri):
        raise bad("empty URI or one with whitespace/control characters at its ends")
    match = _SCHEME.match(uri)
    scheme = match.group(1).lower() if match else None
    if scheme is None or scheme == "file":
        path = uri[len("file://") :] if scheme == "file" else uri
        if path.startswith("localhost/"):
            path = path[len("localhost") :]
        if not path:
            raise bad("file:// URI without a path")
        return LocalUri(path=path)
    rest = uri[match.end() :] if match else uri
    if scheme == "https":
        parts = urllib.parse.urlsplit(uri)
        try:
            host = parts.hostname
            _ = parts.port  # raises for a malformed port
        except ValueError as exc:
            raise bad(f"malformed URL ({exc})") from None
        if not host:
            raise bad("https URL without a host")
        if parts.username is not None or parts.password is not None:
            raise bad(
                "credentials in the URL would be recorded in the lock",
                hint="use a presigned URL or an s3:// input with credentials from the environment",
            )
        return HttpsUri(url=urllib.parse.urlunsplit(parts._replace(scheme="https", fragment="")))
    if scheme == "s3":
        bucket, sep, key = rest.partition("/")
        if not _BUCKET.match(bucket):
            raise bad(f"{bucket!r} is not a valid bucket name")
        if not sep:
            raise bad(
                "an s3 URI needs a key or a prefix",
                hint=f"s3://{bucket}/key for an object, s3://{bucket}/prefix/ for a directory",
            )
        return S3Uri(bucket=bucket, key=key)
    if scheme == "oci":
        name, at, digest = rest.partition("@")
        registry, slash, repository = name.partition("/")
        if not at:
            raise bad("oci inputs must be pinned by digest", hint="oci://registry/repo@sha256:…")
        if not _HEX_DIGEST.match(digest) or not digest.startswith("sha256:"):
            raise bad(f"{digest!r} is not a sha256:<64 hex> digest")
        if not slash or not _REGISTRY.match(registry):
            raise bad(f"{registry!r} is not a registry host[:port]")
        if ":" in repository:
            raise bad("give the digest only, not a tag and a digest")
        if not _REPOSITORY.match(repository):
            raise bad(f"{repository!r} is not a valid repository name")
        return OciUri(registry=registry, repository=repository, digest=digest)
    if scheme == "http":
        raise bad("plain http:// is not accepted", hint="serve the input over https://")
    raise bad(
        f"unsupported scheme {scheme!r}",
        hint="use a path, file://, https://, s3:// or oci://",
    )


def parse_expected_digest(value: str, *, field: str) -> str:
    """``sha256:<hex>`` from ``<hex>`` or ``sha256:<hex>``; InputError naming ``field``."""
    match = _HEX_DIGEST.match(value)
    if not match:
        raise InputError(
            f"{field}: expected a sha256 digest (64 lowercase hex, optionally 'sha256:')",
            field=field,
            found=value,
        )
    return f"sha256:{match.group(1)}"

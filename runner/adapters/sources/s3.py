"""``s3://`` inputs: one object, or every object under a prefix as a directory.

Any S3-compatible endpoint (:func:`s3_endpoint`) is reached with the MinIO SDK
(:func:`s3_client`: credentials from the environment, a profile, IAM, else anonymous);
its errors are translated here. A prefix is listed, every object streamed into the cache
in parallel (digests unknown until read), the tree checked against the pinned digest,
and only then published; a mismatch caches nothing.
"""

from __future__ import annotations

import threading
import urllib.parse
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

import urllib3
from minio import Minio
from minio.credentials.providers import AWSConfigProvider, IamAwsProvider, Provider
from minio.credentials.providers import StaticProvider as _StaticProvider
from minio.error import InvalidResponseError, MinioException, S3Error, ServerError

from runner._internal.cas import BlobWriter, ContentStore
from runner._internal.input_tree import (
    READ_CHUNK,
    InputFile,
    check_relative_path,
    make_tree,
)
from runner._internal.retry import call_with_retries
from runner.adapters.sources.https import TRANSIENT_STATUS, http_pool, translate_urllib3
from runner.adapters.sources.transfer import (
    AcquiredInput,
    ByteStream,
    Meter,
    Opener,
    SourceOptions,
    digest_mismatch,
    fetch_blob,
    file_result,
    stream_into,
    tree_result,
)
from runner.errors import (
    EvalrunError,
    InfrastructureError,
    InputError,
    TransientInfrastructureError,
)
from runner.model.input_uri import (
    S3Uri,
)


def s3_endpoint(options: SourceOptions) -> str:
    """The S3 endpoint URL ``scheme://host[:port]`` the options select (see SourceOptions)."""
    env = options.env()
    endpoint = (
        options.s3_endpoint
        or env.get("AWS_ENDPOINT_URL_S3")
        or env.get("AWS_ENDPOINT_URL")
        or "https://s3.amazonaws.com"
    )
    parts = urllib.parse.urlsplit(endpoint if "://" in endpoint else f"https://{endpoint}")
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.path not in ("", "/"):
        raise InputError(
            "S3 endpoint must be http[s]://host[:port] without a path", endpoint=endpoint
        )
    return f"{parts.scheme}://{parts.netloc}"


def s3_client(options: SourceOptions) -> tuple[Minio, str]:
    """A MinIO SDK client for the configured endpoint, and that endpoint's URL.

    Credentials, first that works: ``$AWS_ACCESS_KEY_ID``/``$AWS_SECRET_ACCESS_KEY``
    (+ ``$AWS_SESSION_TOKEN``); the profile ``$AWS_PROFILE`` (default ``default``) of
    ``$AWS_SHARED_CREDENTIALS_FILE`` (default ``~/.aws/credentials``); IAM web identity or
    container credentials when their variables are set; else anonymous. A profile named
    explicitly in ``$AWS_PROFILE`` that cannot be read is an InputError, not anonymous.
    """
    env = options.env()
    endpoint = s3_endpoint(options)
    parts = urllib.parse.urlsplit(endpoint)
    region = options.s3_region or env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION")
    client = Minio(
        parts.netloc,
        secure=parts.scheme == "https",
        region=region or None,
        credentials=_s3_credentials(env),
        http_client=http_pool(options),
    )
    return client, endpoint


def _s3_credentials(env: Mapping[str, str]) -> Provider | None:
    access = env.get("AWS_ACCESS_KEY_ID") or env.get("AWS_ACCESS_KEY")
    secret = env.get("AWS_SECRET_ACCESS_KEY") or env.get("AWS_SECRET_KEY")
    if access and secret:
        return _StaticProvider(access, secret, env.get("AWS_SESSION_TOKEN") or None)
    home = env.get("HOME") or str(Path.home())
    filename = env.get("AWS_SHARED_CREDENTIALS_FILE") or str(Path(home) / ".aws" / "credentials")
    profile = env.get("AWS_PROFILE")
    config = AWSConfigProvider(filename=filename, profile=profile or "default")
    try:
        config.retrieve()
        return config
    except ValueError as exc:
        if profile:
            raise InputError(
                f"AWS_PROFILE={profile!r}: no usable credentials",
                credentials_file=filename,
                error=str(exc),
            ) from None
    if (
        env.get("AWS_WEB_IDENTITY_TOKEN_FILE")
        or env.get("AWS_CONTAINER_CREDENTIALS_RELATIVE_URI")
        or env.get("AWS_CONTAINER_CREDENTIALS_FULL_URI")
    ):
        return IamAwsProvider()
    return None  # anonymous: public buckets


_S3_NOT_FOUND = {"NoSuchKey", "NoSuchBucket", "ResourceNotFound"}
_S3_DENIED = {
    "AccessDenied",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "AllAccessDisabled",
    "ExpiredToken",
    "InvalidToken",
}


def _translate_s3(exc: Exception, what: str, source: str) -> EvalrunError:
    if isinstance(exc, S3Error):
        status = exc.response.status if exc.response is not None else 0
        if exc.code in _S3_NOT_FOUND:
            hint = None if source.endswith("/") else "a directory input's URI ends with '/'"
            return InputError(f"{what}: {source} not found ({exc.code})", uri=source, hint=hint)
        if exc.code in _S3_DENIED:
            return InputError(
                f"{what}: access to {source} denied ({exc.code})",
                uri=source,
                hint="set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE",
            )
        if status >= 500 or status in TRANSIENT_STATUS or exc.code in ("SlowDown",):
            return TransientInfrastructureError(
                f"{what}: S3 error {exc.code} for {source}", uri=source
            )
        return InputError(f"{what}: S3 refused {source} ({exc.code}: {exc.message})", uri=source)
    if isinstance(exc, ServerError):
        return TransientInfrastructureError(
            f"{what}: S3 server error {exc.status_code} for {source}", uri=source
        )
    if isinstance(exc, InvalidResponseError):
        return TransientInfrastructureError(
            f"{what}: unexpected S3 answer for {source}", uri=source, error=str(exc)
        )
    if isinstance(exc, urllib3.exceptions.HTTPError | OSError):
        return translate_urllib3(exc, what, source)
    if isinstance(exc, ValueError):
        return InputError(f"{what}: {exc}", uri=source)
    return InfrastructureError(f"{what}: S3 failure for {source}", uri=source, error=str(exc))


_S3_ERRORS = (MinioException, urllib3.exceptions.HTTPError, OSError, ValueError)


def s3_opener(
    client: Minio, bucket: str, key: str, *, total: int, what: str, source: str
) -> Opener:
    """An :data:`Opener` for one S3 object of known size (ranged GET when resuming)."""

    def chunks(resp: urllib3.BaseHTTPResponse) -> Iterator[bytes]:
        try:
            yield from resp.stream(READ_CHUNK, decode_content=False)
        except _S3_ERRORS as exc:
            raise _translate_s3(exc, what, source) from exc
        finally:
            resp.close()
            resp.release_conn()

    def open_at(offset: int) -> ByteStream:
        try:
            resp = client.get_object(bucket, key, offset=offset)
        except _S3_ERRORS as exc:
            raise _translate_s3(exc, what, source) from exc
        start = offset if resp.status == 206 else 0
        return ByteStream(chunks(resp), total, start)

    return open_at


class _Listed(NamedTuple):
    path: str
    key: str
    size: int


def _list_prefix(
    client: Minio, uri: S3Uri, *, what: str, options: SourceOptions, max_files: int
) -> list[_Listed]:
    def listing() -> list[_Listed]:
        found: list[_Listed] = []
        try:
            for obj in client.list_objects(uri.bucket, prefix=uri.key, recursive=True):
                key = obj.object_name or ""
                if key.endswith("/") and not obj.size:
                    continue  # a "folder" marker object, not a file
                rel = key[len(uri.key) :]
                try:
                    check_relative_path(rel)
                except ValueError as exc:
                    raise InputError(
                        f"{what}: object key escapes or is not a clean path ({exc}): {key!r}",
                        input=what,
                        entry=key,
                        uri=str(uri),
                    ) from None
                if len(found) >= max_files:
                    raise InputError(f"{what}: more than {max_files} objects under {uri}")
                found.append(_Listed(rel, key, int(obj.size or 0)))
        except _S3_ERRORS as exc:
            raise _translate_s3(exc, what, str(uri)) from exc
        return found

    found: list[_Listed] = call_with_retries(
        listing, what=f"{what}: listing {uri}", policy=options.retry_policy()
    )
    if not found:
        raise InputError(f"{what}: no objects under {uri}", input=what, uri=str(uri))
    return found


def _stat_s3(client: Minio, uri: S3Uri, *, what: str, options: SourceOptions) -> int:
    def stat() -> int:
        try:
            return int(client.stat_object(uri.bucket, uri.key).size or 0)
        except _S3_ERRORS as exc:
            raise _translate_s3(exc, what, str(uri)) from exc

    size: int = call_with_retries(stat, what=f"{what}: {uri}", policy=options.retry_policy())
    return size


def acquire_s3(
    uri: S3Uri,
    want: str,
    *,
    field: str,
    store: ContentStore,
    meter: Meter,
    options: SourceOptions,
) -> AcquiredInput:
    """The ``s3://`` object, or every object under a prefix, pinned by ``want``."""
    source = str(uri)
    if not uri.is_prefix:
        if store.has_blob(want):
            return file_result(
                store,
                want,
                name=uri.key.rsplit("/", 1)[-1],
                source=source,
                endpoint=s3_endpoint(options),
            )
        client, endpoint = s3_client(options)
        size = _stat_s3(client, uri, what=field, options=options)
        meter.grow(size)
        opener = s3_opener(client, uri.bucket, uri.key, total=size, what=field, source=source)
        fetch_blob(store, want, opener, what=field, source=source, options=options, meter=meter)
        return file_result(
            store, want, name=uri.key.rsplit("/", 1)[-1], source=source, endpoint=endpoint
        )
    cached = store.tree_files(want)
    if cached is not None:
        return tree_result(store, want, cached, source=source, endpoint=s3_endpoint(options))
    client, endpoint = s3_client(options)
    with store.filling(want):
        cached = store.tree_files(want)
        if cached is None:
            cached = _fetch_s3_tree(
                client, uri, want, field=field, store=store, meter=meter, options=options
            )
    return tree_result(store, want, cached, source=source, endpoint=endpoint)


def _fetch_s3_tree(
    client: Minio,
    uri: S3Uri,
    want: str,
    *,
    field: str,
    store: ContentStore,
    meter: Meter,
    options: SourceOptions,
) -> tuple[InputFile, ...]:
    """Stage every object (digests unknown until read), check the tree, then publish."""
    listed = _list_prefix(client, uri, what=field, options=options, max_files=200_000)
    meter.grow(sum(item.size for item in listed))
    writers: list[BlobWriter] = []
    lock = threading.Lock()

    def one(item: _Listed) -> InputFile:
        writer = store.writer(what=f"{field}: {item.path}")
        with lock:
            writers.append(writer)
        source = f"s3://{uri.bucket}/{item.key}"
        opener = s3_opener(client, uri.bucket, item.key, total=item.size, what=field, source=source)
        stream_into(writer, opener, what=field, source=source, options=options, meter=meter)
        return InputFile(path=item.path, sha256=writer.seal(), size=writer.size)

    try:
        pool = ThreadPoolExecutor(max_workers=max(1, options.parallel))
        try:
            files = list(pool.map(one, listed))
        finally:
            pool.shutdown(wait=True, cancel_futures=True)  # a failure stops the rest
        tree = make_tree(files)
        if tree.digest != want:
            raise digest_mismatch(
                field,
                want,
                tree.digest,
                str(uri),
                "the objects under the prefix are not the pinned directory; nothing was cached",
            )
        for writer in writers:
            writer.commit()
    finally:
        for writer in writers:
            writer.discard()
    store.materialize_tree(tree.files, what=field)
    return tree.files

"""``https://`` inputs: verifying TLS, ranged GETs that resume, HTTP errors translated.

The connection pool (:func:`http_pool`) verifies TLS against the configured CA bundle
(:func:`tls_context`) and never retries by itself:
:func:`~runner.adapters.sources.transfer.stream_into` does. urllib3 errors and HTTP
statuses become evalrun errors here (transient: worth a retry; 4xx: the input is wrong;
an untrusted certificate: InfrastructureError naming the URL).
The S3 source reuses the pool and the translation.
"""

from __future__ import annotations

import logging
import re
import ssl
from collections.abc import Iterator
from pathlib import Path

import urllib3

from runner._internal.cas import ContentStore
from runner._internal.input_tree import (
    READ_CHUNK,
)
from runner.adapters.sources.transfer import (
    AcquiredInput,
    ByteStream,
    Meter,
    Opener,
    SourceOptions,
    fetch_blob,
    file_result,
)
from runner.errors import (
    EvalrunError,
    InfrastructureError,
    InputError,
    TransientInfrastructureError,
)
from runner.model.input_uri import (
    HttpsUri,
)

log = logging.getLogger("evalrun.inputs")

TRANSIENT_STATUS = {408, 425, 429}


def _ca_bundle(options: SourceOptions) -> str | None:
    env = options.env()
    chosen = (
        str(options.ca_file)
        if options.ca_file
        else env.get("REQUESTS_CA_BUNDLE") or env.get("SSL_CERT_FILE")
    )
    if chosen and not Path(chosen).is_file():
        raise InputError("CA bundle for TLS not found", ca_file=chosen)
    return chosen or None


def tls_context(options: SourceOptions) -> ssl.SSLContext:
    """A verifying TLS context: the CA bundle from ``options`` or the system store."""
    cafile = _ca_bundle(options)
    try:
        return ssl.create_default_context(cafile=cafile)
    except ssl.SSLError as exc:
        raise InputError(
            "CA bundle for TLS is not valid PEM", ca_file=cafile, error=str(exc)
        ) from None


def http_pool(options: SourceOptions) -> urllib3.PoolManager:
    """A connection pool that verifies TLS and never retries by itself (tenacity does)."""
    return urllib3.PoolManager(
        num_pools=4,
        maxsize=max(1, options.parallel),
        ssl_context=tls_context(options),
        retries=urllib3.Retry(
            total=None, connect=0, read=0, status=0, other=0, redirect=5, raise_on_status=False
        ),
        timeout=urllib3.Timeout(connect=options.connect_timeout_s, read=options.read_timeout_s),
    )


def _tls_refused(what: str, url: str, exc: BaseException) -> InfrastructureError:
    return InfrastructureError(
        f"{what}: TLS verification failed for {url}",
        url=url,
        error=str(exc),
        hint="the server's certificate is not trusted: pass its CA bundle (ca_file) or set "
        "REQUESTS_CA_BUNDLE / SSL_CERT_FILE",
    )


def _untrusted(reason: BaseException) -> bool:
    """A certificate the client refused (chain or name), as opposed to a broken transfer."""
    if isinstance(reason, urllib3.exceptions.SSLError) and reason.args:
        inner = reason.args[0]
        if isinstance(inner, BaseException):
            reason = inner
    return isinstance(reason, ssl.SSLCertVerificationError) or (
        isinstance(reason, urllib3.exceptions.SSLError | ssl.SSLError)
        and "CERTIFICATE_VERIFY_FAILED" in str(reason)
    )


def translate_urllib3(exc: Exception, what: str, url: str) -> EvalrunError:
    """A urllib3 or socket error as an evalrun error: TLS refused, malformed URL, or transient."""
    reason: BaseException = exc
    if isinstance(exc, urllib3.exceptions.MaxRetryError) and exc.reason is not None:
        reason = exc.reason
    if _untrusted(reason):
        return _tls_refused(what, url, reason)
    if isinstance(reason, urllib3.exceptions.LocationParseError):
        return InputError(f"{what}: malformed URL", url=url, error=str(reason))
    return TransientInfrastructureError(f"{what}: cannot reach {url}", url=url, error=str(reason))


def _status_error(status: int, what: str, url: str) -> EvalrunError:
    if status >= 500 or status in TRANSIENT_STATUS:
        return TransientInfrastructureError(f"{what}: HTTP {status} from {url}", url=url)
    if status in (401, 403):
        return InputError(
            f"{what}: access denied (HTTP {status}) at {url}",
            url=url,
            hint="https inputs must be readable without credentials (or presigned)",
        )
    if status in (404, 410):
        return InputError(f"{what}: not found (HTTP {status}) at {url}", url=url)
    if 400 <= status < 500:
        return InputError(f"{what}: refused (HTTP {status}) at {url}", url=url)
    return InfrastructureError(f"{what}: unexpected HTTP {status} from {url}", url=url)


_CONTENT_RANGE = re.compile(r"^bytes (\d+)-(\d+)/(\d+)$")


def _http_chunks(resp: urllib3.BaseHTTPResponse, what: str, url: str) -> Iterator[bytes]:
    try:
        yield from resp.stream(READ_CHUNK, decode_content=False)
    except (urllib3.exceptions.HTTPError, OSError) as exc:
        raise translate_urllib3(exc, what, url) from exc
    finally:
        resp.release_conn()


def https_opener(pool: urllib3.PoolManager, uri: HttpsUri, *, what: str) -> Opener:
    """An :data:`Opener` for one HTTPS file: GET with ``Range`` when resuming."""
    url = uri.redacted

    def open_at(offset: int) -> ByteStream:
        headers = {"Accept-Encoding": "identity", "User-Agent": "evalrun"}
        if offset:
            headers["Range"] = f"bytes={offset}-"
        try:
            resp = pool.request(
                "GET", uri.url, headers=headers, preload_content=False, decode_content=False
            )
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise translate_urllib3(exc, what, url) from exc
        if resp.status == 206 and offset:
            match = _CONTENT_RANGE.match(resp.headers.get("Content-Range", ""))
            if match and int(match.group(1)) == offset:
                return ByteStream(_http_chunks(resp, what, url), int(match.group(3)), offset)
            resp.release_conn()
            return open_at(0)  # an answer we cannot splice: start over
        if resp.status == 416 and offset:
            resp.release_conn()
            return open_at(0)
        if resp.status != 200:
            resp.drain_conn()
            resp.release_conn()
            raise _status_error(resp.status, what, url)
        length = resp.headers.get("Content-Length")
        total = int(length) if length and length.isdigit() else None
        return ByteStream(_http_chunks(resp, what, url), total, 0)

    return open_at


def acquire_https(
    uri: HttpsUri,
    want: str,
    *,
    field: str,
    store: ContentStore,
    meter: Meter,
    options: SourceOptions,
) -> AcquiredInput:
    """The ``https://`` file pinned by ``want``: from the cache, else fetched and verified."""
    if not store.has_blob(want):
        log.info(
            "fetching input", extra={"event": "input.fetch", "input": field, "url": uri.redacted}
        )
        opener = https_opener(http_pool(options), uri, what=field)
        fetch_blob(
            store, want, opener, what=field, source=uri.redacted, options=options, meter=meter
        )
    return file_result(store, want, name=uri.name, source=uri.redacted)

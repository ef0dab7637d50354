"""Build single-layer OCI images from a few files and push them to a plain-HTTP registry.

Standard library only, so `up.sh` can run it with any python3. Images are
byte-for-byte reproducible (fixed mtimes, owners and gzip header), so the same
inputs always give the same digest.

CLI (prints the pushed reference ``REGISTRY/REPOSITORY@sha256:...``)::

    python3 oci.py push REGISTRY REPOSITORY TAG --file /NAME=LOCALPATH --entrypoint /NAME \
        [--cmd ARG...]
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import tarfile
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"


class RegistryError(RuntimeError):
    """The registry refused or failed a request."""


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def build_layer(files: Mapping[str, tuple[bytes, int]]) -> tuple[bytes, str]:
    """Return (gzipped tar, diff_id) for ``{"/path": (content, mode)}``."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name in sorted(files):
            content, mode = files[name]
            info = tarfile.TarInfo(name.lstrip("/"))
            info.size, info.mode, info.mtime = len(content), mode, 0
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            tar.addfile(info, io.BytesIO(content))
    tar_bytes = raw.getvalue()
    gz = io.BytesIO()
    with gzip.GzipFile(fileobj=gz, mode="wb", mtime=0, compresslevel=6) as f:
        f.write(tar_bytes)
    return gz.getvalue(), _digest(tar_bytes)


def _request(
    method: str, url: str, data: bytes | None = None, headers: Mapping[str, str] | None = None
) -> tuple[int, Mapping[str, str]]:
    req = urllib.request.Request(url, data=data, method=method, headers=dict(headers or {}))
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            resp.read()
            return resp.status, resp.headers
    except urllib.error.HTTPError as e:
        if method == "HEAD" and e.code == 404:
            return 404, e.headers
        body = e.read().decode(errors="replace")[:500]
        raise RegistryError(f"{method} {url}: HTTP {e.code}: {body}") from e
    except urllib.error.URLError as e:
        raise RegistryError(f"{method} {url}: {e.reason}") from e


def _push_blob(base: str, repository: str, blob: bytes) -> str:
    digest = _digest(blob)
    status, _ = _request("HEAD", f"{base}/v2/{repository}/blobs/{digest}")
    if status == 200:
        return digest
    _, headers = _request("POST", f"{base}/v2/{repository}/blobs/uploads/", data=b"")
    location = headers["Location"]
    if location.startswith("/"):
        location = base + location
    sep = "&" if "?" in location else "?"
    _request(
        "PUT",
        f"{location}{sep}digest={digest}",
        data=blob,
        headers={"Content-Type": "application/octet-stream"},
    )
    return digest


def push_image(
    registry: str,
    repository: str,
    tag: str,
    files: Mapping[str, tuple[bytes, int]],
    entrypoint: Sequence[str],
    cmd: Sequence[str] = (),
    labels: Mapping[str, str] | None = None,
) -> str:
    """Push a one-layer linux/amd64 image; return ``registry/repository@sha256:...``."""
    base = f"http://{registry}"
    layer, diff_id = build_layer(files)
    config = json.dumps(
        {
            "architecture": "amd64",
            "os": "linux",
            "config": {
                "Entrypoint": list(entrypoint),
                "Cmd": list(cmd),
                "Env": ["PATH=/"],
                "WorkingDir": "/",
                "Labels": dict(labels or {}),
            },
            "rootfs": {"type": "layers", "diff_ids": [diff_id]},
        },
        sort_keys=True,
        separators=(",", ":"),
    ).encode()
    config_digest = _push_blob(base, repository, config)
    layer_digest = _push_blob(base, repository, layer)
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"mediaType": OCI_CONFIG, "digest": config_digest, "size": len(config)},
            "layers": [{"mediaType": OCI_LAYER, "digest": layer_digest, "size": len(layer)}],
        },
        sort_keys=True,
        separators=(",", ":"),
    ).encode()
    _request(
        "PUT",
        f"{base}/v2/{repository}/manifests/{tag}",
        data=manifest,
        headers={"Content-Type": OCI_MANIFEST},
    )
    return f"{registry}/{repository}@{_digest(manifest)}"


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    push = sub.add_parser("push")
    push.add_argument("registry")
    push.add_argument("repository")
    push.add_argument("tag")
    push.add_argument("--file", action="append", default=[], metavar="/NAME=LOCALPATH")
    push.add_argument("--entrypoint", action="append", default=[])
    push.add_argument("--cmd", nargs="*", default=[])
    args = p.parse_args(argv)
    files = {}
    for spec in args.file:
        name, _, local = spec.partition("=")
        files[name] = (Path(local).read_bytes(), 0o755)
    print(push_image(args.registry, args.repository, args.tag, files, args.entrypoint, args.cmd))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

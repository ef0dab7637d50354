"""Evaluation bundles: hashed files, a manifest, an in-toto Statement and its DSSE envelope.

A bundle is a directory::

    manifest.json        every payload file: path, sha256, size (sorted by path)
    statement.json       in-toto Statement v1; subjects = every payload file + manifest.json
    envelope.dsse.json   DSSE envelope over statement.json (application/vnd.in-toto+json)
    envelope.sigstore.json   the same envelope as a Sigstore bundle (for cosign; optional:
                         bundles sealed before it existed have none)
    spec.yaml, eval.lock.json, env.json, report.md, results/..., logs/...   (the payload)

The runner hashes every file itself and never follows links: symlinks, devices,
FIFOs, sockets and paths that could escape the bundle are refused. The bundle
digest is the sha256 of the exact statement bytes (which are the signed payload).
The metadata models and their canonical bytes are in :mod:`runner.bundle.metadata`; a
bundle also has a deterministic ``.tar`` form (:mod:`runner.bundle.archive`).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from runner._internal.tree import (
    TreeEntry,
    hash_fd,
    open_beneath,
    open_root,
    remove_tree,
    scan_tree,
)
from runner.bundle.hashing import FileDigest, hash_files, map_in_threads
from runner.bundle.metadata import (
    ENVELOPE_NAME,
    MANIFEST_NAME,
    METADATA_NAMES,
    PAYLOAD_TYPE,
    RUN_ID_PATTERN,
    SIGSTORE_BUNDLE_NAME,
    STATEMENT_NAME,
    BundleManifest,
    ManifestFile,
    SignedPredicate,
    Statement,
    Subject,
    canonical_json_bytes,
    load_json_strict,
)
from runner.bundle.signing import Signer, sign_envelope, sigstore_bundle
from runner.errors import InputError, UnsafeBundleEntry
from runner.shared.tarformat import unsafe_path_reason

__all__ = ["BundleInfo", "build_bundle"]


class BundleInfo(BaseModel):
    """What :func:`build_bundle` produced."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    path: Path
    bundle_digest: str = Field(description="'sha256:' + sha256 hex of statement.json")
    manifest_digest: str = Field(description="'sha256:' + sha256 hex of manifest.json")
    run_id: str
    keyid: str
    file_count: int
    total_size: int


def _plain_json_predicate(predicate: Mapping[str, object]) -> SignedPredicate:
    try:
        data = load_json_strict(json.dumps(dict(predicate), allow_nan=False).encode("utf-8"))
    except (TypeError, ValueError) as exc:
        raise InputError(f"bundle predicate is not plain JSON: {exc}") from exc
    assert isinstance(data, dict)
    run_id = data.get("run_id")
    if not isinstance(run_id, str) or not RUN_ID_PATTERN.match(run_id):
        raise InputError(
            "bundle predicate needs a 'run_id' string",
            hint="run ids match [A-Za-z0-9][A-Za-z0-9._-]{0,127}",
        )
    return data


def _content_files(content_dir: Path) -> list[TreeEntry]:
    files: list[TreeEntry] = []
    for entry in scan_tree(content_dir):
        where = str(content_dir / entry.path)
        reason = unsafe_path_reason(entry.path)
        if reason:
            raise UnsafeBundleEntry(
                f"refusing bundle content {entry.path!r}: {reason}",
                path=where,
                reason=reason,
                root=str(content_dir),
            )
        if entry.kind == "symlink":
            raise UnsafeBundleEntry(
                f"refusing to bundle symlink {entry.path!r}; links are never followed",
                path=where,
                reason="symlink",
                root=str(content_dir),
            )
        if entry.kind == "special":
            raise UnsafeBundleEntry(
                f"refusing to bundle {entry.path!r}: not a regular file or directory",
                path=where,
                reason="device, FIFO or socket",
                root=str(content_dir),
            )
        if entry.kind == "file" and entry.links > 1:
            raise UnsafeBundleEntry(
                f"refusing to bundle {entry.path!r}: it has {entry.links} hard links, "
                "so it could change through another name after signing",
                path=where,
                reason="hard link",
                root=str(content_dir),
            )
        if entry.kind == "file":
            if entry.path in METADATA_NAMES:
                raise InputError(
                    f"content may not contain {entry.path!r}: reserved for bundle metadata",
                    file=where,
                )
            files.append(entry)
    return files


def _copy_and_hash(src_root_fd: int, dest: Path, path: str) -> FileDigest:
    src_fd = open_beneath(src_root_fd, path)
    try:
        target = dest / path
        target.parent.mkdir(parents=True, exist_ok=True)
        out_fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        try:
            sha, size = hash_fd(src_fd, copy_to=out_fd)
        finally:
            os.close(out_fd)
    finally:
        os.close(src_fd)
    return FileDigest(path, sha, size)


def _write_new(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)


def build_bundle(
    content_dir: Path,
    predicate: Mapping[str, object],
    signer: Signer,
    dest: Path,
    *,
    workers: int | None = None,
) -> BundleInfo:
    """Hash, describe and sign ``content_dir`` as a bundle at ``dest``.

    ``content_dir`` holds the payload (any tree of regular files). If ``dest`` is
    ``content_dir`` the bundle is built in place (no copy: the runner's usual path,
    inside a store staging dir); otherwise ``dest`` must not exist or be empty, and
    each file is copied there while it is hashed (the digest is of the bytes written).

    ``predicate`` is plain JSON with a ``run_id``; it becomes the Statement's
    predicate unchanged. Symlinks, devices, FIFOs, sockets and unsafe names in
    ``content_dir`` raise UnsafeBundleEntry naming the path; top-level
    metadata names (``manifest.json``, ``statement.json``, ``envelope.*.json``) raise InputError.
    On any failure the metadata (and, when copying, ``dest``) written so far is removed.
    """
    body = _plain_json_predicate(predicate)
    run_id: str = body["run_id"]
    if content_dir.is_symlink() or not content_dir.is_dir():
        raise InputError("bundle content directory not found (or a symlink)", file=str(content_dir))
    in_place = dest.exists() and dest.samefile(content_dir)
    if not in_place and dest.resolve().is_relative_to(content_dir.resolve()):
        raise InputError("bundle destination may not lie inside the content dir", file=str(dest))
    entries = _content_files(content_dir)
    paths = [e.path for e in entries]

    created_dest = False
    if not in_place:
        if dest.is_symlink() or (dest.exists() and (not dest.is_dir() or any(dest.iterdir()))):
            raise InputError("bundle destination exists and is not empty", file=str(dest))
        if not dest.exists():
            dest.mkdir(parents=True)
            created_dest = True
    written: list[Path] = []
    try:
        if in_place:
            digests, errors = hash_files(content_dir, paths, workers=workers)
            if errors:
                bad, reason = next(iter(errors.items()))
                raise UnsafeBundleEntry(
                    f"cannot hash bundle content {bad!r}: {reason}",
                    path=str(content_dir / bad),
                    reason=reason,
                )
            found = [digests[p] for p in paths]
        else:
            src_fd = open_root(content_dir)
            try:
                found = map_in_threads(lambda p: _copy_and_hash(src_fd, dest, p), paths, workers)
            finally:
                os.close(src_fd)

        manifest = BundleManifest(
            run_id=run_id,
            files=tuple(ManifestFile(path=f.path, sha256=f.sha256, size=f.size) for f in found),
        )
        manifest_bytes = manifest.to_json_bytes()
        manifest_sha = hashlib.sha256(manifest_bytes).hexdigest()
        subjects = [Subject(name=f.path, digest={"sha256": f.sha256}) for f in manifest.files]
        subjects.append(Subject(name=MANIFEST_NAME, digest={"sha256": manifest_sha}))
        subjects.sort(key=lambda s: s.name)
        statement = Statement(subject=tuple(subjects), predicate=body)
        statement_bytes = statement.to_json_bytes()
        envelope = sign_envelope(statement_bytes, PAYLOAD_TYPE, signer)
        envelope_bytes = canonical_json_bytes(envelope)

        for name, data in (
            (MANIFEST_NAME, manifest_bytes),
            (STATEMENT_NAME, statement_bytes),
            (ENVELOPE_NAME, envelope_bytes),
            (SIGSTORE_BUNDLE_NAME, canonical_json_bytes(sigstore_bundle(envelope))),
        ):
            _write_new(dest / name, data)
            written.append(dest / name)
    except BaseException:
        if created_dest:
            remove_tree(dest)
        elif in_place:
            for path in written:
                path.unlink(missing_ok=True)
        else:  # dest was an empty directory before: empty it again
            for child in dest.iterdir():
                remove_tree(child)
        raise

    return BundleInfo(
        path=dest,
        bundle_digest="sha256:" + hashlib.sha256(statement_bytes).hexdigest(),
        manifest_digest="sha256:" + manifest_sha,
        run_id=run_id,
        keyid=signer.keyid,
        file_count=len(manifest.files),
        total_size=sum(f.size for f in manifest.files),
    )

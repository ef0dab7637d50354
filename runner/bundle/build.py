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
A bundle also has a deterministic ``.tar`` form (:func:`write_bundle_tar`).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import itertools
import json
import os
import re
import shutil
import stat
import tarfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from runner.bundle.signing import Signer, sign_envelope, sigstore_bundle
from runner.errors import InputError, UnsafeBundleEntry

MANIFEST_NAME = "manifest.json"
STATEMENT_NAME = "statement.json"
ENVELOPE_NAME = "envelope.dsse.json"
# Not signed itself: it restates the envelope, and verification checks that it does.
SIGSTORE_BUNDLE_NAME = "envelope.sigstore.json"
METADATA_NAMES: frozenset[str] = frozenset(
    {MANIFEST_NAME, STATEMENT_NAME, ENVELOPE_NAME, SIGSTORE_BUNDLE_NAME}
)

MANIFEST_SCHEMA = "evalrun/bundle-manifest/v1"
STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
PREDICATE_TYPE = "https://evalrun.dev/EvalRun/v1"
PAYLOAD_TYPE = "application/vnd.in-toto+json"

# Large enough that syscalls are negligible, small enough to stay in L2 while hashed.
READ_CHUNK = 1 << 20
# Deeper trees are refused rather than walked (each level holds a directory fd).
MAX_DEPTH = 64
# A manifest/statement/envelope larger than this is not one the runner wrote.
METADATA_MAX_BYTES = 256 << 20

_T = TypeVar("_T")
_R = TypeVar("_R")

_SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")
_RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def unsafe_path_reason(path: str) -> str | None:
    """Why ``path`` is not a safe bundle-relative POSIX path, or None if it is.

    Safe means: relative, '/'-separated, no empty, '.' or '..' components, no
    backslashes, NULs or control characters, and encodable as UTF-8.
    """
    if not path:
        return "empty path"
    if path.startswith("/"):
        return "absolute path"
    parts = path.split("/")
    if ".." in parts:
        return "path contains '..'"
    if "." in parts or "" in parts:
        return "path has an empty or '.' component"
    if "\\" in path:
        return "path contains a backslash"
    if any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in path):
        return "path contains a control character"
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        return "path is not valid UTF-8"
    return None


def _check_sha256_hex(value: str) -> str:
    if not _SHA256_HEX.match(value):
        raise ValueError("expected 64 lowercase hex characters")
    return value


# --- models -------------------------------------------------------------------


class ManifestFile(BaseModel):
    """One payload file of a bundle."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    path: str
    sha256: str
    size: int = Field(ge=0)

    @field_validator("path")
    @classmethod
    def _safe_path(cls, value: str) -> str:
        reason = unsafe_path_reason(value)
        if reason:
            raise ValueError(f"{reason}: {value!r}")
        if value in METADATA_NAMES:
            raise ValueError(f"{value!r} is reserved for bundle metadata")
        return value

    @field_validator("sha256")
    @classmethod
    def _sha256_hex(cls, value: str) -> str:
        return _check_sha256_hex(value)


class BundleManifest(BaseModel):
    """``manifest.json``: the run it belongs to and every payload file, sorted by path."""

    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)

    schema_: Literal["evalrun/bundle-manifest/v1"] = Field(
        default="evalrun/bundle-manifest/v1", alias="schema"
    )
    run_id: str
    files: tuple[ManifestFile, ...]

    @field_validator("run_id")
    @classmethod
    def _valid_run_id(cls, value: str) -> str:
        if not _RUN_ID.match(value):
            raise ValueError("run id must match [A-Za-z0-9][A-Za-z0-9._-]{0,127}")
        return value

    @model_validator(mode="after")
    def _sorted_unique(self) -> BundleManifest:
        paths = [f.path for f in self.files]
        for before, after in itertools.pairwise(paths):
            if before >= after:
                raise ValueError(f"files not strictly sorted by path at {after!r}")
        # a file and a directory of the same name cannot both exist on disk
        names = set(paths)
        for p in paths:
            parts = p.split("/")
            for i in range(1, len(parts)):
                if "/".join(parts[:i]) in names:
                    raise ValueError(f"{p!r} lies under {'/'.join(parts[:i])!r}, which is a file")
        return self

    def to_json_bytes(self) -> bytes:
        """The exact bytes written to ``manifest.json``."""
        return _json_bytes(self.model_dump(mode="json", by_alias=True))


class Subject(BaseModel):
    """An in-toto ResourceDescriptor naming a bundle file by path and sha256."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    digest: dict[str, str]

    @field_validator("digest")
    @classmethod
    def _has_sha256(cls, value: dict[str, str]) -> dict[str, str]:
        if set(value) != {"sha256"}:
            raise ValueError("digest must hold exactly one 'sha256' entry")
        _check_sha256_hex(value["sha256"])
        return value


class Statement(BaseModel):
    """An in-toto Statement v1 with the evalrun predicate type."""

    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)

    type_: Literal["https://in-toto.io/Statement/v1"] = Field(
        default="https://in-toto.io/Statement/v1", alias="_type"
    )
    subject: tuple[Subject, ...] = Field(min_length=1)
    predicate_type: Literal["https://evalrun.dev/EvalRun/v1"] = Field(
        default="https://evalrun.dev/EvalRun/v1", alias="predicateType"
    )
    predicate: dict[str, Any]

    @field_validator("predicate")
    @classmethod
    def _has_run_id(cls, value: dict[str, Any]) -> dict[str, Any]:
        run_id = value.get("run_id")
        if not isinstance(run_id, str) or not _RUN_ID.match(run_id):
            raise ValueError("predicate.run_id must be a run id string")
        return value

    @property
    def run_id(self) -> str:
        """The run this statement is about (``predicate.run_id``)."""
        value = self.predicate["run_id"]
        assert isinstance(value, str)  # checked by the validator
        return value

    def subject_digests(self) -> dict[str, str]:
        """Subject name → sha256 hex."""
        return {s.name: s.digest["sha256"] for s in self.subject}

    def to_json_bytes(self) -> bytes:
        """The exact bytes written to ``statement.json`` and signed as the DSSE payload."""
        return _json_bytes(self.model_dump(mode="json", by_alias=True))


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


def _json_bytes(obj: Any) -> bytes:
    # sorted keys, no NaN/Infinity: one canonical form a verifier can rely on
    text = json.dumps(obj, sort_keys=True, indent=2, ensure_ascii=True, allow_nan=False)
    return (text + "\n").encode("ascii")


def load_json_strict(data: bytes) -> Any:
    """Parse JSON, refusing duplicate object keys and non-finite numbers."""

    def no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in pairs:
            if key in out:
                raise ValueError(f"duplicate key {key!r}")
            out[key] = value
        return out

    def no_constant(name: str) -> Any:
        raise ValueError(f"non-finite number {name}")

    try:
        return json.loads(data, object_pairs_hook=no_duplicates, parse_constant=no_constant)
    except RecursionError as exc:
        raise ValueError("JSON nested too deeply") from exc


# --- walking and hashing trees without following links -------------------------

EntryKind = Literal["file", "dir", "symlink", "special"]


@dataclass(frozen=True)
class TreeEntry:
    """One entry found under a root; ``path`` is '/'-separated and root-relative."""

    path: str
    kind: EntryKind
    size: int
    links: int = 1


@dataclass(frozen=True)
class FileDigest:
    """The sha256 hex and size of one file, as read by the runner."""

    path: str
    sha256: str
    size: int


def _kind_of(mode: int) -> EntryKind:
    if stat.S_ISREG(mode):
        return "file"
    if stat.S_ISDIR(mode):
        return "dir"
    if stat.S_ISLNK(mode):
        return "symlink"
    return "special"


def _open_root(root: Path) -> int:
    try:
        return os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except FileNotFoundError as exc:
        raise InputError("directory not found", file=str(root)) from exc
    except NotADirectoryError as exc:
        raise InputError("not a directory", file=str(root)) from exc


def scan_tree(root: Path) -> list[TreeEntry]:
    """List everything under ``root`` (not root itself), sorted by path, following no links.

    Directories are opened relative to their parent with O_NOFOLLOW, so a link
    can neither be listed through nor swapped in mid-walk. Symlinks, devices,
    FIFOs and sockets are reported with their kind, never opened. Names that
    are not safe paths (see :func:`unsafe_path_reason`) are reported as they are.
    Nesting deeper than :data:`MAX_DEPTH` raises UnsafeBundleEntry.
    """
    root_fd = _open_root(root)
    out: list[TreeEntry] = []
    try:
        _scan_dir(root_fd, "", out, 0)
    finally:
        os.close(root_fd)
    out.sort(key=lambda e: e.path)
    return out


def _scan_dir(dir_fd: int, prefix: str, out: list[TreeEntry], depth: int) -> None:
    if depth > MAX_DEPTH:
        raise UnsafeBundleEntry(
            f"directories nested deeper than {MAX_DEPTH} levels at {prefix!r}",
            path=prefix,
            reason="nesting too deep",
        )
    with os.scandir(dir_fd) as it:
        entries = list(it)
    for entry in entries:
        rel = prefix + entry.name
        st = entry.stat(follow_symlinks=False)
        kind = _kind_of(st.st_mode)
        size = st.st_size if kind == "file" else 0
        out.append(TreeEntry(rel, kind, size, st.st_nlink if kind == "file" else 1))
        if kind == "dir":
            sub_fd = os.open(
                entry.name,
                os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                dir_fd=dir_fd,
            )
            try:
                _scan_dir(sub_fd, rel + "/", out, depth + 1)
            finally:
                os.close(sub_fd)


def open_beneath(root_fd: int, path: str) -> int:
    """Open the regular file ``path`` under the directory ``root_fd`` for reading.

    Every component is opened with O_NOFOLLOW relative to its parent, so no
    symlink anywhere on the way is followed. Raises UnsafeBundleEntry for an
    unsafe path, a link, or anything that is not a regular file; FileNotFoundError
    if it does not exist.
    """
    reason = unsafe_path_reason(path)
    if reason:
        raise UnsafeBundleEntry(f"unsafe path {path!r}", path=path, reason=reason)
    parts = path.split("/")
    fd = os.dup(root_fd)
    try:
        for part in parts[:-1]:
            try:
                next_fd = os.open(
                    part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd
                )
            except OSError as exc:
                if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                    raise UnsafeBundleEntry(
                        f"{path!r}: {part!r} is a symlink or not a directory",
                        path=path,
                        reason="symlink or non-directory on the path",
                    ) from exc
                raise
            os.close(fd)
            fd = next_fd
        try:
            # O_NONBLOCK: opening a FIFO must not hang; it is rejected just below
            file_fd = os.open(
                parts[-1], os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=fd
            )
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise UnsafeBundleEntry(
                    f"{path!r} is a symlink", path=path, reason="symlink"
                ) from exc
            raise
    finally:
        os.close(fd)
    mode = os.fstat(file_fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(file_fd)
        kind = _kind_of(mode)
        raise UnsafeBundleEntry(
            f"{path!r} is not a regular file ({kind})",
            path=path,
            reason=f"not a regular file: {kind}",
        )
    os.set_blocking(file_fd, True)
    return file_fd


def _hash_fd(fd: int, copy_to: int | None = None) -> tuple[str, int]:
    digest = hashlib.sha256()
    buffer = bytearray(READ_CHUNK)
    view = memoryview(buffer)
    size = 0
    with io.FileIO(fd, "rb", closefd=False) as reader:
        while n := reader.readinto(buffer):
            chunk = view[:n]
            digest.update(chunk)
            if copy_to is not None:
                written = 0
                while written < n:
                    written += os.write(copy_to, chunk[written:])
            size += n
    return digest.hexdigest(), size


def default_workers() -> int:
    """How many files are hashed at once: one per CPU, at most 8."""
    return max(1, min(8, os.cpu_count() or 1))


def hash_files(
    root: Path, paths: Sequence[str], *, workers: int | None = None
) -> tuple[dict[str, FileDigest], dict[str, str]]:
    """Hash each regular file ``paths[i]`` under ``root``; return (digests, errors).

    Files are opened with :func:`open_beneath` (no link is followed) and read in
    :data:`READ_CHUNK` pieces, several files at once. ``errors`` maps each path
    that could not be hashed to the reason (missing, symlink, not a regular file).
    """
    root_fd = _open_root(root)
    try:

        def one(path: str) -> FileDigest | str:
            try:
                fd = open_beneath(root_fd, path)
            except UnsafeBundleEntry as exc:
                return exc.reason
            except FileNotFoundError:
                return "missing"
            except OSError as exc:
                return f"cannot open: {exc.strerror}"
            try:
                sha, size = _hash_fd(fd)
            except OSError as exc:
                return f"cannot read: {exc.strerror}"
            finally:
                os.close(fd)
            return FileDigest(path, sha, size)

        results = _map(one, paths, workers)
    finally:
        os.close(root_fd)
    digests: dict[str, FileDigest] = {}
    errors: dict[str, str] = {}
    for path, result in zip(paths, results, strict=True):
        if isinstance(result, FileDigest):
            digests[path] = result
        else:
            errors[path] = result
    return digests, errors


def _map(fn: Callable[[_T], _R], items: Sequence[_T], workers: int | None) -> list[_R]:
    count = workers or default_workers()
    if count <= 1 or len(items) <= 1:
        return [fn(item) for item in items]
    with ThreadPoolExecutor(max_workers=min(count, len(items))) as pool:
        return list(pool.map(fn, items))


# --- building -----------------------------------------------------------------


def _plain_json_predicate(predicate: Mapping[str, Any]) -> dict[str, Any]:
    try:
        data = load_json_strict(json.dumps(dict(predicate), allow_nan=False).encode("utf-8"))
    except (TypeError, ValueError) as exc:
        raise InputError(f"bundle predicate is not plain JSON: {exc}") from exc
    assert isinstance(data, dict)
    run_id = data.get("run_id")
    if not isinstance(run_id, str) or not _RUN_ID.match(run_id):
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
            sha, size = _hash_fd(src_fd, copy_to=out_fd)
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
    predicate: Mapping[str, Any],
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
            src_fd = _open_root(content_dir)
            try:
                found = _map(lambda p: _copy_and_hash(src_fd, dest, p), paths, workers)
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
        envelope_bytes = _json_bytes(envelope)

        for name, data in (
            (MANIFEST_NAME, manifest_bytes),
            (STATEMENT_NAME, statement_bytes),
            (ENVELOPE_NAME, envelope_bytes),
            (SIGSTORE_BUNDLE_NAME, _json_bytes(sigstore_bundle(envelope))),
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


def remove_tree(path: Path) -> None:
    """Remove ``path`` and everything under it, read-only entries included; links not followed."""
    if path.is_symlink() or not path.is_dir():
        path.unlink(missing_ok=True)
        return
    for dirpath, dirnames, _ in os.walk(path):
        with contextlib.suppress(OSError):
            Path(dirpath).chmod(0o700)
        for name in dirnames:
            sub = Path(dirpath) / name
            if not sub.is_symlink():
                with contextlib.suppress(OSError):
                    sub.chmod(0o700)
    shutil.rmtree(path)


# --- tar form -------------------------------------------------------------------


def write_bundle_tar(bundle_dir: Path, tar_path: Path) -> Path:
    """Write ``bundle_dir`` as a deterministic tar at ``tar_path`` (which must not exist).

    Regular files only, sorted by path, with mtime 0, uid/gid 0, empty owner
    names and mode 0644 (PAX format only where a long name needs it): the same
    bundle always gives the same bytes. Links and special files raise
    UnsafeBundleEntry; the partial tar is removed on failure.
    """
    entries = scan_tree(bundle_dir)
    for entry in entries:
        if entry.kind in ("symlink", "special"):
            raise UnsafeBundleEntry(
                f"refusing to tar {entry.path!r}: {entry.kind}",
                path=str(bundle_dir / entry.path),
                reason=entry.kind,
            )
        reason = unsafe_path_reason(entry.path)
        if reason:
            raise UnsafeBundleEntry(
                f"refusing to tar {entry.path!r}: {reason}",
                path=str(bundle_dir / entry.path),
                reason=reason,
            )
    files = [e.path for e in entries if e.kind == "file"]
    root_fd = _open_root(bundle_dir)
    try:
        out_fd = os.open(tar_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    except FileExistsError as exc:
        os.close(root_fd)
        raise InputError("tar file already exists", file=str(tar_path)) from exc
    try:
        with (
            io.FileIO(out_fd, "wb", closefd=True) as raw,
            io.BufferedWriter(raw, buffer_size=READ_CHUNK) as out,
            tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar,
        ):
            for path in files:
                fd = open_beneath(root_fd, path)
                with io.FileIO(fd, "rb", closefd=True) as src:
                    info = tarfile.TarInfo(path)
                    info.size = os.fstat(fd).st_size
                    info.mtime = 0
                    info.mode = 0o644
                    info.uid = info.gid = 0
                    info.uname = info.gname = ""
                    tar.addfile(info, io.BufferedReader(src, buffer_size=READ_CHUNK))
    except BaseException:
        tar_path.unlink(missing_ok=True)
        raise
    finally:
        os.close(root_fd)
    return tar_path


@dataclass(frozen=True)
class TarMember:
    """A tar member the runner will read: a regular file at a safe path."""

    path: str
    member: tarfile.TarInfo


def scan_tar(tar: tarfile.TarFile) -> tuple[list[TarMember], list[str]]:
    """Sort a tar's members into readable regular files and problems (one per bad member).

    Accepts regular files and directories at safe paths (a leading ``./`` is
    allowed); refuses symlinks, hard links, devices, FIFOs, unsafe paths and
    duplicate names, each named in a problem.
    """
    members: list[TarMember] = []
    problems: list[str] = []
    seen: set[str] = set()
    for member in tar:
        name = member.name
        while name.startswith("./"):
            name = name[2:]
        name = name.rstrip("/") if member.isdir() else name
        if name in ("", ".") and member.isdir():
            continue
        reason = unsafe_path_reason(name)
        if reason:
            problems.append(f"tar member {member.name!r}: {reason}")
            continue
        if member.issym():
            problems.append(
                f"tar member {name!r} is a symlink (-> {member.linkname!r}); links are refused"
            )
            continue
        if member.islnk():
            problems.append(
                f"tar member {name!r} is a hard link (-> {member.linkname!r}); links are refused"
            )
            continue
        if member.isdir():
            continue
        if not member.isreg():
            problems.append(f"tar member {name!r} is a device, FIFO or other special file")
            continue
        if name in seen:
            problems.append(f"tar member {name!r} appears more than once")
            continue
        seen.add(name)
        members.append(TarMember(name, member))
    return members, problems


def open_bundle_tar(tar_path: Path) -> tarfile.TarFile:
    """Open an uncompressed bundle tar for reading; the caller closes it.

    Raises InputError naming the file if it is missing or not a tar.
    """
    if not tar_path.is_file():
        raise InputError("bundle tar not found", file=str(tar_path))
    try:
        return tarfile.open(tar_path, mode="r:")  # the caller closes it
    except tarfile.TarError as exc:
        raise InputError(f"not an uncompressed tar file: {exc}", file=str(tar_path)) from exc


def extract_bundle_tar(tar_path: Path, dest: Path) -> Path:
    """Extract a bundle tar into the new directory ``dest``, refusing anything unsafe.

    Every member is checked before anything is written: links, devices, unsafe
    paths and duplicates raise UnsafeBundleEntry (naming the first, listing all).
    Files are written 0644 under ``dest`` regardless of the modes and owners in
    the tar. ``dest`` is removed again if extraction fails.
    """
    with open_bundle_tar(tar_path) as tar:
        members, problems = scan_tar(tar)
        if problems:
            raise UnsafeBundleEntry(
                f"refusing to extract {tar_path.name}: {'; '.join(problems)}",
                path=str(tar_path),
                reason=problems[0],
            )
        paths = {m.path for m in members}
        for m in members:
            parts = m.path.split("/")
            for i in range(1, len(parts)):
                if "/".join(parts[:i]) in paths:
                    raise UnsafeBundleEntry(
                        f"tar member {m.path!r} lies under the file {'/'.join(parts[:i])!r}",
                        path=str(tar_path),
                        reason="file used as directory",
                    )
        dest.mkdir(parents=True, exist_ok=False)
        try:
            for m in members:
                target = dest / m.path
                target.parent.mkdir(parents=True, exist_ok=True)
                source = tar.extractfile(m.member)
                assert source is not None  # regular file
                fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
                with io.FileIO(fd, "wb", closefd=True) as out, source:
                    while chunk := source.read(READ_CHUNK):
                        out.write(chunk)
        except BaseException:
            remove_tree(dest)
            raise
    return dest


def iter_tar_chunks(tar: tarfile.TarFile, member: tarfile.TarInfo) -> Iterator[bytes]:
    """Yield the content of a regular-file member in :data:`READ_CHUNK` pieces."""
    source = tar.extractfile(member)
    if source is None:
        return
    with source:
        while chunk := source.read(READ_CHUNK):
            yield chunk


__all__ = [
    "ENVELOPE_NAME",
    "MANIFEST_NAME",
    "MANIFEST_SCHEMA",
    "METADATA_NAMES",
    "PAYLOAD_TYPE",
    "PREDICATE_TYPE",
    "SIGSTORE_BUNDLE_NAME",
    "STATEMENT_NAME",
    "STATEMENT_TYPE",
    "BundleInfo",
    "BundleManifest",
    "FileDigest",
    "ManifestFile",
    "Statement",
    "Subject",
    "TreeEntry",
    "UnsafeBundleEntry",
    "build_bundle",
    "extract_bundle_tar",
    "hash_files",
    "open_beneath",
    "open_bundle_tar",
    "remove_tree",
    "scan_tar",
    "scan_tree",
    "unsafe_path_reason",
    "write_bundle_tar",
]

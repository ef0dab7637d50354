"""Reading a bundle for verification: everything the checks look at, read once, link-free.

:func:`gather` reads a bundle directory or ``.tar`` into :class:`BundleFacts` without
following any link: its layout, the metadata files (bounded), the envelope and what it
signs, the manifest, and (only once the signature holds and the signed statement pins
the manifest, :func:`pinned_sizes`) the digests of the payload files. Nothing here
decides whether the bundle is valid: :mod:`runner.bundle.verify.checks` does.
"""

from __future__ import annotations

import hashlib
import os
import tarfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import ValidationError

from runner._internal.tar import TarMember
from runner._internal.tar import iter_chunks as iter_tar_chunks
from runner._internal.tree import open_beneath, scan_tree
from runner.bundle.archive import open_bundle_tar, scan_tar
from runner.bundle.hashing import FileDigest, hash_files
from runner.bundle.metadata import (
    ENVELOPE_NAME,
    MANIFEST_NAME,
    METADATA_MAX_BYTES,
    METADATA_NAMES,
    PAYLOAD_TYPE,
    SIGSTORE_BUNDLE_NAME,
    STATEMENT_NAME,
    BundleManifest,
    Statement,
    load_json_strict,
)
from runner.bundle.signing import (
    DsseEnvelope,
    TrustedKeys,
    b64_decode_canonical,
    envelope_problems,
)
from runner.errors import UnsafeBundleEntry
from runner.shared.tarformat import unsafe_path_reason

# --- reading a bundle -------------------------------------------------------------


@dataclass
class BundleFacts:
    """Everything read from the bundle; the checks are pure functions of this."""

    location: str
    entry_count: int = 0
    layout_problems: list[str] = field(default_factory=list)
    payload_files: set[str] = field(default_factory=set)
    raw: dict[str, bytes] = field(default_factory=dict)
    raw_problems: dict[str, str] = field(default_factory=dict)
    envelope: dict[str, object] | None = None  # the JSON object read, not yet validated
    envelope_problem: str | None = None
    payload: bytes | None = None
    statement: Statement | None = None
    statement_problems: list[str] = field(default_factory=list)
    manifest: BundleManifest | None = None
    manifest_problems: list[str] = field(default_factory=list)
    digests: dict[str, FileDigest] = field(default_factory=dict)
    hash_errors: dict[str, str] = field(default_factory=dict)
    sizes: dict[str, int] = field(default_factory=dict)  # payload file -> size found
    signature_problems: list[str] = field(default_factory=list)


class _DirSource:
    def __init__(self, root: Path, workers: int | None) -> None:
        self.root = root
        self.workers = workers

    def scan(self, facts: BundleFacts) -> None:
        try:
            entries = scan_tree(self.root)
        except UnsafeBundleEntry as exc:
            facts.layout_problems.append(exc.message)
            return
        for entry in entries:
            facts.entry_count += 1
            reason = unsafe_path_reason(entry.path)
            if reason:
                facts.layout_problems.append(f"unsafe path {entry.path!r}: {reason}")
            elif entry.kind == "symlink":
                target = _readlink(self.root / entry.path)
                facts.layout_problems.append(
                    f"symlink {entry.path!r} -> {target!r}: links are never followed"
                )
            elif entry.kind == "special":
                facts.layout_problems.append(
                    f"{entry.path!r} is a device, FIFO or socket, not a regular file"
                )
            elif entry.kind == "file" and entry.path not in METADATA_NAMES:
                facts.payload_files.add(entry.path)
                facts.sizes[entry.path] = entry.size

    def read_metadata(self, name: str) -> bytes | str:
        root_fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            fd = open_beneath(root_fd, name)
        except FileNotFoundError:
            return "missing"
        except UnsafeBundleEntry as exc:
            return exc.reason
        finally:
            os.close(root_fd)
        try:
            if os.fstat(fd).st_size > METADATA_MAX_BYTES:
                return f"larger than {METADATA_MAX_BYTES} bytes"
            chunks: list[bytes] = []
            while chunk := os.read(fd, 1 << 20):
                chunks.append(chunk)
            return b"".join(chunks)
        finally:
            os.close(fd)

    def hash(self, paths: Sequence[str]) -> tuple[dict[str, FileDigest], dict[str, str]]:
        return hash_files(self.root, paths, workers=self.workers)


def _readlink(path: Path) -> str:
    # for the message only: the link itself is never followed
    try:
        return str(path.readlink())
    except OSError:
        return "?"


class _TarSource:
    def __init__(self, tar: tarfile.TarFile) -> None:
        self.tar = tar
        self.members: dict[str, TarMember] = {}

    def scan(self, facts: BundleFacts) -> None:
        members, problems = scan_tar(self.tar)
        facts.entry_count = len(members) + len(problems)
        facts.layout_problems.extend(problems)
        self.members = {m.path: m for m in members}
        facts.payload_files.update(p for p in self.members if p not in METADATA_NAMES)
        facts.sizes.update((p, m.member.size) for p, m in self.members.items())

    def read_metadata(self, name: str) -> bytes | str:
        member = self.members.get(name)
        if member is None:
            return "missing"
        if member.member.size > METADATA_MAX_BYTES:
            return f"larger than {METADATA_MAX_BYTES} bytes"
        return b"".join(iter_tar_chunks(self.tar, member.member))

    def hash(self, paths: Sequence[str]) -> tuple[dict[str, FileDigest], dict[str, str]]:
        digests: dict[str, FileDigest] = {}
        errors: dict[str, str] = {}
        for path in paths:
            member = self.members.get(path)
            if member is None:
                errors[path] = "missing"
                continue
            digest = hashlib.sha256()
            size = 0
            for chunk in iter_tar_chunks(self.tar, member.member):
                digest.update(chunk)
                size += len(chunk)
            digests[path] = FileDigest(path, digest.hexdigest(), size)
        return digests, errors


@contextmanager
def _open_source(path: Path, workers: int | None) -> Iterator[_DirSource | _TarSource]:
    if path.is_dir():
        yield _DirSource(path, workers)
        return
    with open_bundle_tar(path) as tar:
        yield _TarSource(tar)


def _pydantic_problems(what: str, exc: ValidationError) -> list[str]:
    return [
        f"{what}: {'.'.join(str(p) for p in err['loc']) or '(root)'}: {err['msg']}"
        for err in exc.errors()
    ]


def pinned_sizes(facts: BundleFacts) -> str | None:
    """Why the payload must not be hashed yet (None: it may be).

    Hashing reads as many bytes as the files hold: that work is done only once the
    signature holds and the signed statement pins this manifest, so every size that
    decides it was declared by a trusted signer, not by whoever handed the bundle over.
    """
    if facts.signature_problems or facts.statement is None or facts.payload is None:
        return "files not hashed: the signature does not verify"
    signed = facts.statement.subject_digests().get(MANIFEST_NAME)
    if signed is None or signed != sha256_hex(facts.raw[MANIFEST_NAME]):
        return "files not hashed: the manifest is not the signed one"
    return None


def gather(path: Path, workers: int | None, verifier: TrustedKeys) -> BundleFacts:
    facts = BundleFacts(location=str(path))
    with _open_source(path, workers) as source:
        source.scan(facts)
        for name in (ENVELOPE_NAME, STATEMENT_NAME, MANIFEST_NAME, SIGSTORE_BUNDLE_NAME):
            data = source.read_metadata(name)
            if isinstance(data, bytes):
                facts.raw[name] = data
            elif name != SIGSTORE_BUNDLE_NAME or data != "missing":  # older bundles lack it
                facts.raw_problems[name] = f"{name}: {data}"

        if ENVELOPE_NAME in facts.raw:
            try:
                loaded = load_json_strict(facts.raw[ENVELOPE_NAME])
                if not isinstance(loaded, dict):
                    raise ValueError("not a JSON object")
                facts.envelope = loaded
                parsed = DsseEnvelope.model_validate(loaded)
                facts.payload = b64_decode_canonical(parsed.payload)
            except ValidationError as exc:
                facts.envelope_problem = "; ".join(_pydantic_problems(ENVELOPE_NAME, exc))
            except ValueError as exc:
                facts.envelope_problem = f"{ENVELOPE_NAME}: {exc}"
            if facts.envelope is not None:
                _, facts.signature_problems = envelope_problems(
                    facts.envelope, verifier, PAYLOAD_TYPE
                )

        if facts.payload is not None:
            try:
                facts.statement = Statement.model_validate(load_json_strict(facts.payload))
            except ValidationError as exc:
                facts.statement_problems = _pydantic_problems("signed statement", exc)
            except ValueError as exc:
                facts.statement_problems = [f"signed statement is not JSON: {exc}"]

        if MANIFEST_NAME in facts.raw:
            try:
                facts.manifest = BundleManifest.model_validate(
                    load_json_strict(facts.raw[MANIFEST_NAME])
                )
            except ValidationError as exc:
                facts.manifest_problems = _pydantic_problems(MANIFEST_NAME, exc)
            except ValueError as exc:
                facts.manifest_problems = [f"{MANIFEST_NAME} is not JSON: {exc}"]

        if facts.manifest is not None and pinned_sizes(facts) is None:
            listed: list[str] = []
            for f in facts.manifest.files:
                if f.path not in facts.payload_files:
                    continue
                found = facts.sizes.get(f.path)
                if found != f.size:
                    # a file of another size cannot have the signed digest: not read at all
                    facts.hash_errors[f.path] = f"expected {f.size} bytes, found {found}"
                    continue
                listed.append(f.path)
            facts.digests, hash_errors = source.hash(listed)
            facts.hash_errors.update(hash_errors)
    return facts


def sha256_hex(data: bytes) -> str:
    """The sha256 hex of ``data``."""
    return hashlib.sha256(data).hexdigest()

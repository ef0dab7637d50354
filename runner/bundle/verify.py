"""Offline verification of evalrun bundles.

:func:`verify_bundle` reads a bundle (directory or ``.tar``) without following any
link, then runs a fixed list of small checks over what it read. Each check
reports how many things it compared and every problem it found; a check whose
inputs could not be read reports that as a problem, so no check passes without
having checked something. The bundle is valid only if every check ran and found
nothing. There is no option to skip a check.

The chain of trust: the DSSE signature (by the given key, or by the keyring key
its keyid selects) covers statement.json; its subjects pin manifest.json and
every payload file by sha256; the manifest must list exactly the files present,
with the digests the runner recomputes. ``envelope.sigstore.json``, where present,
must restate exactly that envelope (bundles sealed before it existed have none).
"""

from __future__ import annotations

import hashlib
import os
import tarfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from runner._internal.files import RefusedFile
from runner._internal.sanitize import one_line
from runner._internal.tar import TarMember
from runner._internal.tar import iter_chunks as iter_tar_chunks
from runner._internal.tree import open_beneath, scan_tree
from runner.bundle.archive import open_bundle_tar, scan_tar
from runner.bundle.contents import read_bundle_file
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
    ManifestFile,
    Statement,
    load_json_strict,
)
from runner.bundle.signing import (
    DsseEnvelope,
    TrustedKeys,
    b64_decode_canonical,
    envelope_problems,
    sigstore_bundle,
)
from runner.errors import InputError, IntegrityError, UnsafeBundleEntry, VerificationFailed
from runner.shared.tarformat import unsafe_path_reason


class CheckReport(BaseModel):
    """The outcome of one verification check."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    checked: int
    problems: tuple[str, ...]

    @property
    def passed(self) -> bool:
        """True only if the check compared at least one thing and found no problem."""
        return self.checked > 0 and not self.problems


class VerifiedBundle(BaseModel):
    """A bundle that passed every check: what it is, who signed it, what was checked."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    path: Path
    run_id: str
    bundle_digest: str
    manifest_digest: str
    keyid: str
    file_count: int
    total_size: int
    statement: Statement
    checks: tuple[CheckReport, ...]
    files: tuple[ManifestFile, ...] = ()

    def read_file(self, name: str, *, max_bytes: int) -> bytes:
        """The bytes of payload file ``name``, exactly as signed.

        Read again through the one link-free, bounded bundle reader and checked
        against the signed manifest's sha256, so a file swapped after verification
        is never used: IntegrityError (exit 3). FileNotFoundError when the manifest
        lists no such file; RefusedFile when it is larger than ``max_bytes``.
        """
        entry = next((f for f in self.files if f.path == name), None)
        if entry is None:
            raise FileNotFoundError(name)
        if entry.size > max_bytes:
            raise RefusedFile(f"{name} is {entry.size} bytes; the limit is {max_bytes}")
        data = read_bundle_file(self.path, name, max_bytes=max_bytes)
        if hashlib.sha256(data).hexdigest() != entry.sha256:
            raise IntegrityError(
                f"{name} changed after the bundle was verified; it is not used",
                path=str(self.path),
                expected=entry.sha256,
            )
        return data


# --- reading a bundle -------------------------------------------------------------


@dataclass
class _Facts:
    """Everything read from the bundle; the checks are pure functions of this."""

    location: str
    entry_count: int = 0
    layout_problems: list[str] = field(default_factory=list)
    payload_files: set[str] = field(default_factory=set)
    raw: dict[str, bytes] = field(default_factory=dict)
    raw_problems: dict[str, str] = field(default_factory=dict)
    envelope: dict[str, Any] | None = None  # the JSON object read, not yet validated
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

    def scan(self, facts: _Facts) -> None:
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

    def scan(self, facts: _Facts) -> None:
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


def _pinned_sizes(facts: _Facts) -> str | None:
    """Why the payload must not be hashed yet (None: it may be).

    Hashing reads as many bytes as the files hold: that work is done only once the
    signature holds and the signed statement pins this manifest, so every size that
    decides it was declared by a trusted signer, not by whoever handed the bundle over.
    """
    if facts.signature_problems or facts.statement is None or facts.payload is None:
        return "files not hashed: the signature does not verify"
    signed = facts.statement.subject_digests().get(MANIFEST_NAME)
    if signed is None or signed != _sha(facts.raw[MANIFEST_NAME]):
        return "files not hashed: the manifest is not the signed one"
    return None


def _gather(path: Path, workers: int | None, verifier: TrustedKeys) -> _Facts:
    facts = _Facts(location=str(path))
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

        if facts.manifest is not None and _pinned_sizes(facts) is None:
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


def _decoded_sigstore(bundle: Any, problems: list[str]) -> Any:
    """The Sigstore bundle with its base64 fields decoded (either DSSE alphabet says the same);
    a field that does not decode is kept as text and named in ``problems``."""
    if not isinstance(bundle, dict) or not isinstance(bundle.get("dsseEnvelope"), dict):
        return bundle
    envelope = dict(bundle["dsseEnvelope"])

    def decode(text: object, where: str) -> object:
        if not isinstance(text, str):
            return text
        try:
            return b64_decode_canonical(text)
        except ValueError as exc:
            problems.append(f"dsseEnvelope.{where} is {exc}")
            return text

    envelope["payload"] = decode(envelope.get("payload"), "payload")
    if isinstance(envelope.get("signatures"), list):
        envelope["signatures"] = [
            {**sig, "sig": decode(sig.get("sig"), f"signatures[{i}].sig")}
            if isinstance(sig, dict)
            else sig
            for i, sig in enumerate(envelope["signatures"])
        ]
    return {**bundle, "dsseEnvelope": envelope}


# --- the checks ---------------------------------------------------------------------

_Check = Callable[[_Facts, TrustedKeys], tuple[int, list[str]]]


def _check_layout(facts: _Facts, verifier: TrustedKeys) -> tuple[int, list[str]]:
    """Every entry is a regular file or directory at a safe relative path."""
    problems = list(facts.layout_problems)
    for name in METADATA_NAMES:
        if name not in facts.raw and name in facts.raw_problems:
            problems.append(facts.raw_problems[name])
    return facts.entry_count, problems


def _check_signature(facts: _Facts, verifier: TrustedKeys) -> tuple[int, list[str]]:
    """The envelope carries exactly one signature, by a trusted key, over the in-toto payload;
    the Sigstore bundle, if there is one, restates exactly that envelope."""
    if facts.envelope is None:
        if ENVELOPE_NAME not in facts.raw:
            return 0, [facts.raw_problems.get(ENVELOPE_NAME, f"{ENVELOPE_NAME}: missing")]
        return 0, [facts.envelope_problem or f"{ENVELOPE_NAME}: not readable"]
    problems = list(facts.signature_problems)
    signatures = facts.envelope.get("signatures")
    if isinstance(signatures, list) and len(signatures) != 1:
        problems.append(
            f"{ENVELOPE_NAME}: carries {len(signatures)} signatures; "
            "an evalrun bundle carries exactly one"
        )
    problems.extend(_sigstore_problems(facts))
    return 1, problems


def _sigstore_problems(facts: _Facts) -> list[str]:
    if SIGSTORE_BUNDLE_NAME in facts.raw_problems:
        return [facts.raw_problems[SIGSTORE_BUNDLE_NAME]]
    raw = facts.raw.get(SIGSTORE_BUNDLE_NAME)
    if raw is None or facts.envelope is None:
        return []
    envelope_problems_: list[str] = []
    try:
        expected = _decoded_sigstore(sigstore_bundle(facts.envelope), envelope_problems_)
    except ValueError:
        return []  # the envelope's own problems are reported already
    if envelope_problems_:
        return []  # likewise
    try:
        loaded = load_json_strict(raw)
    except ValueError as exc:
        return [f"{SIGSTORE_BUNDLE_NAME} is not JSON: {exc}"]
    problems: list[str] = []
    found = _decoded_sigstore(loaded, problems)
    if problems:
        return [f"{SIGSTORE_BUNDLE_NAME}: {p}" for p in problems]
    if found != expected:
        differing = (
            sorted(k for k in expected.keys() | found.keys() if expected.get(k) != found.get(k))
            if isinstance(found, dict)
            else ["(root)"]
        )
        return [
            f"{SIGSTORE_BUNDLE_NAME} does not restate {ENVELOPE_NAME} "
            f"({', '.join(differing)} differ{'s' * (len(differing) == 1)})"
        ]
    return []


def _check_statement(facts: _Facts, verifier: TrustedKeys) -> tuple[int, list[str]]:
    """statement.json is byte-for-byte the signed payload, and that is an evalrun Statement."""
    if facts.payload is None:
        return 0, [f"statement not checked: no readable payload in {ENVELOPE_NAME}"]
    problems = list(facts.statement_problems)
    statement_bytes = facts.raw.get(STATEMENT_NAME)
    if statement_bytes is None:
        problems.append(facts.raw_problems.get(STATEMENT_NAME, f"{STATEMENT_NAME}: missing"))
    elif statement_bytes != facts.payload:
        problems.append(
            f"{STATEMENT_NAME} differs from the payload signed in {ENVELOPE_NAME} "
            f"(sha256 {_sha(statement_bytes)} vs signed {_sha(facts.payload)})"
        )
    return 1, problems


def _check_manifest(facts: _Facts, verifier: TrustedKeys) -> tuple[int, list[str]]:
    """manifest.json is a well-formed evalrun manifest (safe, sorted, unique paths)."""
    if MANIFEST_NAME not in facts.raw:
        return 0, [facts.raw_problems.get(MANIFEST_NAME, f"{MANIFEST_NAME}: missing")]
    return 1, list(facts.manifest_problems)


def _check_subjects(facts: _Facts, verifier: TrustedKeys) -> tuple[int, list[str]]:
    """The signed subjects are exactly the manifest files plus manifest.json, same digests."""
    if facts.statement is None or facts.manifest is None:
        return 0, ["subjects not checked: statement or manifest unreadable"]
    problems: list[str] = []
    subjects = facts.statement.subject_digests()
    if len(subjects) != len(facts.statement.subject):
        problems.append("statement lists a subject name more than once")
    expected = {f.path: f.sha256 for f in facts.manifest.files}
    expected[MANIFEST_NAME] = _sha(facts.raw[MANIFEST_NAME])
    for name in sorted(expected.keys() | subjects.keys()):
        want, have = subjects.get(name), expected.get(name)
        if want is None:
            problems.append(f"statement subjects do not match manifest: no subject for {name!r}")
        elif have is None:
            problems.append(
                f"statement subjects do not match manifest: subject {name!r} is not in the manifest"
            )
        elif want != have:
            what = "manifest.json" if name == MANIFEST_NAME else f"manifest entry {name!r}"
            problems.append(
                f"statement subjects do not match manifest: signed sha256 of {name!r} is "
                f"{want}, {what} has {have}"
            )
    return len(expected), problems


def _check_run_identity(facts: _Facts, verifier: TrustedKeys) -> tuple[int, list[str]]:
    """The signed statement is about the run this bundle's manifest belongs to, and the
    launcher it names (self-asserted) is bound to the key that signed it."""
    if facts.statement is None or facts.manifest is None:
        return 0, ["run identity not checked: statement or manifest unreadable"]
    checked, problems = 1, []
    if facts.statement.run_id != facts.manifest.run_id:
        problems.append(
            f"envelope of another run: the signed statement is for run "
            f"{facts.statement.run_id!r}, this bundle's manifest is for run "
            f"{facts.manifest.run_id!r}"
        )
    bound = _launcher_keyid(facts.statement)
    if bound is not None:
        checked += 1
        signed_by = _envelope_keyids(facts)
        if bound not in signed_by:
            problems.append(
                f"provenance.launched_by is bound to keyid {one_line(bound, limit=80)}, "
                f"but the bundle is signed by keyid {', '.join(signed_by) or '(none)'}"
            )
    return checked, problems


def _launcher_keyid(statement: Statement) -> str | None:
    """``provenance.launched_by.signer_keyid`` of the signed predicate, if it names one."""
    node: Any = statement.predicate
    for key in ("provenance", "launched_by", "signer_keyid"):
        node = node.get(key) if isinstance(node, dict) else None
    return node if isinstance(node, str) else None


def _envelope_keyids(facts: _Facts) -> list[str]:
    signatures = facts.envelope.get("signatures") if facts.envelope is not None else None
    if not isinstance(signatures, list):
        return []
    return [
        s["keyid"] for s in signatures if isinstance(s, dict) and isinstance(s.get("keyid"), str)
    ]


def _check_files(facts: _Facts, verifier: TrustedKeys) -> tuple[int, list[str]]:
    """Exactly the manifest's files are present, each with its sha256 and size."""
    if facts.manifest is None:
        return 0, ["files not checked: manifest unreadable"]
    if _pinned_sizes(facts) is not None:
        return 0, []  # the signature or subjects check names why
    problems: list[str] = []
    listed = {f.path: f for f in facts.manifest.files}
    for path in sorted(facts.payload_files - listed.keys()):
        problems.append(f"extra file not in manifest: {path!r}")
    compared = 1  # the set of files present against the set listed
    for path, entry in listed.items():
        if path not in facts.payload_files:
            problems.append(f"missing file {path!r} (listed in manifest)")
            continue
        found = facts.digests.get(path)
        if found is None:
            problems.append(f"file {path!r}: {facts.hash_errors.get(path, 'not hashed')}")
            continue
        compared += 1
        if found.sha256 != entry.sha256:
            problems.append(f"file {path!r}: expected sha256 {entry.sha256}, found {found.sha256}")
        if found.size != entry.size:
            problems.append(f"file {path!r}: expected {entry.size} bytes, found {found.size}")
    return compared, problems


CHECKS: tuple[tuple[str, _Check], ...] = (
    ("layout", _check_layout),
    ("signature", _check_signature),
    ("statement", _check_statement),
    ("manifest", _check_manifest),
    ("subjects", _check_subjects),
    ("run_identity", _check_run_identity),
    ("files", _check_files),
)


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def verify_bundle(
    path: Path, verifier: TrustedKeys, *, workers: int | None = None
) -> VerifiedBundle:
    """Verify the bundle at ``path`` (a directory or an uncompressed ``.tar``) offline.

    ``verifier`` is the one trusted public key, or a keyring whose key the
    envelope's keyid selects (an unknown keyid is a problem naming it).
    Returns a VerifiedBundle only if every check in :data:`CHECKS` compared
    something and found no problem. Otherwise raises VerificationFailed whose
    ``problems`` name each mismatch (file, expected vs found sha256, extra or
    missing file, payloadType, key ids, subjects, run ids, unsafe entries).
    A missing path or a file that is not a tar raises InputError.
    """
    try:
        present = path.exists()
    except (OSError, ValueError):  # a name the system refuses (too long, NUL)
        present = False
    if not present:
        raise InputError("bundle not found", file=one_line(path, limit=200))
    try:
        facts = _gather(path, workers, verifier)
    except (OSError, tarfile.TarError, EOFError) as exc:
        # an unreadable or truncated bundle cannot be vouched for
        raise VerificationFailed(
            "bundle could not be read",
            problems=[f"cannot read {exc.filename or path}: {exc.strerror or exc}"]
            if isinstance(exc, OSError)
            else [f"corrupt tar: {exc}"],
            bundle=str(path),
        ) from exc
    reports: list[CheckReport] = []
    for name, check in CHECKS:
        checked, found = check(facts, verifier)
        reports.append(CheckReport(name=name, checked=checked, problems=tuple(found)))
    # one missing file can be the cause named by two checks; say it once
    problems = list(dict.fromkeys(p for r in reports for p in r.problems))
    if not problems:
        # a check can only pass by checking something; one that was skipped because
        # another failed adds nothing to the problems that other check names
        problems.extend(
            f"{r.name}: compared nothing" for r in reports if r.checked == 0 and not r.problems
        )
    if problems or not all(r.passed for r in reports):
        raise VerificationFailed(
            f"bundle failed verification ({len(problems)} problem{'s' * (len(problems) != 1)})",
            problems=problems,
            bundle=str(path),
        )
    assert facts.statement is not None and facts.manifest is not None and facts.payload
    assert facts.envelope is not None  # the signature check passed: one signature, trusted
    return VerifiedBundle(
        path=path,
        run_id=facts.statement.run_id,
        bundle_digest="sha256:" + _sha(facts.payload),
        manifest_digest="sha256:" + _sha(facts.raw[MANIFEST_NAME]),
        keyid=facts.envelope["signatures"][0]["keyid"],
        file_count=len(facts.manifest.files),
        total_size=sum(f.size for f in facts.manifest.files),
        statement=facts.statement,
        checks=tuple(reports),
        files=facts.manifest.files,
    )


__all__ = ["CHECKS", "CheckReport", "VerifiedBundle", "verify_bundle"]

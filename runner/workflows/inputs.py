"""A lock's inputs delivered by digest: found in the cache, next to the spec, or fetched.

Every input a run uses is a verified blob (a file) or a read-only hard-linked tree (a
directory) in the content-addressed cache (``settings.input_cache``); backends mount
it from there, so nothing is copied per run. :class:`InputResolver` finds each locked
input, first match wins:

1. next to the spec (local inputs of ``evalrun run``): re-hashed every time, so a file
   edited since the lock is refused (exit 3) rather than replaced by cached bytes;
2. the cache, by digest (trusted, like the rest of the runner host);
3. the input cache of older evalruns (``$EVALRUN_HOME/inputs/sha256/<hex>``, files);
4. each ``--inputs DIR`` of a re-run: a file by its locked path, its name, or any file
   of its size; a directory by its locked path or name, checked by its listing first;
5. the artifact the lock says it was published as (``registry/repo@sha256:…``),
   every layer and file checked while it streams in;
6. the input's own remote URI (https, s3, oci), as at lock time.

For a backend whose nodes pull inputs themselves (Kubernetes image volumes), a resolver
made with ``remote=True`` stops before 5: an input not already here that has a published
artifact is only checked to be in the registry (:class:`Published`), never downloaded to
the runner's host — the node pulls it by digest and the agent checks every file's sha256.

Whatever it comes from, the bytes are checked against the locked digest before they
enter the cache; a source that does not hold them is noted and the next one tried.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Literal, NoReturn

from runner._internal.cas import ContentStore
from runner._internal.input_tree import InputFile, hash_file
from runner._internal.settings import Settings
from runner.adapters.sources import AcquiredInput, OciUri, RemoteListing, SourceOptions, acquire
from runner.adapters.sources import Progress as TransferCallback
from runner.errors import DigestMismatch, EvalrunError, InfrastructureError, IntegrityError
from runner.model.base import parse_digest_ref
from runner.model.lock import LockedArtifact, LockedSpec
from runner.model.plan import PlanInput, PlanInputFile

Progress = Callable[[str], None]
TransferProgress = Callable[[str], TransferCallback | None]
MAX_WALK_FILES = 50_000


@dataclass(frozen=True)
class WantedInput:
    """One input of a lock, as a run or re-run asks for it."""

    role: Literal["model", "dataset"]
    name: str
    locked: LockedArtifact = field(compare=False)

    @property
    def path(self) -> str:
        """Where it came from: the local path (relative to the spec) or the URI."""
        return self.locked.origin

    @property
    def sha256(self) -> str:
        return self.locked.sha256

    @property
    def size(self) -> int:
        return self.locked.size

    @property
    def kind(self) -> str:
        return self.locked.kind

    @property
    def label(self) -> str:
        return f"{self.role} {self.name} ({self.path}, sha256:{self.sha256[:12]}…)"

    @property
    def what(self) -> str:
        """How errors name it (``model model``, ``dataset digits-test``)."""
        return f"{self.role} {self.name}"


def wanted_inputs(lock: LockedSpec) -> list[WantedInput]:
    """The model and every dataset of ``lock``."""
    items = [WantedInput("model", "model", lock.model)]
    items += [WantedInput("dataset", d.name, d) for d in lock.datasets]
    return items


@dataclass(frozen=True)
class UnresolvedInput:
    """An input no source could deliver, why, and the most telling error met."""

    wanted: WantedInput
    reason: str
    error: EvalrunError | None = None

    def as_dict(self) -> dict[str, str]:
        """What an audit records about the input (role, name, path, sha256, reason)."""
        return {
            "role": self.wanted.role,
            "name": self.wanted.name,
            "path": self.wanted.path,
            "sha256": self.wanted.sha256,
            "reason": self.reason,
        }


def _rank(error: EvalrunError | None) -> int:
    if isinstance(error, IntegrityError):
        return 3
    if isinstance(error, InfrastructureError):
        return 2
    return 0 if error is None else 1


def _resolve_artifact(uri: OciUri) -> RemoteListing:
    """The ``oci://`` plug-in of :func:`acquire`, its registry client loaded on first use
    (a run of local or cached inputs never loads it)."""
    from runner.adapters.input_artifacts import oci_resolver

    return oci_resolver()(uri)


def _worse(a: EvalrunError | None, b: EvalrunError) -> EvalrunError:
    """Integrity beats infrastructure beats the rest: what to raise if nothing else works."""
    return b if a is None or _rank(b) > _rank(a) else a


class InputResolver:
    """Finds locked inputs by digest (see the module docs for where, in which order)."""

    def __init__(
        self,
        settings: Settings,
        search_dirs: Sequence[Path] = (),
        *,
        spec_dir: Path | None = None,
        options: Callable[[WantedInput], SourceOptions] | None = None,
        progress: Progress = lambda _: None,
        transfer: TransferProgress | None = None,
        fetch: bool = True,
        remote: bool = False,
    ) -> None:
        self.store = ContentStore(settings.input_cache)
        self.legacy_cache = settings.home / "inputs" / "sha256"
        self.search_dirs = [Path(d) for d in search_dirs]
        self.spec_dir = spec_dir
        self._options = options or (lambda want: SourceOptions(s3_endpoint=want.locked.endpoint))
        self.progress = progress
        self.transfer = transfer
        self.fetch = fetch
        self.remote = remote

    # ------------------------------------------------------------------ the sources

    def _acquire(self, uri: str, want: WantedInput, how: str, spec_dir: Path) -> AcquiredInput:
        got = acquire(
            uri,
            want.sha256,
            field=want.what,
            spec_dir=spec_dir,
            store=self.store,
            progress=self.transfer(f"{want.what}: {how}") if self.transfer else None,
            options=self._options(want),
            oci=_resolve_artifact,
        )
        if got.kind != want.kind:
            raise DigestMismatch(
                want.what, expected=f"a {want.kind}", found=f"a {got.kind}", path=uri
            )
        return got

    def _cached(self, want: WantedInput) -> Path | None:
        digest = want.locked.digest
        if want.kind == "file":
            return self.store.blob_path(digest) if self.store.has_blob(digest) else None
        if self.store.tree_files(digest) is not None:
            return self.store.tree_path(digest)
        files = want.locked.entries()
        if all(self.store.has_blob(f.sha256) for f in files):
            return self.store.materialize_tree(
                [InputFile(path=f.path, sha256=f.sha256, size=f.size) for f in files],
                what=want.what,
            )
        return None

    def _file_candidates(self, want: WantedInput) -> Iterator[Path]:
        yield self.legacy_cache / want.sha256
        rel = PurePosixPath(want.path) if want.locked.path is not None else None
        name = want.locked.entries()[0].path
        for base in self.search_dirs:
            if rel is not None and ".." not in rel.parts and not rel.is_absolute():
                yield base / rel
            yield base / name
        for base in self.search_dirs:
            yield from _walk_by_size(base, want.size)

    def _dir_candidates(self, want: WantedInput) -> Iterator[Path]:
        origin = PurePosixPath(want.path.rstrip("/"))
        for base in self.search_dirs:
            local = want.locked.path is not None and not origin.is_absolute()
            if local and ".." not in origin.parts:
                yield base / origin
            yield base / origin.name
            yield base

    def _from_dirs(self, want: WantedInput, notes: list[str]) -> Path | None:
        """A verified copy from a ``--inputs`` directory, or None (mismatches noted)."""
        tried: set[Path] = set()
        if want.kind == "directory":
            for candidate in self._dir_candidates(want):
                if candidate in tried or not candidate.is_dir() or candidate.is_symlink():
                    continue
                tried.add(candidate)
                if not _same_listing(candidate, want.locked):
                    continue
                try:
                    return self._acquire(str(candidate.resolve()), want, "copying", Path("/")).path
                except EvalrunError as exc:
                    notes.append(f"{candidate}: {exc.message} (changed)")
            return None
        for candidate in self._file_candidates(want):
            if candidate in tried:
                continue
            tried.add(candidate)
            try:
                if candidate.is_symlink() or not candidate.is_file():
                    continue
                found, _ = hash_file(candidate)
            except OSError:
                continue
            if found == want.sha256:
                self.store.put_file(candidate, what=want.what, expected=want.sha256)
                return self.store.blob_path(want.sha256)
            if candidate.name == want.locked.entries()[0].path:
                notes.append(f"{candidate} has sha256:{found[:12]}… (changed)")
        return None

    # ------------------------------------------------------------------ resolve

    def _published(self, want: WantedInput, artifact: str) -> Published | UnresolvedInput:
        """The input's artifact if the registry holds it (checked by digest, not fetched)."""
        from runner.adapters.registry import ImageName, manifest_exists

        repo, digest = parse_digest_ref(artifact)
        try:
            present = manifest_exists(ImageName.parse(repo), digest)
        except EvalrunError as exc:
            return UnresolvedInput(want, f"oci://{artifact}: {exc.message}", exc)
        if not present:
            return UnresolvedInput(want, f"oci://{artifact}: not in the registry")
        self.progress(f"{want.what}: in the registry as {artifact} (the node pulls it)")
        return Published(artifact)

    def resolve(self, want: WantedInput) -> Path | Published | UnresolvedInput:
        """The input's verified blob or tree in the cache, or why there is none.

        With ``remote``, an input that is not here but published is :class:`Published`.
        A local input present next to the spec that no longer matches raises
        DigestMismatch at once (exit 3): it was edited since the lock.
        """
        if self.spec_dir is not None and want.locked.path is not None:
            local = self.spec_dir / want.locked.path
            if local.exists() or local.is_symlink():
                return self._acquire(want.locked.path, want, "hashing", self.spec_dir).path
        cached = self._cached(want)
        if cached is not None:
            return cached
        notes: list[str] = []
        error: EvalrunError | None = None
        found = self._from_dirs(want, notes)
        if found is not None:
            return found
        if self.remote and want.locked.artifact:
            return self._published(want, want.locked.artifact)
        sources: list[tuple[str, str]] = []
        if self.fetch and want.locked.artifact:
            sources.append((f"oci://{want.locked.artifact}", "fetching the published artifact"))
        if self.fetch and want.locked.uri:
            sources.append((want.locked.uri, "fetching from its source"))
        for uri, how in sources:
            self.progress(f"{want.what}: {how} {uri}")
            try:
                return self._acquire(uri, want, how.split(" ")[0], Path("/")).path
            except EvalrunError as exc:
                notes.append(f"{uri}: {exc.message}")
                error = _worse(error, exc)
        if not notes:
            where = ", ".join(str(d) for d in self.search_dirs) or "no --inputs given"
            published = "" if want.locked.artifact else "; the lock records no published artifact"
            notes.append(f"not found (input cache, {where}{published})")
        return UnresolvedInput(want, "; ".join(notes[:3]), error)


def _walk_by_size(base: Path, size: int) -> Iterator[Path]:
    seen = 0
    for dirpath, dirnames, filenames in os.walk(base):
        dirnames.sort()
        for name in sorted(filenames):
            seen += 1
            if seen > MAX_WALK_FILES:
                return
            path = Path(dirpath) / name
            with contextlib.suppress(OSError):
                if not path.is_symlink() and path.stat().st_size == size:
                    yield path


def _same_listing(root: Path, locked: LockedArtifact) -> bool:
    """Whether ``root`` lists the locked files with their sizes (no hashing, no links)."""
    want = {f.path: f.size for f in locked.entries()}
    seen: dict[str, int] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        rel = Path(dirpath).relative_to(root).as_posix()
        prefix = "" if rel == "." else rel + "/"
        for name in filenames:
            path = Path(dirpath) / name
            if path.is_symlink():
                return False
            seen[prefix + name] = path.stat().st_size
            if len(seen) > len(want):
                return False
        dirnames[:] = [d for d in dirnames if not (Path(dirpath) / d).is_symlink()]
    return seen == want


@dataclass(frozen=True)
class Published:
    """An input the runner's host does not hold, present in the registry by digest."""

    artifact: str


def plan_input(want: WantedInput, host_path: Path | None) -> PlanInput:
    """The input as a backend delivers it: the cached blob or tree (None: registry only),
    its files and artifact."""
    entries = want.locked.entries()
    return PlanInput(
        role=want.role,
        name=want.name,
        host_path=host_path,
        sha256=want.sha256,
        kind=want.locked.kind,
        file_name=entries[0].path if want.locked.kind == "file" else None,
        files=tuple(PlanInputFile(path=f.path, sha256=f.sha256, size=f.size) for f in entries),
        artifact_ref=want.locked.artifact,
    )


def host_inputs(lock: LockedSpec, resolver: InputResolver) -> list[PlanInput]:
    """Every input of ``lock`` in the cache, ready to mount; raises on the first that is not.

    DigestMismatch (exit 3) for an input edited since the lock, altered where it was
    published, or found nowhere; InfrastructureError (exit 5) when a source holding it
    stays unreachable.
    """
    found = []
    for want in wanted_inputs(lock):
        result = resolver.resolve(want)
        if isinstance(result, UnresolvedInput):
            raise_unresolved(result)
        found.append(plan_input(want, None if isinstance(result, Published) else result))
    return found


def raise_unresolved(result: UnresolvedInput) -> NoReturn:
    """Raise what ``result`` amounts to: integrity (3), infrastructure (5) or missing (3)."""
    want, error = result.wanted, result.error
    if isinstance(error, IntegrityError):
        raise IntegrityError(
            f"{want.what}: {result.reason}", hint=error.hint, expected=want.locked.digest
        )
    if isinstance(error, InfrastructureError):
        raise InfrastructureError(f"{want.what}: {result.reason}", hint=error.hint)
    raise DigestMismatch(
        want.what,
        expected=want.locked.digest,
        found=f"missing ({result.reason})",
        path=want.path,
        hint="the input is neither where the lock says nor in the cache, and could "
        "not be fetched by digest; restore it or re-lock deliberately",
    )


__all__ = [
    "InputResolver",
    "UnresolvedInput",
    "WantedInput",
    "host_inputs",
    "plan_input",
    "raise_unresolved",
    "wanted_inputs",
]

"""Re-run a historical evaluation by digest, and judge whether it reproduced.

Order of events: verify the original bundle with the public key (refuse if it
does not verify) → take its ``spec.yaml`` and ``eval.lock.json`` (their digests
must be the ones its signed predicate names) → resolve every input to a file
with the pinned sha256 (refusing, with the full list, any that cannot be) →
check the pinned image digest is still in the registry → run the same lock
again as a new attempt → add to the new, signed predicate a link to the
original (``reproduction_of``) and a verdict per metric (``reproduction``).

Where inputs are found (first match by sha256 wins):

1. the input cache ``$EVALRUN_HOME/inputs/sha256/<hex>`` (filled by every
   successful resolution, so a later re-run or audit needs no hints);
2. each ``--inputs DIR`` (and ``$EVALRUN_INPUTS``, ``:``-separated): first the
   path the lock names relative to DIR, then its file name in DIR, then any file
   under DIR with the pinned size (only those are hashed).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from runner._internal.files import RefusedFile
from runner._internal.settings import Settings
from runner.adapters.registry import ImageName, manifest_exists
from runner.build.image import sha256_file
from runner.bundle.reader import predicate_of
from runner.bundle.signing import Signer, Verifier
from runner.bundle.store import Store, StoreConflict
from runner.bundle.verify import verify_bundle
from runner.errors import (
    EvalrunError,
    ImageUnavailable,
    InputError,
    InputsUnavailable,
    IntegrityError,
)
from runner.model.outcome import Outcome
from runner.model.plan import Backend
from runner.model.predicate import (
    ReproducedMetric,
    ReproductionOf,
    ReproductionRecord,
    ReproductionVerdict,
    RunPredicate,
)
from runner.model.spec import (
    MAX_LOCK_BYTES,
    MAX_SPEC_BYTES,
    EvalSpec,
    LockedSpec,
    load_spec_bytes,
    parse_digest_ref,
    parse_lock_bytes,
)
from runner.workflows.diff import MetricDelta, compare_metrics, overall_verdict
from runner.workflows.run import RunOutcome, run_evaluation

Progress = Callable[[str], None]
MAX_WALK_FILES = 50_000
REPRODUCED = ("identical", "within_tolerance", "within_ci")
# the evaluation's own verdicts; any other outcome is reported with its own exit code
_EVALUATED_EXITS = frozenset({Outcome.PASSED.exit_code, Outcome.THRESHOLDS_FAILED.exit_code})


def evaluated(outcome: Outcome) -> bool:
    """Whether ``outcome`` is a verdict on the evaluation (exit 0 or 6), not a failure to run."""
    return outcome.exit_code in _EVALUATED_EXITS


@dataclass(frozen=True)
class WantedInput:
    role: str
    name: str
    path: str
    sha256: str
    size: int

    @property
    def label(self) -> str:
        return f"{self.role} {self.name} ({self.path}, sha256:{self.sha256[:12]}…)"


@dataclass(frozen=True)
class UnresolvedInput:
    wanted: WantedInput
    reason: str

    def as_dict(self) -> dict[str, str]:
        """What an audit records about the input (role, name, path, sha256, reason)."""
        return {
            "role": self.wanted.role,
            "name": self.wanted.name,
            "path": self.wanted.path,
            "sha256": self.wanted.sha256,
            "reason": self.reason,
        }


@dataclass(frozen=True)
class Original:
    """A verified original run: its bundle, predicate, spec and lock."""

    path: Path
    digest: str
    run_id: str
    predicate: RunPredicate
    spec: EvalSpec
    lock: LockedSpec
    spec_bytes: bytes
    lock_bytes: bytes
    keyid: str
    notes: tuple[str, ...] = ()


def load_original(bundle: Path, verifier: Verifier) -> Original:
    """Verify ``bundle`` and read the spec and lock it ran (VerificationFailed: exit 3)."""
    verified = verify_bundle(bundle, verifier)
    # the predicate of the statement that was verified, not the file read again
    predicate = predicate_of(verified.statement)
    if not isinstance(predicate, RunPredicate):
        raise InputError(
            f"bundle {verified.run_id} is a {predicate.kind} report, not a run",
            bundle=str(bundle),
        )
    # the signed bytes (checked against the manifest as they are read), never the path again
    try:
        spec_bytes = verified.read_file("spec.yaml", max_bytes=MAX_SPEC_BYTES)
        lock_bytes = verified.read_file("eval.lock.json", max_bytes=MAX_LOCK_BYTES)
    except (FileNotFoundError, RefusedFile) as exc:
        raise IntegrityError(
            f"the bundle holds no usable spec.yaml/eval.lock.json to re-run ({exc})",
            bundle=str(bundle),
        ) from exc
    spec = load_spec_bytes(spec_bytes, source=f"{bundle}/spec.yaml")
    lock = parse_lock_bytes(lock_bytes, source=f"{bundle}/eval.lock.json")
    # spec.yaml and eval.lock.json are signed (verify_bundle checked their bytes); their
    # model digests can still differ from the predicate's when this evalrun's spec or
    # lock model gained fields since the run: then the lock is re-pinned to this
    # version's spec digest, and the note says so. Inputs and image stay as locked.
    notes: list[str] = []
    recorded_spec = predicate.spec.digest
    if lock.spec_digest != recorded_spec:
        raise IntegrityError(
            "inconsistent bundle: the lock names another spec than the run",
            bundle=str(bundle),
            expected=recorded_spec,
            found=lock.spec_digest,
        )
    if spec.digest() != recorded_spec:
        notes.append(
            f"spec digest under this evalrun is {spec.digest()} (run recorded {recorded_spec}); "
            "the lock was re-pinned to it"
        )
        data = json.loads(lock_bytes)
        data["spec_digest"] = spec.digest()
        lock_bytes = (json.dumps(data, indent=2, sort_keys=True) + "\n").encode()
    elif lock.digest() != predicate.lock_digest:
        notes.append(
            f"lock digest under this evalrun is {lock.digest()} "
            f"(run recorded {predicate.lock_digest})"
        )
    return Original(
        path=bundle,
        digest=verified.bundle_digest,
        run_id=verified.run_id,
        predicate=predicate,
        spec=spec,
        lock=lock,
        spec_bytes=spec_bytes,
        lock_bytes=lock_bytes,
        notes=tuple(notes),
        keyid=verified.keyid,
    )


def wanted_inputs(lock: LockedSpec) -> list[WantedInput]:
    items = [WantedInput("model", "model", lock.model.path, lock.model.sha256, lock.model.size)]
    items += [WantedInput("dataset", d.name, d.path, d.sha256, d.size) for d in lock.datasets]
    return items


def search_dirs_from_env() -> list[Path]:
    """``$EVALRUN_INPUTS``: extra input directories, ``:``-separated."""
    value = os.environ.get("EVALRUN_INPUTS", "")
    return [Path(p).expanduser() for p in value.split(":") if p]


class InputResolver:
    """Finds files by sha256 in the input cache and the given directories."""

    def __init__(self, settings: Settings, search_dirs: Sequence[Path] = ()) -> None:
        self.cache_dir = settings.home / "inputs" / "sha256"
        self.search_dirs = [Path(d) for d in search_dirs]
        self._hashes: dict[tuple[Path, int, int], str] = {}

    def _sha(self, path: Path) -> str:
        st = path.stat()
        key = (path.resolve(), st.st_size, st.st_mtime_ns)
        if key not in self._hashes:
            self._hashes[key] = sha256_file(path)
        return self._hashes[key]

    def _candidates(self, want: WantedInput) -> Iterator[Path]:
        yield self.cache_dir / want.sha256
        rel = PurePosixPath(want.path)
        for base in self.search_dirs:
            if ".." not in rel.parts and not rel.is_absolute():
                yield base / rel
            yield base / rel.name
        for base in self.search_dirs:
            yield from self._walk_by_size(base, want.size)

    @staticmethod
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

    def resolve(self, want: WantedInput) -> Path | UnresolvedInput:
        """A regular file whose sha256 is the pinned one, or why there is none."""
        mismatches: list[str] = []
        tried: set[Path] = set()
        for path in self._candidates(want):
            if path in tried:
                continue
            tried.add(path)
            try:
                if not path.is_file():
                    continue
                found = self._sha(path)
            except OSError:
                continue
            if found == want.sha256:
                return path
            if path.name == PurePosixPath(want.path).name:
                mismatches.append(f"{path} has sha256:{found[:12]}… (changed)")
        if mismatches:
            reason = "; ".join(mismatches[:3])
        else:
            where = ", ".join(str(d) for d in self.search_dirs) or "no --inputs given"
            reason = f"not found (input cache, {where})"
        return UnresolvedInput(want, reason)

    def remember(self, path: Path, sha256: str) -> Path:
        """Copy a resolved file into the input cache (read-only, by sha256); return it.

        A copy, not a link: an edit of the user's file in place must not change
        the cached bytes.
        """
        target = self.cache_dir / sha256
        if target.is_file():
            return target
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=".in-", dir=self.cache_dir)
        os.close(fd)
        tmp = Path(tmp_name)
        try:
            shutil.copyfile(path, tmp)
            if sha256_file(tmp) != sha256:
                raise IntegrityError("input changed while it was cached", path=str(path))
            tmp.chmod(0o444)
            tmp.replace(target)
        finally:
            tmp.unlink(missing_ok=True)
        return target


def _place(source: Path, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, dest)
    except OSError as exc:
        if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.EACCES):
            raise
        shutil.copyfile(source, dest)


def resolve_inputs(original: Original, resolver: InputResolver) -> dict[WantedInput, Path]:
    """Every input of ``original`` by sha256, or InputsUnavailable listing all that are not."""
    found: dict[WantedInput, Path] = {}
    missing: list[UnresolvedInput] = []
    for want in wanted_inputs(original.lock):
        result = resolver.resolve(want)
        if isinstance(result, UnresolvedInput):
            missing.append(result)
        else:
            found[want] = result
    if missing:
        raise InputsUnavailable(original.run_id, missing)
    for want, path in list(found.items()):
        with contextlib.suppress(OSError):
            found[want] = resolver.remember(path, want.sha256)
    return found


def check_image_available(lock: LockedSpec) -> None:
    """Refuse (ImageUnavailable) when the registry no longer has the pinned image digest."""
    repo, digest = parse_digest_ref(lock.image.ref)
    if not manifest_exists(ImageName.parse(repo), digest):
        raise ImageUnavailable(
            "the pinned image digest is no longer in the registry",
            image=lock.image.ref,
            hint="push the image again by digest (docker push keeps the digest) or restore it",
        )


@contextlib.contextmanager
def workspace(
    original: Original, inputs: Mapping[WantedInput, Path], store: Store
) -> Iterator[Path]:
    """A scratch spec directory: the original spec and lock, inputs at their locked paths.

    Yields the spec path. Lock paths that climb out of the spec dir (``../x``)
    get enough directory levels above the spec to stay inside the workspace.
    """
    depth = max(
        (sum(1 for p in PurePosixPath(w.path).parts if p == "..") for w in inputs), default=0
    )
    store.tmp_dir.mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="rerun-", dir=store.tmp_dir))
    try:
        spec_dir = root.joinpath(*[f"d{i}" for i in range(depth)]) if depth else root
        spec_dir.mkdir(parents=True, exist_ok=True)
        for want, source in inputs.items():
            dest = (spec_dir / want.path).resolve()
            if not dest.is_relative_to(root.resolve()):
                raise InputError(f"lock path escapes the workspace: {want.path!r}")
            _place(source, dest)
        (spec_dir / "eval.yaml").write_bytes(original.spec_bytes)
        (spec_dir / "eval.lock.json").write_bytes(original.lock_bytes)
        # Preprocessing code travels in the bundle (signed); put it back where the spec
        # names it. The lock's code digests are checked again before the run starts.
        carried = original.path / "preprocessing"
        if carried.is_dir():
            shutil.copytree(carried, spec_dir, dirs_exist_ok=True)
        yield spec_dir / "eval.yaml"
    finally:
        shutil.rmtree(root, ignore_errors=True)


@dataclass(frozen=True)
class Reproduction:
    verdict: ReproductionVerdict
    reason: str | None
    deltas: tuple[MetricDelta, ...]

    def record(self, tolerance: float | None) -> ReproductionRecord:
        """What the re-run's predicate records (``reproduction``)."""
        return ReproductionRecord(
            verdict=self.verdict,
            reason=self.reason,
            tolerance=tolerance,
            metrics=tuple(
                ReproducedMetric(
                    name=d.name,
                    original=d.a,
                    rerun=d.b,
                    delta=d.delta,
                    original_ci=d.a_ci or None,
                    rerun_ci=d.b_ci or None,
                    verdict=d.verdict,
                )
                for d in self.deltas
            ),
        )


def judge_reproduction(
    original: RunPredicate, rerun: RunPredicate, tolerance: float | None
) -> Reproduction:
    """Per-metric verdicts of ``rerun`` against ``original`` and the overall verdict."""
    a, b = original.metrics, rerun.metrics
    if not a and not b:
        same = original.outcome == rerun.outcome
        return Reproduction(
            "identical" if same else "changed",
            f"no metrics on either side; outcome {original.outcome} → {rerun.outcome}",
            (),
        )
    if not b:
        return Reproduction("failed", f"the re-run produced no metrics: {rerun.outcome}", ())
    deltas = tuple(compare_metrics(a, b, tolerance))
    verdict = overall_verdict(deltas)
    changed = [d.name for d in deltas if d.verdict not in REPRODUCED]
    reason = f"not reproduced: {', '.join(changed)}" if changed else None
    return Reproduction(verdict, reason, deltas)


@dataclass(frozen=True)
class RerunResult:
    original: Original
    outcome: RunOutcome
    reproduction: Reproduction
    exit_code: int


def import_into_store(bundle: Path, store: Store) -> None:
    """Copy a verified bundle into the store (no-op if it is there already)."""
    with store.staging_dir() as stage:
        target = stage / "bundle"
        shutil.copytree(bundle, target, symlinks=True)
        for dirpath, dirnames, filenames in os.walk(target):
            for name in dirnames:
                (Path(dirpath) / name).chmod(0o755)
            for name in filenames:
                (Path(dirpath) / name).chmod(0o644)
        store.put(target)


def prepare(
    original: Original,
    settings: Settings,
    *,
    search_dirs: Sequence[Path] = (),
    progress: Progress = lambda _: None,
) -> dict[WantedInput, Path]:
    """Everything a re-run needs, checked: each input by sha256, the image in its registry.

    Raises InputsUnavailable or ImageUnavailable (exit 3); starts nothing.
    """
    for note in original.notes:
        progress(f"note: {note}")
    resolver = InputResolver(settings, [*search_dirs, *search_dirs_from_env()])
    inputs = resolve_inputs(original, resolver)
    progress(f"all {len(inputs)} inputs resolved to their pinned digests")
    check_image_available(original.lock)
    progress(f"image {original.lock.image.ref.split('@')[1][:19]}… is in the registry")
    return inputs


def rerun(
    original: Original,
    backend: Backend,
    signer: Signer,
    settings: Settings,
    *,
    search_dirs: Sequence[Path] = (),
    tolerance: float | None = None,
    progress: Progress = lambda _: None,
) -> RerunResult:
    """Re-run a verified original run; the new bundle is signed and stored."""
    store = Store(settings.home)
    inputs = prepare(original, settings, search_dirs=search_dirs, progress=progress)
    # the original must be in the store, so the new attempt gets a new run id
    if not store.bundle_path(original.digest).is_dir():
        progress(f"importing the original bundle {original.digest[:19]}… into the store")
        try:
            import_into_store(original.path, store)
        except StoreConflict:
            # the same lock already ran here as this attempt: its run id is taken either way
            progress(f"run id {original.run_id} is already stored here as another bundle")
    reproduction_of = ReproductionOf(
        run_id=original.run_id,
        bundle_digest=original.digest,
        outcome=original.predicate.outcome,
        lock_digest=original.predicate.lock_digest,
        signer_keyid=original.keyid,
        notes=original.notes,
    )
    judged: list[Reproduction] = []

    def annotate(predicate: RunPredicate) -> RunPredicate:
        repro = judge_reproduction(original.predicate, predicate, tolerance)
        judged.append(repro)
        return predicate.model_copy(
            update={"reproduction_of": reproduction_of, "reproduction": repro.record(tolerance)}
        )

    with workspace(original, inputs, store) as spec_path:
        outcome = run_evaluation(
            spec_path, backend, signer, settings, rerun=True, progress=progress, annotate=annotate
        )
    if not judged:  # the run was not new (cannot happen with rerun=True); judge it anyway
        judged.append(judge_reproduction(original.predicate, outcome.predicate, tolerance))
    repro = judged[0]
    if not evaluated(outcome.outcome):
        code = outcome.exit_code
    elif repro.verdict in REPRODUCED:
        code = 0
    else:
        code = 6
    return RerunResult(original=original, outcome=outcome, reproduction=repro, exit_code=code)


@dataclass
class RerunFailure:
    """Why a re-run could not happen or did not reproduce (for audits)."""

    run_id: str
    category: str
    detail: str
    error: dict[str, object] = field(default_factory=dict)


def failure_category(exc: EvalrunError) -> str:
    """A short name for why a re-run did not happen."""
    if isinstance(exc, InputsUnavailable):
        return "missing_artifact"
    if isinstance(exc, ImageUnavailable):
        return "image_unavailable"
    return exc.kind


__all__ = [
    "ImageUnavailable",
    "InputResolver",
    "InputsUnavailable",
    "Original",
    "Reproduction",
    "RerunResult",
    "evaluated",
    "failure_category",
    "judge_reproduction",
    "load_original",
    "prepare",
    "rerun",
    "resolve_inputs",
]

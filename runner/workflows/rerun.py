"""Re-run a historical evaluation by digest, and judge whether it reproduced.

Order of events: verify the original bundle with the public key (refuse if it
does not verify) → take its ``spec.yaml`` and ``eval.lock.json`` (their digests
must be the ones its signed predicate names) → resolve every input to a file
with the pinned sha256 (refusing, with the full list, any that cannot be) →
check the pinned image digest is still in the registry → run the same lock
again as a new attempt → add to the new, signed predicate a link to the
original (``reproduction_of``) and a verdict per metric (``reproduction``).

Inputs are found by digest (:class:`~runner.workflows.inputs.InputResolver`): in the
input cache (``$EVALRUN_CACHE/inputs``), in each ``--inputs DIR`` (and
``$EVALRUN_INPUTS``, ``:``-separated), else fetched from the OCI artifact the lock says
each input was published as — so a re-run on an empty machine needs only the registry.
Every byte is checked against the locked digest before it enters the cache; an input
altered where it was published is refused before anything starts (exit 3).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from runner._internal.files import RefusedFile
from runner._internal.settings import Settings
from runner.adapters.registry import ImageName, manifest_exists
from runner.bundle.reader import predicate_of
from runner.bundle.signing import Signer, Verifier
from runner.bundle.store import Store, StoreConflict
from runner.bundle.verify import verify_bundle
from runner.errors import (
    EvalrunError,
    ImageUnavailable,
    InfrastructureError,
    InputError,
    InputsUnavailable,
    IntegrityError,
)
from runner.model.base import parse_digest_ref
from runner.model.lock import MAX_LOCK_BYTES, LockedSpec, parse_lock_bytes
from runner.model.outcome import Outcome
from runner.model.plan import Backend
from runner.model.predicate import (
    ReproducedMetric,
    ReproductionOf,
    ReproductionRecord,
    ReproductionVerdict,
    RunPredicate,
)
from runner.model.spec import EvalSpec, load_spec_bytes
from runner.model.spec_yaml import MAX_SPEC_BYTES
from runner.workflows.custom_metrics import BUNDLE_DIR as CUSTOM_METRICS_DIR
from runner.workflows.diff import MetricDelta, compare_metrics, overall_verdict
from runner.workflows.inputs import (
    InputResolver,
    Published,
    TransferProgress,
    UnresolvedInput,
    WantedInput,
    wanted_inputs,
)
from runner.workflows.run import RunOutcome, run_evaluation

Progress = Callable[[str], None]
REPRODUCED = ("identical", "within_tolerance", "within_ci")
# the evaluation's own verdicts; any other outcome is reported with its own exit code
_EVALUATED_EXITS = frozenset({Outcome.PASSED.exit_code, Outcome.THRESHOLDS_FAILED.exit_code})


def evaluated(outcome: Outcome) -> bool:
    """Whether ``outcome`` is a verdict on the evaluation (exit 0 or 6), not a failure to run."""
    return outcome.exit_code in _EVALUATED_EXITS


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


def search_dirs_from_env() -> list[Path]:
    """``$EVALRUN_INPUTS``: extra input directories, ``:``-separated."""
    value = os.environ.get("EVALRUN_INPUTS", "")
    return [Path(p).expanduser() for p in value.split(":") if p]


def resolve_inputs(
    original: Original, resolver: InputResolver
) -> dict[WantedInput, Path | Published]:
    """Every input of ``original`` in the cache, or an error listing all that are not.

    InputsUnavailable (exit 3) lists each input no source delivered, and why (an input
    altered where it was published included); when every one of them failed only
    because a source stayed unreachable, InfrastructureError (exit 5) instead.
    """
    found: dict[WantedInput, Path | Published] = {}
    missing: list[UnresolvedInput] = []
    for want in wanted_inputs(original.lock):
        result = resolver.resolve(want)
        if isinstance(result, UnresolvedInput):
            missing.append(result)
        else:
            found[want] = result
    if missing:
        if all(isinstance(m.error, InfrastructureError) for m in missing) and not any(
            isinstance(m.error, IntegrityError) for m in missing
        ):
            raise InfrastructureError(
                f"cannot re-run {original.run_id}: "
                + "; ".join(f"{m.wanted.what}: {m.reason}" for m in missing),
                hint="the registry holding the inputs is unreachable; try again when it is up",
            )
        raise InputsUnavailable(original.run_id, missing)
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
def workspace(original: Original, store: Store) -> Iterator[Path]:
    """A scratch spec directory holding the original spec, lock, preprocessing code and
    custom metric files.

    Yields the spec path. The inputs are not placed there: the run finds them by digest
    in the input cache, where :func:`prepare` put them.
    """
    store.tmp_dir.mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="rerun-", dir=store.tmp_dir))
    try:
        (root / "eval.yaml").write_bytes(original.spec_bytes)
        (root / "eval.lock.json").write_bytes(original.lock_bytes)
        # Preprocessing code travels in the bundle (signed); put it back where the spec
        # names it. The lock's code digests are checked again before the run starts.
        for folder in ("preprocessing", CUSTOM_METRICS_DIR):
            carried = original.path / folder
            if carried.is_dir():
                shutil.copytree(carried, root, dirs_exist_ok=True)
        yield root / "eval.yaml"
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
    transfer: TransferProgress | None = None,
    remote: bool = False,
) -> dict[WantedInput, Path | Published]:
    """Everything a re-run needs, checked: each input by digest, the image in its registry.

    Inputs not cached are fetched by digest (``transfer`` follows the bytes) — or with
    ``remote`` (a backend whose nodes pull them) only checked to be published. Raises
    InputsUnavailable or ImageUnavailable (exit 3), or InfrastructureError (exit 5)
    when the registry stays unreachable; starts nothing.
    """
    for note in original.notes:
        progress(f"note: {note}")
    resolver = InputResolver(
        settings,
        [*search_dirs, *search_dirs_from_env()],
        progress=progress,
        transfer=transfer,
        remote=remote,
    )
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
    transfer: TransferProgress | None = None,
) -> RerunResult:
    """Re-run a verified original run; the new bundle is signed and stored."""
    store = Store(settings.home)
    prepare(
        original,
        settings,
        search_dirs=search_dirs,
        progress=progress,
        transfer=transfer,
        remote=backend.pulls_inputs,
    )
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

    with workspace(original, store) as spec_path:
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
    "UnresolvedInput",
    "WantedInput",
    "evaluated",
    "failure_category",
    "judge_reproduction",
    "load_original",
    "prepare",
    "rerun",
    "resolve_inputs",
    "wanted_inputs",
]

"""Setting up a run: the spec and its lock, inputs re-hashed on the host, preprocessing
carried and checked, the plan, and which attempt a run is."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from runner._internal.settings import Settings
from runner.adapters.sources import SourceOptions, source_options
from runner.bundle.store import Store, StoredBundle
from runner.errors import DigestMismatch, SpecError
from runner.model.lock import LockedSpec, load_lock, lock_path_for
from runner.model.outcome import Outcome
from runner.model.plan import Backend, PlanInput, RunPlan
from runner.model.spec import EvalSpec, load_spec
from runner.shared.run_ids import run_id_for
from runner.workflows.inputs import InputResolver, TransferProgress, WantedInput, host_inputs

if TYPE_CHECKING:  # the predicate's models load while the run's sandbox runs (workflows.run)
    from runner.model.predicate import JsonObject, RunPredicate

Progress = Callable[[str], None]


def backend_target(backend: Backend) -> str | None:
    """What, besides the lock and the attempt, makes a run on ``backend`` this run.

    A backend may say where it runs (``run_target``: for Kubernetes the API server and
    the namespace); one that does not (the local Docker engine) is the embedded default.
    """
    target = getattr(backend, "run_target", None)
    return target if isinstance(target, str) and target else None


def load_locked(spec_path: Path, spec: EvalSpec | None = None) -> tuple[EvalSpec, LockedSpec]:
    """Spec plus its lock; refuse a lock that belongs to a different spec.

    ``spec`` is the spec as the caller already loaded it from ``spec_path`` (not read again).
    """
    if spec is None:
        spec = load_spec(spec_path)
    lock_path = lock_path_for(spec_path)
    lock = load_lock(lock_path)
    if lock.spec_digest != spec.digest():
        raise SpecError(
            "the lock does not match the spec (the spec changed since it was locked)",
            file=str(lock_path),
            problems=[("spec_digest", f"lock has {lock.spec_digest}, spec is {spec.digest()}")],
            hint=f"run `evalrun lock {spec_path}` to resolve the inputs again",
        )
    return spec, lock


def _check_inputs_on_host(
    spec_dir: Path,
    lock: LockedSpec,
    settings: Settings,
    *,
    spec: EvalSpec | None = None,
    progress: Progress = lambda _: None,
    transfer: TransferProgress | None = None,
    remote: bool = False,
) -> list[PlanInput]:
    """Every input verified in the cache before any container: local ones re-hashed now.

    A local input edited since the lock stops the run (exit 3); one that is gone, or a
    remote one not cached here, is fetched by digest from where the lock says it was
    published (see :mod:`runner.workflows.inputs`) — or, with ``remote`` (a backend
    whose nodes pull inputs), only checked to be in the registry.
    """
    by_name = {"model": spec.model} if spec else {}
    if spec:
        by_name |= {f"dataset {d.name}": d for d in spec.datasets}

    def options(want: WantedInput) -> SourceOptions:
        declared = by_name.get(want.what)
        if declared is None:
            return SourceOptions(s3_endpoint=want.locked.endpoint)
        return source_options(declared, spec_dir)

    resolver = InputResolver(
        settings,
        spec_dir=spec_dir,
        options=options,
        progress=progress,
        transfer=transfer,
        remote=remote,
    )
    return host_inputs(lock, resolver)


def _carry_preprocessing(spec: EvalSpec, spec_dir: Path, dest: Path) -> None:
    """Copy the declared preprocessing code into the bundle, so a re-run can replay it."""
    for step in spec.preprocessing:
        src = spec_dir / step.code
        target = dest / step.code
        target.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(
                src, target, symlinks=False, ignore=shutil.ignore_patterns("__pycache__", "*.pyc")
            )
        elif src.is_file():
            shutil.copy2(src, target)


def _check_preprocessing(steps: list[JsonObject], lock: LockedSpec) -> None:
    """The preprocessing code found now must be the code that was locked."""
    locked = {p.name: p.code_digest for p in lock.preprocessing}
    for step in steps:
        # PreprocessingRecord JSON (runner.build.provenance): these are strings
        name, found = str(step["name"]), str(step["code_digest"])
        expected = locked.get(name)
        if expected != found:
            raise DigestMismatch(
                f"preprocessing step {name} ({step['code']})",
                expected=expected or "not in the lock",
                found=found,
                hint="the preprocessing code changed since it was locked; re-lock deliberately",
            )


def make_plan(
    spec: EvalSpec,
    lock: LockedSpec,
    inputs: list[PlanInput],
    attempt: int,
    target: str | None = None,
    *,
    verify_rootfs: Literal["used", "full"] | None = None,
) -> RunPlan:
    """The run's plan; ``verify_rootfs`` (``--verify-rootfs``) wins over the spec's."""
    return RunPlan(
        run_id=run_id_for(lock.digest(), attempt, target),
        attempt=attempt,
        image_ref=lock.image.ref,
        expected_rootfs_digest=lock.image.rootfs_digest,
        runtime=spec.sandbox.runtime,
        network=spec.sandbox.network,
        command=list(spec.command),
        params=dict(spec.params),
        seed=spec.seed,
        metrics=[m.definition() for m in spec.metrics if m.custom is None],
        custom_metrics=[m.definition() for m in spec.metrics if m.custom is not None],
        perturbations=[x.model_dump(mode="json") for x in spec.perturbations],
        expect=spec.expect.model_dump(mode="json"),
        inputs=inputs,
        timeout_s=spec.timeout_s,
        cpus=spec.resources.cpus,
        memory_mib=spec.resources.memory_mib,
        pids=spec.resources.pids,
        gpus=spec.resources.gpus,
        results_mib=spec.resources.results_mib,
        retries=spec.retries,
        gpu_product=spec.resources.gpu_product,
        gpu_driver_major=spec.resources.gpu_driver_major,
        mig_profile=spec.resources.mig_profile,
        runtime_class=spec.sandbox.runtime_class,
        verify_rootfs=verify_rootfs or spec.sandbox.verify_rootfs,
        queue=spec.cluster.queue,
        priority_class=spec.cluster.priority_class,
        image_pull_secrets=list(spec.cluster.image_pull_secrets),
        spec_digest=spec.digest(),
        lock_digest=lock.digest(),
        spec_name=spec.metadata.name,
    )


def _made_by(found: StoredBundle, backend: str) -> bool:
    """Whether a stored run was made by ``backend`` (runs before v2 ids: any backend)."""
    made_by = _load_predicate(found.path).backend
    return made_by is None or made_by == backend


def _current_attempt(store: Store, lock_digest: str, backend: str, target: str | None) -> int:
    """The attempt a plain run attaches to: the first one not ended by infrastructure/Ctrl-C.

    A run made by another backend under the same id (a Kubernetes run from before the
    target was part of the id) is another run: it is skipped, never returned.
    """
    attempt = 0
    while (found := store.find_run(run_id_for(lock_digest, attempt, target))) is not None:
        outcome = Outcome.parse(found.outcome)
        # runs that never got to evaluate: a plain `evalrun run` tries again
        if (outcome is None or not outcome.retryable) and _made_by(found, backend):
            return attempt
        attempt += 1
    return attempt


def choose_attempt(
    store: Store, lock_digest: str, backend: str, target: str | None, *, rerun: bool
) -> int:
    """The attempt a run is: a new one with ``rerun``, else the one a plain run attaches to."""
    if rerun:
        return _next_attempt(store, lock_digest, target)
    return _current_attempt(store, lock_digest, backend, target)


def _next_attempt(store: Store, lock_digest: str, target: str | None) -> int:
    """A free attempt: the first one after the stored ones. Attempts are stored in order
    (each the first free one), so it is found by doubling, then halving, the step: a
    lookup reads and checks an index entry (~0.3 ms), and a spec re-run nightly for a
    year has 365 of them."""

    def taken(attempt: int) -> bool:
        return store.find_run(run_id_for(lock_digest, attempt, target)) is not None

    if not taken(0):
        return 0
    stored, free = 0, 1
    while taken(free):
        stored, free = free, free * 2
    while free - stored > 1:
        middle = (stored + free) // 2
        if taken(middle):
            stored = middle
        else:
            free = middle
    return free


def stage_run_files(spec_path: Path, spec: EvalSpec, stage: Path) -> None:
    """What every run bundle carries from the spec's folder: spec, lock, preprocessing code."""
    shutil.copy2(spec_path, stage / "spec.yaml")
    shutil.copy2(lock_path_for(spec_path), stage / "eval.lock.json")
    _carry_preprocessing(spec, spec_path.resolve().parent, stage / "preprocessing")


def _load_predicate(bundle_dir: Path) -> RunPredicate:
    from runner.bundle.reader import expect_kind, read_predicate
    from runner.model.predicate import RunPredicate

    return expect_kind(read_predicate(bundle_dir), RunPredicate, bundle_dir)

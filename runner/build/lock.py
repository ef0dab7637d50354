"""``evalrun lock``: every input of a spec resolved to a digest, the image built, the lock written.

The model and datasets are checked against their pinned sha256 (:func:`lock_inputs`); the
base image, wheels and evaluation image are resolved or built (reusing the previous lock's
when their inputs did not change); the result is written atomically as ``eval.lock.json``.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import os
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from runner._internal import oci
from runner._internal.settings import Settings
from runner._internal.tree import sha256_file
from runner.adapters import registry
from runner.adapters.docker_engine import connect
from runner.build.base_image import ensure_base_image
from runner.build.context import BUILD_EPOCH, BuildInputs, build_inputs_for, tree_digest
from runner.build.image import BuiltImage, build_image, measure_rootfs
from runner.build.package_files import agent_digest
from runner.build.provenance import preprocessing_records
from runner.build.wheels import cached_wheel, normalize_project_name, resolve_wheels
from runner.errors import DigestMismatch, EvalrunError, InputError, SpecError
from runner.model.spec import (
    EvalSpec,
    LockedArtifact,
    LockedBase,
    LockedDataset,
    LockedImage,
    LockedPreprocessing,
    LockedSource,
    LockedSpec,
    LockedWheel,
    load_lock,
    lock_path_for,
    parse_digest_ref,
)

log = logging.getLogger("evalrun.build")
Progress = Callable[[str], None]


def _noop(_: str) -> None:
    return None


def resolve_input(spec_dir: Path, uri: str, field: str) -> Path:
    """A spec input path (relative to the spec, or file://) as a real local file."""
    raw = uri.removeprefix("file://")
    if "://" in raw:
        raise InputError(f"{field}: only local files and file:// URIs are supported, found {uri!r}")
    path = (spec_dir / raw).resolve()
    if not path.is_file():
        raise InputError(f"{field}: file not found", file=str(path), uri=uri)
    return path


def lock_artifact(spec_dir: Path, uri: str, expected: str, field: str) -> LockedArtifact:
    path = resolve_input(spec_dir, uri, field)
    found = sha256_file(path)
    if found != expected:
        raise DigestMismatch(
            field,
            expected=expected,
            found=found,
            path=str(path),
            hint="the file changed since the spec was written; check its origin",
        )
    return LockedArtifact(
        path=os.path.relpath(path, spec_dir), sha256=found, size=path.stat().st_size
    )


def git_source(path: Path) -> tuple[str | None, bool]:
    """(commit, dirty) of the git checkout holding ``path``; (None, False) outside git."""

    def git(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["git", "-C", str(path), *args], capture_output=True, text=True, check=False
        )

    head = git("rev-parse", "HEAD")
    if head.returncode != 0:
        return None, False
    status = git("status", "--porcelain", "--untracked-files=normal", "--", ".")
    return head.stdout.strip(), bool(status.stdout.strip())


def _resolve_base(
    spec: EvalSpec, settings: Settings, client: Any | None, progress: Progress
) -> LockedBase:
    assert spec.image.base
    if "@" in spec.image.base:
        repo, digest = parse_digest_ref(spec.image.base)
        if not registry.manifest_exists(registry.ImageName.parse(repo), digest):
            raise InputError(f"image.base {spec.image.base} is not in its registry")
        return LockedBase(ref=spec.image.base)
    return ensure_base_image(spec.image.base, settings, client, progress)


def lock_inputs(spec: EvalSpec, spec_dir: Path) -> tuple[LockedArtifact, list[LockedDataset]]:
    """The model and datasets of ``spec``, each checked against its pinned sha256."""
    model = lock_artifact(spec_dir, spec.model.uri, spec.model.sha256, "model")
    datasets = []
    for i, ds in enumerate(spec.datasets):
        art = lock_artifact(spec_dir, ds.uri, ds.sha256, f"datasets[{i}] ({ds.name})")
        datasets.append(
            LockedDataset(
                **art.model_dump(),
                name=ds.name,
                split=ds.split,
                license=ds.license,
                source=ds.source,
            )
        )
    return model, datasets


def lock_spec(
    spec: EvalSpec,
    spec_path: Path,
    settings: Settings,
    *,
    progress: Progress = _noop,
    rebuild: bool = False,
) -> tuple[LockedSpec, BuiltImage | None]:
    """Resolve every input of ``spec`` to a digest, build the image, write the lock."""
    spec_dir = spec_path.resolve().parent
    model, datasets = lock_inputs(spec, spec_dir)
    commit, dirty = git_source(spec_dir)
    client = None
    built: BuiltImage | None = None
    if spec.image.ref:
        repo, digest = parse_digest_ref(spec.image.ref)
        if not registry.manifest_exists(registry.ImageName.parse(repo), digest):
            raise InputError(f"image.ref {spec.image.ref} is not in its registry")
        client = connect()
        base = None
        wheels: list[LockedWheel] = []
        image = LockedImage(
            ref=spec.image.ref, rootfs_digest=measure_rootfs(client, spec.image.ref, "runc")
        )
        tree = hashlib.sha256(b"").hexdigest()
    else:
        previous = _previous_lock(spec_path)
        base = _resolve_base(spec, settings, client, progress)
        wheels = _reuse_or_resolve_wheels(spec, previous, settings, progress)
        inputs = build_inputs_for(spec, spec_dir, base, wheels)
        tree = tree_digest(inputs.context)
        image_or_none = None if rebuild else _reusable_image(previous, inputs)
        if image_or_none is None:
            built = build_image(inputs, settings, progress=progress)
            image = LockedImage(
                ref=built.ref,
                rootfs_digest=built.rootfs_digest,
                template_sha256=sha256_file(inputs.template),
                context_sha256=tree,
                inputs_digest=built.inputs_digest,
                built_at=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
                assembly=oci.ASSEMBLY_SCHEME,
                agent_sha256=agent_digest(),
                source_date_epoch=BUILD_EPOCH,
                config_digest=built.config_digest,
                layers=list(built.layers),
            )
        else:
            image = image_or_none
            built = BuiltImage(
                ref=image.ref,
                rootfs_digest=image.rootfs_digest,
                inputs_digest=image.inputs_digest or "",
                skipped=True,
            )
            progress(f"image unchanged: {image.ref}")
    lock = LockedSpec(
        spec_name=spec.metadata.name,
        spec_digest=spec.digest(),
        base=base,
        wheels=wheels,
        image=image,
        model=model,
        datasets=datasets,
        source=LockedSource(commit=commit, dirty=dirty, tree_sha256=tree),
        preprocessing=[
            LockedPreprocessing.model_validate(step)
            for step in preprocessing_records(spec, spec_path.resolve().parent)
        ],
    )
    write_lock(lock, lock_path_for(spec_path))
    return lock, built


def _previous_lock(spec_path: Path) -> LockedSpec | None:
    path = lock_path_for(spec_path)
    if not path.exists():
        return None
    try:
        return load_lock(path)
    except SpecError:
        log.warning(
            "ignoring unreadable previous lock", extra={"event": "lock_ignored", "file": str(path)}
        )
        return None


def _reuse_or_resolve_wheels(
    spec: EvalSpec, previous: LockedSpec | None, settings: Settings, progress: Progress
) -> list[LockedWheel]:
    """Keep the previous lock's wheels when the requirements still match and are cached."""
    if previous is not None and previous.wheels:
        pinned = {
            normalize_project_name(r.split("==")[0]): r.split("==")[1]
            for r in spec.image.requirements
        }
        have = {w.name: w.version for w in previous.wheels}
        if all(have.get(n) == v for n, v in pinned.items()):
            try:
                for w in previous.wheels:
                    cached_wheel(w, settings)
                return list(previous.wheels)
            except EvalrunError:
                pass
    return resolve_wheels(spec.image.requirements, settings, progress)


def _reusable_image(previous: LockedSpec | None, inputs: BuildInputs) -> LockedImage | None:
    """The previous lock's image when its build inputs are unchanged and it is still pushed."""
    if previous is None or previous.image.inputs_digest != inputs.digest():
        return None
    repo, digest = parse_digest_ref(previous.image.ref)
    if not registry.manifest_exists(registry.ImageName.parse(repo), digest):
        return None
    return previous.image


def write_lock(lock: LockedSpec, path: Path) -> None:
    """Write the lock atomically (temp file + rename): never half-written."""
    data = json.dumps(lock.model_dump(mode="json", by_alias=True), indent=2, sort_keys=True) + "\n"
    fd, tmp = tempfile.mkstemp(prefix=".eval.lock.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        Path(tmp).replace(path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise

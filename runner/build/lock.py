"""``evalrun lock``: every input of a spec resolved to a digest, the image built, the lock written.

The model and datasets are fetched where remote, checked against their pinned digest and
cached by content (:func:`lock_inputs`), then published by digest as OCI artifacts next
to the image (:func:`publish_inputs`); the base image, wheels and evaluation image are
resolved or built (reusing the previous lock's when their inputs did not change); the
result is written atomically as ``eval.lock.json``.
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Required, TypedDict

from runner._internal import oci
from runner._internal.cas import ContentStore
from runner._internal.files import read_regular_file
from runner._internal.input_tree import scan_tree
from runner._internal.settings import Settings
from runner._internal.strict_json import load_json_strict
from runner._internal.tree import sha256_file
from runner.adapters import registry
from runner.adapters.docker_engine import connect
from runner.adapters.input_artifacts import inputs_repository, oci_resolver, publish_input
from runner.adapters.sources import AcquiredInput, acquire, source_options
from runner.adapters.sources import Progress as TransferCallback
from runner.build.base_image import ensure_base_image
from runner.build.context import BUILD_EPOCH, BuildInputs, build_inputs_for, tree_digest
from runner.build.custom_metrics import custom_metric_records
from runner.build.image import BuiltImage, build_image, measure_rootfs
from runner.build.package_files import agent_digest
from runner.build.preprocessing import preprocessing_records
from runner.build.wheels import (
    cached_wheel,
    normalize_project_name,
    remembered_wheels,
    resolve_wheels,
)
from runner.errors import DigestMismatch, EvalrunError, InputError, SpecError
from runner.model.base import parse_digest_ref
from runner.model.input_uri import LocalUri, parse_input_uri
from runner.model.lock import (
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
)
from runner.model.spec import ArtifactSpec, DatasetSpec, EvalSpec

log = logging.getLogger("evalrun.build")
Progress = Callable[[str], None]
TransferProgress = Callable[[str], TransferCallback | None]
"""``transfer(what)``: a ``(done_bytes, total_bytes)`` callback following one transfer
(``what`` says which, e.g. ``model: fetching``), or None not to follow it."""


def _noop(_: str) -> None:
    return None


def _field_of(role: str, index: int | None, name: str | None) -> str:
    return "model" if role == "model" else f"datasets[{index}] ({name})"


def check_local_input(spec_dir: Path, uri: str, expected: str, field: str) -> None:
    """Check a local input (file or directory) against its pin without caching it.

    Remote inputs are left alone (``evalrun lock`` fetches them). DigestMismatch (exit 3)
    for other bytes, InputError (exit 2) for a missing input or an escaping entry.
    """
    parsed = parse_input_uri(uri, field=f"{field}.uri")
    if not isinstance(parsed, LocalUri):
        return
    path = parsed.resolve(spec_dir)
    if path.is_dir():
        found = scan_tree(path, what=field).digest
    elif path.is_file():
        found = "sha256:" + sha256_file(path)
    else:
        raise InputError(f"{field}: input not found", path=str(path), uri=uri)
    if found != f"sha256:{expected.removeprefix('sha256:')}":
        raise DigestMismatch(
            field,
            expected=f"sha256:{expected.removeprefix('sha256:')}",
            found=found,
            path=str(path),
            hint="the input changed since the spec was written; check its origin",
        )


@dataclass(frozen=True)
class LockedInput:
    """One input as ``evalrun lock`` resolved it: the lock's record and the cached content."""

    role: Literal["model", "dataset"]
    field: str
    locked: LockedArtifact
    acquired: AcquiredInput

    @property
    def name(self) -> str:
        return self.locked.name if isinstance(self.locked, LockedDataset) else "model"


class _InputRecord(TypedDict, total=False):
    """A locked input as fetched, before its model checks it (LockedArtifact/LockedDataset)."""

    kind: Required[Literal["file", "directory"]]
    sha256: Required[str]
    size: Required[int]
    files: Required[list[dict[str, str | int]]]
    path: str
    uri: str
    endpoint: str | None
    name: str
    split: str
    license: str
    source: str


def lock_input(
    artifact: ArtifactSpec,
    *,
    role: Literal["model", "dataset"],
    field: str,
    spec_dir: Path,
    store: ContentStore,
    transfer: TransferProgress | None = None,
) -> LockedInput:
    """Fetch (if remote), verify and cache one input; its lock record (not yet published)."""
    got = acquire(
        artifact.uri,
        artifact.sha256,
        field=field,
        spec_dir=spec_dir,
        store=store,
        progress=transfer(field) if transfer else None,
        options=source_options(artifact, spec_dir),
        oci=oci_resolver(),
    )
    record: _InputRecord = {
        "kind": got.kind,
        "sha256": got.sha256,
        "size": got.size,
        "files": [{"path": f.path, "sha256": f.sha256, "size": f.size} for f in got.files],
    }
    if isinstance(parse_input_uri(artifact.uri, field=f"{field}.uri"), LocalUri):
        record["path"] = got.source
    else:
        record["uri"] = got.source
        record["endpoint"] = got.endpoint
    if isinstance(artifact, DatasetSpec):
        record["name"] = artifact.name
        record["split"] = artifact.split
        record["license"] = artifact.license
        record["source"] = artifact.source
        return LockedInput(role, field, LockedDataset.model_validate(record), got)
    return LockedInput(role, field, LockedArtifact.model_validate(record), got)


def lock_inputs(
    spec: EvalSpec,
    spec_dir: Path,
    store: ContentStore,
    *,
    transfer: TransferProgress | None = None,
) -> list[LockedInput]:
    """The model and every dataset of ``spec``: fetched, verified against their pins, cached.

    Errors name the input: DigestMismatch (exit 3) for other bytes than pinned, before
    any container; InputError (exit 2) for a bad URI, a missing input or a directory
    entry that escapes its root; InfrastructureError (exit 5) for a source that stays
    unreachable after bounded retries.
    """
    found = [
        lock_input(
            spec.model,
            role="model",
            field="model",
            spec_dir=spec_dir,
            store=store,
            transfer=transfer,
        )
    ]
    for i, ds in enumerate(spec.datasets):
        found.append(
            lock_input(
                ds,
                role="dataset",
                field=_field_of("dataset", i, ds.name),
                spec_dir=spec_dir,
                store=store,
                transfer=transfer,
            )
        )
    return found


def image_repository(spec: EvalSpec) -> str:
    """The repository the evaluation image lives in (known before it is built)."""
    if spec.image.ref:
        return parse_digest_ref(spec.image.ref)[0]
    return f"{spec.image.repository}/{spec.metadata.name}"


def publish_inputs(
    inputs: list[LockedInput],
    repository: str,
    store: ContentStore,
    *,
    progress: Progress = _noop,
    transfer: TransferProgress | None = None,
) -> list[LockedInput]:
    """Publish every input by digest next to the image; each lock record names its artifact."""
    target = inputs_repository(repository)
    published = []
    for item in inputs:
        locked = item.locked
        notes = {"role": item.role, "name": item.name}
        if isinstance(locked, LockedDataset):
            notes |= {"split": locked.split, "license": locked.license, "source": locked.source}
        pub = publish_input(
            store,
            target,
            kind=locked.kind,
            digest=locked.digest,
            files=item.acquired.files,
            annotations=notes,
            progress=transfer(f"{item.field}: publishing") if transfer else None,
        )
        how = "already there" if pub.already_present else f"{_mib(pub.uploaded_bytes)} uploaded"
        progress(f"{item.field}: published as {pub.reference} ({how})")
        record = locked.model_dump(mode="json") | {"artifact": pub.reference}
        published.append(
            LockedInput(item.role, item.field, type(locked).model_validate(record), item.acquired)
        )
    return published


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB"


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


def lock_spec(
    spec: EvalSpec,
    spec_path: Path,
    settings: Settings,
    *,
    progress: Progress = _noop,
    rebuild: bool = False,
    transfer: TransferProgress | None = None,
) -> tuple[LockedSpec, BuiltImage | None]:
    """Resolve every input of ``spec`` to a digest, build the image, write the lock.

    Inputs are fetched and verified into the content-addressed cache at
    ``settings.input_cache``, then published by digest as OCI artifacts next to the
    image (each lock record names its artifact); ``transfer(what)`` may return a
    ``(done, total)`` callback to follow large transfers (the CLI draws a bar).
    """
    spec_dir = spec_path.resolve().parent
    # a custom metric file that is missing or lacks its function is refused before any work
    custom_metrics = custom_metric_records(spec, spec_path)
    store = ContentStore(settings.input_cache)
    locked_inputs = lock_inputs(spec, spec_dir, store, transfer=transfer)
    for item in locked_inputs:
        progress(
            f"{item.field}: {item.locked.kind} {item.locked.digest[:19]}… "
            f"({_mib(item.locked.size)}, {len(item.acquired.files)} file(s)) verified"
        )
    locked_inputs = publish_inputs(
        locked_inputs, image_repository(spec), store, progress=progress, transfer=transfer
    )
    model = locked_inputs[0].locked
    datasets = [i.locked for i in locked_inputs[1:] if isinstance(i.locked, LockedDataset)]
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
        cache_key = _image_cache_key(spec, inputs)
        image_or_none = (
            None
            if rebuild
            else _reusable_image(previous, inputs) or _cached_image(settings, cache_key, inputs)
        )
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
            _remember_image(settings, cache_key, image)
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
        custom_metrics=custom_metrics,
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
    remembered = remembered_wheels(spec.image.requirements, settings)
    if remembered is not None:
        progress(f"wheels: {len(remembered)} resolved earlier, all cached")
        return remembered
    return resolve_wheels(spec.image.requirements, settings, progress)


def _reusable_image(previous: LockedSpec | None, inputs: BuildInputs) -> LockedImage | None:
    """The previous lock's image when its build inputs are unchanged and it is still pushed."""
    if previous is None or previous.image.inputs_digest != inputs.digest():
        return None
    repo, digest = parse_digest_ref(previous.image.ref)
    if not registry.manifest_exists(registry.ImageName.parse(repo), digest):
        return None
    return previous.image


def _image_cache_key(spec: EvalSpec, inputs: BuildInputs) -> str:
    """What names a built image in the cache: its build inputs, its repository and the
    spec name its Dockerfile is rendered with (two specs never share a cached image)."""
    text = f"evalrun-image-cache/v1\n{inputs.digest()}\n{image_repository(spec)}\n"
    return hashlib.sha256((text + spec.metadata.name).encode()).hexdigest()


def _image_cache_path(settings: Settings, key: str) -> Path:
    return settings.cache / "images" / f"{key}.json"


def _remember_image(settings: Settings, key: str, image: LockedImage) -> None:
    """Record a built image under its cache key, so a later lock with the same image
    inputs reuses it without a previous lock (a fresh checkout, another copy of a spec).
    Best effort: a cache that cannot be written only costs a rebuild later."""
    path = _image_cache_path(settings, key)
    data = json.dumps(image.model_dump(mode="json", exclude_none=True), sort_keys=True)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".image.", dir=path.parent)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(data + "\n")
        Path(tmp).replace(path)
    except OSError as exc:
        log.warning(
            "image cache not written",
            extra={"event": "image_cache_unwritable", "file": str(path), "error": str(exc)},
        )


def _cached_image(settings: Settings, key: str, inputs: BuildInputs) -> LockedImage | None:
    """The image built earlier from the same inputs (the host's image cache), if it is
    still in its registry; None for no record, an unreadable one or a different build."""
    path = _image_cache_path(settings, key)
    try:
        data = read_regular_file(path, max_bytes=1 << 20)
        image = LockedImage.model_validate(load_json_strict(data))
    except (OSError, EvalrunError, ValueError):
        return None
    if image.inputs_digest != inputs.digest() or image.agent_sha256 != agent_digest():
        return None
    repo, digest = parse_digest_ref(image.ref)
    if not registry.manifest_exists(registry.ImageName.parse(repo), digest):
        return None
    return image


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

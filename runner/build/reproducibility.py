"""``evalrun build --check``: rebuild a locked image from nothing and say what differs.

See docs/reproducible-images.md. The report lists every file (path, type, mode, owner,
size, sha256), config field and layer that differs and which Debian packages moved; the
result is recorded in the lock, and from there in every bundle of the image.
"""

from __future__ import annotations

import datetime as dt
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Literal, NotRequired, TypedDict

from runner._internal import image_contents, oci
from runner._internal.settings import Settings
from runner._internal.strict_json import load_json_strict
from runner._internal.tree import sha256_file
from runner.adapters import registry, registry_blobs
from runner.adapters.docker_engine import connect
from runner.build.base_image import (
    assemble_base,
    base_tag,
    base_tar_path,
    build_base_tar,
    load_recipe,
)
from runner.build.context import BUILD_EPOCH, BuildInputs, build_inputs_for, tree_digest
from runner.build.image import build_image, push_image
from runner.build.lock import write_lock
from runner.build.package_files import agent_digest
from runner.errors import InputError
from runner.model.base import parse_digest_ref
from runner.model.lock import LockedSpec, Reproducibility, load_lock, lock_path_for
from runner.model.spec import EvalSpec

Progress = Callable[[str], None]


class InputChange(TypedDict):
    """A build input from the checkout (not the registry) that moved since the lock."""

    input: str
    expected: str | None
    found: str


class LayerChange(TypedDict):
    """A layer position whose digest differs (None: the image has no layer there)."""

    index: int
    expected: str | None
    found: str | None


class ImageDiff(TypedDict):
    """What differs between two pushed images (config fields under ``rootfs.`` left out)."""

    layers: list[LayerChange]
    config: list[image_contents.FieldChange]
    files: list[image_contents.FileChange]


class CheckReport(TypedDict):
    """The report of ``evalrun build --check`` (printed by ``--json`` as it is)."""

    result: Literal["identical", "differs"]
    inputs_changed: list[InputChange]
    image_identical: bool
    locked_image: str
    rebuilt_image: str
    base_identical: bool
    locked_base: str
    rebuilt_base: str
    from_scratch: bool
    package_drift: list[image_contents.PackageChange] | None
    locked_rootfs: str
    rebuilt_rootfs: str
    rootfs_identical: bool
    files: list[image_contents.FileChange]
    config: list[image_contents.FieldChange]
    layers: list[LayerChange]
    seconds: float
    checked_at: str
    note: NotRequired[str]


def _noop(_: str) -> None:
    return None


def check_reproducible(
    spec: EvalSpec,
    spec_path: Path,
    lock: LockedSpec,
    settings: Settings,
    progress: Progress = _noop,
    *,
    fresh_base: bool = True,
) -> CheckReport:
    """Rebuild the locked image from nothing and compare it with the lock, file by file.

    ``fresh_base`` runs mmdebstrap again into a temporary directory (the audit of
    the base); otherwise the cached base tar is used. The Docker build always runs
    without cache. The rebuilt image is pushed under a ``-check`` tag; on a
    mismatch the report lists every file (path, type, mode, owner, size, sha256)
    and config field that differs, and which Debian packages moved.
    """
    if lock.base is None or lock.base.recipe is None:
        raise InputError(
            "build --check needs an image built from a base recipe (image.base: <recipe>)"
        )
    recipe, recipe_sha = load_recipe(lock.base.recipe)
    if recipe_sha != lock.base.recipe_sha256:
        raise InputError(
            f"base recipe {recipe.name} changed since the lock was written",
            expected=lock.base.recipe_sha256,
            found=recipe_sha,
            hint="check out the recipe the lock was made with, or lock again",
        )
    client = connect()
    t0 = time.monotonic()
    base_repo = f"{settings.registry}/evalrun/base"
    with tempfile.TemporaryDirectory(prefix="evalrun-check-") as tmp:
        work = Path(tmp)
        if fresh_base:
            tar = work / "rootfs.tar"
            build_base_tar(recipe, tar, progress)
        else:
            tar = base_tar_path(recipe, recipe_sha, settings)
            if not tar.is_file():
                build_base_tar(recipe, tar, progress)
        base = assemble_base(recipe, tar, work)
        progress(f"base rebuilt: {base.image.digest}")
        base_digest = push_image(base_repo, base_tag(recipe, recipe_sha) + "-check", base.image)
    fresh_base_ref = f"{base_repo}@{base_digest}"
    inputs = build_inputs_for(
        spec,
        spec_path.resolve().parent,
        lock.base.model_copy(update={"ref": fresh_base_ref}),
        list(lock.wheels),
    )
    rebuilt = build_image(
        inputs,
        settings,
        client=client,
        nocache=True,
        tag_suffix="-check",
        progress=progress,
    )
    identical = rebuilt.ref == lock.image.ref
    inputs_changed = _inputs_changed(lock, inputs)
    diff: ImageDiff = {"layers": [], "config": [], "files": []}
    note: str | None = None
    if identical:
        # same manifest digest ⇒ same config and layer bytes ⇒ same files
        rebuilt_rootfs = lock.image.rootfs_digest
    else:
        progress("rebuilt image differs; comparing files and config")
        diff = image_diff(lock.image.ref, rebuilt.ref)
        # measured by the rebuild itself: the digest table is part of every built image
        rebuilt_rootfs = rebuilt.rootfs_digest
        if lock.image.assembly is None:
            note = (
                "the locked image was built before evalrun assembled images itself; "
                "run `evalrun lock --rebuild` once to lock a reproducible image"
            )
    report: CheckReport = {
        "result": "identical" if identical else "differs",
        "inputs_changed": inputs_changed,
        "image_identical": identical,
        "locked_image": lock.image.ref,
        "rebuilt_image": rebuilt.ref,
        "base_identical": fresh_base_ref == lock.base.ref,
        "locked_base": lock.base.ref,
        "rebuilt_base": fresh_base_ref,
        "from_scratch": fresh_base,
        "package_drift": image_contents.diff_packages(lock.base.packages or {}, base.packages)
        if lock.base.packages is not None
        else None,
        "locked_rootfs": lock.image.rootfs_digest,
        "rebuilt_rootfs": rebuilt_rootfs,
        "rootfs_identical": rebuilt_rootfs == lock.image.rootfs_digest,
        "files": diff["files"],
        "config": diff["config"],
        "layers": diff["layers"],
        "seconds": round(time.monotonic() - t0, 1),
        "checked_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }
    if note is not None:
        report["note"] = note
    return report


def _inputs_changed(lock: LockedSpec, inputs: BuildInputs) -> list[InputChange]:
    """Build inputs that come from the checkout, not the registry, and moved since the lock."""
    now = {
        "template_sha256": sha256_file(inputs.template),
        "context_sha256": tree_digest(inputs.context),
        "agent_sha256": agent_digest(),
        "source_date_epoch": str(BUILD_EPOCH),
        "assembly": oci.ASSEMBLY_SCHEME,
    }
    locked = {k: getattr(lock.image, k) for k in now}
    return [
        {"input": k, "expected": None if locked[k] is None else str(locked[k]), "found": v}
        for k, v in now.items()
        if locked[k] is not None and str(locked[k]) != v
    ]


def image_diff(expected_ref: str, found_ref: str) -> ImageDiff:
    """Which layers, config fields and files differ between two pushed images."""
    sides: dict[str, tuple[oci.ImageManifest, oci.ImageConfig]] = {}
    with tempfile.TemporaryDirectory(prefix="evalrun-diff-") as tmp:
        blobs: dict[str, Path] = {}
        indexes = []
        for side, ref in (("expected", expected_ref), ("found", found_ref)):
            repo, digest = parse_digest_ref(ref)
            name = registry.ImageName.parse(repo)
            manifest: oci.ImageManifest = load_json_strict(
                registry.get_manifest_bytes(name, digest)
            )
            config: oci.ImageConfig = load_json_strict(
                registry_blobs.get_blob_bytes(name, manifest["config"]["digest"])
            )
            sides[side] = (manifest, config)
            for layer in manifest.get("layers", []):
                if layer["digest"] not in blobs:
                    path = Path(tmp) / f"{len(blobs)}.layer"
                    registry_blobs.get_blob(name, layer["digest"], path)
                    blobs[layer["digest"]] = path
            handles = [blobs[d["digest"]].open("rb") for d in manifest.get("layers", [])]
            try:
                indexes.append(image_contents.filesystem_index(handles))
            finally:
                for fh in handles:
                    fh.close()
    (m_exp, c_exp), (m_found, c_found) = sides["expected"], sides["found"]
    exp_layers = [d["digest"] for d in m_exp.get("layers", [])]
    found_layers = [d["digest"] for d in m_found.get("layers", [])]
    return {
        "layers": [
            {"index": i, "expected": a, "found": b}
            for i, (a, b) in enumerate(_pad(exp_layers, found_layers))
            if a != b
        ],
        "config": [
            d
            for d in image_contents.diff_json(c_exp, c_found)
            if not d["field"].startswith("rootfs.")
        ],
        "files": image_contents.diff_index(indexes[0], indexes[1]),
    }


def _pad(a: list[str], b: list[str]) -> list[tuple[str | None, str | None]]:
    n = max(len(a), len(b))
    return [(a[i] if i < len(a) else None, b[i] if i < len(b) else None) for i in range(n)]


def record_reproducibility(spec_path: Path, report: CheckReport) -> LockedSpec:
    """Store the outcome of a ``build --check`` in the lock (``image.reproducibility``)."""
    path = lock_path_for(spec_path)
    lock = load_lock(path)
    if lock.image.ref != report["locked_image"]:
        raise InputError("the lock changed while it was being checked", file=str(path))
    record = Reproducibility(
        checked_at=report["checked_at"],
        result=report["result"],
        rebuilt_ref=report["rebuilt_image"],
        base_identical=report["base_identical"],
        from_scratch=report["from_scratch"],
        differences=len(report["files"]) + len(report["config"]),
    )
    updated = lock.model_copy(
        update={"image": lock.image.model_copy(update={"reproducibility": record})}
    )
    write_lock(updated, path)
    return updated


def format_check_report(report: CheckReport, limit: int = 50) -> list[str]:
    """The human rendering of a ``build --check`` report."""
    verdict = "identical" if report["image_identical"] else "DIFFERS"
    lines = [
        f"image   {verdict}",
        f"  locked   {report['locked_image']}",
        f"  rebuilt  {report['rebuilt_image']}",
        f"base    {'identical' if report['base_identical'] else 'DIFFERS'}"
        f" ({'fresh mmdebstrap' if report['from_scratch'] else 'cached base tar'})",
    ]
    drift = report.get("package_drift") or []
    if drift:
        lines.append(f"  {len(drift)} Debian package(s) differ from the lock (mirror moved on?):")
        lines += [f"    {d['package']}: {d['expected']} → {d['found']}" for d in drift[:limit]]
    for moved in report.get("inputs_changed") or []:
        lines.append(
            f"input   {moved['input']} changed since the lock: "
            f"{moved['expected']} → {moved['found']}"
        )
    rootfs = "identical" if report["rootfs_identical"] else "DIFFERS"
    lines.append(f"rootfs  {rootfs} ({report['rebuilt_rootfs']})")
    for layer in report["layers"]:
        lines.append(f"layer {layer['index']}: {layer['expected']} → {layer['found']}")
    files = report["files"]
    if files:
        lines.append(f"files   {len(files)} differ")
        for item in files[:limit]:
            lines.append(f"  {item['change']:<8} {item['path']}")
            if item["change"] == "changed":
                expected, found = item["expected"], item["found"]
                for field in item["fields"]:
                    lines.append(f"           {field}: {expected.get(field)} → {found.get(field)}")
        if len(files) > limit:
            lines.append(f"  … and {len(files) - limit} more (--json lists all)")
    for changed in report["config"]:
        lines.append(f"config  {changed['field']}: {changed['expected']!r} → {changed['found']!r}")
    if report.get("note"):
        lines.append(f"note    {report['note']}")
    lines.append(f"rebuilt in {report['seconds']} s")
    return lines

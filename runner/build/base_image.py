"""Base images from recipes: mmdebstrap into a reproducible tar, assembled and pushed by evalrun.

A recipe (``images/base/<name>.yaml``) names a Debian suite, mirror and packages;
mmdebstrap builds the root filesystem with ``SOURCE_DATE_EPOCH``, and
:mod:`runner._internal.oci` turns it into a timestamp-free image whose digest depends only
on the recipe and the packages it installed. Nothing is pulled from Docker Hub.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from runner._internal import image_contents, oci
from runner._internal.settings import Settings
from runner._internal.strict_json import load_json_strict
from runner._internal.tree import sha256_file
from runner.adapters import registry
from runner.build.image import push_image
from runner.build.package_files import IMAGES_DIR
from runner.errors import InfrastructureError, InputError, SpecError
from runner.model.lock import LockedBase

Progress = Callable[[str], None]
OCI_TAG = "oci2"  # bump when the assembly changes, so old tags are not reused
# bump when the way mmdebstrap is run changes (its tar, cached by this name, changes with it)
TAR_TAG = "t2"
# The environment of mmdebstrap and every maintainer script it runs. SOURCE_DATE_EPOCH
# (the recipe's) clamps the files' times and makes py3compile write hash-based bytecode.
# PYTHONDONTWRITEBYTECODE keeps the import system from writing bytecode of its own: the
# modules Python imports while packages are configured (py3compile's own debpython, the
# _distutils_hack every start loads) otherwise got, in some builds and not others,
# timestamp-based bytecode written on import instead of py3compile's, and a base rebuilt
# from scratch differed from the locked one in those six files.
BUILD_ENV = {"PYTHONDONTWRITEBYTECODE": "1"}
PACKAGES_ANNOTATION = "org.evalrun.base.packages"


def _noop(_: str) -> None:
    return None


class BaseRecipe(BaseModel):
    """``images/base/<name>.yaml``: how a base image is made with mmdebstrap."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    name: str
    suite: str
    variant: str = "apt"
    mirror: str
    include: list[str] = Field(default_factory=list)
    dpkg_path_excludes: list[str] = Field(default_factory=list)
    dpkg_path_includes: list[str] = Field(default_factory=list)
    source_date_epoch: int


def load_recipe(name: str, images_dir: Path = IMAGES_DIR) -> tuple[BaseRecipe, str]:
    """Load a base recipe by name; returns it with the sha256 of the recipe file."""
    path = images_dir / "base" / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in (images_dir / "base").glob("*.yaml"))
        raise InputError(
            f"unknown base recipe {name!r}", file=str(path), hint=f"known recipes: {known}"
        )
    try:
        recipe = BaseRecipe.model_validate(yaml.safe_load(path.read_text()))
    except (yaml.YAMLError, ValidationError) as exc:
        raise SpecError(f"invalid base recipe: {exc}", file=str(path)) from None
    return recipe, sha256_file(path)


def base_tag(recipe: BaseRecipe, recipe_sha: str) -> str:
    return f"{recipe.name}-{recipe_sha[:16]}-{TAR_TAG}-{OCI_TAG}"


def base_tar_path(recipe: BaseRecipe, recipe_sha: str, settings: Settings) -> Path:
    return settings.base_cache / f"{recipe.name}-{recipe_sha[:16]}-{TAR_TAG}.tar"


@dataclass(frozen=True)
class BaseImage:
    """A base image assembled from an mmdebstrap tar, with what the lock records of it."""

    image: oci.AssembledImage
    packages: dict[str, str]


def assemble_base(recipe: BaseRecipe, rootfs_tar: Path, workdir: Path) -> BaseImage:
    """Normalize the mmdebstrap tar into one layer and wrap it in a timestamp-free image."""
    with rootfs_tar.open("rb") as src:
        layer = oci.normalize_layer(src, workdir / "base-layer.tar", recipe.source_date_epoch)
    assert layer.path is not None
    with layer.path.open("rb") as fh:
        packages = image_contents.dpkg_packages(fh)
    config = {
        "Env": [f"PATH={oci.DEFAULT_PATH}", "LANG=C.UTF-8"],
        "Cmd": ["/bin/bash"],
        "Labels": {
            "org.evalrun.base.recipe": recipe.name,
            "org.evalrun.base.suite": recipe.suite,
            "org.evalrun.base.mirror": recipe.mirror,
            "org.evalrun.base.source-date-epoch": str(recipe.source_date_epoch),
        },
    }
    history = [f"evalrun base {recipe.name}: mmdebstrap --variant={recipe.variant} {recipe.suite}"]
    # The package list is a manifest annotation, not a label: labels are copied onto
    # containers, and containerd refuses labels over 4 KiB.
    annotations = {PACKAGES_ANNOTATION: json.dumps(packages, sort_keys=True)}
    image = oci.assemble(
        [layer], config, recipe.source_date_epoch, history, annotations=annotations
    )
    return BaseImage(image=image, packages=packages)


def _locked_base_from_registry(
    repo: str, digest: str, recipe: BaseRecipe, recipe_sha: str
) -> LockedBase:
    """What the lock records of a pushed base image, read back from its manifest and config."""
    name = registry.ImageName.parse(repo)
    manifest: oci.ImageManifest = load_json_strict(registry.get_manifest_bytes(name, digest))
    annotations = manifest.get("annotations") or {}
    return LockedBase(
        ref=f"{repo}@{digest}",
        recipe=recipe.name,
        recipe_sha256=recipe_sha,
        suite=recipe.suite,
        mirror=recipe.mirror,
        source_date_epoch=recipe.source_date_epoch,
        layer_digest=manifest["layers"][0]["digest"],
        packages=load_json_strict(annotations.get(PACKAGES_ANNOTATION, "{}")),
    )


def ensure_base_image(
    name: str, settings: Settings, client: Any | None = None, progress: Progress = _noop
) -> LockedBase:
    """Resolve (building and pushing if absent) the base image of a recipe to a digest.

    The image is assembled by evalrun from the mmdebstrap tar (see :mod:`runner._internal.oci`),
    so its digest depends only on the recipe and the Debian packages it installed.
    """
    recipe, recipe_sha = load_recipe(name)
    repo = f"{settings.registry}/evalrun/base"
    tag = base_tag(recipe, recipe_sha)
    digest = registry.resolve_tag(registry.ImageName.parse(repo), tag)
    if digest is None:
        tar = base_tar_path(recipe, recipe_sha, settings)
        if not tar.is_file():
            build_base_tar(recipe, tar, progress)
        with tempfile.TemporaryDirectory(prefix="evalrun-base-") as tmp:
            progress(f"assembling base image {repo}:{tag}")
            base = assemble_base(recipe, tar, Path(tmp))
            digest = push_image(repo, tag, base.image)
    return _locked_base_from_registry(repo, digest, recipe, recipe_sha)


def build_base_tar(recipe: BaseRecipe, dest: Path, progress: Progress = _noop) -> None:
    """Run mmdebstrap for ``recipe`` into ``dest`` (atomically)."""
    if shutil.which("mmdebstrap") is None:
        raise InfrastructureError("mmdebstrap is not installed", hint="apt-get install mmdebstrap")
    dest.parent.mkdir(parents=True, exist_ok=True)
    partial = dest.with_suffix(".partial.tar")
    cmd = ["mmdebstrap", f"--variant={recipe.variant}", "--format=tar", "--quiet"]
    if recipe.include:
        cmd.append("--include=" + ",".join(recipe.include))
    cmd += [f"--dpkgopt=path-exclude={p}" for p in recipe.dpkg_path_excludes]
    cmd += [f"--dpkgopt=path-include={p}" for p in recipe.dpkg_path_includes]
    cmd += [recipe.suite, str(partial), recipe.mirror]
    progress(f"building base image {recipe.name} with mmdebstrap (about a minute)")
    env = {**os.environ, **BUILD_ENV, "SOURCE_DATE_EPOCH": str(recipe.source_date_epoch)}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        partial.unlink(missing_ok=True)
        raise InfrastructureError(
            f"mmdebstrap failed ({proc.returncode})", stderr=proc.stderr.strip()[-2000:]
        )
    partial.replace(dest)

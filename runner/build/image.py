"""Lock, render and build: every input resolved to a digest, images built hermetically.

Flow: the base image comes from a recipe (mmdebstrap, reproducible tar, assembled
by :mod:`runner._internal.oci` and pushed over the registry HTTP API) or a digest reference;
wheels are downloaded on the host with their hashes; the Dockerfile template is
rendered with StrictUndefined; Docker runs the build with no network, installing
only the hashed wheels; evalrun then re-writes the layers Docker added and the
config deterministically and pushes them itself, so the **manifest digest** is a
pure function of the locked inputs. The engine pulls the image by that digest and
the **rootfs content digest** is measured on it. ``check_reproducible`` rebuilds
from nothing and diffs (see docs/reproducible-images.md).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import importlib.resources
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jinja2
import jinja2.meta
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

import runner
from runner._internal import oci
from runner._internal.settings import Settings
from runner._internal.tree import TreeDigestFormat, digest_tree
from runner.adapters import registry
from runner.adapters.docker_engine import connect, docker_call, translated
from runner.build.provenance import preprocessing_records
from runner.errors import (
    DigestMismatch,
    EvalrunError,
    InfrastructureError,
    InputError,
    IntegrityError,
    SpecError,
)
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
    Reproducibility,
    load_lock,
    lock_path_for,
    parse_digest_ref,
)

log = logging.getLogger("evalrun.build")
Progress = Callable[[str], None]

# The runner package on disk: runner/ in a checkout, site-packages/runner when installed.
PACKAGE_DIR = Path(str(importlib.resources.files(runner))).resolve()
REPO_ROOT = PACKAGE_DIR.parent
# A wheel carries the top-level images/ as runner/_images (setup.py); a checkout reads images/.
_PACKAGED_IMAGES = PACKAGE_DIR / "_images"
IMAGES_DIR = Path(
    os.environ.get(
        "EVALRUN_IMAGES_DIR",
        _PACKAGED_IMAGES if _PACKAGED_IMAGES.is_dir() else REPO_ROOT / "images",
    )
)
# What goes into the image: the agent package (every module of it) and what it imports.
AGENT_FILES = (
    "__init__.py",
    *sorted(
        f"{package}/{p.name}"
        for package in ("agent", "shared")
        for p in (PACKAGE_DIR / package).glob("*.py")
        if p.is_file()
    ),
)
WHEEL_PLATFORMS = ("manylinux2014_x86_64", "manylinux_2_17_x86_64", "manylinux_2_28_x86_64", "any")
IMAGE_PYTHON = "3.11"
BUILD_EPOCH = 1735689600
OCI_TAG = "oci2"  # bump when the assembly changes, so old tags are not reused
PACKAGES_ANNOTATION = "org.evalrun.base.packages"


def _noop(_: str) -> None:
    return None


def sha256_file(path: Path) -> str:
    with path.open("rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


# --------------------------------------------------------------------------- base image


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


def push_image(
    repo: str, tag: str, image: oci.AssembledImage, *, base_repo: str | None = None
) -> str:
    """Push an assembled image through the registry HTTP API; returns its manifest digest.

    Layers without a local file are the base image's: mounted from ``base_repo``
    when it is on the same registry, else copied from there. The digest is
    computed here from the bytes we wrote; the registry must agree.
    """
    name = registry.ImageName.parse(repo)
    source = registry.ImageName.parse(base_repo) if base_repo else None
    mount_from = [source.repository] if source and source.registry == name.registry else []
    for layer in image.layers:
        if layer.path is None and source is not None and not mount_from:
            if not registry.blob_exists(name, layer.digest):
                with tempfile.TemporaryDirectory(prefix="evalrun-blob-") as tmp:
                    copy = Path(tmp) / "blob"
                    registry.get_blob(source, layer.digest, copy)
                    registry.push_blob(name, layer.digest, layer.size, copy)
            continue
        registry.push_blob(name, layer.digest, layer.size, layer.path, mount_from=mount_from)
    registry.put_blob_bytes(name, image.config_digest, image.config)
    reported = registry.put_manifest(name, tag, image.manifest, oci.OCI_MANIFEST)
    resolved = registry.resolve_tag(name, tag)
    if (reported and reported != image.digest) or resolved != image.digest:
        raise IntegrityError(
            f"registry digest for {repo}:{tag} does not match the assembled manifest",
            expected=image.digest,
            found=reported or resolved,
        )
    return image.digest


def ensure_local(client: Any, ref: str, progress: Progress = _noop) -> None:
    """Make the engine hold ``repo@sha256`` (pulled from the registry if absent)."""
    try:
        with translated(f"inspect {ref}"):
            client.images.get(ref)
            return
    except EvalrunError:
        pass
    repo, digest = parse_digest_ref(ref)
    progress(f"pulling {ref}")
    errors: list[str] = []

    def do_pull() -> None:
        for chunk in client.api.pull(repo, tag=digest, stream=True, decode=True):
            if "errorDetail" in chunk or "error" in chunk:
                errors.append(
                    str((chunk.get("errorDetail") or {}).get("message") or chunk.get("error"))
                )

    docker_call(f"pull {ref}", do_pull)
    if errors:
        raise InfrastructureError(f"pull of {ref} failed: {errors[-1]}")


def base_tag(recipe: BaseRecipe, recipe_sha: str) -> str:
    return f"{recipe.name}-{recipe_sha[:16]}-{OCI_TAG}"


def base_tar_path(recipe: BaseRecipe, recipe_sha: str, settings: Settings) -> Path:
    return settings.base_cache / f"{recipe.name}-{recipe_sha[:16]}.tar"


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
        packages = oci.dpkg_packages(fh)
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
    manifest = json.loads(registry.get_manifest_bytes(name, digest))
    annotations = manifest.get("annotations") or {}
    return LockedBase(
        ref=f"{repo}@{digest}",
        recipe=recipe.name,
        recipe_sha256=recipe_sha,
        suite=recipe.suite,
        mirror=recipe.mirror,
        source_date_epoch=recipe.source_date_epoch,
        layer_digest=manifest["layers"][0]["digest"],
        packages=json.loads(annotations.get(PACKAGES_ANNOTATION, "{}")),
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
    env = {**os.environ, "SOURCE_DATE_EPOCH": str(recipe.source_date_epoch)}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        partial.unlink(missing_ok=True)
        raise InfrastructureError(
            f"mmdebstrap failed ({proc.returncode})", stderr=proc.stderr.strip()[-2000:]
        )
    partial.replace(dest)


# --------------------------------------------------------------------------- wheels


_WHEEL_RE = re.compile(r"^(?P<name>[^-]+)-(?P<version>[^-]+)(-\d[^-]*)?-[^-]+-[^-]+-[^-]+\.whl$")


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def resolve_wheels(
    requirements: Iterable[str], settings: Settings, progress: Progress = _noop
) -> list[LockedWheel]:
    """Download the wheels (and their dependencies) for the image's Python; hash each."""
    reqs = sorted(requirements)
    if not reqs:
        return []
    cache = settings.wheel_cache
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="evalrun-wheels-") as tmp:
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--quiet",
            "--only-binary=:all:",
            "--python-version",
            IMAGE_PYTHON,
            "--implementation",
            "cp",
            "-d",
            tmp,
        ]
        for plat in WHEEL_PLATFORMS:
            cmd += ["--platform", plat]
        progress(f"resolving wheels: {', '.join(reqs)}")
        proc = subprocess.run([*cmd, *reqs], capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise InfrastructureError(
                "pip download failed", requirements=reqs, stderr=proc.stderr.strip()[-1500:]
            )
        wheels = []
        for path in sorted(Path(tmp).glob("*.whl")):
            match = _WHEEL_RE.match(path.name)
            if not match:
                raise InputError(f"cannot parse wheel filename {path.name!r}")
            digest = sha256_file(path)
            target = cache / digest / path.name
            if not target.exists():
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(path, target.with_suffix(".partial"))
                target.with_suffix(".partial").replace(target)
            wheels.append(
                LockedWheel(
                    name=_normalize(match["name"]),
                    version=match["version"],
                    filename=path.name,
                    sha256=digest,
                )
            )
    return wheels


def cached_wheel(wheel: LockedWheel, settings: Settings) -> Path:
    """The cached file of a locked wheel, verified against its hash."""
    path = settings.wheel_cache / wheel.sha256 / wheel.filename
    if not path.is_file():
        raise InputError(
            f"wheel {wheel.filename} is not in the cache",
            file=str(path),
            hint="run `evalrun lock` to download the locked wheels again",
        )
    found = sha256_file(path)
    if found != wheel.sha256:
        raise DigestMismatch(
            f"cached wheel {wheel.filename}", expected=wheel.sha256, found=found, path=str(path)
        )
    return path


# --------------------------------------------------------------------------- inputs


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


def tree_digest(root: Path) -> str:
    """The build context's digest (``context_sha256``): files, exec bits, content; no links.

    The :attr:`~runner._internal.tree.TreeDigestFormat.BUILD_CONTEXT` layout, bare hex.
    """
    return digest_tree(root, TreeDigestFormat.BUILD_CONTEXT, what="build context")


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


# --------------------------------------------------------------------------- render


def render_dockerfile(template: Path, variables: dict[str, Any]) -> str:
    """Render a Dockerfile template strictly; every FROM must be digest-pinned."""
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(template.parent)),
        undefined=jinja2.StrictUndefined,
        autoescape=False,  # noqa: S701 - output is a Dockerfile, not HTML
        keep_trailing_newline=True,
    )
    source = template.read_text(encoding="utf-8")
    missing = sorted(jinja2.meta.find_undeclared_variables(env.parse(source)) - variables.keys())
    if missing:
        raise InputError(
            f"template uses undefined variable(s): {', '.join(missing)}",
            file=str(template),
            hint=f"available variables: {sorted(variables)}",
        )
    try:
        text = env.get_template(template.name).render(**variables)
    except jinja2.UndefinedError as exc:
        raise InputError(
            f"template uses an undefined variable: {exc.message}",
            file=str(template),
            hint=f"available variables: {sorted(variables)}",
        ) from None
    except jinja2.TemplateError as exc:
        raise InputError(f"template error: {exc}", file=str(template)) from None
    for lineno, line in enumerate(text.splitlines(), start=1):
        match = re.match(r"^\s*FROM\s+(?:--\S+\s+)*(\S+)", line, re.IGNORECASE)
        if match:
            try:
                parse_digest_ref(match[1])
            except ValueError as exc:
                raise InputError(
                    f"rendered Dockerfile line {lineno}: {exc}", file=str(template)
                ) from None
    return text


@dataclass(frozen=True)
class BuildInputs:
    spec: EvalSpec
    spec_dir: Path
    base: LockedBase
    wheels: list[LockedWheel]
    template: Path
    context: Path

    def digest(self) -> str:
        """One digest over everything that goes into the image."""
        h = hashlib.sha256(b"evalrun-build-inputs/v1\n" + oci.ASSEMBLY_SCHEME.encode() + b"\n")
        h.update(self.base.ref.encode() + b"\n")
        for w in self.wheels:
            h.update(f"{w.filename} {w.sha256}\n".encode())
        h.update(sha256_file(self.template).encode() + b"\n")
        h.update(tree_digest(self.context).encode() + b"\n")
        h.update(agent_digest().encode() + b"\n")
        return h.hexdigest()


def agent_digest() -> str:
    """sha256 over the agent files that go into every image (path and content)."""
    h = hashlib.sha256(b"evalrun-agent/v1\n")
    for rel in AGENT_FILES:
        h.update(f"{rel} {sha256_file(PACKAGE_DIR / rel)}\n".encode())
    return h.hexdigest()


def stage_context(inputs: BuildInputs, dest: Path, settings: Settings) -> str:
    """Fill ``dest`` with the hermetic build context; returns the rendered Dockerfile."""
    wheels_dir = dest / "wheels"
    wheels_dir.mkdir(parents=True)
    lines = []
    for wheel in inputs.wheels:
        shutil.copy2(cached_wheel(wheel, settings), wheels_dir / wheel.filename)
        lines.append(f"{wheel.name}=={wheel.version} --hash=sha256:{wheel.sha256}")
    (dest / "requirements.lock.txt").write_text("\n".join(lines) + ("\n" if lines else ""))
    agent_dir = dest / "agent" / "runner"
    for rel in AGENT_FILES:
        target = agent_dir / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(PACKAGE_DIR / rel, target)
    shutil.copytree(
        inputs.context,
        dest / "app",
        symlinks=True,
        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"),
    )
    text = render_dockerfile(
        inputs.template,
        {
            "base_image": inputs.base.ref,
            "spec_name": inputs.spec.metadata.name,
            "inputs_digest": inputs.digest(),
            "source_date_epoch": BUILD_EPOCH,
            "has_wheels": bool(inputs.wheels),
        },
    )
    (dest / "Dockerfile").write_text(text)
    _normalize_modes(dest)
    return text


def _normalize_modes(root: Path) -> None:
    """0755 for directories and executables, 0644 for the rest: the umask must not leak in."""
    for path in [root, *root.rglob("*")]:
        if path.is_symlink():
            continue
        exe = path.is_dir() or bool(path.stat().st_mode & 0o111)
        path.chmod(0o755 if exe else 0o644)


@dataclass(frozen=True)
class BuiltImage:
    ref: str
    rootfs_digest: str
    inputs_digest: str
    skipped: bool
    config_digest: str | None = None
    layers: tuple[str, ...] = ()


def _docker_build(client: Any, context: Path, tag: str, nocache: bool, progress: Progress) -> None:
    """Build with the network off; a stream ``errorDetail`` is a failed build, always."""
    # A failed build must never leave an older image under this tag to be used.
    try:
        with translated("remove stale tag"):
            client.api.remove_image(tag, noprune=True)
    except EvalrunError:
        pass
    errors: list[str] = []
    tail: list[str] = []

    def do_build() -> None:
        stream = client.api.build(
            path=str(context),
            tag=tag,
            network_mode="none",
            rm=True,
            forcerm=True,
            pull=False,
            nocache=nocache,
            decode=True,
            buildargs={"SOURCE_DATE_EPOCH": str(BUILD_EPOCH)},
        )
        for chunk in stream:
            if "errorDetail" in chunk or "error" in chunk:
                errors.append(
                    str((chunk.get("errorDetail") or {}).get("message") or chunk.get("error"))
                )
            text = chunk.get("stream", "")
            if text.strip():
                tail.append(text.rstrip())
                if text.startswith("Step "):
                    progress("  " + text.strip())

    progress(f"building {tag} (network disabled)")
    docker_call(f"build {tag}", do_build, retries=False)
    if errors:
        try:
            with translated("remove failed tag"):
                client.api.remove_image(tag, noprune=True)
        except EvalrunError:
            pass
        raise InputError(
            f"image build failed: {errors[-1].strip()}",
            build_log_tail="\n".join(tail[-15:]),
        )


def measure_rootfs(client: Any, ref: str, runtime: str) -> str:
    """Run the agent in the image (read-only, no network) to compute its rootfs digest."""

    def run() -> bytes:
        out: bytes = client.containers.run(
            ref,
            ["rootfs-digest"],
            remove=True,
            network_mode="none",
            read_only=True,
            tmpfs={"/tmp": "rw,size=16m"},
            runtime=runtime,
            stdout=True,
            stderr=False,
            cap_drop=["ALL"],
            security_opt=["no-new-privileges"],
        )
        return out

    out = docker_call(f"measure rootfs of {ref}", run, retries=False)
    data = json.loads(out.decode().strip().splitlines()[-1])
    digest: str = data["rootfs_digest"]
    return digest


def _base_layers(base_ref: str) -> tuple[list[oci.Blob], list[str], list[str]]:
    """The base image's layers (registry-held blobs), diff ids and history lines."""
    repo, digest = parse_digest_ref(base_ref)
    name = registry.ImageName.parse(repo)
    manifest = json.loads(registry.get_manifest_bytes(name, digest))
    if "layers" not in manifest:
        raise InputError(f"base image {base_ref} is an index, not a single-platform image")
    config = json.loads(registry.get_blob_bytes(name, manifest["config"]["digest"]))
    layers = [
        oci.Blob(
            None, d["digest"], int(d["size"]), oci.LAYER_TYPES.get(d["mediaType"], d["mediaType"])
        )
        for d in manifest["layers"]
    ]
    diff_ids = list(config["rootfs"]["diff_ids"])
    history = [
        h.get("created_by", "") for h in config.get("history", []) if not h.get("empty_layer")
    ]
    if len(history) != len(layers):
        history = [f"base layer {i}" for i in range(1, len(layers) + 1)]
    return layers, diff_ids, history


def assemble_from_build(
    client: Any, tag: str, base_ref: str, workdir: Path, progress: Progress = _noop
) -> oci.AssembledImage:
    """``docker save`` the built image and re-write its build layers deterministically.

    The base layers are taken from the base image in the registry (byte-identical
    by digest); the layers Docker added are normalized; the config keeps only the
    runtime fields (env, entrypoint, cmd, user, workdir, labels) with fixed times.
    """
    base_layers, base_diff_ids, base_history = _base_layers(base_ref)
    saved_path = workdir / "saved.tar"
    progress("exporting the build layers (docker save)")
    docker_call(
        f"save {tag}",
        lambda: oci.copy_stream(client.api.get_image(tag, chunk_size=1 << 20), saved_path),
        retries=False,
    )
    layers, diff_ids, history = list(base_layers), list(base_diff_ids), list(base_history)
    with tarfile.open(saved_path, mode="r:") as archive:
        saved = oci.read_saved(archive)
        n = len(base_layers)
        built_from = saved.config["rootfs"]["diff_ids"][:n]
        if built_from != base_diff_ids:
            raise IntegrityError(
                "the Docker build did not start from the locked base layers",
                expected=base_diff_ids,
                found=built_from,
            )
        for i, member in enumerate(saved.layer_members[n:], start=1):
            with oci.open_member(archive, member) as src:
                blob = oci.normalize_layer(src, workdir / f"layer-{i}.tar", BUILD_EPOCH)
            assert blob.path is not None
            if oci.empty_layer(blob.path):
                continue
            layers.append(blob)
            diff_ids.append(blob.digest)
            history.append(f"evalrun build layer {len(layers) - n}")
    saved_path.unlink()
    config = saved.config.get("config") or {}
    return oci.assemble(layers, config, BUILD_EPOCH, history, diff_ids)


def build_image(
    inputs: BuildInputs,
    settings: Settings,
    *,
    client: Any | None = None,
    nocache: bool = False,
    tag_suffix: str = "",
    measure: bool = True,
    progress: Progress = _noop,
) -> BuiltImage:
    """Render, build hermetically, assemble deterministically, push, measure the rootfs.

    Docker runs the network-less install; the pushed image is evalrun's own
    assembly, so its digest is a pure function of the build inputs.
    """
    client = client or connect()
    inputs_digest = inputs.digest()
    repo = f"{inputs.spec.image.repository}/{inputs.spec.metadata.name}"
    tag = f"in-{inputs_digest[:24]}{tag_suffix}"
    ensure_local(client, inputs.base.ref, progress)
    with tempfile.TemporaryDirectory(prefix="evalrun-build-") as tmp:
        context, work = Path(tmp) / "context", Path(tmp) / "layers"
        context.mkdir()
        work.mkdir()
        stage_context(inputs, context, settings)
        build_tag = f"{repo}:build-{inputs_digest[:24]}{tag_suffix}"
        _docker_build(client, context, build_tag, nocache, progress)
        image = assemble_from_build(client, build_tag, inputs.base.ref, work, progress)
        progress(f"pushing {repo}:{tag} ({image.digest})")
        digest = push_image(repo, tag, image, base_repo=parse_digest_ref(inputs.base.ref)[0])
    ref = f"{repo}@{digest}"
    rootfs = ""
    if measure:
        ensure_local(client, ref, progress)
        progress("measuring rootfs digest")
        rootfs = measure_rootfs(client, ref, "runc")
    return BuiltImage(
        ref=ref,
        rootfs_digest=rootfs,
        inputs_digest=inputs_digest,
        skipped=False,
        config_digest=image.config_digest,
        layers=tuple(b.digest for b in image.layers),
    )


# --------------------------------------------------------------------------- lock


def build_inputs_for(
    spec: EvalSpec, spec_dir: Path, base: LockedBase, wheels: list[LockedWheel]
) -> BuildInputs:
    assert spec.image.template and spec.image.context  # guaranteed by ImageSpec
    template = (spec_dir / spec.image.template).resolve()
    if not template.is_file():
        raise InputError("image.template: file not found", file=str(template))
    context = (spec_dir / spec.image.context).resolve()
    if not context.is_dir():
        raise InputError("image.context: directory not found", file=str(context))
    return BuildInputs(
        spec=spec, spec_dir=spec_dir, base=base, wheels=wheels, template=template, context=context
    )


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
        pinned = {_normalize(r.split("==")[0]): r.split("==")[1] for r in spec.image.requirements}
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


def check_reproducible(
    spec: EvalSpec,
    spec_path: Path,
    lock: LockedSpec,
    settings: Settings,
    progress: Progress = _noop,
    *,
    fresh_base: bool = True,
) -> dict[str, Any]:
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
        measure=False,
        progress=progress,
    )
    identical = rebuilt.ref == lock.image.ref
    report: dict[str, Any] = {
        "result": "identical" if identical else "differs",
        "inputs_changed": _inputs_changed(lock, inputs),
        "image_identical": identical,
        "locked_image": lock.image.ref,
        "rebuilt_image": rebuilt.ref,
        "base_identical": fresh_base_ref == lock.base.ref,
        "locked_base": lock.base.ref,
        "rebuilt_base": fresh_base_ref,
        "from_scratch": fresh_base,
        "package_drift": oci.diff_packages(lock.base.packages or {}, base.packages)
        if lock.base.packages is not None
        else None,
        "locked_rootfs": lock.image.rootfs_digest,
        "files": [],
        "config": [],
        "layers": [],
    }
    if identical:
        # same manifest digest ⇒ same config and layer bytes ⇒ same files
        report["rebuilt_rootfs"] = lock.image.rootfs_digest
    else:
        progress("rebuilt image differs; comparing files and config")
        report.update(image_diff(lock.image.ref, rebuilt.ref))
        ensure_local(client, rebuilt.ref, progress)
        report["rebuilt_rootfs"] = measure_rootfs(client, rebuilt.ref, "runc")
        if lock.image.assembly is None:
            report["note"] = (
                "the locked image was built before evalrun assembled images itself; "
                "run `evalrun lock --rebuild` once to lock a reproducible image"
            )
    report["rootfs_identical"] = report["rebuilt_rootfs"] == lock.image.rootfs_digest
    report["seconds"] = round(time.monotonic() - t0, 1)
    report["checked_at"] = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    return report


def _inputs_changed(lock: LockedSpec, inputs: BuildInputs) -> list[dict[str, str | None]]:
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


def image_diff(expected_ref: str, found_ref: str) -> dict[str, Any]:
    """Which layers, config fields and files differ between two pushed images."""
    sides: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {}
    with tempfile.TemporaryDirectory(prefix="evalrun-diff-") as tmp:
        blobs: dict[str, Path] = {}
        indexes = []
        for side, ref in (("expected", expected_ref), ("found", found_ref)):
            repo, digest = parse_digest_ref(ref)
            name = registry.ImageName.parse(repo)
            manifest = json.loads(registry.get_manifest_bytes(name, digest))
            config = json.loads(registry.get_blob_bytes(name, manifest["config"]["digest"]))
            sides[side] = (manifest, config)
            for layer in manifest.get("layers", []):
                if layer["digest"] not in blobs:
                    path = Path(tmp) / f"{len(blobs)}.layer"
                    registry.get_blob(name, layer["digest"], path)
                    blobs[layer["digest"]] = path
            handles = [blobs[d["digest"]].open("rb") for d in manifest.get("layers", [])]
            try:
                indexes.append(oci.filesystem_index(handles))
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
            d for d in oci.diff_json(c_exp, c_found) if not d["field"].startswith("rootfs.")
        ],
        "files": oci.diff_index(indexes[0], indexes[1]),
    }


def _pad(a: list[str], b: list[str]) -> list[tuple[str | None, str | None]]:
    n = max(len(a), len(b))
    return [(a[i] if i < len(a) else None, b[i] if i < len(b) else None) for i in range(n)]


def record_reproducibility(spec_path: Path, report: dict[str, Any]) -> LockedSpec:
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


def image_reproducibility(lock: LockedSpec) -> dict[str, Any]:
    """What a bundle records about its image: checked or not, when, with what result."""
    record = lock.image.reproducibility
    if record is None:
        return {"checked": False, "assembly": lock.image.assembly}
    return {"checked": True, "assembly": lock.image.assembly, **record.model_dump(mode="json")}


def format_check_report(report: dict[str, Any], limit: int = 50) -> list[str]:
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
    for item in report.get("inputs_changed") or []:
        lines.append(
            f"input   {item['input']} changed since the lock: {item['expected']} → {item['found']}"
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
                for field in item["fields"]:
                    lines.append(
                        f"           {field}: {item['expected'][field]} → {item['found'][field]}"
                    )
        if len(files) > limit:
            lines.append(f"  … and {len(files) - limit} more (--json lists all)")
    for item in report["config"]:
        lines.append(f"config  {item['field']}: {item['expected']!r} → {item['found']!r}")
    if report.get("note"):
        lines.append(f"note    {report['note']}")
    lines.append(f"rebuilt in {report['seconds']} s")
    return lines

"""Evaluation blueprints: small, working projects that ``evalrun init`` scaffolds.

The blueprints ship as package data under ``runner/blueprints/``: one directory per
blueprint with a ``blueprint.yaml`` manifest, plus ``shared/`` for files several
blueprints copy (the image template, the digits data and model). Python sources
are stored as ``*.py-tpl`` so linters and type checkers leave them alone; the
suffix is dropped when a project is written.
"""

from __future__ import annotations

import importlib.resources
import re
import shutil
import tempfile
from dataclasses import dataclass
from importlib.resources.abc import Traversable
from pathlib import Path, PurePosixPath
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from runner.build.lock import check_local_input
from runner.errors import InputError
from runner.model.spec import EvalSpec, Metadata, load_spec

MANIFEST = "blueprint.yaml"
SHARED = "shared"
TEMPLATE_SUFFIX = "-tpl"
SPEC_FILE = "eval.yaml"


class BlueprintManifest(BaseModel):
    """``blueprint.yaml``: what a blueprint is and how a scaffolded project is made."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    description: str = Field(max_length=100, description="One line for `blueprints ls`.")
    requires: Literal["docker", "gpu"] = Field(
        description="Where it runs: the local Docker backend, or a GPU node (Kubernetes)."
    )
    lock_on_init: bool = Field(
        default=True, description="Whether `evalrun init` locks the project unless told not to."
    )
    lock_note: str | None = Field(
        default=None, description="Why the project is not locked on init (lock_on_init false)."
    )
    shared: dict[str, str] = Field(
        default_factory=dict, description="Files under shared/ → where they go in the project."
    )
    next: list[str] = Field(
        default_factory=list, description="Commands to run in the project after init."
    )

    @field_validator("description")
    @classmethod
    def _one_line(cls, value: str) -> str:
        if "\n" in value.strip() or not value.strip():
            raise ValueError("the description must be one non-empty line")
        return value.strip()

    @field_validator("shared")
    @classmethod
    def _relative(cls, value: dict[str, str]) -> dict[str, str]:
        for path in (*value, *value.values()):
            pure = PurePosixPath(path)
            if pure.is_absolute() or ".." in pure.parts:
                raise ValueError(f"{path!r} must be a relative path inside the blueprint")
        return value


@dataclass(frozen=True)
class Blueprint:
    """One catalogue entry: its name, manifest and packaged source directory."""

    name: str
    manifest: BlueprintManifest
    source: Traversable

    @property
    def description(self) -> str:
        return self.manifest.description


@dataclass(frozen=True)
class Scaffolded:
    """A project written by :func:`scaffold`."""

    blueprint: Blueprint
    root: Path
    files: tuple[str, ...]
    spec: EvalSpec

    @property
    def spec_path(self) -> Path:
        return self.root / SPEC_FILE


def _catalogue_root() -> Traversable:
    return importlib.resources.files("runner").joinpath("blueprints")


def _load_manifest(name: str, entry: Traversable) -> BlueprintManifest:
    source = f"runner/blueprints/{name}/{MANIFEST}"
    try:
        data = yaml.safe_load(entry.joinpath(MANIFEST).read_text(encoding="utf-8"))
        return BlueprintManifest.model_validate(data)
    except (yaml.YAMLError, ValidationError) as exc:
        # A broken manifest is a packaging bug, but say which file.
        raise InputError(f"invalid blueprint manifest: {exc}", file=source) from None


def list_blueprints() -> list[Blueprint]:
    """Every packaged blueprint, sorted by name."""
    found = []
    for entry in _catalogue_root().iterdir():
        if entry.name == SHARED or not entry.is_dir() or not entry.joinpath(MANIFEST).is_file():
            continue
        found.append(Blueprint(entry.name, _load_manifest(entry.name, entry), entry))
    return sorted(found, key=lambda b: b.name)


def get_blueprint(name: str) -> Blueprint:
    """The blueprint called ``name``; an :class:`InputError` naming the known ones if none is."""
    catalogue = list_blueprints()
    for blueprint in catalogue:
        if blueprint.name == name:
            return blueprint
    raise InputError(
        f"unknown blueprint {name!r}",
        known=", ".join(b.name for b in catalogue),
        hint="`evalrun blueprints ls` lists them with a description",
    )


def _walk(node: Traversable, prefix: PurePosixPath) -> list[tuple[PurePosixPath, Traversable]]:
    files = []
    for child in sorted(node.iterdir(), key=lambda c: c.name):
        rel = prefix / child.name
        if child.is_dir():
            if child.name != "__pycache__":
                files.extend(_walk(child, rel))
        elif child.is_file():
            files.append((rel, child))
    return files


def _project_files(blueprint: Blueprint) -> list[tuple[PurePosixPath, Traversable]]:
    """(destination path in the project, packaged source) for every file to write."""
    files = [
        (rel.with_name(rel.name.removesuffix(TEMPLATE_SUFFIX)), src)
        for rel, src in _walk(blueprint.source, PurePosixPath())
        if rel != PurePosixPath(MANIFEST)
    ]
    shared = _catalogue_root().joinpath(SHARED)
    for src_rel, dest_rel in blueprint.manifest.shared.items():
        src = shared.joinpath(*PurePosixPath(src_rel).parts)
        if not src.is_file():
            raise InputError(
                f"blueprint {blueprint.name!r}: shared file {src_rel!r} is not packaged",
                file=f"runner/blueprints/{SHARED}/{src_rel}",
            )
        files.append((PurePosixPath(dest_rel), src))
    seen: set[PurePosixPath] = set()
    for rel, _ in files:
        if rel in seen:
            raise InputError(f"blueprint {blueprint.name!r} writes {rel} twice")
        seen.add(rel)
    return sorted(files, key=lambda item: item[0])


def _check_destination(dest: Path) -> None:
    if dest.is_symlink() or (dest.exists() and not dest.is_dir()):
        raise InputError(
            "the project directory exists and is not a directory",
            file=str(dest),
            hint="choose a new or empty directory",
        )
    if dest.is_dir():
        entries = sorted(p.name for p in dest.iterdir())
        if entries:
            shown = ", ".join(entries[:5]) + (", …" if len(entries) > 5 else "")
            raise InputError(
                "the project directory is not empty; init never overwrites files",
                file=str(dest),
                found=shown,
                hint="choose a new or empty directory",
            )


def _rename(spec_text: str, old: str, new: str, blueprint: str) -> str:
    text, count = re.subn(
        rf"^(  name: ){re.escape(old)}[ \t]*$", rf"\g<1>{new}", spec_text, count=1, flags=re.M
    )
    if count != 1:
        raise InputError(f"blueprint {blueprint!r}: cannot find metadata.name in {SPEC_FILE}")
    return text


def _check_name(name: str) -> None:
    try:
        Metadata(name=name)
    except ValidationError:
        raise InputError(
            f"--name {name!r} is not a valid evaluation name",
            hint="lowercase letters, digits, '.', '_' and '-', starting and ending with a "
            "letter or digit, at most 63 characters",
        ) from None


def scaffold(blueprint: Blueprint, dest: Path, *, name: str | None = None) -> Scaffolded:
    """Write a new project from ``blueprint`` into ``dest``, which must be new or empty.

    The project is complete before it appears: files are written to a hidden sibling
    directory, its spec is validated and its pinned inputs hashed, and only then is
    it moved into place (one rename for a new directory). Nothing is ever overwritten.
    ``name`` replaces the spec's ``metadata.name``.
    """
    if name is not None:
        _check_name(name)
    dest = dest.expanduser().absolute()
    _check_destination(dest)
    files = _project_files(blueprint)
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}.init-", dir=dest.parent))
    try:
        for rel, src in files:
            target = staging.joinpath(*rel.parts)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(src.read_bytes())
            target.chmod(0o644)
        for directory in [staging, *(p for p in staging.rglob("*") if p.is_dir())]:
            directory.chmod(0o755)
        spec_path = staging / SPEC_FILE
        spec = load_spec(spec_path)
        if name is not None and name != spec.metadata.name:
            text = _rename(
                spec_path.read_text(encoding="utf-8"), spec.metadata.name, name, blueprint.name
            )
            spec_path.write_text(text, encoding="utf-8")
            spec = load_spec(spec_path)
        # Fail here, not at lock time, if a packaged input does not match its pin.
        check_local_input(staging, spec.model.uri, spec.model.sha256, "model")
        for i, ds in enumerate(spec.datasets):
            check_local_input(staging, ds.uri, ds.sha256, f"datasets[{i}] ({ds.name})")
        _check_destination(dest)
        if dest.is_dir():
            # Fill the existing directory rather than replace it: it may be someone's cwd.
            for entry in sorted(staging.iterdir()):
                entry.rename(dest / entry.name)
            staging.rmdir()
        else:
            staging.rename(dest)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return Scaffolded(
        blueprint=blueprint,
        root=dest,
        files=tuple(str(rel) for rel, _ in files),
        spec=spec,
    )

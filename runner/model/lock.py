"""The lock (``eval.lock.json``): every input of a run resolved to a digest.

:class:`LockedSpec` is what ``evalrun lock`` writes and every run reads; its
:meth:`~LockedSpec.digest` identifies a run. Within ``evalrun/lock/v1`` fields are
only ever added, with defaults, and left out of the digest while at their defaults,
so locks written by older evalruns load and keep their digests (and run ids).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Literal

from pydantic import ConfigDict, Field, ValidationError, field_validator, model_validator

from runner._internal.input_tree import check_relative_path
from runner._internal.strict_json import load_json_strict
from runner.errors import SpecError
from runner.model.base import (
    FrozenModel,
    Name,
    Sha256Hex,
    decoded_text,
    format_errors,
    parse_digest_ref,
    read_input_file,
)
from runner.shared.inputs import tree_digest_of
from runner.shared.json_types import JSONObject

if TYPE_CHECKING:  # the predicate's models load when a run is sealed, not to read a lock
    from runner.model.predicate_parts import JsonObject

LOCK_SCHEMA = "evalrun/lock/v1"
MAX_LOCK_BYTES = 16 * 1024 * 1024


class LockedFile(FrozenModel):
    """One file of a locked input: its path inside the input, sha256 and size."""

    path: str = Field(description="Path relative to the input's root, '/'-separated.")
    sha256: Sha256Hex
    size: int = Field(ge=0)

    @field_validator("path")
    @classmethod
    def _safe_path(cls, value: str) -> str:
        return check_relative_path(value)


class LockedArtifact(FrozenModel):
    """A locked model input (datasets add their provenance, :class:`LockedDataset`).

    A *file* input is identified by the sha256 of its bytes, a *directory* by its
    ``evalrun-input-tree/v1`` digest over every file (``sha256`` holds either, as hex).
    Locks written before directories and remote sources hold only ``path``,
    ``sha256`` and ``size``: a local file, named like its path inside the container.
    """

    kind: Literal["file", "directory"] = Field(
        default="file", description="One file, or a directory of files."
    )
    path: str | None = Field(
        default=None, description="Local inputs: the path relative to the spec directory."
    )
    uri: str | None = Field(
        default=None,
        description="Remote inputs: https URL (without query), s3://bucket/key or "
        "s3://bucket/prefix/, or oci://registry/repo@sha256:….",
    )
    endpoint: str | None = Field(default=None, description="S3 endpoint the input came from.")
    sha256: Sha256Hex = Field(
        description="A file's sha256, or a directory's evalrun-input-tree/v1 digest (hex)."
    )
    size: int = Field(ge=0, description="Bytes, all files together.")
    files: tuple[LockedFile, ...] = Field(
        default=(),
        description="Every file (a file input: one entry, its name inside the container).",
    )
    artifact: str | None = Field(
        default=None,
        description="Where the input is published by digest: registry/repo@sha256:… of an "
        "OCI artifact with one layer per file.",
    )

    @field_validator("artifact")
    @classmethod
    def _artifact_pinned(cls, value: str | None) -> str | None:
        if value is not None:
            parse_digest_ref(value)
        return value

    @model_validator(mode="after")
    def _consistent(self) -> LockedArtifact:
        if (self.path is None) == (self.uri is None):
            raise ValueError("a locked input has either 'path' (local) or 'uri' (remote)")
        if self.kind == "directory" and not self.files:
            raise ValueError("a directory input lists its files")
        if not self.files:
            return self
        if sum(f.size for f in self.files) != self.size:
            raise ValueError("'size' is not the sum of the files' sizes")
        if self.kind == "file":
            if len(self.files) != 1 or self.files[0].sha256 != self.sha256:
                raise ValueError("a file input lists exactly its one file")
            return self
        paths = [f.path for f in self.files]
        if len(set(paths)) != len(paths):
            raise ValueError("a file is listed twice")
        found = tree_digest_of((f.path, f.sha256, f.size) for f in self.files)
        if found != self.digest:
            raise ValueError(f"the files listed give the tree digest {found}, not the one locked")
        return self

    @property
    def digest(self) -> str:
        """``sha256:<hex>``: the file's sha256 or the directory's tree digest."""
        return f"sha256:{self.sha256}"

    @property
    def origin(self) -> str:
        """Where the input came from, for people: its local path or its URI."""
        return self.path if self.path is not None else str(self.uri)

    def entries(self) -> tuple[LockedFile, ...]:
        """Every file; a lock without ``files`` is one local file named like its path."""
        if self.files:
            return self.files
        name = PurePosixPath(self.origin).name or "input"
        return (LockedFile(path=name, sha256=self.sha256, size=self.size),)

    def record(self) -> JsonObject:
        """What a run's signed predicate says about the input (the lock has the file list)."""
        return self.model_dump(mode="json", exclude_defaults=True, exclude={"files"})


class LockedDataset(LockedArtifact):
    """A locked dataset: the input plus its name, split, license and provenance."""

    name: Name
    split: str
    license: str
    source: str = Field(description="Where the data came from (provenance, as the spec says).")


class LockedWheel(FrozenModel):
    name: str
    version: str
    filename: str
    sha256: Sha256Hex


class LockedBase(FrozenModel):
    ref: str = Field(description="repo@sha256 of the base image.")
    recipe: str | None = None
    recipe_sha256: Sha256Hex | None = None
    suite: str | None = Field(default=None, description="Debian suite of the recipe.")
    mirror: str | None = Field(default=None, description="Debian mirror the recipe used.")
    source_date_epoch: int | None = Field(
        default=None, description="SOURCE_DATE_EPOCH of the base."
    )
    layer_digest: str | None = Field(
        default=None,
        pattern=r"^sha256:[0-9a-f]{64}$",
        description="Digest of the normalized base layer (uncompressed tar).",
    )
    packages: dict[str, str] | None = Field(
        default=None, description="Debian packages as installed (dpkg status): name → version."
    )

    @field_validator("ref")
    @classmethod
    def _pinned(cls, value: str) -> str:
        parse_digest_ref(value)
        return value


class Reproducibility(FrozenModel):
    """The outcome of the last ``evalrun build --check`` of this image."""

    checked_at: str = Field(description="When the rebuild finished (UTC, RFC 3339).")
    result: Literal["identical", "differs"]
    rebuilt_ref: str = Field(description="repo@sha256 of the image the rebuild produced.")
    base_identical: bool = Field(description="The fresh base layer equals the locked one.")
    from_scratch: bool = Field(description="Base rebuilt with mmdebstrap and no build cache.")
    differences: int = Field(default=0, ge=0, description="Files + config fields that differ.")


class LockedImage(FrozenModel):
    ref: str = Field(description="repo@sha256 manifest digest of the evaluation image.")
    rootfs_digest: str = Field(pattern=r"^sha256:[0-9a-f]{64}$")
    template_sha256: Sha256Hex | None = None
    context_sha256: Sha256Hex | None = None
    inputs_digest: Sha256Hex | None = Field(
        default=None, description="Digest over every build input (base, wheels, template, context)."
    )
    built_at: str | None = None
    assembly: str | None = Field(
        default=None, description="How evalrun assembled the image (evalrun-oci/v1)."
    )
    agent_sha256: Sha256Hex | None = Field(
        default=None, description="Digest of the in-container agent files copied into the image."
    )
    source_date_epoch: int | None = None
    config_digest: str | None = Field(default=None, pattern=r"^sha256:[0-9a-f]{64}$")
    layers: list[str] | None = Field(default=None, description="Layer digests (diff ids).")
    reproducibility: Reproducibility | None = None

    @field_validator("ref")
    @classmethod
    def _pinned(cls, value: str) -> str:
        parse_digest_ref(value)
        return value


class LockedSource(FrozenModel):
    commit: str | None = Field(description="git commit of the evaluated code, None outside git.")
    dirty: bool
    tree_sha256: Sha256Hex = Field(description="Digest of the build context's files.")


class LockedPreprocessing(FrozenModel):
    name: str
    code: str = Field(description="Path of the step's code, relative to the spec.")
    code_digest: str = Field(pattern=r"^sha256:[0-9a-f]{64}$")
    kind: Literal["file", "directory"]
    params: JSONObject = Field(default_factory=dict)


class LockedCustomMetric(FrozenModel):
    """A custom metric's code: the file (relative to the spec), its function, its digest."""

    name: str
    file: str
    function: str
    digest: str = Field(pattern=r"^sha256:[0-9a-f]{64}$")


class LockedSpec(FrozenModel):
    """``eval.lock.json``: every input of a run resolved to a digest."""

    schema_: Literal["evalrun/lock/v1"] = Field(alias="schema", default="evalrun/lock/v1")
    spec_name: Name
    spec_digest: str = Field(pattern=r"^sha256:[0-9a-f]{64}$")
    base: LockedBase | None
    wheels: list[LockedWheel]
    image: LockedImage
    model: LockedArtifact
    datasets: list[LockedDataset]
    source: LockedSource
    preprocessing: list[LockedPreprocessing] = Field(
        default_factory=list, description="Declared preprocessing steps and their code digests."
    )
    custom_metrics: list[LockedCustomMetric] = Field(
        default_factory=list,
        description="Custom metric files (compute: custom) and their digests.",
    )

    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)

    def canonical_json(self) -> bytes:
        """The inputs that identify a run. Findings about them (the image's
        reproducibility check, its time of build) are left out: recording a check
        must not turn the same locked inputs into a different run."""
        data = self.model_dump(mode="json", by_alias=True, exclude_defaults=True)
        image = data.get("image") or {}
        for key in ("reproducibility", "built_at"):
            image.pop(key, None)
        return json.dumps(data, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()

    def digest(self) -> str:
        return "sha256:" + hashlib.sha256(self.canonical_json()).hexdigest()


# --------------------------------------------------------------------------- loading


def parse_lock_bytes(raw: bytes, *, source: str) -> LockedSpec:
    """Validate the bytes of an ``eval.lock.json`` (strict JSON: no duplicate keys, no NaN)."""
    try:
        data = load_json_strict(decoded_text(raw, what="lock file", source=source))
    except json.JSONDecodeError as exc:
        raise SpecError(
            f"lock file {source} is not valid JSON",
            file=source,
            problems=[(f"line {exc.lineno}, column {exc.colno}", exc.msg)],
        ) from None
    except ValueError as exc:
        raise SpecError(
            f"lock file {source} is not valid JSON",
            file=source,
            problems=[("document", str(exc)[:200])],
        ) from None
    try:
        return LockedSpec.model_validate(data)
    except ValidationError as exc:
        raise SpecError(
            f"invalid lock file {source}", file=source, problems=format_errors(LockedSpec, exc)
        ) from None


def load_lock(path: Path) -> LockedSpec:
    """Load and validate ``eval.lock.json`` (a regular file, at most :data:`MAX_LOCK_BYTES`)."""
    try:
        raw = read_input_file(path, what="lock file", max_bytes=MAX_LOCK_BYTES)
    except SpecError as exc:
        if "not found" in exc.message:
            exc.hint = "run `evalrun lock SPEC` to resolve every input to a digest"
        raise
    return parse_lock_bytes(raw, source=str(path))


def lock_path_for(spec_path: Path) -> Path:
    """The lock file that belongs next to a spec: ``eval.yaml`` → ``eval.lock.json``."""
    return spec_path.with_name(spec_path.stem + ".lock.json")

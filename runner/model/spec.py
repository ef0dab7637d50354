"""The evaluation spec (``eval.yaml``) and its lock (``eval.lock.json``).

Models are frozen and strict: once you hold an :class:`EvalSpec` or a
:class:`LockedSpec`, it is well-formed. Loading goes through a YAML loader that
refuses custom tags, duplicate keys, alias bombs and oversized files.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import math
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    field_validator,
    model_validator,
)

from runner._internal.files import RefusedFile, read_regular_file
from runner._internal.strict_json import load_json_strict
from runner.errors import SpecError

API_VERSION = "evalrun/v1"
MAX_SPEC_BYTES = 256 * 1024
MAX_LOCK_BYTES = 16 * 1024 * 1024
MAX_ALIASES = 16
# Deeper YAML is refused before it is composed (the composer recurses per level).
MAX_YAML_DEPTH = 64
LOCK_SCHEMA = "evalrun/lock/v1"

Sha256Hex = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]
Name = Annotated[str, StringConstraints(pattern=r"^[a-z0-9]([a-z0-9._-]{0,61}[a-z0-9])?$")]
DIGEST_REF_RE = re.compile(
    r"^(?P<repo>[a-z0-9]+(?:[._:/-][a-z0-9]+)*)@(?P<digest>sha256:[0-9a-f]{64})$"
)


def parse_digest_ref(ref: str) -> tuple[str, str]:
    """Split ``repo@sha256:…`` into (repo, digest); raise ValueError for anything else."""
    match = DIGEST_REF_RE.match(ref)
    if not match:
        if "@" not in ref:
            raise ValueError(
                f"image reference {ref!r} is not pinned by digest; expected repo@sha256:<64 hex>"
            )
        raise ValueError(f"image reference {ref!r} is not of the form repo@sha256:<64 hex>")
    return match["repo"], match["digest"]


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", strict=False)


class Metadata(_Model):
    name: Name = Field(description="Evaluation name: lowercase letters, digits, '.', '_', '-'.")
    description: str = ""
    labels: dict[str, str] = Field(default_factory=dict)
    rationale: str | None = Field(
        default=None,
        description="Why this run exists (e.g. why this model is a release candidate); "
        "recorded in the bundle's provenance. `evalrun run --reason` takes precedence.",
    )
    comparison_group: Name | None = Field(
        default=None,
        description="Runs with the same group are compared by `evalrun compare GROUP`, "
        "which refuses runs that are not comparable.",
    )


class ImageSpec(_Model):
    """Either a template build (template + context + base) or a digest-pinned ``ref``."""

    template: str | None = Field(
        default=None, description="Jinja2 Dockerfile template, relative to the spec file."
    )
    context: str | None = Field(
        default=None, description="Build context directory, relative to the spec file."
    )
    base: str | None = Field(
        default=None,
        description="Base image: a recipe name under images/base/ or a repo@sha256:… reference.",
    )
    requirements: list[str] = Field(
        default_factory=list,
        description="Python requirements ('name==version'), resolved to wheels with hashes.",
    )
    ref: str | None = Field(
        default=None, description="A prebuilt image, pinned as repo@sha256:… (no tags)."
    )
    repository: str = Field(
        default="127.0.0.1:5000/evalrun",
        description="Registry and path prefix the built image is pushed to.",
    )

    @field_validator("ref")
    @classmethod
    def _ref_pinned(cls, value: str | None) -> str | None:
        if value is not None:
            parse_digest_ref(value)
        return value

    @field_validator("requirements")
    @classmethod
    def _requirements_pinned(cls, value: list[str]) -> list[str]:
        for req in value:
            if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*==[A-Za-z0-9.+!-]+", req):
                raise ValueError(f"requirement {req!r} must be pinned exactly as 'name==version'")
        return value

    @field_validator("base")
    @classmethod
    def _base_shape(cls, value: str | None) -> str | None:
        if value is None:
            return value
        if "/" in value or ":" in value or "@" in value:
            parse_digest_ref(value)
        elif not re.fullmatch(r"[a-z0-9][a-z0-9._-]*", value):
            raise ValueError(f"base {value!r} is neither a recipe name nor a digest reference")
        return value

    @model_validator(mode="after")
    def _one_source(self) -> ImageSpec:
        if self.ref and (self.template or self.context or self.base):
            raise ValueError("give either 'ref' or 'template'/'context'/'base', not both")
        if not self.ref and not (self.template and self.context and self.base):
            raise ValueError("a template build needs 'template', 'context' and 'base'")
        return self


class ArtifactSpec(_Model):
    uri: str = Field(description="Path relative to the spec file, or file:// URI.")
    sha256: Sha256Hex = Field(description="Expected sha256 of the file (64 lowercase hex).")


class DatasetSpec(ArtifactSpec):
    name: Name
    split: str = Field(description="Which split is evaluated (e.g. 'test').")
    license: str = Field(description="SPDX id or license statement of the data.")
    source: str = Field(description="Where the data came from.")


CIMethod = Literal["bootstrap_percentile", "bootstrap_bca", "wilson", "none"]


class ConfidenceIntervalSpec(_Model):
    method: CIMethod = "bootstrap_percentile"
    level: float = Field(default=0.95, gt=0.5, lt=1.0)
    resamples: int = Field(default=1000, ge=100, le=100_000)


class Promotion(_Model):
    """Why a supplementary metric gates the run after all; recorded in bundle and report."""

    justification: str = Field(
        min_length=1, description="Why this supplementary metric is promoted to gate the run."
    )

    @field_validator("justification")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("a promotion needs a non-empty justification")
        return value


class PerturbationSpec(_Model):
    """A declared data perturbation, evaluated in the same run as the baseline.

    ``subsample`` and ``slice`` select samples from the baseline outputs; ``noise`` and
    ``drop_feature`` re-run the evaluation on perturbed inputs (the evaluation reads
    ``EVALRUN_PERTURBATION``). All are seeded and recorded.
    """

    name: Name
    kind: Literal["subsample", "slice", "noise", "drop_feature"]
    fraction: float | None = Field(default=None, gt=0, lt=1, description="subsample: share kept.")
    field: str | None = Field(default=None, description="slice: per-sample field to match.")
    value: str | int | float | bool | None = Field(default=None, description="slice: value.")
    std: float | None = Field(default=None, gt=0, description="noise: standard deviation.")
    feature: str | None = Field(default=None, description="drop_feature: which feature.")
    seed: int | None = Field(default=None, ge=0, le=2**32 - 1)

    @model_validator(mode="after")
    def _parameters_for_kind(self) -> PerturbationSpec:
        needs = {
            "subsample": ["fraction"],
            "slice": ["field", "value"],
            "noise": ["std"],
            "drop_feature": ["feature"],
        }[self.kind]
        missing = [n for n in needs if getattr(self, n) is None]
        if missing:
            raise ValueError(f"perturbation kind {self.kind!r} needs {missing}")
        return self


class MetricSpec(_Model):
    name: Name
    compute: Literal["accuracy", "macro_f1", "error_rate", "mean"] = Field(
        description="Built-in metric computed from the per-sample outputs."
    )
    field: str | None = Field(
        default=None, description="Per-sample field for 'mean' (e.g. 'score')."
    )
    direction: Literal["higher_is_better", "lower_is_better"] = "higher_is_better"
    threshold: float | None = Field(
        default=None, description="Pass if the point estimate is on the good side of this."
    )
    ci: ConfidenceIntervalSpec = Field(default_factory=ConfidenceIntervalSpec)
    role: Literal["primary", "supplementary"] = Field(
        default="primary",
        description="primary metrics are the acceptance criteria (their thresholds gate the "
        "run); supplementary ones are reported and never gate unless promoted.",
    )
    promoted: Promotion | None = Field(
        default=None,
        description="Make a supplementary metric gate, with a recorded justification.",
    )

    @property
    def gating(self) -> bool:
        """Whether this metric's threshold decides the run's verdict."""
        return self.role == "primary" or self.promoted is not None

    @model_validator(mode="after")
    def _promotion_is_for_supplementary(self) -> MetricSpec:
        if self.promoted is not None and self.role != "supplementary":
            raise ValueError("only a supplementary metric can be promoted (role: supplementary)")
        return self

    @model_validator(mode="after")
    def _field_for_mean(self) -> MetricSpec:
        if self.compute == "mean" and not self.field:
            raise ValueError("metric 'mean' needs 'field'")
        if self.ci.method == "wilson" and self.compute not in ("accuracy", "error_rate"):
            raise ValueError("the Wilson interval applies to proportions (accuracy, error_rate)")
        return self


class ResourcesSpec(_Model):
    cpus: float = Field(default=1.0, gt=0, le=256)
    memory_mib: int = Field(default=1024, ge=64, le=4 * 1024 * 1024)
    pids: int = Field(default=256, ge=16, le=65536)
    gpus: int = Field(default=0, ge=0, le=16)
    gpu_product: str | None = Field(
        default=None,
        pattern=r"^[A-Za-z0-9]([A-Za-z0-9._-]{0,61}[A-Za-z0-9])?$",
        description="Exact node label value of nvidia.com/gpu.product to schedule onto.",
    )
    gpu_driver_major: int | None = Field(
        default=None, ge=1, description="Node label nvidia.com/cuda.driver.major to require."
    )


class SandboxSpec(_Model):
    runtime: Literal["gvisor", "runc"] = Field(
        default="gvisor", description="gvisor (default) or runc; never silently downgraded."
    )
    network: Literal["none"] = "none"
    runtime_class: str | None = Field(
        default=None,
        pattern=r"^[a-z0-9]([a-z0-9.-]{0,61}[a-z0-9])?$",
        description="Kubernetes RuntimeClass to use (default: 'gvisor' for runtime gvisor). "
        "GPU runs must name theirs explicitly (e.g. a gVisor-with-nvproxy class).",
    )


class ExpectedEnvironment(_Model):
    """What the container must find before the evaluation starts (checked by the agent)."""

    driver: str | None = Field(default=None, description="Driver version specifier, '>=550,<600'.")
    cuda: str | None = Field(default=None, description="CUDA driver version specifier.")
    gpu_product: str | None = Field(default=None, description="Regex the GPU name must match.")
    gpu_count: int | None = Field(default=None, ge=0)
    mig: Literal["required", "forbidden"] | None = None
    ecc: Literal["required"] | None = None


class PreprocessingStep(_Model):
    """A declared preprocessing / feature step, so the feature space can be replayed."""

    name: Name
    code: str = Field(
        description="File or directory with the step's code, relative to the spec file; "
        "its digest is recorded in the bundle."
    )
    params: dict[str, Any] = Field(default_factory=dict)

    @field_validator("code")
    @classmethod
    def _relative_inside(cls, value: str) -> str:
        parts = Path(value).parts
        if not value or Path(value).is_absolute() or ".." in parts:
            raise ValueError(f"code {value!r} must be a relative path inside the spec directory")
        return value


class EvalSpec(_Model):
    """A whole ``eval.yaml``."""

    apiVersion: Literal["evalrun/v1"]
    kind: Literal["Evaluation"]
    metadata: Metadata
    image: ImageSpec
    model: ArtifactSpec
    datasets: list[DatasetSpec] = Field(min_length=1)
    command: list[str] = Field(min_length=1, description="argv run inside the container.")
    params: dict[str, Any] = Field(default_factory=dict)
    seed: int = Field(default=0, ge=0, le=2**32 - 1)
    seeds: list[int] | None = Field(
        default=None,
        min_length=2,
        max_length=100,
        description="Run the evaluation once per seed as one run set (per-seed metrics, "
        "mean, standard deviation, CI across seeds). Excludes 'seed' and 'repeats'.",
    )
    repeats: int | None = Field(
        default=None,
        ge=2,
        le=100,
        description="Shorthand for seeds: seed, seed+1, …, seed+repeats-1.",
    )
    metrics: list[MetricSpec] = Field(min_length=1)
    perturbations: list[PerturbationSpec] = Field(
        default_factory=list,
        description="Data perturbations evaluated in the same run; the report shows each "
        "metric's change with its CI.",
    )
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)
    sandbox: SandboxSpec = Field(default_factory=SandboxSpec)
    expect: ExpectedEnvironment = Field(default_factory=ExpectedEnvironment)
    timeout_s: int = Field(default=600, ge=1, le=7 * 24 * 3600)
    retries: int = Field(default=2, ge=0, le=10)
    preprocessing: list[PreprocessingStep] = Field(
        default_factory=list,
        description="Preprocessing / feature steps (name, code, params), recorded with the "
        "digest of their code.",
    )

    @model_validator(mode="after")
    def _one_seed_policy(self) -> EvalSpec:
        if self.seeds is not None:
            if self.repeats is not None:
                raise ValueError("give either 'seeds' or 'repeats', not both")
            if "seed" in self.model_fields_set:
                raise ValueError("give either 'seed' or 'seeds', not both")
            if len(set(self.seeds)) != len(self.seeds):
                raise ValueError(f"seeds: duplicate values in {self.seeds}")
            if any(not 0 <= s <= 2**32 - 1 for s in self.seeds):
                raise ValueError("seeds: each must be between 0 and 2**32-1")
        return self

    def run_set_seeds(self) -> list[int] | None:
        """The seeds of a run set, or None for a single run."""
        if self.seeds is not None:
            return list(self.seeds)
        if self.repeats is not None:
            return [self.seed + i for i in range(self.repeats)]
        return None

    @model_validator(mode="after")
    def _gpu_sandbox_is_explicit(self) -> EvalSpec:
        if (
            self.resources.gpus
            and self.sandbox.runtime == "gvisor"
            and not self.sandbox.runtime_class
        ):
            raise ValueError(
                "sandbox.runtime_class: a GPU run under gvisor must name its RuntimeClass "
                "explicitly (e.g. one with nvproxy), or choose sandbox.runtime: runc; "
                "evalrun never picks a GPU sandbox silently"
            )
        return self

    @model_validator(mode="after")
    def _unique_names(self) -> EvalSpec:
        for what, names in (
            ("datasets", [d.name for d in self.datasets]),
            ("metrics", [m.name for m in self.metrics]),
            ("preprocessing", [p.name for p in self.preprocessing]),
        ):
            dupes = sorted({n for n in names if names.count(n) > 1})
            if dupes:
                raise ValueError(f"{what}: duplicate names {dupes}")
        return self

    def canonical_json(self) -> bytes:
        """Canonical bytes of the spec: the basis of the spec digest.

        Fields left at their defaults are omitted, so adding a new optional field to the
        schema does not change the digest (and run ids) of every existing spec.
        """
        return json.dumps(
            self.model_dump(mode="json", exclude_defaults=True),
            sort_keys=True,
            separators=(",", ":"),
            allow_nan=False,
        ).encode()

    def digest(self) -> str:
        return "sha256:" + hashlib.sha256(self.canonical_json()).hexdigest()


# --------------------------------------------------------------------------- lock


class LockedArtifact(_Model):
    path: str = Field(description="Resolved path relative to the spec directory.")
    sha256: Sha256Hex
    size: int = Field(ge=0)


class LockedDataset(LockedArtifact):
    name: Name
    split: str
    license: str
    source: str


class LockedWheel(_Model):
    name: str
    version: str
    filename: str
    sha256: Sha256Hex


class LockedBase(_Model):
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


class Reproducibility(_Model):
    """The outcome of the last ``evalrun build --check`` of this image."""

    checked_at: str = Field(description="When the rebuild finished (UTC, RFC 3339).")
    result: Literal["identical", "differs"]
    rebuilt_ref: str = Field(description="repo@sha256 of the image the rebuild produced.")
    base_identical: bool = Field(description="The fresh base layer equals the locked one.")
    from_scratch: bool = Field(description="Base rebuilt with mmdebstrap and no build cache.")
    differences: int = Field(default=0, ge=0, description="Files + config fields that differ.")


class LockedImage(_Model):
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


class LockedSource(_Model):
    commit: str | None = Field(description="git commit of the evaluated code, None outside git.")
    dirty: bool
    tree_sha256: Sha256Hex = Field(description="Digest of the build context's files.")


class LockedPreprocessing(_Model):
    name: str
    code: str = Field(description="Path of the step's code, relative to the spec.")
    code_digest: str = Field(pattern=r"^sha256:[0-9a-f]{64}$")
    kind: Literal["file", "directory"]
    params: dict[str, Any] = Field(default_factory=dict)


class LockedSpec(_Model):
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


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that also refuses duplicate and non-scalar keys, non-finite numbers,
    tags beyond plain JSON types and deep nesting, and counts aliases."""

    alias_count = 0
    depth = 0

    def compose_node(self, parent: yaml.Node | None, index: int) -> yaml.Node | None:
        if self.check_event(yaml.AliasEvent):
            self.alias_count += 1
            if self.alias_count > MAX_ALIASES:
                event = self.peek_event()  # type: ignore[no-untyped-call]
                raise yaml.constructor.ConstructorError(
                    None,
                    None,
                    f"more than {MAX_ALIASES} YAML aliases; refusing possible alias expansion",
                    event.start_mark,
                )
        self.depth += 1
        try:
            if self.depth > MAX_YAML_DEPTH:
                event = self.peek_event()  # type: ignore[no-untyped-call]
                raise yaml.composer.ComposerError(
                    None, None, f"nested deeper than {MAX_YAML_DEPTH} levels", event.start_mark
                )
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, yaml.Mark] = {}
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode):
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping",
                    node.start_mark,
                    "a mapping key must be a plain scalar, not a "
                    + ("sequence" if isinstance(key_node, yaml.SequenceNode) else "mapping"),
                    key_node.start_mark,
                )
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping",
                    node.start_mark,
                    f"duplicate key {key!r} (first defined at line {seen[key].line + 1})",
                    key_node.start_mark,
                )
            seen[key] = key_node.start_mark
        return super().construct_mapping(node, deep=deep)

    def construct_finite_float(self, node: yaml.ScalarNode) -> float:
        value: float = self.construct_yaml_float(node)
        if not math.isfinite(value):
            raise yaml.constructor.ConstructorError(
                None, None, f"non-finite number {node.value!r} is not allowed", node.start_mark
            )
        return value

    def construct_text(self, node: yaml.ScalarNode) -> str:
        return str(self.construct_scalar(node))

    def construct_refused(self, node: yaml.Node) -> Any:
        raise yaml.constructor.ConstructorError(
            None, None, f"YAML type {node.tag} is not allowed in a spec", node.start_mark
        )


_StrictLoader.add_constructor("tag:yaml.org,2002:float", _StrictLoader.construct_finite_float)
# dates stay the text they were written as; a spec holds JSON types only
_StrictLoader.add_constructor("tag:yaml.org,2002:timestamp", _StrictLoader.construct_text)
for _tag in ("binary", "omap", "pairs", "set"):
    _StrictLoader.add_constructor(f"tag:yaml.org,2002:{_tag}", _StrictLoader.construct_refused)


def read_input_file(path: Path, *, what: str, max_bytes: int) -> bytes:
    """The bytes of a spec, lock or matrix file the user named, bounded and never blocking.

    SpecError (exit 2) naming the file when it is missing, not a regular file (a
    directory, FIFO or device), larger than ``max_bytes`` or unreadable.
    """
    try:
        return read_regular_file(path, max_bytes=max_bytes)
    except FileNotFoundError:
        raise SpecError(f"{what} not found: {path}", file=str(path)) from None
    except NotADirectoryError:
        raise SpecError(f"{what} not found: {path}", file=str(path)) from None
    except RefusedFile as exc:
        if "limit" in exc.reason:
            raise SpecError(f"{what} {path} {exc.reason}", file=str(path)) from None
        raise SpecError(f"cannot read {what} {path}: {exc.reason}", file=str(path)) from None


def _decoded(data: bytes, *, what: str, source: str) -> str:
    try:
        return data.decode("utf-8", errors="strict")
    except UnicodeDecodeError as exc:
        raise SpecError(
            f"{what} {source} is not UTF-8 text "
            f"(byte 0x{data[exc.start]:02x} at offset {exc.start})",
            file=source,
        ) from None


def load_yaml_bytes(data: bytes, *, source: str, what: str = "spec file") -> Any:
    """One YAML document from ``data`` (read from ``source``), strictly.

    Raises :class:`SpecError` naming ``source`` (and the line, where there is one) for
    text that is not UTF-8, malformed YAML, custom tags, duplicate or non-scalar keys,
    non-finite numbers, alias bombs, nesting deeper than :data:`MAX_YAML_DEPTH`, or
    not exactly one document.
    """
    text = _decoded(data, what=what, source=source)
    try:
        loader = _StrictLoader(text)
        try:
            docs = []
            while loader.check_data():  # type: ignore[no-untyped-call]
                docs.append(loader.get_data())
        finally:
            loader.dispose()
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "document"
        problem = getattr(exc, "problem", None) or str(exc)
        if "could not determine a constructor" in str(exc):
            tag = getattr(exc, "problem", "")
            problem = f"custom YAML tags are not allowed: {tag}"
        raise SpecError(
            f"malformed YAML in {source}", file=source, problems=[(where, str(problem))]
        ) from None
    except (ValueError, RecursionError) as exc:
        # e.g. an integer literal with more digits than Python converts
        raise SpecError(
            f"malformed YAML in {source}", file=source, problems=[("document", str(exc)[:200])]
        ) from None
    if len(docs) != 1:
        raise SpecError(
            f"{source}: expected exactly one YAML document, found {len(docs)}", file=source
        )
    return docs[0]


def load_yaml_document(path: Path, *, what: str = "spec file") -> Any:
    """Read one YAML document safely, raising :class:`SpecError` naming the file and line."""
    data = read_input_file(path, what=what, max_bytes=MAX_SPEC_BYTES)
    return load_yaml_bytes(data, source=str(path), what=what)


def _non_finite(data: Any, where: str = "") -> list[tuple[str, str]]:
    """Where ``data`` (parsed YAML or JSON) holds a NaN or an infinity."""
    found: list[tuple[str, str]] = []
    stack: list[tuple[Any, str]] = [(data, where)]
    while stack:
        value, loc = stack.pop()
        if isinstance(value, float) and not math.isfinite(value):
            found.append((loc or "(top level)", f"non-finite number {value!r} is not allowed"))
        elif isinstance(value, dict):
            stack.extend((v, f"{loc}.{k}" if loc else str(k)) for k, v in value.items())
        elif isinstance(value, list | tuple):
            stack.extend((v, f"{loc}[{i}]") for i, v in enumerate(value))
    return sorted(found)


def _field_names(model: type[BaseModel]) -> list[str]:
    return [info.alias or name for name, info in model.model_fields.items()]


def _model_at(model: type[BaseModel], loc: tuple[int | str, ...]) -> type[BaseModel] | None:
    """Walk ``loc`` through nested pydantic models; None when it leaves models."""
    current: Any = model
    for part in loc:
        if isinstance(part, int):
            continue
        if not (isinstance(current, type) and issubclass(current, BaseModel)):
            return None
        info = current.model_fields.get(part)
        if info is None:
            return None
        current = info.annotation
        args = getattr(current, "__args__", ())
        for arg in (current, *args):
            if isinstance(arg, type) and issubclass(arg, BaseModel):
                current = arg
                break
    return current if isinstance(current, type) and issubclass(current, BaseModel) else None


def _format_errors(model: type[BaseModel], exc: ValidationError) -> list[tuple[str, str]]:
    problems: list[tuple[str, str]] = []
    for err in exc.errors():
        loc = tuple(err["loc"])
        where = ".".join(f"[{p}]" if isinstance(p, int) else str(p) for p in loc).replace(".[", "[")
        where = where or "(top level)"
        if err["type"] == "extra_forbidden":
            parent = _model_at(model, loc[:-1])
            key = str(loc[-1])
            msg = f"unknown field {key!r}"
            if parent is not None:
                close = difflib.get_close_matches(key, _field_names(parent), n=1, cutoff=0.5)
                if close:
                    msg += f"; did you mean {close[0]!r}?"
                else:
                    msg += f"; expected one of {sorted(_field_names(parent))}"
            problems.append((where, msg))
            continue
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "missing":
            msg = "required field is missing"
        elif "input" in err and err["type"] not in ("missing",):
            found = err["input"]
            shown = repr(found)
            if len(shown) > 80:
                shown = shown[:77] + "..."
            msg = f"{msg} (found {type(found).__name__} {shown})"
        problems.append((where, msg))
    return problems


def parse_spec(data: Any, *, source: str) -> EvalSpec:
    """Validate a loaded document into an :class:`EvalSpec`."""
    if not isinstance(data, dict):
        raise SpecError(
            f"the spec {source} must be a mapping, found {type(data).__name__}", file=source
        )
    non_finite = _non_finite(data)
    if non_finite:
        raise SpecError(f"invalid evaluation spec {source}", file=source, problems=non_finite)
    try:
        return EvalSpec.model_validate(data)
    except ValidationError as exc:
        raise SpecError(
            f"invalid evaluation spec {source}", file=source, problems=_format_errors(EvalSpec, exc)
        ) from None


def load_spec(path: Path) -> EvalSpec:
    """Load and validate ``eval.yaml``."""
    return parse_spec(load_yaml_document(path), source=str(path))


def load_spec_bytes(data: bytes, *, source: str) -> EvalSpec:
    """Validate the bytes of an ``eval.yaml`` read elsewhere (e.g. from a verified bundle)."""
    return parse_spec(load_yaml_bytes(data, source=source), source=source)


def parse_lock_bytes(raw: bytes, *, source: str) -> LockedSpec:
    """Validate the bytes of an ``eval.lock.json`` (strict JSON: no duplicate keys, no NaN)."""
    try:
        data = load_json_strict(_decoded(raw, what="lock file", source=source))
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
            f"invalid lock file {source}", file=source, problems=_format_errors(LockedSpec, exc)
        ) from None


def load_lock(path: Path) -> LockedSpec:
    """Load and validate ``eval.lock.json``."""
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


def spec_json_schema() -> dict[str, Any]:
    """The JSON Schema of ``eval.yaml`` (what ``evalrun schema`` prints)."""
    schema = EvalSpec.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["$id"] = "https://evalrun.dev/schema/evaluation-v1.json"
    return schema

"""The evaluation spec (``eval.yaml``).

Models are frozen and strict: once you hold an :class:`EvalSpec`, it is
well-formed. Loading goes through the strict YAML loader of :mod:`runner.model.spec_yaml`,
which refuses custom tags, duplicate keys, alias bombs and oversized files. What a spec
says about its metrics is in :mod:`runner.model.spec_metrics`, where and how it runs in
:mod:`runner.model.spec_runtime`; the lock's models live in :mod:`runner.model.lock`.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import urllib.parse
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    Field,
    StringConstraints,
    ValidationError,
    field_validator,
    model_validator,
)

from runner.errors import InputError, SpecError
from runner.model.base import FrozenModel as _Model
from runner.model.base import Name, format_errors, parse_digest_ref
from runner.model.input_uri import HttpsUri, S3Uri, parse_input_uri
from runner.model.spec_metrics import MetricSpec, PerturbationSpec
from runner.model.spec_runtime import ClusterSpec, ExpectedEnvironment, ResourcesSpec, SandboxSpec
from runner.model.spec_yaml import load_yaml_bytes, load_yaml_document
from runner.shared.json_types import JSONObject

API_VERSION = "evalrun/v1"

InputDigest = Annotated[
    str,
    StringConstraints(pattern=r"^(?:sha256:)?[0-9a-f]{64}$"),
    AfterValidator(lambda value: value.removeprefix("sha256:")),
]
"""A pinned input digest: ``<hex>`` or ``sha256:<hex>`` accepted, recorded as ``<hex>``."""


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
    """A model (or, as :class:`DatasetSpec`, a dataset) input: where it is, what it must be."""

    uri: str = Field(
        description="Where the input is: a path relative to the spec file or a file:// URI "
        "(a file or a directory), https://host/path (a file), s3://bucket/key (an object) or "
        "s3://bucket/prefix/ (every object under it, as a directory), or "
        "oci://registry/repo@sha256:… (an input published as an OCI artifact)."
    )
    sha256: InputDigest = Field(
        description="What it must be: a file's sha256, or a directory's evalrun-input-tree/v1 "
        "digest (64 lowercase hex, optionally prefixed 'sha256:'). `evalrun digest PATH` "
        "prints it."
    )
    ca_file: str | None = Field(
        default=None,
        description="https:// inputs (and S3 over https): PEM file of the CAs to trust, "
        "relative to the spec file (default: $REQUESTS_CA_BUNDLE, $SSL_CERT_FILE, else the "
        "system store).",
    )
    endpoint: str | None = Field(
        default=None,
        description="s3:// inputs: the S3-compatible endpoint, http[s]://host[:port] "
        "(default: $AWS_ENDPOINT_URL_S3, $AWS_ENDPOINT_URL, else AWS). Credentials come from "
        "the usual places ($AWS_ACCESS_KEY_ID…, $AWS_PROFILE), never from the spec.",
    )

    @field_validator("uri")
    @classmethod
    def _uri_parses(cls, value: str) -> str:
        try:
            parse_input_uri(value, field="uri")
        except InputError as exc:
            reason = exc.message.removeprefix("uri: ")
            raise ValueError(f"{reason} (hint: {exc.hint})" if exc.hint else reason) from None
        return value

    @field_validator("endpoint")
    @classmethod
    def _endpoint_shape(cls, value: str | None) -> str | None:
        if value is None:
            return value
        parts = urllib.parse.urlsplit(value)
        if (
            parts.scheme not in ("http", "https")
            or not parts.hostname
            or parts.path not in ("", "/")
        ):
            raise ValueError(f"endpoint {value!r} is not http[s]://host[:port] without a path")
        return value

    @model_validator(mode="after")
    def _options_fit_the_source(self) -> ArtifactSpec:
        parsed = parse_input_uri(self.uri, field="uri")
        if self.endpoint is not None and not isinstance(parsed, S3Uri):
            raise ValueError("'endpoint' applies to s3:// inputs only")
        if self.ca_file is not None and not isinstance(parsed, HttpsUri | S3Uri):
            raise ValueError("'ca_file' applies to https:// and s3:// inputs only")
        return self


class DatasetSpec(ArtifactSpec):
    name: Name
    split: str = Field(description="Which split is evaluated (e.g. 'test').")
    license: str = Field(description="SPDX id or license statement of the data.")
    source: str = Field(description="Where the data came from.")


class PreprocessingStep(_Model):
    """A declared preprocessing / feature step, so the feature space can be replayed."""

    name: Name
    code: str = Field(
        description="File or directory with the step's code, relative to the spec file; "
        "its digest is recorded in the bundle."
    )
    params: JSONObject = Field(default_factory=dict)

    @field_validator("code")
    @classmethod
    def _relative_inside(cls, value: str) -> str:
        parts = Path(value).parts
        if not value or Path(value).is_absolute() or ".." in parts:
            raise ValueError(f"code {value!r} must be a relative path inside the spec directory")
        return value


# params reach the evaluation in one environment variable (EVALRUN_PARAMS), which the
# kernel caps at 128 KiB (MAX_ARG_STRLEN): larger ones could never start the command.
MAX_PARAMS_BYTES = 64 * 1024


class EvalSpec(_Model):
    """A whole ``eval.yaml``."""

    apiVersion: Literal["evalrun/v1"]
    kind: Literal["Evaluation"]
    metadata: Metadata
    image: ImageSpec
    model: ArtifactSpec
    datasets: list[DatasetSpec] = Field(min_length=1)
    command: list[str] = Field(min_length=1, description="argv run inside the container.")
    params: JSONObject = Field(
        default_factory=dict,
        description="Handed to the evaluation as JSON in EVALRUN_PARAMS: at most "
        f"{MAX_PARAMS_BYTES} bytes (one environment variable; the kernel allows 128 KiB).",
    )
    seed: int = Field(default=0, ge=0, le=2**32 - 1)

    @field_validator("params")
    @classmethod
    def _params_fit_the_environment(cls, value: JSONObject) -> JSONObject:
        size = len(json.dumps(value, sort_keys=True, default=str).encode())
        if size > MAX_PARAMS_BYTES:
            raise ValueError(
                f"params are {size} bytes as JSON; at most {MAX_PARAMS_BYTES} reach the "
                "evaluation (in the EVALRUN_PARAMS environment variable): put large data in "
                "a dataset or model input instead"
            )
        return value

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
    cluster: ClusterSpec = Field(default_factory=ClusterSpec)
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


# --------------------------------------------------------------------------- loading


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
            f"invalid evaluation spec {source}", file=source, problems=format_errors(EvalSpec, exc)
        ) from None


def load_spec(path: Path) -> EvalSpec:
    """Load and validate ``eval.yaml``."""
    return parse_spec(load_yaml_document(path), source=str(path))


def load_spec_bytes(data: bytes, *, source: str) -> EvalSpec:
    """Validate the bytes of an ``eval.yaml`` read elsewhere (e.g. from a verified bundle)."""
    return parse_spec(load_yaml_bytes(data, source=source), source=source)


def spec_json_schema() -> JSONObject:
    """The JSON Schema of ``eval.yaml`` (what ``evalrun schema`` prints)."""
    schema = EvalSpec.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["$id"] = "https://evalrun.dev/schema/evaluation-v1.json"
    return schema

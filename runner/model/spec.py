"""The evaluation spec (``eval.yaml``).

Models are frozen and strict: once you hold an :class:`EvalSpec`, it is
well-formed. Loading goes through a YAML loader that refuses custom tags, duplicate
keys, alias bombs and oversized files. The lock's models live in
:mod:`runner.model.lock` (re-exported here for the code that imported them from here).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import urllib.parse
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

import yaml
from pydantic import (
    AfterValidator,
    Field,
    StrictBool,
    StrictInt,
    StrictStr,
    StringConstraints,
    ValidationError,
    field_validator,
    model_validator,
)

from runner.errors import InputError, SpecError
from runner.model.base import DIGEST_REF_RE as DIGEST_REF_RE
from runner.model.base import FrozenModel as _Model
from runner.model.base import Name, decoded_text, format_errors
from runner.model.base import Sha256Hex as Sha256Hex
from runner.model.base import parse_digest_ref as parse_digest_ref
from runner.model.base import read_input_file as read_input_file
from runner.model.input_uri import HttpsUri, S3Uri, parse_input_uri
from runner.model.lock import LOCK_SCHEMA as LOCK_SCHEMA
from runner.model.lock import MAX_LOCK_BYTES as MAX_LOCK_BYTES
from runner.model.lock import LockedArtifact as LockedArtifact
from runner.model.lock import LockedBase as LockedBase
from runner.model.lock import LockedDataset as LockedDataset
from runner.model.lock import LockedFile as LockedFile
from runner.model.lock import LockedImage as LockedImage
from runner.model.lock import LockedPreprocessing as LockedPreprocessing
from runner.model.lock import LockedSource as LockedSource
from runner.model.lock import LockedSpec as LockedSpec
from runner.model.lock import LockedWheel as LockedWheel
from runner.model.lock import Reproducibility as Reproducibility
from runner.model.lock import load_lock as load_lock
from runner.model.lock import lock_path_for as lock_path_for
from runner.model.lock import parse_lock_bytes as parse_lock_bytes
from runner.shared.metric_catalogue import CATALOGUE, LEGACY, PARAMETERS, definition_problems

API_VERSION = "evalrun/v1"
MAX_SPEC_BYTES = 256 * 1024
MAX_ALIASES = 16
# Deeper YAML is refused before it is composed (the composer recurses per level).
MAX_YAML_DEPTH = 64

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


MetricCompute = Literal[
    "accuracy",
    "error_rate",
    "balanced_accuracy",
    "precision",
    "recall",
    "f1",
    "macro_f1",
    "roc_auc",
    "average_precision",
    "log_loss",
    "brier",
    "ece",
    "mae",
    "rmse",
    "r2",
    "exact_match",
    "token_f1",
    "pass_at_k",
    "mean",
    "custom",
]
SampleField = Annotated[str, StringConstraints(min_length=1, max_length=128)]
ClassLabel = StrictStr | StrictBool | StrictInt
NormalizationStep = Literal["lowercase", "punctuation", "articles", "whitespace"]


class SampleFieldNames(_Model):
    """Which per-sample field holds each input a metric reads (each defaults to its own name)."""

    label: SampleField | None = Field(default=None, description="The true class.")
    prediction: SampleField | None = Field(
        default=None, description="The predicted class, value (regression) or text."
    )
    score: SampleField | None = Field(
        default=None, description="Score or probability of the 'positive' class."
    )
    probabilities: SampleField | None = Field(
        default=None, description="One score or probability per class of 'classes'."
    )
    target: SampleField | None = Field(default=None, description="The true value (regression).")
    reference: SampleField | None = Field(
        default=None, description="The reference text, or a list of acceptable ones."
    )
    n: SampleField | None = Field(default=None, description="pass@k: generations made.")
    c: SampleField | None = Field(default=None, description="pass@k: generations that passed.")


class CustomMetric(_Model):
    """A metric function in the evaluation's own repository (``compute: custom``).

    The file is locked by digest like the other code; the runner calls the function in a
    separate sandboxed container of the run's pinned image that sees only the per-sample
    file and this file (never on the runner host): ``function(samples: list[dict]) ->
    float``, on all samples and on each bootstrap resample the runner draws.
    """

    file: str = Field(
        description="Python file with the metric function, relative to the spec file."
    )
    function: str = Field(
        pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,99}$",
        description="Name of the function: samples (a list of per-sample objects) → a number.",
    )

    @field_validator("file")
    @classmethod
    def _relative_python_file(cls, value: str) -> str:
        parts = Path(value).parts
        if not value or Path(value).is_absolute() or ".." in parts:
            raise ValueError(f"file {value!r} must be a relative path inside the spec directory")
        if not value.endswith(".py"):
            raise ValueError(f"file {value!r} must be a Python file (.py)")
        return value


class MetricSpec(_Model):
    name: Name
    compute: MetricCompute = Field(
        description="Built-in metric computed from the per-sample outputs (see the README's "
        "metric catalogue)."
    )
    field: str | None = Field(
        default=None, description="Per-sample field for 'mean' (e.g. 'score')."
    )
    fields: SampleFieldNames | None = Field(
        default=None,
        description="Per-sample field names for what the metric reads, where they differ from "
        "the defaults (label, prediction, score, probabilities, target, reference, n, c).",
    )
    average: Literal["micro", "macro", "weighted"] | None = Field(
        default=None,
        description="precision/recall/f1: how classes are averaged; roc_auc/average_precision "
        "over 'classes': macro (default) or weighted one-vs-rest.",
    )
    positive: ClassLabel | None = Field(
        default=None,
        description="The one class scored: precision/recall/f1 of that class, or a binary "
        "score metric reading that class's 'score'.",
    )
    classes: list[ClassLabel] | None = Field(
        default=None,
        min_length=2,
        max_length=10_000,
        description="Score metrics without 'positive': the classes, in the order of a list "
        "'probabilities' field (an object field is keyed by class).",
    )
    bins: int | None = Field(
        default=None, ge=1, le=1000, description="ece: number of equal-width bins over [0, 1]."
    )
    k: int | None = Field(default=None, ge=1, le=100_000, description="pass_at_k: k.")
    normalize: Literal["squad", "none"] | list[NormalizationStep] | None = Field(
        default=None,
        description="exact_match/token_f1: text normalisation, 'squad' (all steps), 'none', or "
        "a list of steps. Default: none for exact_match, squad for token_f1.",
    )
    confusion_matrix: bool = Field(
        default=False,
        description="Attach the confusion matrix (rows: true labels, columns: predictions).",
    )
    custom: CustomMetric | None = Field(
        default=None,
        description="compute: custom — the metric function (file and function name); "
        "recomputed by the runner in a separate sandbox from the per-sample outputs.",
    )
    direction: Literal["higher_is_better", "lower_is_better"] = Field(
        default="higher_is_better",
        description="Defaults to lower_is_better for log_loss, brier, ece, mae and rmse.",
    )
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

    def definition(self) -> dict[str, Any]:
        """The metric as JSON for the agent, the runner and the bundle.

        Catalogue parameters left unset are omitted, so a metric that uses none of them is
        written exactly as before the catalogue (plans, signed metric definitions).
        """
        data = self.model_dump(mode="json")
        if data["fields"] is not None:
            # a field left at its default is not named (the signed definition lists renames only)
            data["fields"] = {k: v for k, v in data["fields"].items() if v is not None} or None
        for key in ("fields", "custom", *PARAMETERS):
            if data[key] is None or (key == "confusion_matrix" and data[key] is False):
                del data[key]
        return data

    @field_validator("positive", "classes", mode="before")
    @classmethod
    def _class_labels(cls, value: Any) -> Any:
        labels = value if isinstance(value, list) else [value]
        if value is not None and not all(isinstance(v, str | int) for v in labels):
            raise ValueError("expected a class label: a string, an integer or a boolean")
        return value

    @field_validator("normalize", mode="before")
    @classmethod
    def _normalization_steps(cls, value: Any) -> Any:
        steps = list(get_args(NormalizationStep))
        ok = value is None or value in ("squad", "none")
        ok = ok or (isinstance(value, list) and all(v in steps for v in value))
        if not ok:
            raise ValueError(f"expected 'squad', 'none' or a list of steps from {steps}")
        return value

    @model_validator(mode="before")
    @classmethod
    def _natural_direction(cls, data: Any) -> Any:
        # Losses and errors of the catalogue are lower-is-better unless the spec says so;
        # the pre-catalogue error_rate keeps its old default (its specs' digests stay).
        if isinstance(data, dict) and "direction" not in data:
            kind = CATALOGUE.get(str(data.get("compute")))
            if kind and kind.direction == "lower_is_better" and data["compute"] not in LEGACY:
                return {**data, "direction": "lower_is_better"}
        return data

    @model_validator(mode="after")
    def _promotion_is_for_supplementary(self) -> MetricSpec:
        if self.promoted is not None and self.role != "supplementary":
            raise ValueError("only a supplementary metric can be promoted (role: supplementary)")
        return self

    @model_validator(mode="after")
    def _parameters_fit_compute(self) -> MetricSpec:
        if self.compute == "custom" or self.custom is not None:
            return self._custom_alone()
        problems = definition_problems(self.model_dump(mode="json"))
        if self.compute not in LEGACY and self.direction != CATALOGUE[self.compute].direction:
            problems.append(
                f"{self.compute!r} is {CATALOGUE[self.compute].direction.replace('_', '-')}; "
                f"direction {self.direction!r} contradicts it"
            )
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def _custom_alone(self) -> MetricSpec:
        problems = []
        if self.compute != "custom":
            problems.append(f"'custom' needs compute: custom (found compute: {self.compute!r})")
        elif self.custom is None:
            problems.append("compute: custom needs 'custom: {file: PATH.py, function: NAME}'")
        given = [
            p for p in ("field", "fields", *PARAMETERS) if getattr(self, p) not in (None, False)
        ]
        if given:
            problems.append(f"{given} do(es) not apply to compute: custom")
        if self.ci.method not in ("bootstrap_percentile", "none"):
            problems.append(
                f"ci.method {self.ci.method!r} is not available for compute: custom "
                "(bootstrap_percentile or none)"
            )
        if problems:
            raise ValueError("; ".join(problems))
        return self


# A MIG profile as the NVIDIA device plugin names it: <slices>g.<memory>gb[+me…].
MIG_PROFILE_PATTERN = r"^[1-8]g\.[0-9]{1,4}gb(\+[a-z]{1,8})?$"
K8S_NAME_PATTERN = r"^[a-z0-9]([a-z0-9.-]{0,251}[a-z0-9])?$"


class ResourcesSpec(_Model):
    cpus: float = Field(default=1.0, gt=0, le=256)
    memory_mib: int = Field(default=1024, ge=64, le=4 * 1024 * 1024)
    pids: int = Field(default=256, ge=16, le=65536)
    gpus: int = Field(default=0, ge=0, le=16)
    results_mib: int = Field(
        default=2048,
        ge=16,
        le=1024 * 1024,
        description="Size limit of the results volume (Kubernetes: the emptyDir's sizeLimit).",
    )
    gpu_product: str | None = Field(
        default=None,
        pattern=r"^[A-Za-z0-9]([A-Za-z0-9._-]{0,61}[A-Za-z0-9])?$",
        description="Exact node label value of nvidia.com/gpu.product to schedule onto.",
    )
    gpu_driver_major: int | None = Field(
        default=None, ge=1, description="Node label nvidia.com/cuda.driver.major to require."
    )
    mig_profile: str | None = Field(
        default=None,
        pattern=MIG_PROFILE_PATTERN,
        description="Run on MIG devices of this profile ('1g.10gb', '3g.40gb', …): 'gpus' of "
        "them, requested as nvidia.com/mig-<profile> (the NVIDIA device plugin's mixed "
        "strategy).",
    )

    @model_validator(mode="after")
    def _mig_needs_gpus(self) -> ResourcesSpec:
        if self.mig_profile is not None and self.gpus < 1:
            raise ValueError("mig_profile needs gpus >= 1 (how many MIG devices to request)")
        return self


class ClusterSpec(_Model):
    """How the run is submitted on a shared cluster (the CLI flags override each one)."""

    queue: str | None = Field(
        default=None,
        pattern=K8S_NAME_PATTERN,
        description="Kueue LocalQueue: the Job waits suspended until Kueue admits it.",
    )
    priority_class: str | None = Field(
        default=None,
        pattern=K8S_NAME_PATTERN,
        description="PriorityClass of the pod; with a queue also the Kueue "
        "WorkloadPriorityClass (the operator creates both under this name).",
    )
    image_pull_secrets: list[str] = Field(
        default_factory=list,
        max_length=8,
        description="Secrets (kubernetes.io/dockerconfigjson) in the run's namespace that "
        "the kubelet pulls the image and input artifacts with.",
    )

    @field_validator("image_pull_secrets")
    @classmethod
    def _secret_names(cls, value: list[str]) -> list[str]:
        for name in value:
            if not re.fullmatch(K8S_NAME_PATTERN, name):
                raise ValueError(f"{name!r} is not a Kubernetes object name")
        return value


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
    verify_rootfs: Literal["used", "full"] = Field(
        default="used",
        description="What the in-container agent checks of the image before results are "
        "accepted: 'used' (default) the files the evaluation uses, against the image's digest "
        "table; 'full' every file of the image, hashed while the evaluation runs.",
    )


class ExpectedEnvironment(_Model):
    """What the container must find before the evaluation starts (checked by the agent)."""

    driver: str | None = Field(default=None, description="Driver version specifier, '>=550,<600'.")
    cuda: str | None = Field(default=None, description="CUDA driver version specifier.")
    gpu_product: str | None = Field(default=None, description="Regex the GPU name must match.")
    gpu_count: int | None = Field(default=None, ge=0)
    mig: Literal["required", "forbidden"] | None = None
    mig_profile: str | None = Field(
        default=None,
        pattern=MIG_PROFILE_PATTERN,
        description="Every MIG device the container sees is of this profile ('1g.10gb').",
    )
    mig_count: int | None = Field(
        default=None, ge=1, le=56, description="Number of MIG devices the container must see."
    )
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


def load_yaml_bytes(data: bytes, *, source: str, what: str = "spec file") -> Any:
    """One YAML document from ``data`` (read from ``source``), strictly.

    Raises :class:`SpecError` naming ``source`` (and the line, where there is one) for
    text that is not UTF-8, malformed YAML, custom tags, duplicate or non-scalar keys,
    non-finite numbers, alias bombs, nesting deeper than :data:`MAX_YAML_DEPTH`, or
    not exactly one document.
    """
    text = decoded_text(data, what=what, source=source)
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


def spec_json_schema() -> dict[str, Any]:
    """The JSON Schema of ``eval.yaml`` (what ``evalrun schema`` prints)."""
    schema = EvalSpec.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["$id"] = "https://evalrun.dev/schema/evaluation-v1.json"
    return schema

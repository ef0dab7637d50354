"""What a spec says about its metrics: each metric (:class:`MetricSpec`), its confidence
interval, its per-sample fields, a custom metric's code, and the declared perturbations."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal, cast, get_args

from pydantic import (
    Field,
    StrictBool,
    StrictInt,
    StrictStr,
    StringConstraints,
    field_validator,
    model_validator,
)

from runner.model.base import FrozenModel as _Model
from runner.model.base import Name
from runner.shared.definitions import MetricDefinition
from runner.shared.metric_catalogue import CATALOGUE, LEGACY, PARAMETERS, definition_problems

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

    def definition(self) -> MetricDefinition:
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
        # this model's own fields as JSON, the unset parameters left out: the TypedDict's shape
        return cast(MetricDefinition, data)

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

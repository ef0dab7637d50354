"""The spec's own definitions as the plan carries them to the agent and the runner:
metrics, perturbations and the expected environment.

The host writes them from its spec models (``MetricSpec.definition()``,
``PerturbationSpec`` and ``ExpectedEnvironment`` dumped as JSON), which validated them;
the agent and the runner read them here, standard library only. Fields a spec left
unset are absent (metrics) or null (perturbations, expect); which parameters a metric or
a perturbation needs depends on its ``compute`` / ``kind`` and is checked by its reader
(:func:`runner.shared.metric_catalogue.definition_problems`, the perturbation code).
"""

from __future__ import annotations

from typing import NotRequired, TypedDict

ClassLabel = str | int | bool


class CiDefinition(TypedDict):
    """A metric's confidence interval as the spec asks for it."""

    method: str
    level: float
    resamples: int


class PromotionDefinition(TypedDict):
    """Why a supplementary metric gates the run."""

    justification: str


class CustomDefinition(TypedDict):
    """``compute: custom``: the metric function's file (relative to the spec) and name."""

    file: str
    function: str


class MetricDefinition(TypedDict):
    """One metric of the spec (``MetricSpec.definition()``); catalogue parameters the
    spec left unset are absent, so older plans and signed definitions read the same."""

    name: str
    compute: str
    field: NotRequired[str | None]
    direction: NotRequired[str]
    threshold: NotRequired[float | None]
    ci: NotRequired[CiDefinition]
    role: NotRequired[str]
    promoted: NotRequired[PromotionDefinition | None]
    fields: NotRequired[dict[str, str]]
    average: NotRequired[str]
    positive: NotRequired[ClassLabel]
    classes: NotRequired[list[ClassLabel]]
    bins: NotRequired[int]
    k: NotRequired[int]
    normalize: NotRequired[str | list[str]]
    confusion_matrix: NotRequired[bool]
    custom: NotRequired[CustomDefinition]


class PerturbationDefinition(TypedDict):
    """One declared perturbation (``PerturbationSpec`` as JSON): the parameters of its
    ``kind`` are set, the others null."""

    name: str
    kind: str
    fraction: NotRequired[float | None]
    field: NotRequired[str | None]
    value: NotRequired[str | int | float | bool | None]
    std: NotRequired[float | None]
    feature: NotRequired[str | None]
    seed: NotRequired[int | None]


class PlanExpect(TypedDict, total=False):
    """The expected environment (``ExpectedEnvironment`` as JSON); null: not checked.

    A newer host may send keys this agent does not know: they are not dropped but
    fail closed (:func:`runner.agent.expectations.check_expected_environment`).
    """

    driver: str | None
    cuda: str | None
    gpu_product: str | None
    gpu_count: int | None
    mig: str | None
    mig_profile: str | None
    mig_count: int | None
    ecc: str | None

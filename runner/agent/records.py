"""What the agent writes into the results: ``summary.json``, ``preflight.json`` and
``metrics.json``, as TypedDicts (stdlib only: the agent ships into the image)."""

from __future__ import annotations

from typing import Literal, NotRequired, TypedDict

from runner.agent.expectations import Check
from runner.agent.inputs import InputCheck
from runner.agent.verification import RootfsRecord
from runner.shared.metrics import MetricRecord
from runner.shared.perturbations import PerturbationRecord

Outcome = Literal[
    "completed",
    "agent_error",
    "integrity_failure",
    "environment_mismatch",
    "evaluation_failed",
    "timeout",
    "bad_output",
]


class EvaluationRecord(TypedDict):
    returncode: int | None
    duration_s: float
    peak_rss_kib: int


class AgentSummary(TypedDict, total=False):
    """``summary.json``: how the run went, always written (``outcome`` once it is known)."""

    run_id: str
    started: float
    plan_sha256: str
    determinism: dict[str, str]
    evaluation: EvaluationRecord
    outcome: Outcome
    reason: str
    hint: str
    finished: float
    exit_code: int


class Preflight(TypedDict):
    """``preflight.json``: the rootfs check, every input, the expected environment."""

    rootfs: RootfsRecord
    inputs: list[InputCheck]
    environment: NotRequired[list[Check]]
    duration_s: NotRequired[float]
    before_plan_s: NotRequired[float]
    """The parts done before the plan came (a sandbox started ahead of it): not in
    ``duration_s``."""
    plan_waited_s: NotRequired[float]
    """How long that sandbox then waited for its plan (0: the plan was there first)."""


class MetricsReport(TypedDict):
    """``metrics.json`` of a run whose outputs fed every metric."""

    seed: int
    metrics: list[MetricRecord]
    perturbations: NotRequired[list[PerturbationRecord]]

"""The signed predicates: what a run, a run set and an audit bundle say, as typed models.

One frozen model per predicate ``kind``: :class:`RunPredicate` (the original kind,
written without a ``kind`` key), :class:`RunSetPredicate` (``"run_set"``) and
:class:`AuditPredicate` (``"audit"``). All three are version 1 of the statement's
``predicateType`` (:data:`PREDICATE_TYPE`); within v1 fields are only ever added, and
every field is optional except ``run_id``, so bundles written by older evalruns read.
:func:`parse_predicate` picks the model by ``kind`` (absent means ``"run"``).

Reading rules:

- Keys a model does not know are kept (so :meth:`to_json` gives back every signed
  key) but no code reads them.
- What the container or the spec author wrote (environment capture, preflight
  report, evaluation summary, determinism record, params, backend details) stays
  plain JSON (:data:`JsonObject`): it is evidence, signed as found, and odd content
  there must never make a valid bundle unreadable. :class:`EnvironmentView` reads it.
- Anything else that does not fit is an :class:`~runner.errors.IntegrityError`
  naming the field (:func:`parse_predicate`), never a traceback.

Writing: builders construct these models and sign :meth:`to_json`, which holds
exactly the keys they gave (``None`` included) and nothing else, so the signed JSON
stays what the builder says.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal, TypeAlias

from pydantic import (
    ConfigDict,
    Field,
    JsonValue,
    ValidationError,
)
from pydantic_core import ErrorDetails

from runner.errors import IntegrityError
from runner.model.outcome import Outcome
from runner.model.predicate_parts import (
    _FLOAT_MAX,
    PREDICATE_TYPE,
    SELF_ASSERTED,
    AuditOutcome,
    CiIdentity,
    ConfidenceInterval,
    ConfusionMatrix,
    Count,
    CustomMetricRecord,
    DatasetInput,
    Direction,
    Flag,
    ImageFacts,
    ImageReproducibility,
    JsonObject,
    Launcher,
    MetricDefinition,
    MetricResult,
    MetricVerdict,
    ModelInput,
    Number,
    PerturbationResult,
    PerturbedMetric,
    PreprocessingRecord,
    Promotion,
    Provenance,
    Rationale,
    Record,
    ReproducedMetric,
    ReproductionOf,
    ReproductionRecord,
    ReproductionVerdict,
    Role,
    SandboxFacts,
    Seeds,
    SourceFacts,
    SpecRef,
    Text,
    Timestamps,
    _number,
)


class RunPredicate(Record):
    """The predicate of a run bundle (``kind`` absent): everything the run was and found."""

    kind: Literal["run"] = "run"
    run_id: Text
    attempt: Count | None = None
    evalrun_version: Text | None = None
    backend: Text | None = None
    # where the backend ran it (e.g. a cluster's API server and namespace), part of the
    # run id; absent for the local Docker engine and in bundles from before it
    backend_target: Text | None = None
    spec: SpecRef = SpecRef()
    lock_digest: Text | None = None
    image: ImageFacts = ImageFacts()
    sandbox: SandboxFacts = SandboxFacts()
    model: ModelInput = ModelInput()
    datasets: tuple[DatasetInput, ...] = ()
    source: SourceFacts = SourceFacts()
    image_reproducibility: ImageReproducibility = ImageReproducibility()
    provenance: Provenance = Provenance()
    comparison_group: Text | None = None
    # absent in bundles from before provenance: then only provenance.preprocessing, if any
    preprocessing: tuple[PreprocessingRecord, ...] | None = None
    # absent in bundles from before metric roles: every metric was primary
    metric_definitions: tuple[MetricDefinition, ...] | None = None
    params: JsonObject = Field(default_factory=dict)
    seeds: Seeds = Seeds()
    environment: JsonObject = Field(default_factory=dict)
    preflight: JsonObject = Field(default_factory=dict)
    node_crosscheck: tuple[Text, ...] | None = None
    perturbations: tuple[PerturbationResult, ...] = ()
    evaluation: JsonValue = None
    metrics: tuple[MetricResult, ...] = ()
    outcome: Outcome | None = None
    reason: Text | None = None
    # the last lines of the evaluation's stderr, as written, for a run that failed in the
    # container (crashed, timed out, bad output); absent otherwise and in older bundles
    stderr_tail: tuple[Text, ...] | None = None
    exit_code: Count | None = None
    timestamps: Timestamps = Timestamps()
    reproduction_of: ReproductionOf | None = None
    reproduction: ReproductionRecord | None = None

    def metric(self, name: str) -> MetricResult | None:
        """The recorded metric called ``name``, if any."""
        return next((m for m in self.metrics if m.name == name), None)

    @property
    def env(self) -> EnvironmentView:
        """The container's environment capture, read leniently."""
        return EnvironmentView(self.environment)


# --------------------------------------------------------------------------- run set predicate


class SeedList(Record):
    """The seeds of a run set."""

    seeds: tuple[Count, ...] | None = None


class RunSetMember(Record):
    """One seed of a run set: its run (by id and bundle digest), outcome and metrics."""

    # built on first use: only run sets and audits make one
    model_config = ConfigDict(defer_build=True)

    seed: Count | None = None
    run_id: Text | None = None
    bundle_digest: Text | None = None
    # "error": the seed's run could not even be sealed
    outcome: Outcome | Literal["error"] | None = None
    reason: Text | None = None
    metrics: tuple[MetricResult, ...] = ()


class AcrossSeedsStat(Record):
    """A metric's spread across seeds: mean, sample sd, Student-t CI of the mean."""

    # built on first use: only run sets and audits make one
    model_config = ConfigDict(defer_build=True)

    name: Text | None = None
    n: Count | None = None
    mean: Number | None = None
    sd: Number | None = None
    ci: ConfidenceInterval | None = None
    note: Text | None = None


class RunSetPredicate(Record):
    """The predicate of a run-set bundle: every seed's run and the spread across seeds."""

    # built on first use: only run sets and audits make one
    model_config = ConfigDict(defer_build=True)

    kind: Literal["run_set"]
    run_id: Text
    spec: SpecRef = SpecRef()
    lock_digest: Text | None = None
    seeds: SeedList = SeedList()
    members: tuple[RunSetMember, ...] = ()
    across_seeds: tuple[AcrossSeedsStat, ...] = ()
    outcome: Outcome | None = None
    exit_code: Count | None = None
    timestamps: Timestamps = Timestamps()


# --------------------------------------------------------------------------- audit predicate


class MissingInput(Record):
    """An input of an audited run that no longer resolved to its pinned digest."""

    # built on first use: only run sets and audits make one
    model_config = ConfigDict(defer_build=True)

    role: Text | None = None
    name: Text | None = None
    path: Text | None = None
    sha256: Text | None = None
    reason: Text | None = None


class AuditedRun(Record):
    """One sampled run of an audit and whether its re-run reproduced it."""

    # built on first use: only run sets and audits make one
    model_config = ConfigDict(defer_build=True)

    run_id: Text | None = None
    bundle_digest: Text | None = None
    spec: Text | None = None
    reproduced: Flag | None = None
    category: Text | None = None
    detail: Text | None = None
    rerun_id: Text | None = None
    rerun_bundle: Text | None = None
    verdicts: dict[str, Text] = Field(default_factory=dict)
    missing: tuple[MissingInput, ...] = ()
    exit_code: Count | None = None


class AuditFilters(Record):
    """What an audit sampled from."""

    since: Text | None = None
    until: Text | None = None
    spec: Text | None = None
    tolerance: Number | None = None


class AuditPredicate(Record):
    """The predicate of an audit bundle: the sample, and which runs reproduced."""

    # built on first use: only run sets and audits make one
    model_config = ConfigDict(defer_build=True)

    kind: Literal["audit"]
    run_id: Text
    started: Text | None = None
    finished: Text | None = None
    seed: Count | None = None
    sample: Count | None = None
    sampled_from: Count | None = None
    filters: AuditFilters = AuditFilters()
    outcome: AuditOutcome | None = None
    reproduced: Count | None = None
    failed: Count | None = None
    exit_code: Count | None = None
    runs: tuple[AuditedRun, ...] = ()
    timestamps: Timestamps = Timestamps()


Predicate: TypeAlias = RunPredicate | RunSetPredicate | AuditPredicate
_KINDS: dict[str, type[RunPredicate] | type[RunSetPredicate] | type[AuditPredicate]] = {
    "run": RunPredicate,
    "run_set": RunSetPredicate,
    "audit": AuditPredicate,
}


def _field_path(data: object, error: ErrorDetails) -> str:
    """The dotted path of the field an error is about, as it appears in ``data``."""
    parts: list[str] = []
    node = data
    for part in error["loc"]:
        if isinstance(node, Mapping) and isinstance(part, str) and part in node:  # noqa: SIM114
            node = node[part]
        elif isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node):
            node = node[part]
        else:
            if error["type"] == "missing" and isinstance(part, str):
                parts.append(part)
            break  # the rest names union members, not fields
        parts.append(str(part))
    return ".".join(parts) or "(the predicate)"


def parse_predicate(data: object) -> Predicate:
    """The model of a predicate (a JSON object), chosen by its ``kind`` (absent: a run).

    Raises IntegrityError naming the first field that does not fit, with the count of
    further problems; nothing else escapes.
    """
    if not isinstance(data, Mapping):
        raise IntegrityError("the bundle's predicate is not a JSON object")
    kind = data.get("kind", "run")
    model = _KINDS.get(kind) if isinstance(kind, str) else None
    if model is None:
        raise IntegrityError(
            f"the bundle's predicate has an unknown kind {kind!r}",
            field="kind",
            expected=", ".join(sorted(_KINDS)),
        )
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        errors = exc.errors(include_url=False, include_input=False)
        fields = list(dict.fromkeys(_field_path(data, e) for e in errors))
        more = f" (and {len(fields) - 1} more)" if len(fields) > 1 else ""
        raise IntegrityError(
            f"the bundle's {kind} predicate does not fit the model at {fields[0]}{more}",
            field=fields[0],
            problem=errors[0]["msg"],
        ) from None


# --------------------------------------------------------------------------- evidence


def json_at(value: JsonValue, path: str) -> JsonValue:
    """The value at a dotted ``path`` of free-form JSON, or None where the path ends early."""
    node = value
    for key in path.split("."):
        if not isinstance(node, dict):
            return None
        node = node.get(key)
    return node


# What the bundle's image facts say of the agent's rootfs check (the full record is in preflight).
_ROOTFS_CHECK_KEYS = (
    "mode",
    "requested",
    "how",
    "passed",
    "entries",
    "files_verified",
    "files_reported",
    "bytes_hashed",
    "check_cpu_s",
    "traced_processes",
    "table",
    "table_digest",
    "module_pack",
    "failure_count",
    "duration_s",
    "note",
)


def rootfs_check(preflight: JsonValue) -> JsonValue:
    """What the agent verified of the image, and how; None for an agent that does not say."""
    record = json_at(preflight, "rootfs")
    if not isinstance(record, dict) or "mode" not in record:
        return None
    return {k: record[k] for k in _ROOTFS_CHECK_KEYS if k in record}


@dataclass(frozen=True)
class EnvironmentView:
    """The container's environment capture (``env.json``), read without trusting its shape.

    Each accessor returns the value as captured (any JSON), or None where the capture
    has no such field or a different shape.
    """

    data: JsonObject

    def at(self, path: str) -> JsonValue:
        """The captured value at a dotted path (``"os.PRETTY_NAME"``)."""
        return json_at(self.data, path)

    def packages(self) -> list[dict[str, JsonValue]]:
        """The captured package entries (objects only)."""
        found = self.data.get("packages")
        return [p for p in found if isinstance(p, dict)] if isinstance(found, list) else []

    def package_count(self) -> int:
        """How many package entries the capture lists."""
        found = self.data.get("packages")
        return len(found) if isinstance(found, list) else 0

    def gpus(self) -> list[dict[str, JsonValue]]:
        """The captured GPU entries (objects only)."""
        found = self.at("gpu.gpus")
        return [g for g in found if isinstance(g, dict)] if isinstance(found, list) else []

    @property
    def gpu_visible(self) -> bool:
        """Whether the capture saw a GPU at all."""
        return bool(self.at("gpu.visible"))


__all__ = [
    "PREDICATE_TYPE",
    "SELF_ASSERTED",
    "_FLOAT_MAX",
    "AcrossSeedsStat",
    "AuditFilters",
    "AuditOutcome",
    "AuditPredicate",
    "AuditedRun",
    "CiIdentity",
    "ConfidenceInterval",
    "ConfusionMatrix",
    "Count",
    "CustomMetricRecord",
    "DatasetInput",
    "Direction",
    "EnvironmentView",
    "Flag",
    "ImageFacts",
    "ImageReproducibility",
    "JsonObject",
    "Launcher",
    "MetricDefinition",
    "MetricResult",
    "MetricVerdict",
    "MissingInput",
    "ModelInput",
    "Number",
    "PerturbationResult",
    "PerturbedMetric",
    "Predicate",
    "PreprocessingRecord",
    "Promotion",
    "Provenance",
    "Rationale",
    "Record",
    "ReproducedMetric",
    "ReproductionOf",
    "ReproductionRecord",
    "ReproductionVerdict",
    "Role",
    "RunPredicate",
    "RunSetMember",
    "RunSetPredicate",
    "SandboxFacts",
    "Seeds",
    "SourceFacts",
    "SpecRef",
    "Text",
    "Timestamps",
    "_number",
    "json_at",
    "parse_predicate",
]

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

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated, Literal, TypeAlias

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    JsonValue,
    PlainValidator,
    StrictBool,
    StrictInt,
    StrictStr,
    ValidationError,
)
from pydantic_core import ErrorDetails, PydanticCustomError

from runner.errors import IntegrityError
from runner.model.outcome import Outcome

PREDICATE_TYPE = "https://evalrun.dev/EvalRun/v1"


# The largest magnitude a recorded number may have: every consumer can take it as a
# float (an int beyond it would overflow float(), and crash whoever computes with it).
_FLOAT_MAX = 2**1023


def _number(value: object) -> int | float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise PydanticCustomError("number_type", "Input should be a number")
    if isinstance(value, float) and not math.isfinite(value):
        raise PydanticCustomError("number_finite", "Input should be a finite number")
    if isinstance(value, int) and not -_FLOAT_MAX < value < _FLOAT_MAX:
        raise PydanticCustomError("number_range", "Input should be a number a float can hold")
    return value


# Strict scalars: a signed 1 stays 1, 0.9 stays 0.9, and true is never read as 1. Counts
# fit a signed 64-bit integer (what the run index stores them as).
Text: TypeAlias = StrictStr
Flag: TypeAlias = StrictBool
Count: TypeAlias = Annotated[StrictInt, Field(ge=-(2**63), lt=2**63)]
Number: TypeAlias = Annotated[int | float, PlainValidator(_number)]
# Free-form evidence (see the module docstring): any JSON object, kept as signed.
JsonObject: TypeAlias = dict[str, JsonValue]

Direction = Literal["higher_is_better", "lower_is_better"]
Role = Literal["primary", "supplementary"]
MetricVerdict = Literal["identical", "within_tolerance", "within_ci", "changed", "missing"]
ReproductionVerdict = MetricVerdict | Literal["failed"]
AuditOutcome = Literal["reproduced", "not_reproduced"]


class Record(BaseModel):
    """A part of a signed predicate: frozen, unknown keys kept but never relied on."""

    model_config = ConfigDict(frozen=True, extra="allow", populate_by_name=True)

    def to_json(self) -> JsonObject:
        """The JSON object this record stands for: the keys it was given, as given."""
        return self.model_dump(mode="json", by_alias=True, exclude_unset=True)

    def is_empty(self) -> bool:
        """True when the record holds no key at all (``{}`` in the bundle)."""
        return not self.model_fields_set and not self.model_extra


# --------------------------------------------------------------------------- shared parts


class SpecRef(Record):
    """Which spec ran: its ``metadata.name`` and digest."""

    name: Text | None = None
    digest: Text | None = None


class ConfidenceInterval(Record):
    """A recorded interval (``low``/``high`` may be None when it could not be computed)."""

    low: Number | None = None
    high: Number | None = None
    level: Number | None = None
    method: Text | None = None
    resamples: Count | None = None


class Promotion(Record):
    """Why a supplementary metric gates the run after all."""

    justification: Text | None = None


class ConfusionMatrix(Record):
    """Sample counts by (true label, predicted label): rows true, columns predicted."""

    labels: tuple[JsonValue, ...] | None = None
    counts: tuple[tuple[Count, ...], ...] | None = None


class CustomMetricRecord(Record):
    """Where a custom metric's value came from: its locked code and the sandbox it ran in."""

    file: Text | None = None
    function: Text | None = None
    file_sha256: Text | None = None
    # {"image": digest, "runtime": "runsc", "network": "none"}
    recomputed_in: dict[str, Text] | None = None
    # what the evaluation's container reported for it, if anything (never used)
    container_reported: JsonValue = None
    overridden: Flag | None = None


class MetricResult(Record):
    """One metric as the runner recomputed it, with its definition and verdict."""

    name: Text
    value: Number | None = None
    n: Count | None = None
    ci: ConfidenceInterval | None = None
    threshold: Number | None = None
    direction: Direction | None = None
    compute: Text | None = None
    field: Text | None = None
    role: Role | None = None
    gating: Flag | None = None
    promoted: Promotion | None = None
    threshold_met: Flag | None = None
    passed: Flag | None = None
    # when the spec asked for it (confusion_matrix: true); absent before the catalogue
    confusion_matrix: ConfusionMatrix | None = None
    # compute: custom only
    custom: CustomMetricRecord | None = None


class Timestamps(Record):
    """When it started and finished (RFC 3339, UTC); the container's own span for a run."""

    started: Text | None = None
    finished: Text | None = None
    container_started: Text | None = None
    container_finished: Text | None = None
    queued: Text | None = None
    queue_wait_s: float | None = None


# --------------------------------------------------------------------------- run predicate


class ImageFacts(Record):
    """The evaluated image: pinned reference and digest, expected and found rootfs."""

    ref: Text | None = None
    digest: Text | None = None
    rootfs_expected: Text | None = None
    # as the in-container preflight reported it: evidence, any JSON
    rootfs_found: JsonValue = None
    # what the agent checked of the image and how: mode ('used' or 'full'), the files it
    # hashed, the digest table it checked them against (absent in bundles from before)
    rootfs_check: JsonValue = None
    digest_confirmed_by_backend: Flag | None = None


class SandboxFacts(Record):
    """The sandbox asked for and what the backend observed it to be.

    ``network`` is what the backend observed enforcing the network policy (the
    container's network mode, the namespace's NetworkPolicies), never copied from the
    spec; ``network_requested`` is the spec's. Bundles from before the distinction have
    only ``network``, copied from the spec.
    """

    runtime_requested: Text | None = None
    runtime_used: Text | None = None
    network: Text | None = None
    network_requested: Text | None = None
    details: JsonObject = Field(default_factory=dict)


class ModelInput(Record):
    """The locked model: where it came from, its digest, size and where it is published.

    Runs before directory and remote inputs record only ``path``, ``sha256`` and ``size``
    (a local file); the full file list of a directory is in the bundle's lock.
    """

    path: Text | None = None
    sha256: Text | None = None
    size: Count | None = None
    kind: Text | None = None
    uri: Text | None = None
    endpoint: Text | None = None
    artifact: Text | None = None

    @property
    def origin(self) -> str | None:
        """The local path or, for a remote input, its URI."""
        return self.path if self.path is not None else self.uri


class DatasetInput(ModelInput):
    """A locked dataset with its split, license and source."""

    name: Text | None = None
    split: Text | None = None
    license: Text | None = None
    source: Text | None = None


class SourceFacts(Record):
    """The evaluated code: git commit, dirty flag, build-context digest."""

    commit: Text | None = None
    dirty: Flag | None = None
    tree_sha256: Text | None = None


class ImageReproducibility(Record):
    """Whether the image's rebuild was checked, and its result."""

    checked: Flag | None = None
    assembly: Text | None = None
    checked_at: Text | None = None
    result: Text | None = None
    rebuilt_ref: Text | None = None
    base_identical: Flag | None = None
    from_scratch: Flag | None = None
    differences: Count | None = None


class CiIdentity(Record):
    """The CI system and job that launched a run (fields a system lacks are None)."""

    system: Text | None = None
    pipeline: Text | None = None
    run_id: Text | None = None
    job: Text | None = None
    job_url: Text | None = None
    # recorded for the systems that name them (runner.build.provenance)
    run_attempt: Text | None = None
    pipeline_url: Text | None = None
    actor: Text | None = None
    repository: Text | None = None
    ref: Text | None = None
    commit: Text | None = None


# What ``Launcher.evidence`` says of every launcher evalrun records: nothing in it is
# authenticated; the signing key is the only identity a verifier can check.
SELF_ASSERTED = "self-asserted: the launching process's environment variables and host name"


class Launcher(Record):
    """Who launched a run: user, uid, host, CI identity — as the launching process said.

    ``evidence`` says what these claims rest on (:data:`SELF_ASSERTED`: environment
    variables, not authenticated) and ``signer_keyid`` binds them to the key that signs
    the bundle: verification checks that key signed it. Bundles from before either field
    have neither.
    """

    user: Text | None = None
    uid: Count | None = None
    host: Text | None = None
    ci: CiIdentity | None = None
    evidence: Text | None = None
    signer_keyid: Text | None = None


class Rationale(Record):
    """Why a run was launched: ``--reason`` wins over the spec's; both kept."""

    text: Text | None = None
    source: Text | None = None
    cli: Text | None = None
    spec: Text | None = None


class PreprocessingRecord(Record):
    """A preprocessing step with the digest of its code."""

    name: Text | None = None
    code: Text | None = None
    code_digest: Text | None = None
    kind: Text | None = None
    params: JsonObject | None = None


class Provenance(Record):
    """Who launched the run, when, why, with which evalrun and preprocessing code."""

    schema_: Text | None = Field(default=None, alias="schema")
    launched_by: Launcher = Launcher()
    launched_at: Text | None = None
    evalrun_version: Text | None = None
    rationale: Rationale = Rationale()
    comparison_group: Text | None = None
    preprocessing: tuple[PreprocessingRecord, ...] = ()


class MetricDefinition(Record):
    """A metric as the spec declared it (the spec's model, plus whether it gates)."""

    name: Text | None = None
    compute: Text | None = None
    field: Text | None = None
    direction: Direction | None = None
    threshold: Number | None = None
    ci: ConfidenceInterval | None = None
    role: Role | None = None
    promoted: Promotion | None = None
    gating: Flag | None = None
    # the catalogue's parameters, present only where the spec set them
    fields: dict[str, Text] | None = None
    average: Text | None = None
    positive: JsonValue = None
    classes: tuple[JsonValue, ...] | None = None
    bins: Count | None = None
    k: Count | None = None
    normalize: JsonValue = None
    confusion_matrix: Flag | None = None


class Seeds(Record):
    """The run's seed and the determinism settings the agent applied (evidence)."""

    seed: Count | None = None
    determinism: JsonValue = None


class PerturbedMetric(Record):
    """A metric under a perturbation: value, change from the baseline, their CIs."""

    name: Text
    value: Number | None = None
    baseline: Number | None = None
    delta: Number | None = None
    ci: ConfidenceInterval | None = None
    delta_ci: ConfidenceInterval | None = None
    n: Count | None = None


class PerturbationResult(Record):
    """One declared perturbation and every metric's sensitivity to it."""

    name: Text | None = None
    kind: Text | None = None
    n: Count | None = None
    metrics: tuple[PerturbedMetric, ...] = ()


class ReproductionOf(Record):
    """A re-run's link to the original run it reproduces."""

    run_id: Text | None = None
    bundle_digest: Text | None = None
    outcome: Outcome | None = None
    lock_digest: Text | None = None
    signer_keyid: Text | None = None
    notes: tuple[Text, ...] = ()


class ReproducedMetric(Record):
    """One metric of a re-run against the original."""

    name: Text | None = None
    original: Number | None = None
    rerun: Number | None = None
    delta: Number | None = None
    original_ci: tuple[Number, Number] | None = None
    rerun_ci: tuple[Number, Number] | None = None
    verdict: MetricVerdict | None = None


class ReproductionRecord(Record):
    """A re-run's verdict: overall and per metric."""

    verdict: ReproductionVerdict | None = None
    reason: Text | None = None
    tolerance: Number | None = None
    metrics: tuple[ReproducedMetric, ...] = ()


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

    seed: Count | None = None
    run_id: Text | None = None
    bundle_digest: Text | None = None
    # "error": the seed's run could not even be sealed
    outcome: Outcome | Literal["error"] | None = None
    reason: Text | None = None
    metrics: tuple[MetricResult, ...] = ()


class AcrossSeedsStat(Record):
    """A metric's spread across seeds: mean, sample sd, Student-t CI of the mean."""

    name: Text | None = None
    n: Count | None = None
    mean: Number | None = None
    sd: Number | None = None
    ci: ConfidenceInterval | None = None
    note: Text | None = None


class RunSetPredicate(Record):
    """The predicate of a run-set bundle: every seed's run and the spread across seeds."""

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

    role: Text | None = None
    name: Text | None = None
    path: Text | None = None
    sha256: Text | None = None
    reason: Text | None = None


class AuditedRun(Record):
    """One sampled run of an audit and whether its re-run reproduced it."""

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
    "traced_processes",
    "table",
    "table_digest",
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
    "AcrossSeedsStat",
    "AuditFilters",
    "AuditPredicate",
    "AuditedRun",
    "ConfidenceInterval",
    "DatasetInput",
    "EnvironmentView",
    "ImageFacts",
    "JsonObject",
    "MetricDefinition",
    "MetricResult",
    "MetricVerdict",
    "MissingInput",
    "ModelInput",
    "PerturbationResult",
    "Predicate",
    "PreprocessingRecord",
    "Provenance",
    "Record",
    "ReproducedMetric",
    "ReproductionOf",
    "ReproductionRecord",
    "RunPredicate",
    "RunSetMember",
    "RunSetPredicate",
    "SandboxFacts",
    "Seeds",
    "SpecRef",
    "Timestamps",
    "json_at",
    "parse_predicate",
]

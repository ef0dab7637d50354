"""The parts the signed predicates are made of: the frozen ``Record`` base, the literal
types, and the records a run predicate nests (inputs, image, sandbox, provenance, metrics,
seeds, perturbations, reproductions). Re-exported by :mod:`runner.model.predicate`."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Annotated, Literal, TypeAlias

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    JsonValue,
    PlainValidator,
    StrictBool,
    StrictInt,
    StrictStr,
)
from pydantic_core import PydanticCustomError

from runner.model.outcome import Outcome

if TYPE_CHECKING:
    from runner.model.lock import LockedSpec

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


def image_reproducibility(lock: LockedSpec) -> ImageReproducibility:
    """What a bundle records about its image: checked or not, when, with what result."""
    record = lock.image.reproducibility
    if record is None:
        return ImageReproducibility(checked=False, assembly=lock.image.assembly)
    return ImageReproducibility(
        checked=True, assembly=lock.image.assembly, **record.model_dump(mode="json")
    )


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

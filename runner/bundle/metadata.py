"""The three metadata files of a bundle: their names, their models and their exact bytes.

``manifest.json`` lists every payload file (path, sha256, size, sorted by path);
``statement.json`` is an in-toto Statement v1 whose subjects are those files and the
manifest; ``envelope.dsse.json`` is the DSSE envelope over the statement bytes
(:mod:`runner.bundle.signing`). The models are validated when they are built, and
:meth:`~BundleManifest.to_json_bytes`/:meth:`~Statement.to_json_bytes` give the one
canonical form that is hashed and signed.
"""

from __future__ import annotations

import itertools
import json
import re
from typing import Literal, TypeAlias

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

# the one strict JSON reader (duplicate keys and non-finite numbers refused)
from runner._internal.strict_json import load_json_strict as load_json_strict
from runner.shared.json_types import JSONObject
from runner.shared.tarformat import unsafe_path_reason

MANIFEST_NAME = "manifest.json"
STATEMENT_NAME = "statement.json"
ENVELOPE_NAME = "envelope.dsse.json"
# Not signed itself: it restates the envelope, and verification checks that it does.
SIGSTORE_BUNDLE_NAME = "envelope.sigstore.json"
METADATA_NAMES: frozenset[str] = frozenset(
    {MANIFEST_NAME, STATEMENT_NAME, ENVELOPE_NAME, SIGSTORE_BUNDLE_NAME}
)

PAYLOAD_TYPE = "application/vnd.in-toto+json"

# A manifest/statement/envelope larger than this is not one the runner wrote.
METADATA_MAX_BYTES = 256 << 20


_SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")
RUN_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def _check_sha256_hex(value: str) -> str:
    if not _SHA256_HEX.match(value):
        raise ValueError("expected 64 lowercase hex characters")
    return value


class ManifestFile(BaseModel):
    """One payload file of a bundle."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    path: str
    sha256: str
    size: int = Field(ge=0)

    @field_validator("path")
    @classmethod
    def _safe_path(cls, value: str) -> str:
        reason = unsafe_path_reason(value)
        if reason:
            raise ValueError(f"{reason}: {value!r}")
        if value in METADATA_NAMES:
            raise ValueError(f"{value!r} is reserved for bundle metadata")
        return value

    @field_validator("sha256")
    @classmethod
    def _sha256_hex(cls, value: str) -> str:
        return _check_sha256_hex(value)


class BundleManifest(BaseModel):
    """``manifest.json``: the run it belongs to and every payload file, sorted by path."""

    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)

    schema_: Literal["evalrun/bundle-manifest/v1"] = Field(
        default="evalrun/bundle-manifest/v1", alias="schema"
    )
    run_id: str
    files: tuple[ManifestFile, ...]

    @field_validator("run_id")
    @classmethod
    def _valid_run_id(cls, value: str) -> str:
        if not RUN_ID_PATTERN.match(value):
            raise ValueError("run id must match [A-Za-z0-9][A-Za-z0-9._-]{0,127}")
        return value

    @model_validator(mode="after")
    def _sorted_unique(self) -> BundleManifest:
        paths = [f.path for f in self.files]
        for before, after in itertools.pairwise(paths):
            if before >= after:
                raise ValueError(f"files not strictly sorted by path at {after!r}")
        # a file and a directory of the same name cannot both exist on disk
        names = set(paths)
        for p in paths:
            parts = p.split("/")
            for i in range(1, len(parts)):
                if "/".join(parts[:i]) in names:
                    raise ValueError(f"{p!r} lies under {'/'.join(parts[:i])!r}, which is a file")
        return self

    def to_json_bytes(self) -> bytes:
        """The exact bytes written to ``manifest.json``."""
        return canonical_json_bytes(self.model_dump(mode="json", by_alias=True))


class Subject(BaseModel):
    """An in-toto ResourceDescriptor naming a bundle file by path and sha256."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    digest: dict[str, str]

    @field_validator("digest")
    @classmethod
    def _has_sha256(cls, value: dict[str, str]) -> dict[str, str]:
        if set(value) != {"sha256"}:
            raise ValueError("digest must hold exactly one 'sha256' entry")
        _check_sha256_hex(value["sha256"])
        return value


# The predicate exactly as signed: a JSON object (runner.shared.json_types), not JsonValue,
# on purpose: it is read into its model by runner.bundle.reader, and validating it as
# JsonValue here would re-walk every value of a large predicate and refuse nesting deeper
# than pydantic's recursion limit.
SignedPredicate: TypeAlias = JSONObject


class Statement(BaseModel):
    """An in-toto Statement v1 with the evalrun predicate type."""

    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)

    type_: Literal["https://in-toto.io/Statement/v1"] = Field(
        default="https://in-toto.io/Statement/v1", alias="_type"
    )
    subject: tuple[Subject, ...] = Field(min_length=1)
    predicate_type: Literal["https://evalrun.dev/EvalRun/v1"] = Field(
        default="https://evalrun.dev/EvalRun/v1", alias="predicateType"
    )
    predicate: SignedPredicate

    @field_validator("predicate")
    @classmethod
    def _has_run_id(cls, value: SignedPredicate) -> SignedPredicate:
        run_id = value.get("run_id")
        if not isinstance(run_id, str) or not RUN_ID_PATTERN.match(run_id):
            raise ValueError("predicate.run_id must be a run id string")
        return value

    @property
    def run_id(self) -> str:
        """The run this statement is about (``predicate.run_id``)."""
        value = self.predicate["run_id"]
        assert isinstance(value, str)  # checked by the validator
        return value

    def subject_digests(self) -> dict[str, str]:
        """Subject name → sha256 hex."""
        return {s.name: s.digest["sha256"] for s in self.subject}

    def to_json_bytes(self) -> bytes:
        """The exact bytes written to ``statement.json`` and signed as the DSSE payload."""
        return canonical_json_bytes(self.model_dump(mode="json", by_alias=True))


def canonical_json_bytes(obj: object) -> bytes:
    """The bytes a bundle's metadata is written as: sorted keys, indented, ASCII, finite."""
    # one canonical form a verifier can rely on
    text = json.dumps(obj, sort_keys=True, indent=2, ensure_ascii=True, allow_nan=False)
    return (text + "\n").encode("ascii")

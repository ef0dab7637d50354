"""The plan the host writes for the agent (``plan.json``): its schema, its strict parsing
and its exact bytes. Standard library only: the agent imports it inside the image.

The host writes the plan with ``RunPlan.agent_plan()`` and :func:`encode_agent_plan`; the
agent reads it with :func:`read_agent_plan`. A bad field raises :class:`PlanError` naming it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Literal, NotRequired, TypedDict, cast

from runner.shared.definitions import MetricDefinition, PerturbationDefinition, PlanExpect
from runner.shared.json_types import JSONObject
from runner.shared.tarformat import path_structure_reason

# How the runner collects results (see the results stream in :mod:`runner.shared.protocol`)
# and how long the agent holds its finished pod for it.
COLLECT_MODES = ("volume", "exec")
DEFAULT_HOLD_S = 600
MAX_HOLD_S = 24 * 3600


class AgentPlanFile(TypedDict):
    """One file of a directory input: path relative to the input's root, sha256, size."""

    path: str
    sha256: str
    size: int


class AgentPlanInput(TypedDict):
    """One input as the agent sees it (``path`` inside the container).

    A ``file`` input (the default; plans from before directories have no ``kind``)
    is the file at ``path`` with sha256 ``sha256``. A ``directory`` input is the tree
    at ``path`` holding exactly ``files``; ``sha256`` is its evalrun-input-tree/v1
    digest (:func:`runner.shared.inputs.tree_digest_of`).
    """

    role: Literal["model", "dataset"]
    name: str
    path: str
    sha256: str
    kind: NotRequired[Literal["file", "directory"]]
    files: NotRequired[list[AgentPlanFile]]


class AgentPlan(TypedDict):
    """``plan.json``: everything the agent needs, with paths as seen inside the container.

    ``metrics``, ``perturbations`` and ``expect`` are the spec's own definitions
    (:mod:`runner.shared.definitions`), interpreted by :mod:`runner.shared.metrics` and
    the agent's checks; ``params`` is the user's, passed on untouched.
    """

    emit_results: bool
    # How the runner collects the results (absent: "volume"); see "results stream" below.
    collect: NotRequired[Literal["volume", "exec"]]
    hold_s: NotRequired[int]
    # What the agent checks of the image (absent: "full", what agents always did).
    verify_rootfs: NotRequired[Literal["used", "full"]]
    run_id: str
    image_ref: str
    expected_rootfs_digest: str
    seed: int
    params: JSONObject
    command: list[str]
    timeout_s: int
    metrics: list[MetricDefinition]
    perturbations: list[PerturbationDefinition]
    expect: PlanExpect
    inputs: list[AgentPlanInput]


class PlanError(ValueError):
    """The plan is not one this agent can run; ``field`` names the offending part."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"plan field {field!r}: {problem}")
        self.field = field
        self.problem = problem


_SHA256_HEX = re.compile(r"[0-9a-f]{64}")


def _type_name(value: object) -> str:
    return "null" if value is None else type(value).__name__


# The parsing helpers take the decoded plan as untrusted JSON: every value is checked.
Untrusted = Mapping[str, object]


def _str(data: Untrusted, key: str, where: str = "") -> str:
    value = data.get(key)
    if not isinstance(value, str) or not value:
        raise PlanError(where + key, f"expected a non-empty string, found {_type_name(value)}")
    return value


def _int(data: Untrusted, key: str, *, minimum: int, where: str = "") -> int:
    value = data.get(key)
    # bool is an int in Python, never in a plan
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise PlanError(where + key, f"expected an integer >= {minimum}, found {value!r}")
    return value


def _object(data: Untrusted, key: str, *, optional: bool = False) -> JSONObject:
    if optional and key not in data:
        return {}
    value = data.get(key)
    if not isinstance(value, dict):
        raise PlanError(key, f"expected an object, found {_type_name(value)}")
    return value


def _objects(data: Untrusted, key: str, *, optional: bool = False) -> list[JSONObject]:
    if optional and key not in data:
        return []
    value = data.get(key)
    if not isinstance(value, list):
        raise PlanError(key, f"expected a list, found {_type_name(value)}")
    for index, item in enumerate(value):
        if not isinstance(item, dict):
            raise PlanError(f"{key}[{index}]", f"expected an object, found {_type_name(item)}")
    return value


def _plan_input(index: int, item: Untrusted) -> AgentPlanInput:
    where = f"inputs[{index}]."
    role = item.get("role")
    if role not in ("model", "dataset"):
        raise PlanError(where + "role", f"expected 'model' or 'dataset', found {role!r}")
    sha256 = _str(item, "sha256", where)
    if not _SHA256_HEX.fullmatch(sha256):
        raise PlanError(where + "sha256", "expected 64 lowercase hex characters")
    parsed: AgentPlanInput = {
        "role": role,
        "name": _str(item, "name", where),
        "path": _str(item, "path", where),
        "sha256": sha256,
    }
    kind = item.get("kind", "file")
    if kind not in ("file", "directory"):
        raise PlanError(where + "kind", f"expected 'file' or 'directory', found {kind!r}")
    if kind == "directory":
        parsed["kind"] = "directory"
        parsed["files"] = _plan_files(where, item)
    return parsed


def _plan_files(where: str, item: Untrusted) -> list[AgentPlanFile]:
    files = item.get("files")
    if not isinstance(files, list) or not files:
        raise PlanError(where + "files", "a directory input lists its files (at least one)")
    out: list[AgentPlanFile] = []
    seen: set[str] = set()
    for index, entry in enumerate(files):
        at = f"{where}files[{index}]."
        if not isinstance(entry, dict):
            raise PlanError(at.rstrip("."), f"expected an object, found {_type_name(entry)}")
        path = _str(entry, "path", at)
        reason = path_structure_reason(path)
        if reason or path in seen:
            raise PlanError(at + "path", reason or f"{path!r} is listed twice")
        seen.add(path)
        sha256 = _str(entry, "sha256", at)
        if not _SHA256_HEX.fullmatch(sha256):
            raise PlanError(at + "sha256", "expected 64 lowercase hex characters")
        size = _int(entry, "size", minimum=0, where=at)
        out.append({"path": path, "sha256": sha256, "size": size})
    return out


def parse_agent_plan(data: object) -> AgentPlan:
    """Check a decoded ``plan.json`` and return it as an :class:`AgentPlan`.

    Strict on what the agent uses: a missing field or one of the wrong type
    raises :class:`PlanError` naming it. ``emit_results``, ``params``,
    ``perturbations`` and ``expect`` may be absent (false or empty); ``collect``
    and ``hold_s`` are kept only when present (absent: the runner reads the
    results volume, or the log frame with ``emit_results``). Unknown
    fields are ignored, so a newer runner can still drive an agent baked into
    an older image.
    """
    if not isinstance(data, dict):
        raise PlanError("(root)", f"expected an object, found {_type_name(data)}")
    emit = data.get("emit_results", False)
    if not isinstance(emit, bool):
        raise PlanError("emit_results", f"expected true or false, found {emit!r}")
    command = data.get("command")
    if (
        not isinstance(command, list)
        or not command
        or not all(isinstance(arg, str) for arg in command)
    ):
        raise PlanError("command", "expected a non-empty list of strings")
    perturbations = _objects(data, "perturbations", optional=True)
    for index, pert in enumerate(perturbations):
        _str(pert, "name", f"perturbations[{index}].")
        _str(pert, "kind", f"perturbations[{index}].")
    # metrics, perturbations and expect are the host's definitions: checked here only as
    # objects (and a perturbation's name and kind), field by field where they are used
    # (definition_problems, the perturbation code, the expected-environment checks)
    plan: AgentPlan = {
        "emit_results": emit,
        "run_id": _str(data, "run_id"),
        "image_ref": _str(data, "image_ref"),
        "expected_rootfs_digest": _str(data, "expected_rootfs_digest"),
        "seed": _int(data, "seed", minimum=0),
        "params": _object(data, "params", optional=True),
        "command": list(command),
        "timeout_s": _int(data, "timeout_s", minimum=1),
        "metrics": cast(list[MetricDefinition], _objects(data, "metrics")),
        "perturbations": cast(list[PerturbationDefinition], perturbations),
        "expect": cast(PlanExpect, _object(data, "expect", optional=True)),
        "inputs": [_plan_input(i, item) for i, item in enumerate(_objects(data, "inputs"))],
    }
    if "collect" in data:
        plan["collect"] = _collect_mode(data["collect"])
    if "hold_s" in data:
        plan["hold_s"] = _hold_s(data)
    if "verify_rootfs" in data:
        mode = data["verify_rootfs"]
        if mode not in ("used", "full"):
            raise PlanError("verify_rootfs", f"expected 'used' or 'full', found {mode!r}")
        plan["verify_rootfs"] = mode
    return plan


def read_agent_plan(path: Path) -> AgentPlan:
    """Read and parse ``plan.json``; PlanError if it is not JSON or not a valid plan."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise PlanError("(root)", f"not JSON: {exc}") from exc
    return parse_agent_plan(data)


def encode_agent_plan(plan: AgentPlan) -> bytes:
    """The exact bytes of ``plan.json`` (sorted keys, two-space indent, final newline)."""
    return (json.dumps(plan, indent=2, sort_keys=True) + "\n").encode()


def _collect_mode(value: object) -> Literal["volume", "exec"]:
    if value == "volume" or value == "exec":
        return value
    raise PlanError("collect", f"expected one of {list(COLLECT_MODES)}, found {value!r}")


def _hold_s(data: Untrusted) -> int:
    hold = _int(data, "hold_s", minimum=1)
    if hold > MAX_HOLD_S:
        raise PlanError("hold_s", f"expected at most {MAX_HOLD_S}, found {hold}")
    return hold

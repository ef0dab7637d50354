"""The contract between the runner and the in-container agent; one definition of each part.

Standard library only: the agent imports it inside the image. The host writes
the plan with ``RunPlan.agent_plan()`` and reads the results frame with
``runner.backends.collect.extract_results_frame``; the agent (``runner.agent``)
reads the plan with :func:`parse_agent_plan` and writes the frame with
:func:`encode_frame`. The parts:

* where things are inside the container (:data:`PLAN_FILE`, :data:`INPUTS_MOUNT`,
  :data:`RESULTS_MOUNT`);
* the plan (:class:`AgentPlan`), parsed strictly: a bad field is named;
* the agent's exit codes (:class:`AgentExit`);
* the results frame: the results directory as one tar (see
  :mod:`runner.shared.tarformat`), base64 between marker lines with its sha256
  and size, for backends that cannot read the results volume (Kubernetes).
"""

from __future__ import annotations

import base64
import binascii
import enum
import hashlib
import json
import re
from pathlib import Path
from typing import Any, Literal, NotRequired, TypedDict, cast

from runner.shared.tarformat import path_structure_reason

# --------------------------------------------------------------------------- paths

PLAN_MOUNT = "/evalrun/plan"
PLAN_FILE = f"{PLAN_MOUNT}/plan.json"
INPUTS_MOUNT = "/evalrun/inputs"
RESULTS_MOUNT = "/evalrun/results"


# --------------------------------------------------------------------------- exit codes


class AgentExit(enum.IntEnum):
    """How ``python -m runner.agent run`` ends; ``summary.json`` says why."""

    OK = 0
    AGENT_ERROR = 1  # an unexpected exception in the agent itself
    BAD_PLAN = 2
    INTEGRITY = 3  # rootfs or input digest mismatch
    ENVIRONMENT = 4  # driver, CUDA, GPU or another expectation not met
    EVAL_FAILED = 20
    EVAL_OUTPUT = 21  # the per-sample output is unusable
    EVAL_TIMEOUT = 22


# Exits a retry of the same plan on the same image cannot change (a Job fails at once on them).
FINAL_EXITS = (AgentExit.BAD_PLAN, AgentExit.INTEGRITY, AgentExit.ENVIRONMENT)


# --------------------------------------------------------------------------- the plan


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

    ``metrics``, ``perturbations`` and ``expect`` are the spec's own definitions,
    interpreted by :mod:`runner.shared.metrics` and the agent's checks.
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
    params: dict[str, Any]
    command: list[str]
    timeout_s: int
    metrics: list[dict[str, Any]]
    perturbations: list[dict[str, Any]]
    expect: dict[str, Any]
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


def _str(data: dict[str, Any], key: str, where: str = "") -> str:
    value = data.get(key)
    if not isinstance(value, str) or not value:
        raise PlanError(where + key, f"expected a non-empty string, found {_type_name(value)}")
    return value


def _int(data: dict[str, Any], key: str, *, minimum: int, where: str = "") -> int:
    value = data.get(key)
    # bool is an int in Python, never in a plan
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise PlanError(where + key, f"expected an integer >= {minimum}, found {value!r}")
    return value


def _object(data: dict[str, Any], key: str, *, optional: bool = False) -> dict[str, Any]:
    if optional and key not in data:
        return {}
    value = data.get(key)
    if not isinstance(value, dict):
        raise PlanError(key, f"expected an object, found {_type_name(value)}")
    return value


def _objects(data: dict[str, Any], key: str, *, optional: bool = False) -> list[dict[str, Any]]:
    if optional and key not in data:
        return []
    value = data.get(key)
    if not isinstance(value, list):
        raise PlanError(key, f"expected a list, found {_type_name(value)}")
    for index, item in enumerate(value):
        if not isinstance(item, dict):
            raise PlanError(f"{key}[{index}]", f"expected an object, found {_type_name(item)}")
    return value


def _plan_input(index: int, item: dict[str, Any]) -> AgentPlanInput:
    where = f"inputs[{index}]."
    role = item.get("role")
    if role not in ("model", "dataset"):
        raise PlanError(where + "role", f"expected 'model' or 'dataset', found {role!r}")
    sha256 = _str(item, "sha256", where)
    if not _SHA256_HEX.fullmatch(sha256):
        raise PlanError(where + "sha256", "expected 64 lowercase hex characters")
    parsed: AgentPlanInput = {
        "role": cast(Literal["model", "dataset"], role),
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


def _plan_files(where: str, item: dict[str, Any]) -> list[AgentPlanFile]:
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
    plan: AgentPlan = {
        "emit_results": emit,
        "run_id": _str(data, "run_id"),
        "image_ref": _str(data, "image_ref"),
        "expected_rootfs_digest": _str(data, "expected_rootfs_digest"),
        "seed": _int(data, "seed", minimum=0),
        "params": _object(data, "params", optional=True),
        "command": list(command),
        "timeout_s": _int(data, "timeout_s", minimum=1),
        "metrics": _objects(data, "metrics"),
        "perturbations": perturbations,
        "expect": _object(data, "expect", optional=True),
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


# --------------------------------------------------------------------------- results frame

FRAME_BEGIN = "-----BEGIN EVALRUN RESULTS"
FRAME_END = "-----END EVALRUN RESULTS-----"
# the size has at most 15 digits: no frame is larger, and int() refuses thousands of digits
FRAME_BEGIN_RE = re.compile(
    r"^-----BEGIN EVALRUN RESULTS sha256=([0-9a-f]{64}) bytes=(\d{1,15})-----$"
)
FRAME_LINE_CHARS = 76
# The frame travels on the pod log, which the kubelet rotates (10 MiB by default).
MAX_FRAME_BYTES = 64 * 1024 * 1024

# What the runner collects from a results directory, on any backend.
MAX_RESULT_FILES = 10_000
MAX_RESULT_FILE_BYTES = 4 * 1024**3
MAX_RESULT_BYTES = 16 * 1024**3


def encode_frame(data: bytes) -> str:
    """The results tar ``data`` as frame text: begin line with sha256 and size, base64, end line."""
    digest = hashlib.sha256(data).hexdigest()
    encoded = base64.b64encode(data).decode()
    lines = [f"{FRAME_BEGIN} sha256={digest} bytes={len(data)}-----"]
    lines += [encoded[i : i + FRAME_LINE_CHARS] for i in range(0, len(encoded), FRAME_LINE_CHARS)]
    lines.append(FRAME_END)
    return "\n" + "\n".join(lines) + "\n"


class FrameError(ValueError):
    """No single, complete, intact results frame in a log; the message says what is wrong."""


def decode_frame(log_text: str) -> bytes:
    """The tar bytes of the one results frame in ``log_text``, checked against its header.

    Raises FrameError when there is no frame or more than one, when the declared
    size exceeds :data:`MAX_FRAME_BYTES` (checked before decoding), when the end
    marker is missing, or when the base64, size or sha256 do not hold.
    """
    lines = log_text.splitlines()
    begins = [i for i, line in enumerate(lines) if FRAME_BEGIN_RE.match(line.strip())]
    if not begins:
        raise FrameError("no results frame in the pod log (the agent did not finish)")
    if len(begins) > 1:
        raise FrameError(f"{len(begins)} results frames in the pod log; expected one")
    start = begins[0]
    match = FRAME_BEGIN_RE.match(lines[start].strip())
    assert match is not None
    expected_sha, size = match[1], int(match[2])
    if size > MAX_FRAME_BYTES:
        raise FrameError(f"results frame is {size} bytes; the limit is {MAX_FRAME_BYTES}")
    try:
        end = next(i for i in range(start + 1, len(lines)) if lines[i].strip() == FRAME_END)
    except StopIteration:
        raise FrameError("results frame is truncated (no end marker)") from None
    try:
        data = base64.b64decode("".join(x.strip() for x in lines[start + 1 : end]), validate=True)
    except (binascii.Error, ValueError):
        raise FrameError("results frame is not valid base64") from None
    found = hashlib.sha256(data).hexdigest()
    if len(data) != size or found != expected_sha:
        raise FrameError(
            f"results frame checksum mismatch: header says sha256={expected_sha} "
            f"bytes={size}, found sha256={found} bytes={len(data)}"
        )
    return data


# --------------------------------------------------------------------------- results stream
# Kubernetes: the agent holds its finished pod; the runner execs ``emit-results`` (raw binary
# stream on stdout, below), checks it, then execs ``ack``; the agent exits with its real code.

COLLECT_MODES = ("volume", "exec")
DEFAULT_HOLD_S = 600
MAX_HOLD_S = 24 * 3600
# The agent listens here while it holds (a Unix socket on the container's /tmp).
HOLD_SOCKET = "/tmp/evalrun-agent.sock"
AGENT_COMMAND = ("python3", "-m", "runner.agent")
EMIT_COMMAND = (*AGENT_COMMAND, "emit-results")
ACK_COMMAND = (*AGENT_COMMAND, "ack")
# ``emit-results`` and ``ack`` exit with this when no agent holds results (EX_TEMPFAIL).
NOT_HOLDING_EXIT = 75
# The line the agent prints once its results are final and it holds the pod.
READY_RE = re.compile(r"^-----EVALRUN RESULTS READY exit=(\d{1,3})-----$")
# ``ack``'s answer, with the exit code the agent is about to end with.
ACK_RE = re.compile(r"^ok exit=(\d{1,3})$")
# Raw stream: magic, chunks (4-byte big-endian length 1..STREAM_CHUNK_BYTES, then the bytes),
# a zero length, then the trailer with the sha256 and size of the concatenated chunks.
STREAM_MAGIC = b"EVALRUN-RESULTS-STREAM/1\n"
STREAM_CHUNK_BYTES = 1024 * 1024
STREAM_TRAILER_RE = re.compile(rb"sha256=([0-9a-f]{64}) bytes=(\d{1,20})\n")
_TRAILER_MAX = len(b"sha256= bytes=\n") + 64 + 20


def ready_line(exit_code: int) -> str:
    """The ready marker for an agent that will exit with ``exit_code``."""
    return f"-----EVALRUN RESULTS READY exit={exit_code}-----"


def _collect_mode(value: object) -> Literal["volume", "exec"]:
    if value == "volume" or value == "exec":
        return value
    raise PlanError("collect", f"expected one of {list(COLLECT_MODES)}, found {value!r}")


def _hold_s(data: dict[str, Any]) -> int:
    hold = _int(data, "hold_s", minimum=1)
    if hold > MAX_HOLD_S:
        raise PlanError("hold_s", f"expected at most {MAX_HOLD_S}, found {hold}")
    return hold


class StreamWriter:
    """Writes one results stream to ``sink`` (a binary file); :meth:`close` adds the trailer."""

    def __init__(self, sink: Any) -> None:
        self._sink = sink
        self._sha = hashlib.sha256()
        self._size = 0
        self._buf = bytearray()
        sink.write(STREAM_MAGIC)

    def write(self, data: bytes) -> int:
        self._buf += data
        if len(self._buf) >= STREAM_CHUNK_BYTES:
            view = memoryview(self._buf)
            full = len(self._buf) - len(self._buf) % STREAM_CHUNK_BYTES
            for start in range(0, full, STREAM_CHUNK_BYTES):
                self._chunk(view[start : start + STREAM_CHUNK_BYTES])
            view.release()
            del self._buf[:full]
        return len(data)

    def _chunk(self, data: bytes | memoryview) -> None:
        self._sha.update(data)
        self._size += len(data)
        self._sink.write(len(data).to_bytes(4, "big"))
        self._sink.write(data)

    def close(self) -> tuple[str, int]:
        """Flush, end the stream; returns the sha256 (hex) and size of the payload."""
        if self._buf:
            self._chunk(bytes(self._buf))
            self._buf.clear()
        digest = self._sha.hexdigest()
        self._sink.write(b"\0\0\0\0" + f"sha256={digest} bytes={self._size}\n".encode())
        self._sink.flush()
        return digest, self._size


class StreamReader:
    """Incremental reader of one results stream; refuses it the moment it goes wrong.

    :meth:`feed` takes bytes as they arrive and returns the payload pieces among them
    (views of ``data``: use them before the next call);
    :meth:`finish` raises :class:`FrameError` unless the stream ended exactly after
    a trailer whose sha256 and size match the payload. At most ``max_bytes`` of
    payload are accepted (checked before they are returned).
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._pending = bytearray()
        self._state = "magic"  # magic → length → chunk → trailer → done
        self._need = len(STREAM_MAGIC)
        self._sha = hashlib.sha256()
        self.size = 0

    def feed(self, data: bytes) -> list[memoryview]:
        view = memoryview(data)
        out: list[memoryview] = []
        pos = 0
        while pos < len(view):
            if self._state == "chunk":  # payload passes through as it arrives, never buffered
                piece = view[pos : pos + self._need]
                if self.size + len(piece) > self.max_bytes:
                    raise FrameError(f"results stream exceeds {self.max_bytes} bytes")
                self._sha.update(piece)
                self.size += len(piece)
                out.append(piece)
                pos += len(piece)
                self._need -= len(piece)
                if self._need == 0:
                    self._state, self._need = "length", 4
                continue
            if self._state == "done":
                raise FrameError("results stream has bytes after its trailer")
            if self._state == "trailer":
                self._pending += view[pos:]
                self._trailer(final=False)
                break
            take = view[pos : pos + self._need - len(self._pending)]
            self._pending += take
            pos += len(take)
            if len(self._pending) < self._need:
                break
            head = bytes(self._pending)
            self._pending.clear()
            if self._state == "magic":
                if head != STREAM_MAGIC:
                    raise FrameError("not a results stream (bad magic)")
                self._state, self._need = "length", 4
                continue
            length = int.from_bytes(head, "big")
            if length > STREAM_CHUNK_BYTES:
                raise FrameError(
                    f"results stream chunk of {length} bytes; limit {STREAM_CHUNK_BYTES}"
                )
            self._state, self._need = ("trailer", 0) if length == 0 else ("chunk", length)
        return out

    def _trailer(self, *, final: bool) -> None:
        end = self._pending.find(b"\n")
        if end < 0:
            if len(self._pending) > _TRAILER_MAX:
                raise FrameError("results stream trailer is malformed")
            if final:
                raise FrameError("results stream is truncated (no trailer)")
            return
        line = bytes(self._pending[: end + 1])
        del self._pending[: end + 1]
        match = STREAM_TRAILER_RE.fullmatch(line)
        if match is None:
            raise FrameError("results stream trailer is malformed")
        expected_sha, size = match[1].decode(), int(match[2])
        found = self._sha.hexdigest()
        if size != self.size or found != expected_sha:
            raise FrameError(
                f"results stream checksum mismatch: trailer says sha256={expected_sha} "
                f"bytes={size}, found sha256={found} bytes={self.size}"
            )
        self._state = "done"
        if self._pending:
            raise FrameError("results stream has bytes after its trailer")

    def finish(self) -> tuple[str, int]:
        """The payload's sha256 (hex) and size, once the stream ended intact."""
        if self._state == "trailer":
            self._trailer(final=True)
        if self._state != "done":
            raise FrameError(f"results stream is truncated after {self.size} payload bytes")
        return self._sha.hexdigest(), self.size

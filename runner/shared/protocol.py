"""The contract between the runner and the in-container agent; one definition of each part.

Standard library only: the agent imports it inside the image. The host writes
the plan with ``RunPlan.agent_plan()`` and reads the results frame with
``runner.backends.collect.extract_results_frame``; the agent (``runner.agent``)
reads the plan with :mod:`runner.shared.agent_plan` and writes the frame with
:func:`encode_frame`. The parts:

* where things are inside the container (:data:`PLAN_FILE`, :data:`INPUTS_MOUNT`,
  :data:`RESULTS_MOUNT`);
* the plan (:class:`~runner.shared.agent_plan.AgentPlan`), parsed strictly, is in
  :mod:`runner.shared.agent_plan`;
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
import re
from typing import Any

# --------------------------------------------------------------------------- paths

PLAN_MOUNT = "/evalrun/plan"
PLAN_FILE = f"{PLAN_MOUNT}/plan.json"
INPUTS_MOUNT = "/evalrun/inputs"
RESULTS_MOUNT = "/evalrun/results"
SANDBOX_UID = 65532
AGENT_RUN_COMMAND = ("run", "--plan", PLAN_FILE, "--results", RESULTS_MOUNT)
"""The agent's command line in a Docker run's container (its entrypoint is the agent)."""
RUN_ID_LABEL = "org.evalrun.run-id"
"""The Docker label that names the run a container belongs to."""
"""The unprivileged user (and group) the agent and the evaluation run as."""


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

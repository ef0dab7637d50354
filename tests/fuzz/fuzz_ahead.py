"""Fuzz target: the request a run stored for the next run of the same bytes (the store's
``ahead/`` folder), read by the Docker helper before it starts a sandbox ahead.

The input is the stored file. Property: nothing raises; either nothing is started (None)
or the sandbox is the policy's: the lock's image by digest, the agent's command, no
network, a read-only rootfs, every capability dropped, no new privileges, the sandbox
user, the plan read-only and the results writable with their folders left to the run,
every input read-only under the inputs folder, named after the next free attempt.
"""

from __future__ import annotations

import json

from harness import PropertyViolated, scratch
from seeds import sandbox_request

from runner.adapters.docker_ahead import AheadKey, Request
from runner.shared.protocol import (
    AGENT_RUN_COMMAND,
    INPUTS_MOUNT,
    PLAN_MOUNT,
    RESULTS_MOUNT,
    RUN_ID_LABEL,
)
from runner.shared.run_ids import run_id_for

NAME = "ahead"
_HOME = scratch(NAME)
_SPEC = _HOME / "eval.yaml"
_SPEC.write_text("name: fuzz\n")
IMAGE = "127.0.0.1:5000/evalrun/fuzz@sha256:" + "c" * 64
LOCK_DIGEST = "sha256:" + "1" * 64
(_HOME / "eval.lock.json").write_text(json.dumps({"image": {"ref": IMAGE}}))
(_HOME / "runs").mkdir()
(_HOME / "runs" / f"{run_id_for(LOCK_DIGEST, 4)}.json").write_text("{}")  # attempt 4 taken
_KEY = AheadKey.for_run(_HOME, _HOME / "runs", _SPEC, rerun=True)
assert _KEY is not None
_KEY.path.parent.mkdir()


def _request(attempt: int) -> Request:
    return sandbox_request(IMAGE, LOCK_DIGEST, attempt)


def seeds() -> dict[str, bytes]:
    assert _KEY is not None
    out = {}
    for attempt in (0, 3):
        _KEY.remember(_request(attempt), lock_digest=LOCK_DIGEST, attempt=attempt, waits=True)
        out[f"attempt-{attempt}"] = _KEY.path.read_bytes()
    return out


def test_one_input(data: bytes) -> None:
    assert _KEY is not None
    _KEY.path.write_bytes(data)
    ahead = _KEY.ahead()
    if ahead is None:
        return
    request, options = ahead.request, ahead.request.options
    fixed = {
        "network_mode": "none",
        "read_only": True,
        "cap_drop": ["ALL"],
        "security_opt": ["no-new-privileges"],
        "user": "65532:65532",
    }
    problems = [key for key, value in fixed.items() if options.get(key) != value]
    if request.image != IMAGE or request.command != AGENT_RUN_COMMAND:
        problems.append("image or command")
    if options.get("runtime") not in ("runsc", "runc") or "entrypoint" in options:
        problems.append("runtime or entrypoint")
    if [m[:1] + m[2:] for m in request.mounts[:2]] != [(PLAN_MOUNT, True), (RESULTS_MOUNT, False)]:
        problems.append("plan and results mounts")
    if any(m[1] is not None for m in request.mounts[:2]):
        problems.append("plan or results folder not left to the run")
    for target, _source, read_only in request.mounts[2:]:
        if not target.startswith(INPUTS_MOUNT + "/") or read_only is not True:
            problems.append(f"input mount {target!r}")
    taken = run_id_for(LOCK_DIGEST, 4)
    if ahead.run_id == taken or options["name"] != f"evalrun-{ahead.run_id}":
        problems.append("run id")
    if options["labels"].get(RUN_ID_LABEL) != ahead.run_id:
        problems.append("run id label")
    if problems:
        raise PropertyViolated(f"a sandbox outside the policy: {problems}")

"""A sandbox started ahead of the runner (runner.adapters.docker_ahead, docker_early).

The stored request: its key (the spec's and lock's bytes), its checks before use (only
what the sandbox policy makes is started), the run id it guesses (the next free attempt);
the helper's hand-over (only an equal request, only while the agent still waits) and the
agent's wait for its plan. The docker tier runs it against the engine.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from runner.adapters import docker_early
from runner.adapters.docker_ahead import ADOPT_WITHIN_S, PLAN_WAIT_S, AheadKey, Request
from runner.adapters.docker_early import EarlyEngine, Made, _Helper, _Started
from runner.agent.__main__ import _run_args, _wait_for
from runner.shared.protocol import (
    AGENT_RUN_COMMAND,
    INPUTS_MOUNT,
    PLAN_MOUNT,
    RESULTS_MOUNT,
    AgentExit,
)
from runner.shared.run_ids import run_id_for

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "fuzz"))
from seeds import sandbox_request  # the fuzz targets' shared samples

pytestmark = pytest.mark.unit

IMAGE = "127.0.0.1:5000/evalrun/t@sha256:" + "a" * 64
LOCK = "sha256:" + "1" * 64


def _request(attempt: int, plan: str | None = "/tmp/p", results: str | None = "/tmp/r",
             **options: Any) -> Request:
    return sandbox_request(IMAGE, LOCK, attempt, plan, results, spec_name="t", **options)


@pytest.fixture
def spec(tmp_path: Path) -> Path:
    path = tmp_path / "eval.yaml"
    path.write_text("name: t\n")
    (tmp_path / "eval.lock.json").write_text(json.dumps({"image": {"ref": IMAGE}}))
    return path


def _key(spec: Path, rerun: bool = True) -> AheadKey:
    home = spec.parent / "home"
    key = AheadKey.for_run(home, home / "runs", spec, rerun=rerun)
    assert key is not None
    return key


def _stored(key: AheadKey) -> dict[str, Any]:
    return json.loads(key.path.read_text())


def test_the_key_is_the_spec_and_lock_bytes_and_the_sandbox_options(spec: Path):
    first = _key(spec).path
    assert _key(spec).path == first
    home = spec.parent / "home"
    other = AheadKey.for_run(home, home / "runs", spec, rerun=True, options=("full",))
    assert other is not None and other.path != first
    (spec.parent / "eval.lock.json").write_text(json.dumps({"image": {"ref": IMAGE}}) + " ")
    assert _key(spec).path != first
    (spec.parent / "eval.lock.json").unlink()
    assert AheadKey.for_run(home, home / "runs", spec, rerun=True) is None


def test_a_stored_request_starts_the_next_attempts_sandbox_with_fresh_folders(spec: Path):
    key = _key(spec)
    assert key.ahead() is None  # nothing stored yet
    key.remember(_request(2), lock_digest=LOCK, attempt=2, waits=True)
    stored = _stored(key)
    assert stored["mounts"][0] == [PLAN_MOUNT, None, True]  # the run's own folders: not kept
    assert stored["mounts"][1] == [RESULTS_MOUNT, None, False]
    ahead = key.ahead()
    assert ahead is not None
    assert ahead.run_id == run_id_for(LOCK, 3)
    assert ahead.request == _request(3, plan=None, results=None)


def test_the_guess_skips_attempts_the_store_has(spec: Path):
    key = _key(spec)
    key.remember(_request(0), lock_digest=LOCK, attempt=0, waits=True)
    key.runs.mkdir(parents=True)
    for attempt in (1, 2):  # e.g. another runner's runs of the same lock meanwhile
        (key.runs / f"{run_id_for(LOCK, attempt)}.json").write_text("{}")
    ahead = key.ahead()
    assert ahead is not None and ahead.run_id == run_id_for(LOCK, 3)


def test_nothing_is_started_for_a_plain_run_or_after_an_agent_that_did_not_wait(spec: Path):
    _key(spec).remember(_request(0), lock_digest=LOCK, attempt=0, waits=True)
    assert _key(spec, rerun=False).ahead() is None  # a plain run may make no container
    _key(spec).remember(_request(0), lock_digest=LOCK, attempt=0, waits=False)
    assert _key(spec).ahead() is None


@pytest.mark.parametrize(
    "change",
    [
        {"network_mode": "host"},
        {"read_only": False},
        {"cap_drop": []},
        {"security_opt": []},
        {"user": "0:0"},
        {"runtime": "kata"},
        {"privileged": True},
        {"entrypoint": ["/bin/sh"]},
        {"name": "evalrun-someone-else"},
        {"pids_limit": "128"},
        {"labels": {"org.evalrun.spec": "t"}},
    ],
    ids=lambda change: next(iter(change)),
)
def test_a_stored_request_outside_the_policy_starts_nothing(spec: Path, change: dict):
    key = _key(spec)
    key.remember(_request(0, **change), lock_digest=LOCK, attempt=0, waits=True)
    assert key.ahead() is None


@pytest.mark.parametrize(
    "edit",
    [
        lambda e: e.update(image="127.0.0.1:5000/evalrun/other@sha256:" + "b" * 64),
        lambda e: e.update(image="127.0.0.1:5000/evalrun/t:latest"),
        lambda e: e.update(command=["run", "--plan", "/evil"]),
        lambda e: e["mounts"].append(["/etc", "/etc", True]),
        lambda e: e["mounts"].append([f"{INPUTS_MOUNT}/x", "/var/lib", False]),
        lambda e: e["mounts"].append([f"{INPUTS_MOUNT}/x", "relative/path", True]),
        lambda e: e["mounts"].__setitem__(1, [RESULTS_MOUNT, "/", False]),
        lambda e: e["mounts"].__setitem__(0, [PLAN_MOUNT, None, False]),
        lambda e: e["mounts"].pop(0),
        lambda e: e.update(attempt=-1),
        lambda e: e.update(attempt=True),
        lambda e: e.update(version=2),
        lambda e: e.pop("options"),
    ],
)
def test_a_stored_request_that_is_not_the_policys_starts_nothing(spec: Path, edit):
    key = _key(spec)
    key.remember(_request(0), lock_digest=LOCK, attempt=0, waits=True)
    entry = _stored(key)
    edit(entry)
    key.path.write_text(json.dumps(entry))
    assert key.ahead() is None


@pytest.mark.parametrize("data", [b"", b"{", b"[]", b"null", b"\xff\xfe", b'{"version": 1}'])
def test_an_unreadable_stored_request_starts_nothing(spec: Path, data: bytes):
    key = _key(spec)
    key.path.parent.mkdir(parents=True)
    key.path.write_bytes(data)
    assert key.ahead() is None


def test_requests_are_equal_but_for_the_runs_own_folders_and_the_agents_wait():
    mine = _request(3)
    started = Request(
        IMAGE,
        (*AGENT_RUN_COMMAND, "--plan-wait", str(PLAN_WAIT_S)),
        _request(3, plan="/tmp/other-p", results="/tmp/other-r").mounts,
        mine.options,
    )
    assert started.normalized() == mine.normalized()
    assert _request(3, mem_limit="256m").normalized() != mine.normalized()
    assert _request(4).normalized() != mine.normalized()


# --- the helper's hand-over ---------------------------------------------------------------


class _Container:
    def __init__(self, status: str = "running") -> None:
        self.id = "c" * 64
        self.status = status
        self.removed = False

    def reload(self) -> None:
        pass

    def remove(self, force: bool = False) -> None:
        self.removed = True


def _helper_with_ahead(tmp_path: Path, container: _Container, age_s: float = 1.0) -> _Helper:
    helper = _Helper()
    plan_dir, results_dir = tmp_path / "plan", tmp_path / "results"
    plan_dir.mkdir()
    results_dir.mkdir()
    helper.ahead = _Started(
        container, plan_dir, results_dir, _request(3, None, None), time.monotonic() - age_s
    )
    return helper


def _removed_by(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    removed: list[Any] = []
    import runner.adapters.docker_engine as engine

    monkeypatch.setattr(engine, "remove_container", lambda c, log: removed.append(c))
    return removed


def test_an_equal_request_is_handed_the_sandbox_while_its_agent_waits(tmp_path, monkeypatch):
    removed = _removed_by(monkeypatch)
    container = _Container()
    helper = _helper_with_ahead(tmp_path, container)
    assert helper._take_ahead(_request(3)) == "adopted"
    assert helper.ahead is not None and removed == []


@pytest.mark.parametrize(
    ("container", "age_s", "request_", "outcome"),
    [
        (_Container(), 1.0, _request(3, mem_limit="256m"), "different"),
        (_Container(), 1.0, _request(4), "different"),
        (_Container("exited"), 1.0, _request(3), "not_waiting"),
        (_Container(), ADOPT_WITHIN_S + 1, _request(3), "not_waiting"),
    ],
    ids=["other-limits", "other-attempt", "agent-exited", "too-old"],
)
def test_any_other_sandbox_is_removed_before_anything_runs_in_it(
    tmp_path, monkeypatch, container, age_s, request_, outcome
):
    removed = _removed_by(monkeypatch)
    helper = _helper_with_ahead(tmp_path, container, age_s)
    assert helper._take_ahead(request_) == outcome
    for removal in helper.removals:
        removal.join()
    assert helper.ahead is None and removed == [container]
    assert not (tmp_path / "plan").exists() and not (tmp_path / "results").exists()


def test_a_sandbox_started_ahead_and_never_taken_is_removed_when_the_runner_goes(
    tmp_path, monkeypatch
):
    removed = _removed_by(monkeypatch)
    container = _Container()
    helper = _helper_with_ahead(tmp_path, container)
    helper.abandon()  # the runner stopped before it asked for its container
    assert removed == [container] and not (tmp_path / "plan").exists()


def test_a_sandbox_taken_over_and_started_is_left_to_the_runner(tmp_path, monkeypatch):
    removed = _removed_by(monkeypatch)
    container = _Container()
    helper = _helper_with_ahead(tmp_path, container)
    made = helper._do("create", IMAGE, list(AGENT_RUN_COMMAND),
                      [list(m) for m in _request(3).mounts], _request(3).options)
    assert made.ahead == "adopted" and made.container_id == container.id
    assert made.plan_dir == tmp_path / "plan" and made.results_dir == tmp_path / "results"
    assert helper._do("start") is None  # already running: not started twice
    helper.abandon()
    assert removed == [] and (tmp_path / "plan").exists()


def test_a_run_whose_sandbox_did_not_wait_stores_that_none_is_started_again(spec: Path):
    key = _key(spec)
    engine = EarlyEngine(0, -1, -1, key)
    engine._closed = True
    engine.remember(_request(0), lock_digest=LOCK, attempt=0, made=Made("c", ahead="not_waiting"))
    assert _stored(key)["speculate"] is False
    engine.remember(_request(1), lock_digest=LOCK, attempt=1, made=Made("c", ahead="different"))
    assert _stored(key)["speculate"] is True and _stored(key)["attempt"] == 1


def test_the_helper_may_have_made_a_container_from_its_fork_when_it_may_start_one(spec):
    assert EarlyEngine(0, -1, -1, _key(spec)).created  # so close() lets it remove it
    assert not EarlyEngine(0, -1, -1, _key(spec, rerun=False)).created
    assert docker_early.EarlyEngine(0, -1, -1).created is False


# --- the agent's wait -----------------------------------------------------------------------


def test_the_agent_reads_its_wait_from_the_command_line():
    args = _run_args([*AGENT_RUN_COMMAND[0:], "--plan-wait", "300"])
    assert args is not None and args.plan_wait == 300.0
    assert _run_args(list(AGENT_RUN_COMMAND)).plan_wait == 0.0  # type: ignore[union-attr]
    assert _run_args(["run", "--plan-wait", "x"]) is None  # argparse says what is wrong


def test_the_agent_waits_for_its_plan_until_it_is_written_or_the_time_is_up(tmp_path: Path):
    plan = tmp_path / "plan.json"
    writer = threading.Timer(0.2, lambda: plan.write_text("{}"))
    writer.start()
    t0 = time.monotonic()
    _wait_for(plan, 30)
    assert plan.exists() and time.monotonic() - t0 < 5
    writer.join()
    t0 = time.monotonic()
    _wait_for(tmp_path / "never.json", 0.2)
    assert 0.2 <= time.monotonic() - t0 < 5


def test_an_agent_started_ahead_reads_the_table_and_captures_before_its_plan_comes(
    tmp_path: Path, monkeypatch
):
    """The preflight's parts that need no plan are done while the plan is on its way, once;
    the run then uses them (the environment with the plan's image) and says how long
    they took apart from its own preflight."""
    import runner.agent.__main__ as agent
    from runner.model.plan import RunPlan
    from runner.shared.agent_plan import encode_agent_plan

    plan_path, results = tmp_path / "plan.json", tmp_path / "results"
    results.mkdir()
    seen: list[tuple[str, bool]] = []
    root = "sha256:" + "b" * 64

    def read_table() -> None:  # an image without a table: the full check (patched below)
        seen.append(("table", plan_path.exists()))

    def capture(image_ref: str) -> dict[str, Any]:
        seen.append(("capture", plan_path.exists()))
        return {"image_ref": image_ref, "gpu": {"visible": False}}

    monkeypatch.setattr("runner.agent.verification.read_table", read_table)
    monkeypatch.setattr("runner.agent.usage.rootfs_digest", lambda _: (root, 1))
    monkeypatch.setattr(agent, "capture_environment", capture)
    plan = RunPlan(
        run_id="r-1", attempt=0, image_ref=IMAGE, expected_rootfs_digest=root, runtime="runc",
        command=[sys.executable, "-c", "pass"], params={}, seed=7, metrics=[], expect={},
        inputs=[], timeout_s=60, cpus=1.0, memory_mib=256, pids=64,
        spec_digest="sha256:" + "c" * 64, lock_digest=LOCK, spec_name="x",
    )
    writer = threading.Timer(0.3, lambda: plan_path.write_bytes(encode_agent_plan(
        plan.agent_plan())))
    writer.start()
    code = agent.main(["run", "--plan", str(plan_path), "--results", str(results),
                       "--plan-wait", "30"])
    writer.join()
    assert code == AgentExit.EVAL_OUTPUT  # past the preflight: the evaluation wrote nothing
    assert seen == [("table", False), ("capture", False)]  # each once, before the plan
    preflight = json.loads((results / "preflight.json").read_text())
    assert preflight["rootfs"]["passed"] is True and preflight["before_plan_s"] >= 0
    assert preflight["plan_waited_s"] > 0  # the plan came 0.3 s after the start
    assert json.loads((results / "env.json").read_text())["image_ref"] == IMAGE

    # a part that fails before the plan is done again after it, where it is the outcome
    monkeypatch.setattr("runner.agent.verification.read_table", lambda: 1 / 0)
    assert agent.BeforePlan.done() is None

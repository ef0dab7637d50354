"""A rerun's sandbox started ahead of the runner, on the real engine and gVisor
(runner.adapters.docker_ahead).

A rerun of the same locked spec is handed the sandbox the helper started from the last
run's request, its agent waiting for the plan; a rerun that asks for another sandbox is
not, and the one started ahead is gone; a runner stopped before it asked leaves nothing.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import docker
import pytest
import yaml
from conftest import EVALRUN, EXAMPLE, ROOT, predicate_of

pytestmark = pytest.mark.docker


def _named(name: str) -> dict:
    """The example's metadata under another name (its containers are labelled with it)."""
    metadata = yaml.safe_load((EXAMPLE / "eval.yaml").read_text())["metadata"]
    return {"metadata": {**metadata, "name": name}}


def _containers_of(name: str) -> list[str]:
    client = docker.from_env()
    return [c.name for c in client.containers.list(
        all=True, filters={"label": f"org.evalrun.spec={name}"}
    )]


def _stored_request(home: Path) -> Path:
    (entry,) = (home / "ahead").glob("*.json")
    return entry


def test_a_rerun_is_handed_the_sandbox_started_ahead(vcli, variant):
    spec = variant(**_named("ahead-handed"))
    code, first = vcli.json("run", str(spec))
    assert code == 0, first
    assert "started_ahead" not in predicate_of(Path(first["bundle"]))["sandbox"]["details"]
    for _ in range(2):  # each rerun stores the request the next one starts ahead
        code, out = vcli.json("run", str(spec), "--rerun")
        assert code == 0 and out["outcome"] == "passed", out
        pred = predicate_of(Path(out["bundle"]))
        assert pred["sandbox"]["details"]["started_ahead"] is True
        # its agent read the table and captured the environment before the plan came
        preflight = json.loads((Path(out["bundle"]) / "results" / "preflight.json").read_text())
        assert preflight["before_plan_s"] > 0 and preflight["rootfs"]["passed"] is True
        assert preflight["rootfs"]["mode"] == "used"
        assert out["metrics"] == first["metrics"]  # the same evaluation, the same seed
    assert _containers_of("ahead-handed") == []


def test_a_rerun_asking_for_another_sandbox_is_not_handed_the_one_started_ahead(vcli, variant):
    spec = variant(**_named("ahead-different"))
    code, out = vcli.json("run", str(spec))
    assert code == 0, out
    entry = _stored_request(vcli.home)
    stored = json.loads(entry.read_text())
    stored["options"]["mem_limit"] = stored["options"]["memswap_limit"] = "256m"
    entry.write_text(json.dumps(stored))  # as if the last run had had other limits
    code, out = vcli.json("run", str(spec), "--rerun")
    assert code == 0 and out["outcome"] == "passed", out
    details = predicate_of(Path(out["bundle"]))["sandbox"]["details"]
    assert "started_ahead" not in details
    assert _containers_of("ahead-different") == []
    assert json.loads(entry.read_text())["options"]["mem_limit"] == "512m"  # this run's


def test_a_runner_stopped_before_it_asked_leaves_no_sandbox(vcli, variant):
    spec = variant(**_named("ahead-stopped"))
    code, out = vcli.json("run", str(spec))
    assert code == 0, out
    proc = subprocess.Popen([*EVALRUN, "run", str(spec), "--rerun", "--json"], cwd=ROOT,
                            env=vcli.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while not _containers_of("ahead-stopped") and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before its sandbox was started ahead"
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=120)
    assert proc.returncode in (130, 0), proc.returncode  # stopped (or it had just finished)
    deadline = time.monotonic() + 30
    while _containers_of("ahead-stopped") and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _containers_of("ahead-stopped") == []


def test_a_sandbox_made_on_the_socket_is_the_one_the_sdk_makes(vcli, variant):
    """The helper starts the sandbox ahead through the engine's socket, before the SDK is
    loaded: the engine makes the same container of it as of the SDK's request."""
    from runner.adapters.docker_engine import create_container
    from runner.adapters.docker_socket import EngineSocket, create_body

    spec = variant(**_named("ahead-socket"))
    code, out = vcli.json("run", str(spec))
    assert code == 0, out
    stored = json.loads(_stored_request(vcli.home).read_text())
    client = docker.from_env()
    inspected = {}
    for way in ("sdk", "socket"):
        options = {**stored["options"], "name": f"evalrun-ahead-socket-{way}"}
        mounts = [(t, s or str(vcli.home), ro) for t, s, ro in stored["mounts"]]
        if way == "sdk":
            container_id = create_container(
                client, stored["image"], stored["command"], mounts, options).id
        else:
            socket = EngineSocket.from_env()
            assert socket is not None
            body = create_body(stored["image"], stored["command"], mounts, options)
            assert body is not None
            container_id = socket.create(options["name"], body)
        try:
            attrs = client.api.inspect_container(container_id)
        finally:
            client.api.remove_container(container_id, force=True)
        inspected[way] = {"Config": {k: v for k, v in attrs["Config"].items()
                                     if k != "Hostname"},
                          "HostConfig": attrs["HostConfig"],
                          # the engine lists them from a map: in no fixed order
                          "Mounts": sorted(attrs["Mounts"], key=lambda m: m["Destination"])}
    assert inspected["socket"] == inspected["sdk"]

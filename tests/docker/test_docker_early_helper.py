"""The Docker helper of `evalrun run` against the real engine (runner.adapters.docker_early).

Every `evalrun run` of this tier goes through it; these pin what a run does not show: the
runner has not loaded the Docker SDK when the container is created, and a container the
helper created but was never asked to start is removed by it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import docker
import pytest

pytestmark = pytest.mark.docker

ROOT = Path(__file__).resolve().parents[2]


def _fresh(code: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
        cwd=ROOT, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})},
    )


def test_a_container_created_but_never_started_is_removed_by_the_helper(host, locked_example):
    ref = json.loads((locked_example / "eval.lock.json").read_text())["image"]["ref"]
    name = f"evalrun-early-test-{os.getpid()}"
    proc = _fresh(
        f"""
        import docker
        from runner.adapters.docker_early import EarlyEngine
        engine = EarlyEngine.fork()
        assert "runsc" in engine.ask("runtimes")
        assert engine.ask("image", {ref!r}).startswith("sha256:")
        cid = engine.ask("create", {ref!r}, ["true"], [], {{"name": {name!r}}})
        print(cid)
        engine.close()  # the runner stopped before asking for the start
        """
    )
    assert proc.returncode == 0, proc.stderr
    client = docker.from_env()
    assert client.containers.list(all=True, filters={"name": name}) == []


def test_the_runner_has_not_loaded_the_docker_sdk_when_its_container_is_created(vcli, variant):
    # the run's own helper creates it; the runner imports the SDK once the sandbox is up
    proc = _fresh(
        f"""
        import sys, json
        from runner.adapters import docker_early
        seen = []
        ask = docker_early.EarlyEngine.ask
        def asked(self, *request):
            seen.append((request[0], "docker" in sys.modules))
            return ask(self, *request)
        docker_early.EarlyEngine.ask = asked
        import atexit
        atexit.register(lambda: print("SEEN", json.dumps(seen), file=sys.stderr))
        from runner.cli.main import main
        sys.exit(main(["run", {str(variant())!r}, "--rerun", "--json"]))
        """,
        env=vcli.env,
    )
    assert proc.returncode == 0, proc.stderr
    seen = json.loads(proc.stderr.split("SEEN ", 1)[1].splitlines()[0])
    assert [what for what, _ in seen] == ["has_runtime", "image", "create", "start"]
    assert not any(loaded for _, loaded in seen[:3]), seen

"""The Docker sandbox policy is a pure function; the backend sends exactly what it builds.

Every option the engine is asked to enforce is pinned here. The docker tier checks
the same options on a real engine (HostConfig of a real container under runsc).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import docker.errors
import docker.types
import pytest
import requests.exceptions

from runner.adapters.docker_engine import translated
from runner.backends.docker import DockerBackend
from runner.backends.live import OutputLine
from runner.backends.docker_policy import (
    RUNTIME_NAMES,
    BindMount,
    container_name,
    container_policy,
)
from runner.errors import (
    DockerAPIError,
    DockerImageNotFound,
    InfrastructureError,
    InputError,
    TransientDockerError,
    TransientInfrastructureError,
)
from runner.model.plan import PlanInput, RunPlan

pytestmark = pytest.mark.unit

IMAGE = "127.0.0.1:5000/evalrun/digits@sha256:" + "a" * 64


def _plan(**changes: Any) -> RunPlan:
    data: dict[str, Any] = {
        "run_id": "digits-0123456789ab-a0",
        "attempt": 0,
        "image_ref": IMAGE,
        "expected_rootfs_digest": "sha256:" + "b" * 64,
        "runtime": "gvisor",
        "command": ["python", "-m", "evaluate"],
        "params": {},
        "seed": 7,
        "metrics": [],
        "expect": {},
        "inputs": [
            PlanInput(
                role="model", name="model", host_path=Path("/in/weights.json"), sha256="c" * 64
            ),
            PlanInput(
                role="dataset", name="digits-test", host_path=Path("/in/d.jsonl"), sha256="d" * 64
            ),
        ],
        "timeout_s": 600,
        "cpus": 1.5,
        "memory_mib": 2048,
        "pids": 256,
        "spec_digest": "sha256:" + "e" * 64,
        "lock_digest": "sha256:" + "f" * 64,
        "spec_name": "digits",
    }
    data.update(changes)
    return RunPlan(**data)


def _policy(**changes: Any) -> Any:
    return container_policy(
        _plan(**changes), plan_dir=Path("/tmp/plan-x"), results_dir=Path("/tmp/results-x")
    )


def test_policy_pins_every_engine_option() -> None:
    policy = _policy()
    assert policy.image == IMAGE
    assert policy.command == (
        "run",
        "--plan",
        "/evalrun/plan/plan.json",
        "--results",
        "/evalrun/results",
    )
    assert policy.engine_options() == {
        "name": "evalrun-digits-0123456789ab-a0",
        "runtime": "runsc",
        "network_mode": "none",
        "read_only": True,
        "tmpfs": {"/tmp": "rw,nosuid,nodev,size=256m"},
        "user": "65532:65532",
        "cap_drop": ["ALL"],
        "security_opt": ["no-new-privileges"],
        "pids_limit": 256,
        "mem_limit": "2048m",
        "memswap_limit": "2048m",
        "nano_cpus": 1_500_000_000,
        "labels": {
            "org.evalrun.run-id": "digits-0123456789ab-a0",
            "org.evalrun.spec": "digits",
            "org.evalrun.lock-digest": "sha256:" + "f" * 64,
        },
    }


def test_policy_mounts_plan_and_inputs_read_only_and_only_results_writable() -> None:
    assert _policy().mounts == (
        BindMount(target="/evalrun/plan", source="/tmp/plan-x", read_only=True),
        BindMount(target="/evalrun/results", source="/tmp/results-x", read_only=False),
        BindMount(
            target="/evalrun/inputs/model/weights.json", source="/in/weights.json", read_only=True
        ),
        BindMount(
            target="/evalrun/inputs/data/digits-test/d.jsonl",
            source="/in/d.jsonl",
            read_only=True,
        ),
    )
    writable = [m.target for m in _policy().mounts if not m.read_only]
    assert writable == ["/evalrun/results"]


@pytest.mark.parametrize(("runtime", "engine_runtime"), [("gvisor", "runsc"), ("runc", "runc")])
def test_policy_runs_under_the_runtime_the_spec_names(runtime: str, engine_runtime: str) -> None:
    assert _policy(runtime=runtime).runtime == engine_runtime
    assert RUNTIME_NAMES[runtime] == engine_runtime


def test_policy_limits_follow_the_plan_and_swap_adds_nothing() -> None:
    options = _policy(pids=64, memory_mib=512, cpus=0.25).engine_options()
    assert options["pids_limit"] == 64
    assert options["mem_limit"] == options["memswap_limit"] == "512m"
    assert options["nano_cpus"] == 250_000_000


def test_policy_is_pure_and_frozen() -> None:
    assert _policy() == _policy()
    with pytest.raises(ValueError, match="frozen"):
        _policy().user = "0:0"  # type: ignore[misc]
    assert container_name("r1") == "evalrun-r1"


# --------------------------------------------------------------------------- the sender


class _Container:
    def __init__(self) -> None:
        self.attrs = {
            "Id": "c1",
            "Image": "sha256:img",
            "HostConfig": {"Runtime": "runsc", "NetworkMode": "none"},
            "Config": {"User": "65532:65532"},
            "State": {"OOMKilled": False},
        }
        self.id = "c1"
        self.status = "exited"
        self.removed = False

    def start(self) -> None:
        pass

    def wait(self, timeout: float) -> dict[str, int]:
        return {"StatusCode": 0}

    def reload(self) -> None:
        pass

    def logs(self, **kwargs: Any) -> bytes:
        return b"agent done\n"

    def remove(self, force: bool) -> None:
        self.removed = True


class _Client:
    def __init__(self) -> None:
        self.created: list[tuple[tuple[Any, ...], dict[str, Any]]] = []
        self.container = _Container()
        client = self

        class Containers:
            def get(self, name: str) -> Any:
                raise docker.errors.NotFound(f"No such container: {name}")

            def create(self, *args: Any, **kwargs: Any) -> Any:
                client.created.append((args, kwargs))
                return client.container

        class Images:
            def get(self, ref: str) -> Any:
                return type("Image", (), {"id": "sha256:img"})()

        class Api:
            def attach(self, container: str, **kwargs: Any) -> Any:
                client.attached.append((container, kwargs))
                # demuxed chunks, as the engine sends them: lines split across chunks
                yield b"loading model\nstep 1", None
                yield None, b"warning: slow\n"
                yield b"/2\nno newline at the end", None

        self.attached: list[tuple[str, dict[str, Any]]] = []
        self.containers = Containers()
        self.images = Images()
        self.api = Api()


def test_backend_sends_exactly_the_policy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("os.chown", lambda *a: None)  # the unit tier may not run as root
    plan = _plan()
    client = _Client()
    result = DockerBackend(client).run(plan, tmp_path / "results")
    assert result.exit_code == 0 and result.image_digest_confirmed
    assert client.container.removed
    ((args, kwargs),) = client.created
    plan_dir = kwargs["mounts"][0]["Source"]
    expected = container_policy(plan, plan_dir=Path(plan_dir), results_dir=tmp_path / "results")
    assert args == (expected.image, list(expected.command))
    assert kwargs.pop("detach") is True
    mounts = kwargs.pop("mounts")
    assert mounts == [
        docker.types.Mount(m.target, m.source, type="bind", read_only=m.read_only)
        for m in expected.mounts
    ]
    assert kwargs == expected.engine_options()


def test_backend_relays_the_container_output_live(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr("os.chown", lambda *a: None)
    lines: list[OutputLine] = []
    client = _Client()
    with caplog.at_level("INFO", logger="evalrun.output"):
        DockerBackend(client, output=lines.append).run(_plan(), tmp_path / "results")
    assert [(x.stream, x.text) for x in lines] == [
        ("stdout", "loading model"),
        ("stderr", "warning: slow"),
        ("stdout", "step 1/2"),
        ("stdout", "no newline at the end"),
    ]
    assert {x.run_id for x in lines} == {_plan().run_id}
    ((container, kwargs),) = client.attached
    assert container == "c1" and kwargs["demux"] and kwargs["logs"] and kwargs["stream"]
    events = [r for r in caplog.records if getattr(r, "event", None) == "evaluation_output"]
    assert [(r.stream, r.line) for r in events] == [(x.stream, x.text) for x in lines]
    assert all(r.run_id == _plan().run_id for r in events)


# --------------------------------------------------------------------------- engine errors


@pytest.mark.parametrize(
    ("raised", "cls", "exit_code", "transient"),
    [
        (docker.errors.ImageNotFound("no such image"), DockerImageNotFound, 2, False),
        (docker.errors.NotFound("no such container"), DockerAPIError, 5, False),
        (docker.errors.APIError("conflict"), TransientDockerError, 5, True),
        (docker.errors.DockerException("socket missing"), TransientDockerError, 5, True),
        (requests.exceptions.ConnectionError("refused"), TransientDockerError, 5, True),
        (requests.exceptions.ReadTimeout("slow"), TransientDockerError, 5, True),
    ],
)
def test_engine_errors_are_translated_by_type_with_the_cause(
    raised: Exception, cls: type, exit_code: int, transient: bool
) -> None:
    with pytest.raises(cls) as caught, translated("create container"):
        raise raised
    err = caught.value
    assert type(err) is cls and err.exit_code == exit_code
    assert isinstance(err, TransientInfrastructureError) is transient
    assert err.message.startswith("create container: ")
    assert err.operation == "create container"
    assert err.__cause__ is raised


def test_engine_status_decides_transient_or_refused() -> None:
    class Response:
        def __init__(self, status: int) -> None:
            self.status_code = status
            self.reason = "x"
            self.url = "http+docker://localhost/containers/create"

    with pytest.raises(TransientDockerError) as caught, translated("create container"):
        raise docker.errors.APIError("engine broke", response=Response(500))  # type: ignore[arg-type]
    assert caught.value.status == 500
    with pytest.raises(DockerAPIError) as refused, translated("create container"):
        raise docker.errors.APIError("conflict", response=Response(409))  # type: ignore[arg-type]
    assert refused.value.status == 409 and isinstance(refused.value, InfrastructureError)
    assert not isinstance(refused.value, TransientInfrastructureError)
    assert "  status: 409" in refused.value.diagnostics()
    assert isinstance(DockerImageNotFound("x", operation="y"), InputError)

"""The embedded default backend: one sandboxed container on the local Docker engine.

Policy, by construction (built by the pure ``docker_policy.container_policy``;
this module only sends it): the image only by ``repo@sha256``, gVisor (``runsc``)
unless the spec asks for runc, no network, read-only rootfs, tmpfs ``/tmp``,
non-root, no capabilities, no-new-privileges, pids/memory/CPU limits, inputs
read-only and one writable results mount; plus a wall-clock limit. The container's
output is relayed line by line while it runs (runner.backends.live). If gVisor is
demanded and missing, the run is refused (exit 4): never a silent downgrade.
Engine errors are translated by ``runner.adapters.docker_engine`` (the SDK's) and
``runner.adapters.engine_socket``, with the same texts.

On a local engine the whole run goes over the engine's socket with the standard library
(``runner.adapters.engine_socket``); the Docker SDK (its ~70 ms of imports, and its work on
every call, CPU the sandbox needs too on a small machine) only when a client is given or
``DOCKER_HOST`` is not a unix socket, and for pulls. The run itself is the same either way
(``_Container``).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import logging
import os
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

from runner._internal.foreign import DockerObject
from runner.adapters.engine_socket import EngineSocket
from runner.backends.docker_policy import RUNTIME_NAMES, ContainerPolicy, container_policy
from runner.backends.live import LineRelay, OutputSink
from runner.errors import EnvironmentMismatch, EvalrunError
from runner.model.backend_details import InputMount
from runner.model.plan import INPUTS_MOUNT, SANDBOX_UID, BackendResult, RunPlan

log = logging.getLogger("evalrun.backend.docker")

# Extra wall-clock allowance on top of the evaluation timeout, for the agent's preflight.
PREFLIGHT_ALLOWANCE_S = 120


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds")


def _create(client: Any, policy: ContainerPolicy) -> Any:
    """Send ``policy`` to the engine as-is with the SDK: create (not start) the run's
    container."""
    import docker.types

    mounts = [
        docker.types.Mount(m.target, m.source, type="bind", read_only=m.read_only)
        for m in policy.mounts
    ]
    return client.containers.create(
        policy.image, list(policy.command), mounts=mounts, detach=True, **policy.engine_options()
    )


class _Container(Protocol):
    """The run's container, as the backend follows it: over the engine's socket, or with the
    Docker SDK (a client was given, or the engine is not local). Errors come translated."""

    id: str

    def start(self) -> None: ...
    def output(self) -> Iterator[tuple[str, bytes]]: ...
    def wait(self, timeout: float) -> int: ...
    def inspect(self) -> DockerObject: ...
    def kill(self) -> None: ...
    def logs(self, tail: int) -> str: ...
    def remove(self) -> None: ...


_STREAMS = {1: "stdout", 2: "stderr"}


class _SocketContainer:
    """The container over the engine's socket (runner.adapters.engine_socket)."""

    def __init__(self, engine: EngineSocket, container_id: str) -> None:
        self.engine = engine
        self.id = container_id

    def start(self) -> None:
        self.engine.start(self.id)

    def output(self) -> Iterator[tuple[str, bytes]]:
        for stream, chunk in self.engine.attach(self.id):
            if stream in _STREAMS:
                yield _STREAMS[stream], chunk

    def wait(self, timeout: float) -> int:
        return self.engine.wait(self.id, timeout)

    def inspect(self) -> DockerObject:
        return self.engine.inspect(self.id)

    def kill(self) -> None:
        self.engine.kill(self.id)

    def logs(self, tail: int) -> str:
        return self.engine.logs(self.id, tail)

    def remove(self) -> None:
        self.engine.remove(self.id)


class _SdkContainer:
    """The container through the Docker SDK's model of it."""

    def __init__(self, client: Any, model: Any) -> None:
        from runner.adapters.docker_engine import docker_call, translated

        self._call, self._translated = docker_call, translated
        self.client = client
        self.model = model
        self.id = str(model.id)

    def start(self) -> None:
        self._call("start container", self.model.start, retries=False)

    def output(self) -> Iterator[tuple[str, bytes]]:
        with self._translated("follow container output"):
            for out, err in self.client.api.attach(
                self.id, stdout=True, stderr=True, stream=True, logs=True, demux=True
            ):
                if out:
                    yield "stdout", out
                if err:
                    yield "stderr", err

    def wait(self, timeout: float) -> int:
        with self._translated("wait for container"):
            status = self.model.wait(timeout=timeout)
        return int(status.get("StatusCode", -1))

    def inspect(self) -> DockerObject:
        with self._translated("inspect container"):
            self.model.reload()
            attrs: DockerObject = self.model.attrs
        return attrs

    def kill(self) -> None:
        with self._translated("kill container"):
            self.model.kill()

    def logs(self, tail: int) -> str:
        with self._translated("container logs"):
            data: bytes = self.model.logs(stdout=True, stderr=True, tail=tail)
        return data.decode("utf-8", "replace")

    def remove(self) -> None:
        with self._translated("remove container"):
            self.model.remove(force=True)


class DockerBackend:
    """Runs a :class:`RunPlan` as one sandboxed container."""

    name = "docker"
    pulls_inputs = False

    def __init__(self, client: Any | None = None, *, output: OutputSink | None = None) -> None:
        self._client = client
        self.output = output
        # the engine's socket; None: the SDK does everything (a client was given, or
        # DOCKER_HOST names no unix socket)
        self._engine = EngineSocket.from_environment() if client is None else None
        # image ref -> the engine's image ID, as preflight found it (the ref is pinned by
        # digest, so the run's container is compared with it without asking again)
        self._image_ids: dict[str, str] = {}

    @property
    def client(self) -> Any:
        """The Docker SDK's client (connected, loaded on first use)."""
        if self._client is None:
            from runner.adapters.docker_engine import connect

            self._client = connect()
        return self._client

    def preflight(self, plan: RunPlan) -> None:
        runtime = RUNTIME_NAMES[plan.runtime]
        if self._engine is not None:
            available = self._engine.runtimes()
        else:
            from runner.adapters.docker_engine import runtimes

            available = runtimes(self.client)
        if runtime not in available:
            raise EnvironmentMismatch(
                f"the spec demands the {plan.runtime} sandbox, but the Docker engine has no "
                f"{runtime!r} runtime",
                expected=runtime,
                found=sorted(available),
                hint="install runsc and register it in /etc/docker/daemon.json "
                "(make host-up does both); evalrun never falls back to a weaker sandbox",
            )
        if plan.gpus:
            raise EnvironmentMismatch(
                "GPU runs are not supported on the local Docker backend",
                hint="use --backend kubernetes for GPU Jobs",
            )
        self._ensure_image(plan.image_ref)

    def _image_id(self, ref: str) -> str:
        if self._engine is not None:
            return self._engine.image_id(ref)
        from runner.adapters.docker_engine import translated

        with translated(f"inspect {ref}"):
            return str(self.client.images.get(ref).id)

    def _ensure_image(self, ref: str) -> None:
        try:
            self._image_ids[ref] = self._image_id(ref)
            return
        except EvalrunError:
            pass
        from runner.adapters.docker_engine import docker_call

        repo, digest = ref.split("@", 1)
        log.info("pulling image", extra={"event": "image_pull", "image": ref})
        docker_call(f"pull {ref}", lambda: self.client.api.pull(repo, tag=digest))

    def run(
        self, plan: RunPlan, results_dir: Path, *, on_start: Callable[[], None] | None = None
    ) -> BackendResult:
        results_dir.mkdir(parents=True, exist_ok=True)
        os.chown(results_dir, SANDBOX_UID, SANDBOX_UID)
        results_dir.chmod(0o700)
        with tempfile.TemporaryDirectory(prefix="evalrun-plan-") as plan_dir:
            plan_path = plan.write_agent_plan(Path(plan_dir))
            plan_path.chmod(0o444)
            Path(plan_dir).chmod(0o755)
            policy = container_policy(plan, plan_dir=Path(plan_dir), results_dir=results_dir)
            container = self._create(policy)
            collected = False
            try:
                result = self._run_container(container, plan, on_start)
                # what the agent was handed: it reports the sha256 of what it read
                result.details["plan_sha256"] = hashlib.sha256(plan_path.read_bytes()).hexdigest()
                collected = True
                return result
            finally:
                if collected:
                    # All the run needs from the container is read: the engine removes it
                    # while the run is sealed (~25 ms less per run). Not a daemon thread, so
                    # the program waits for it before it exits.
                    threading.Thread(
                        target=_remove,
                        args=(container,),
                        name="evalrun-container-removal",
                    ).start()
                else:
                    _remove(container)

    def _create(self, policy: ContainerPolicy) -> _Container:
        """The run's container, created (not started); a stale one of its name removed."""
        engine = self._engine
        if engine is not None:
            with contextlib.suppress(EvalrunError):
                engine.remove(policy.name, "remove stale container")
            return _SocketContainer(engine, engine.create(policy.name, policy.engine_body()))
        from runner.adapters.docker_engine import docker_call, translated

        client = self.client
        with contextlib.suppress(EvalrunError), translated("remove stale container"):
            client.containers.get(policy.name).remove(force=True)
        return _SdkContainer(
            client, docker_call("create container", lambda: _create(client, policy))
        )

    def _follow_output(
        self, container: _Container, relay: LineRelay, whole: threading.Event
    ) -> None:
        """Relay the container's stdout and stderr, line by line, while it runs; ``whole``
        is set once the stream has ended (the container's output was all relayed)."""
        try:
            for stream, chunk in container.output():
                relay.feed(stream, chunk)
            whole.set()
        except EvalrunError as exc:
            log.warning(
                "live output unavailable",
                extra={"event": "output_follow_failed", "error": exc.message},
            )

    def _run_container(
        self, container: _Container, plan: RunPlan, on_start: Callable[[], None] | None
    ) -> BackendResult:
        started = _now()
        t0 = time.monotonic()
        timed_out = interrupted = False
        interrupted_by: str | None = None
        exit_code: int | None = None
        relay = LineRelay(plan.run_id, self.output)
        relayed_whole = threading.Event()
        follower = threading.Thread(
            target=self._follow_output, args=(container, relay, relayed_whole), daemon=True
        )
        try:
            container.start()
            follower.start()
            if on_start is not None:  # while the sandbox runs; an error removes it (run())
                on_start()
            deadline = plan.timeout_s + PREFLIGHT_ALLOWANCE_S
            try:
                exit_code = container.wait(timeout=deadline)
            except EvalrunError:
                # a read timeout surfaces as unreachable; check what really happened.
                state = container.inspect().get("State") or {}
                if state.get("Status") == "running":
                    timed_out = True
                    container.kill()
                else:
                    raise
        except KeyboardInterrupt as stop:
            interrupted = True
            interrupted_by = getattr(stop, "signal_name", "SIGINT")
            # best effort; remove(force=True) follows in run()
            with contextlib.suppress(Exception):
                container.kill()
        duration = time.monotonic() - t0
        if follower.ident is not None:
            follower.join(5.0)
        relay.close()
        attrs = container.inspect()
        image_id = self._image_ids.get(plan.image_ref) or self._image_id(plan.image_ref)
        if relayed_whole.is_set():  # its last lines are in the relay: no second read
            logs = "".join(line + "\n" for line in relay.tail)
        else:
            logs = container.logs(tail=200)
        host_config = attrs.get("HostConfig", {})
        return BackendResult(
            backend=self.name,
            exit_code=None if (timed_out or interrupted) else exit_code,
            timed_out=timed_out,
            interrupted=interrupted,
            image_digest_confirmed=attrs.get("Image") == image_id,
            runtime=host_config.get("Runtime", "?"),
            # as the engine reports the container, not as the spec asked
            network=str(host_config.get("NetworkMode")) if host_config.get("NetworkMode") else None,
            started_at=started,
            finished_at=_now(),
            duration_s=round(duration, 3),
            container_log=logs,
            details={
                "container_id": attrs.get("Id"),
                "image_id": attrs.get("Image"),
                "network_mode": host_config.get("NetworkMode"),
                "read_only_rootfs": host_config.get("ReadonlyRootfs"),
                "cap_drop": host_config.get("CapDrop"),
                "security_opt": host_config.get("SecurityOpt"),
                "user": attrs.get("Config", {}).get("User"),
                "oom_killed": attrs.get("State", {}).get("OOMKilled"),
                "input_mounts": _input_mounts(attrs),
                # run() removes the container whatever happened; the bundle says so
                **(
                    {"interrupted_by": interrupted_by, "removed_container": attrs.get("Name")}
                    if interrupted_by
                    else {}
                ),
            },
        )


def _remove(container: _Container) -> None:
    """Remove the container (stopped or not); a failure is logged, never raised."""
    try:
        container.remove()
    except EvalrunError as exc:
        log.warning(
            "could not remove container",
            extra={"event": "container_remove_failed", "error": str(exc)},
        )


def _input_mounts(attrs: DockerObject) -> list[InputMount]:
    """The inputs as the engine mounted them (target, cached source, read-only): evidence."""
    return [
        {"target": m.get("Destination"), "source": m.get("Source"), "read_only": not m.get("RW")}
        for m in attrs.get("Mounts") or []
        if str(m.get("Destination", "")).startswith(INPUTS_MOUNT + "/")
    ]

"""The embedded default backend: one sandboxed container on the local Docker engine.

Policy, by construction (built by the pure ``docker_policy.container_policy``;
this module only sends it): the image only by ``repo@sha256``, gVisor (``runsc``)
unless the spec asks for runc, no network, read-only rootfs, tmpfs ``/tmp``,
non-root, no capabilities, no-new-privileges, pids/memory/CPU limits, inputs
read-only and one writable results mount; plus a wall-clock limit. The container's
output is relayed line by line while it runs (runner.backends.live). If gVisor is
demanded and missing, the run is refused (exit 4): never a silent downgrade.
Engine errors are translated by ``runner.adapters.docker_engine``.

On a local engine what precedes the start (runtimes, the image's ID, a stale container
removed, create, start) goes over the engine's socket with the standard library
(``runner.adapters.engine_socket``), and the Docker SDK, which follows the container
(attach, wait, inspect, remove), loads while the sandbox boots: its ~70 ms of imports are
then off the path every run waits on.
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
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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


@dataclass
class _Sandbox:
    """The run's container: its ID, and the SDK's model of it once the SDK follows it."""

    id: str
    model: Any | None = None


class _Loading:
    """``load()`` on a thread, begun at once; :meth:`result` waits for what it returned."""

    def __init__(self, load: Callable[[], Any]) -> None:
        self._load = load
        self._value: Any = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="evalrun-docker-sdk", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self._value = self._load()
        except BaseException as exc:  # handed to the caller by result()
            self._error = exc

    def wait(self) -> None:
        self._thread.join()

    def result(self) -> Any:
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._value


class DockerBackend:
    """Runs a :class:`RunPlan` as one sandboxed container."""

    name = "docker"
    pulls_inputs = False

    def __init__(self, client: Any | None = None, *, output: OutputSink | None = None) -> None:
        self._client = client
        self.output = output
        # the engine's socket for what precedes the start; None: the SDK does everything
        # (a client was given, or DOCKER_HOST names no unix socket)
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

    def _ensure_image(self, ref: str) -> None:
        from_engine = self._engine
        try:
            if from_engine is not None:
                self._image_ids[ref] = from_engine.image_id(ref)
                return
            from runner.adapters.docker_engine import translated

            with translated(f"inspect {ref}"):
                self._image_ids[ref] = self.client.images.get(ref).id
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
            sandbox = self._create(policy)
            collected = False
            try:
                result = self._run_container(sandbox, plan, on_start)
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
                        target=self._remove,
                        args=(sandbox,),
                        name="evalrun-container-removal",
                    ).start()
                else:
                    self._remove(sandbox)

    def _create(self, policy: ContainerPolicy) -> _Sandbox:
        """The run's container, created (not started); a stale one of its name removed."""
        engine = self._engine
        if engine is None:
            from runner.adapters.docker_engine import docker_call, translated

            client = self.client
            with contextlib.suppress(EvalrunError), translated("remove stale container"):
                client.containers.get(policy.name).remove(force=True)
            container = docker_call("create container", lambda: _create(client, policy))
            return _Sandbox(container.id, container)
        with contextlib.suppress(EvalrunError):
            engine.remove(policy.name, "remove stale container")
        return _Sandbox(engine.create(policy.name, policy.engine_body()))

    def _start(self, sandbox: _Sandbox) -> Any:
        """Start the container; the SDK's model of it follows it from then on. Over the
        engine's socket the SDK loads meanwhile, on a thread (the start blocks while the
        sandbox boots, and nothing else is imported then)."""
        engine = self._engine
        if engine is None:
            from runner.adapters.docker_engine import docker_call

            model: Any = sandbox.model
            docker_call("start container", model.start, retries=False)
            return model
        loader = _Loading(lambda: self.client) if self._client is None else None
        try:
            engine.start(sandbox.id)
        except BaseException:
            if loader is not None:
                loader.wait()  # not left importing behind the error
            raise
        client = loader.result() if loader is not None else self.client
        sandbox.model = client.containers.prepare_model({"Id": sandbox.id})
        return sandbox.model

    def _kill(self, sandbox: _Sandbox) -> None:
        if sandbox.model is not None:
            sandbox.model.kill()
        elif self._engine is not None:
            self._engine.kill(sandbox.id)

    def _remove(self, sandbox: _Sandbox) -> None:
        """Remove the container (stopped or not); a failure is logged, never raised."""
        if sandbox.model is not None:
            from runner.adapters.docker_engine import remove_container

            remove_container(sandbox.model, log)
            return
        assert self._engine is not None
        try:
            self._engine.remove(sandbox.id)
        except EvalrunError as exc:
            log.warning(
                "could not remove container",
                extra={"event": "container_remove_failed", "error": str(exc)},
            )

    def _follow_output(self, container: Any, relay: LineRelay, whole: threading.Event) -> None:
        """Relay the container's stdout and stderr, line by line, while it runs; ``whole``
        is set once the stream has ended (the container's output was all relayed)."""
        from runner.adapters.docker_engine import translated

        try:
            with translated("follow container output"):
                for out, err in self.client.api.attach(
                    container.id, stdout=True, stderr=True, stream=True, logs=True, demux=True
                ):
                    if out:
                        relay.feed("stdout", out)
                    if err:
                        relay.feed("stderr", err)
            whole.set()
        except EvalrunError as exc:
            log.warning(
                "live output unavailable",
                extra={"event": "output_follow_failed", "error": exc.message},
            )

    def _run_container(
        self, sandbox: _Sandbox, plan: RunPlan, on_start: Callable[[], None] | None
    ) -> BackendResult:
        from runner.adapters.docker_engine import translated

        started = _now()
        t0 = time.monotonic()
        timed_out = interrupted = False
        interrupted_by: str | None = None
        exit_code: int | None = None
        relay = LineRelay(plan.run_id, self.output)
        relayed_whole = threading.Event()
        follower: threading.Thread | None = None
        try:
            container: Any = self._start(sandbox)
            follower = threading.Thread(
                target=self._follow_output, args=(container, relay, relayed_whole), daemon=True
            )
            follower.start()
            if on_start is not None:  # while the sandbox runs; an error removes it (run())
                on_start()
            deadline = plan.timeout_s + PREFLIGHT_ALLOWANCE_S
            try:
                with translated("wait for container"):
                    status = container.wait(timeout=deadline)
                exit_code = int(status.get("StatusCode", -1))
            except EvalrunError:
                # requests' read timeout surfaces as unreachable; check what really happened.
                with translated("inspect container"):
                    container.reload()
                if container.status == "running":
                    timed_out = True
                    with translated("kill container"):
                        container.kill()
                else:
                    raise
        except KeyboardInterrupt as stop:
            interrupted = True
            interrupted_by = getattr(stop, "signal_name", "SIGINT")
            # best effort; remove(force=True) follows in run()
            with contextlib.suppress(Exception):
                self._kill(sandbox)
        duration = time.monotonic() - t0
        container = sandbox.model
        if container is None:  # interrupted while it started: nothing to follow or inspect
            relay.close()
            return BackendResult(
                backend=self.name,
                exit_code=None,
                interrupted=True,
                image_digest_confirmed=False,
                runtime="?",
                started_at=started,
                finished_at=_now(),
                duration_s=round(duration, 3),
                details={"interrupted_by": interrupted_by, "container_id": sandbox.id},
            )
        if follower is not None and follower.ident is not None:
            follower.join(5.0)
        relay.close()
        with translated("inspect container"):
            container.reload()
            attrs = container.attrs
            image_id = (
                self._image_ids.get(plan.image_ref) or self.client.images.get(plan.image_ref).id
            )
            if relayed_whole.is_set():  # its last lines are in the relay: no second read
                logs = "".join(line + "\n" for line in relay.tail)
            else:
                logs = container.logs(stdout=True, stderr=True, tail=200).decode("utf-8", "replace")
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


def _input_mounts(attrs: DockerObject) -> list[InputMount]:
    """The inputs as the engine mounted them (target, cached source, read-only): evidence."""
    return [
        {"target": m.get("Destination"), "source": m.get("Source"), "read_only": not m.get("RW")}
        for m in attrs.get("Mounts") or []
        if str(m.get("Destination", "")).startswith(INPUTS_MOUNT + "/")
    ]

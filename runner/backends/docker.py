"""The embedded default backend: one sandboxed container on the local Docker engine.

Policy, by construction (built by the pure ``docker_policy.container_policy``;
this module only sends it): the image only by ``repo@sha256``, gVisor (``runsc``)
unless the spec asks for runc, no network, read-only rootfs, tmpfs ``/tmp``,
non-root, no capabilities, no-new-privileges, pids/memory/CPU limits, inputs
read-only and one writable results mount; plus a wall-clock limit. The container's
output is relayed line by line while it runs (runner.backends.live). If gVisor is
demanded and missing, the run is refused (exit 4): never a silent downgrade.
Engine errors are translated by ``runner.adapters.docker_engine``.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from runner._internal.foreign import DockerObject
from runner.adapters.docker_ahead import Request
from runner.backends.docker_policy import RUNTIME_NAMES, container_policy
from runner.backends.live import LineRelay, OutputSink
from runner.errors import EnvironmentMismatch, EvalrunError
from runner.model.backend_details import InputMount
from runner.model.plan import INPUTS_MOUNT, SANDBOX_UID, BackendResult, RunPlan

if TYPE_CHECKING:
    from runner.adapters.docker_early import EarlyEngine, Made

# The Docker SDK (and requests with it, ~70 ms) is imported by the first method that talks
# to the engine, not with this module: with an EarlyEngine that is once the helper has
# started the run's container, while the agent boots in it (not before the start: the
# import would delay it).

log = logging.getLogger("evalrun.backend.docker")

# Extra wall-clock allowance on top of the evaluation timeout, for the agent's preflight.
PREFLIGHT_ALLOWANCE_S = 120


def _translated(what: str) -> contextlib.AbstractContextManager[None]:
    """:func:`runner.adapters.docker_engine.translated`, imported (with the SDK) when a run
    first needs it: after its container has started."""
    from runner.adapters.docker_engine import translated

    return translated(what)


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds")


class DockerBackend:
    """Runs a :class:`RunPlan` as one sandboxed container."""

    name = "docker"
    pulls_inputs = False

    def __init__(
        self,
        client: Any | None = None,
        *,
        output: OutputSink | None = None,
        early: EarlyEngine | None = None,
    ) -> None:
        self._client = client
        self.output = output
        # the helper that connected while the spec was read: it answers the preflight and
        # creates and starts the first container (runner.adapters.docker_early); a run set
        # runs its members on threads: one of them takes it, under the lock
        self._early = early
        self._early_lock = threading.Lock()
        # image ref -> the engine's image ID, as preflight found it (the ref is pinned by
        # digest, so the run's container is compared with it without asking again)
        self._image_ids: dict[str, str] = {}

    @property
    def client(self) -> Any:
        if self._client is None:
            from runner.adapters.docker_engine import connect

            self._client = connect()
        return self._client

    def preflight(self, plan: RunPlan) -> None:
        runtime = RUNTIME_NAMES[plan.runtime]
        found: str | None = None
        with self._early_lock:
            early = self._early
            if early is not None:
                if early.ask("has_runtime", runtime):
                    available = {runtime}
                    if not plan.gpus:  # the order of the checks below
                        found = early.ask("image", plan.image_ref)
                else:  # the whole list, for the error
                    available = set(early.ask("runtimes"))
        if early is None:
            from runner.adapters.docker_engine import image_id, runtimes

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
        if early is None:
            found = image_id(self.client, plan.image_ref)
        if found is not None:
            self._image_ids[plan.image_ref] = found

    def run(
        self, plan: RunPlan, results_dir: Path, *, on_start: Callable[[], None] | None = None
    ) -> BackendResult:
        with self._early_lock:  # the helper makes the first container only
            early, self._early = self._early, None
        results_dir.mkdir(parents=True, exist_ok=True)
        os.chown(results_dir, SANDBOX_UID, SANDBOX_UID)
        results_dir.chmod(0o700)
        with tempfile.TemporaryDirectory(prefix="evalrun-plan-") as plan_dir:
            plan_path = plan.write_agent_plan(Path(plan_dir))
            plan_path.chmod(0o444)
            Path(plan_dir).chmod(0o755)
            policy = container_policy(plan, plan_dir=Path(plan_dir), results_dir=results_dir)
            mounts = [(m.target, m.source, m.read_only) for m in policy.mounts]
            options = dict(policy.engine_options())
            container: Any
            start: Callable[[], Any]
            ahead: Made | None = None
            if early is not None:
                made: Made = early.ask(
                    "create", policy.image, list(policy.command), mounts, options
                )
                early.remember(
                    Request(policy.image, policy.command, tuple(mounts), dict(options)),
                    lock_digest=plan.lock_digest,
                    attempt=plan.attempt,
                    made=made,
                )
                container = _Pending(self, made.container_id)
                if made.ahead == "adopted":  # started ahead, its agent waiting for a plan
                    ahead = made

                def start() -> Any:
                    early.ask("start")
                    # the SDK imported once the sandbox is up: its start takes both cores
                    return _Pending.resolve(container)

            else:
                from runner.adapters.docker_engine import (
                    create_container,
                    docker_call,
                    remove_named,
                )

                client = self.client
                remove_named(client, policy.name)
                container = docker_call(
                    "create container",
                    lambda: create_container(
                        client, policy.image, list(policy.command), mounts, options
                    ),
                )

                def start() -> Any:
                    docker_call("start container", container.start, retries=False)
                    return container

            collected = False
            try:
                if ahead is not None:
                    _hand_over(plan_path, ahead, results_dir)
                container, result = self._run_container(container, start, plan, on_start)
                # what the agent was handed: it reports the sha256 of what it read
                result.details["plan_sha256"] = hashlib.sha256(plan_path.read_bytes()).hexdigest()
                if ahead is not None:
                    result.details["started_ahead"] = True
                collected = True
                return result
            finally:
                from runner.adapters.docker_engine import remove_container

                if ahead is not None:
                    _take_back(ahead, results_dir)

                if collected:
                    # All the run needs from the container is read: the engine removes it
                    # while the run is sealed (~25 ms less per run). Not a daemon thread, so
                    # the program waits for it before it exits.
                    threading.Thread(
                        target=remove_container,
                        args=(container, log),
                        name="evalrun-container-removal",
                    ).start()
                else:
                    remove_container(_Pending.resolve(container), log)
                if early is not None:
                    early.close()

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
        self,
        container: Any,
        start: Callable[[], Any],
        plan: RunPlan,
        on_start: Callable[[], None] | None,
    ) -> tuple[Any, BackendResult]:
        """Start the created ``container`` (``start`` returns it, as this process's SDK
        object), follow it to its end and inspect it; returns it with the result."""
        started = _now()
        t0 = time.monotonic()
        timed_out = interrupted = False
        interrupted_by: str | None = None
        exit_code: int | None = None
        relay = LineRelay(plan.run_id, self.output)
        relayed_whole = threading.Event()
        follower: threading.Thread | None = None
        try:
            container = start()
            follower = threading.Thread(
                target=self._follow_output, args=(container, relay, relayed_whole), daemon=True
            )
            follower.start()
            if on_start is not None:  # while the sandbox runs; an error removes it (run())
                on_start()
            deadline = plan.timeout_s + PREFLIGHT_ALLOWANCE_S
            try:
                with _translated("wait for container"):
                    status = container.wait(timeout=deadline)
                exit_code = int(status.get("StatusCode", -1))
            except EvalrunError:
                # requests' read timeout surfaces as unreachable; check what really happened.
                with _translated("inspect container"):
                    container.reload()
                if container.status == "running":
                    timed_out = True
                    with _translated("kill container"):
                        container.kill()
                else:
                    raise
        except KeyboardInterrupt as stop:
            interrupted = True
            interrupted_by = getattr(stop, "signal_name", "SIGINT")
            # best effort; remove(force=True) follows in run()
            with contextlib.suppress(Exception):
                container = _Pending.resolve(container)
                container.kill()
        container = _Pending.resolve(container)
        duration = time.monotonic() - t0
        if follower is not None:
            follower.join(5.0)
        relay.close()
        with _translated("inspect container"):
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
        return container, BackendResult(
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


class _Pending:
    """A container the early helper created, before this process has an SDK object for it."""

    def __init__(self, backend: DockerBackend, container_id: str) -> None:
        self.backend = backend
        self.container_id = container_id

    @staticmethod
    def resolve(container: Any) -> Any:
        """``container`` as this process's SDK object (connecting if need be)."""
        if isinstance(container, _Pending):
            return container.backend.client.containers.prepare_model({"Id": container.container_id})
        return container


def _hand_over(plan_path: Path, made: Made, results_dir: Path) -> None:
    """Give the sandbox started ahead its plan (whole, by a rename: its agent waits for the
    name), and make ``results_dir`` the folder it writes its results to, for as long as
    it runs (a link: what watches ``results_dir`` meanwhile sees them)."""
    assert made.plan_dir is not None and made.results_dir is not None
    tmp = made.plan_dir / ".plan.json.part"
    tmp.write_bytes(plan_path.read_bytes())
    tmp.chmod(0o444)
    tmp.rename(made.plan_dir / "plan.json")
    results_dir.rmdir()  # made empty above
    results_dir.symlink_to(made.results_dir, target_is_directory=True)


def _take_back(made: Made, results_dir: Path) -> None:
    """The results of a sandbox started ahead moved to ``results_dir`` itself (in place of
    the link), and its plan folder removed."""
    assert made.plan_dir is not None and made.results_dir is not None
    if results_dir.is_symlink():
        results_dir.unlink()
        try:
            made.results_dir.rename(results_dir)
        except OSError:  # another file system (TMPDIR changed between the two processes)
            shutil.move(made.results_dir, results_dir)
    shutil.rmtree(made.plan_dir, ignore_errors=True)
    shutil.rmtree(made.results_dir, ignore_errors=True)


def _input_mounts(attrs: DockerObject) -> list[InputMount]:
    """The inputs as the engine mounted them (target, cached source, read-only): evidence."""
    return [
        {"target": m.get("Destination"), "source": m.get("Source"), "read_only": not m.get("RW")}
        for m in attrs.get("Mounts") or []
        if str(m.get("Destination", "")).startswith(INPUTS_MOUNT + "/")
    ]

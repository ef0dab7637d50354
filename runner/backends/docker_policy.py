"""The Docker sandbox policy as a pure function: one run plan in, the container options out.

What ``backends/docker.py`` asks the engine to enforce, built without a client in
sight (as ``manifests.py`` is for Kubernetes), so every option is pinned by unit
tests: the image only by ``repo@sha256``; gVisor (``runsc``) unless the spec asks
for runc; no network; a read-only root filesystem with a small tmpfs ``/tmp``;
the non-root sandbox user; every capability dropped; no-new-privileges; pids,
memory (no extra swap) and CPU limits; the plan and every input mounted read-only
and one writable results mount. The backend only sends these options.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, NotRequired, TypedDict

from pydantic import BaseModel, ConfigDict

from runner.errors import InputError
from runner.model.plan import PLAN_MOUNT, RESULTS_MOUNT, SANDBOX_UID, RunPlan
from runner.shared.protocol import AGENT_RUN_COMMAND, RUN_ID_LABEL

RUNTIME_NAMES = {"gvisor": "runsc", "runc": "runc"}
"""The Docker runtime that enforces each sandbox the spec may name."""
TMPFS_OPTIONS = "rw,nosuid,nodev,size=256m"
"""``/tmp`` inside the sandbox: writable, in memory, bounded; the rootfs stays read-only."""


class EngineOptions(TypedDict):
    """The sandbox as docker-py's ``containers.create`` keyword arguments."""

    entrypoint: NotRequired[list[str]]
    name: str
    runtime: str
    network_mode: str
    read_only: bool
    tmpfs: dict[str, str]
    user: str
    cap_drop: list[str]
    security_opt: list[str]
    pids_limit: int
    mem_limit: str
    memswap_limit: str
    nano_cpus: int
    labels: dict[str, str]


class BindMount(BaseModel):
    """One host path bound into the container."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    target: str
    source: str
    read_only: bool


class ContainerPolicy(BaseModel):
    """Everything the engine is asked for when the run's container is created."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    image: str
    command: tuple[str, ...]
    # None: the image's own entrypoint (the agent)
    entrypoint: tuple[str, ...] | None = None
    name: str
    runtime: str
    network_mode: Literal["none"]
    read_only_rootfs: bool
    tmpfs: dict[str, str]
    user: str
    cap_drop: tuple[str, ...]
    security_opt: tuple[str, ...]
    pids_limit: int
    memory: str
    memory_and_swap: str
    nano_cpus: int
    mounts: tuple[BindMount, ...]
    labels: dict[str, str]

    def engine_options(self) -> EngineOptions:
        """The keyword arguments of docker-py's ``containers.create`` other than image,
        command and mounts (which the sender turns into its mount objects)."""
        options: EngineOptions = {
            "name": self.name,
            "runtime": self.runtime,
            "network_mode": self.network_mode,
            "read_only": self.read_only_rootfs,
            "tmpfs": dict(self.tmpfs),
            "user": self.user,
            "cap_drop": list(self.cap_drop),
            "security_opt": list(self.security_opt),
            "pids_limit": self.pids_limit,
            "mem_limit": self.memory,
            "memswap_limit": self.memory_and_swap,
            "nano_cpus": self.nano_cpus,
            "labels": dict(self.labels),
        }
        if self.entrypoint is not None:
            options["entrypoint"] = list(self.entrypoint)
        return options


def container_name(run_id: str) -> str:
    """The container's name: one per run id, so a stale one can be found and removed."""
    return f"evalrun-{run_id}"


def container_policy(plan: RunPlan, *, plan_dir: Path, results_dir: Path) -> ContainerPolicy:
    """The sandbox for ``plan``: ``plan_dir`` holds the agent's plan.json (mounted
    read-only), ``results_dir`` receives its results (the only writable mount)."""
    mounts = [
        BindMount(target=PLAN_MOUNT, source=str(plan_dir), read_only=True),
        BindMount(target=RESULTS_MOUNT, source=str(results_dir), read_only=False),
    ]
    for item in plan.inputs:
        if item.host_path is None:
            raise InputError(
                f"{item.role} {item.name!r} is not on this host (only in the registry)",
                hint="the Docker backend mounts inputs from this host's cache, where evalrun "
                "fetches them before a Docker run",
            )
        mounts.append(
            BindMount(target=item.container_path, source=str(item.host_path), read_only=True)
        )
    memory = f"{plan.memory_mib}m"
    return ContainerPolicy(
        image=plan.image_ref,
        command=AGENT_RUN_COMMAND,
        name=container_name(plan.run_id),
        runtime=RUNTIME_NAMES[plan.runtime],
        network_mode="none",
        read_only_rootfs=True,
        tmpfs={"/tmp": TMPFS_OPTIONS},
        user=f"{SANDBOX_UID}:{SANDBOX_UID}",
        cap_drop=("ALL",),
        security_opt=("no-new-privileges",),
        pids_limit=plan.pids,
        memory=memory,
        # Equal to the memory limit: the sandbox gets no swap on top of it.
        memory_and_swap=memory,
        nano_cpus=int(plan.cpus * 1e9),
        mounts=tuple(mounts),
        labels={
            RUN_ID_LABEL: plan.run_id,
            "org.evalrun.spec": plan.spec_name,
            "org.evalrun.lock-digest": plan.lock_digest,
        },
    )

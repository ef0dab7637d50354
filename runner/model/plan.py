"""What every backend receives and returns.

A backend takes a :class:`RunPlan` (everything resolved, digest-pinned), runs
the agent in a sandbox, and fills the plan's results directory. It returns a
:class:`BackendResult` describing how the container ended; it never judges the
evaluation and never touches the signing key or the store.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field

from runner.model.backend_details import BackendDetails
from runner.model.base import AS_JSON_OBJECT, parse_digest_ref
from runner.shared.agent_plan import AgentPlan, AgentPlanInput, encode_agent_plan
from runner.shared.definitions import MetricDefinition, PerturbationDefinition, PlanExpect
from runner.shared.json_types import JSONObject
from runner.shared.protocol import INPUTS_MOUNT as INPUTS_MOUNT
from runner.shared.protocol import PLAN_MOUNT as PLAN_MOUNT
from runner.shared.protocol import RESULTS_MOUNT as RESULTS_MOUNT
from runner.shared.protocol import SANDBOX_UID as SANDBOX_UID


class PlanInputFile(BaseModel):
    """One file of an input: its path relative to the input's root, sha256 and size."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    path: str
    sha256: str
    size: int = Field(ge=0)


class PlanInput(BaseModel):
    """One locked input (model or dataset) as a backend delivers it to the container.

    A ``file`` input is one file named ``file_name``; a ``directory`` input is a tree
    whose every file is listed in ``files``. ``host_path`` is the verified copy on the
    runner's host (a content-cache blob or materialized tree), mounted read-only by the
    Docker backend; ``artifact_ref`` is where the input is published by digest
    (``registry/repo@sha256:…``), which the Kubernetes backend mounts as an image volume.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")
    role: Literal["model", "dataset"]
    name: str
    host_path: Path | None = Field(
        description="Verified file or tree on the runner's host; None when the input is "
        "only in the registry (a backend that pulls inputs on its nodes, see "
        "Backend.pulls_inputs)."
    )
    sha256: str = Field(description="File sha256, or the tree digest of a directory (hex).")
    kind: Literal["file", "directory"] = "file"
    file_name: str | None = Field(
        default=None, description="Name of a file input inside its mount (default: host name)."
    )
    files: tuple[PlanInputFile, ...] = ()
    artifact_ref: str | None = None

    @property
    def size(self) -> int:
        """Bytes of the input (every file's size; what it takes on a node's disk)."""
        return sum(f.size for f in self.files)

    @property
    def mount_path(self) -> str:
        """The directory inside the container that holds this input."""
        folder = "model" if self.role == "model" else f"data/{self.name}"
        return f"{INPUTS_MOUNT}/{folder}"

    @property
    def container_path(self) -> str:
        """The input as the evaluation opens it: the file, or the directory's root."""
        if self.kind == "directory":
            return self.mount_path
        name = self.file_name or (self.host_path.name if self.host_path else self.files[0].path)
        return f"{self.mount_path}/{name}"

    def agent_input(self) -> AgentPlanInput:
        """The input as the agent's plan lists it: where it is inside, what it must be.

        A file input keeps the shape plans always had (so plans, and the bundles that
        hold them, of file inputs do not change); a directory adds its kind and files.
        """
        item: AgentPlanInput = {
            "role": self.role,
            "name": self.name,
            "path": self.container_path,
            "sha256": self.sha256,
        }
        if self.kind == "directory":
            item["kind"] = "directory"
            item["files"] = [
                {"path": f.path, "sha256": f.sha256, "size": f.size} for f in self.files
            ]
        return item


class RunPlan(BaseModel):
    """One sandboxed execution of a locked spec."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    run_id: str
    attempt: int
    image_ref: str
    expected_rootfs_digest: str
    runtime: Literal["gvisor", "runc"]
    network: Literal["none"] = "none"
    command: list[str]
    params: JSONObject
    seed: int
    metrics: list[Annotated[MetricDefinition, AS_JSON_OBJECT]]
    # compute: custom — never sent to the agent; recomputed by the runner in its own sandbox
    custom_metrics: list[Annotated[MetricDefinition, AS_JSON_OBJECT]] = Field(default_factory=list)
    perturbations: list[Annotated[PerturbationDefinition, AS_JSON_OBJECT]] = Field(
        default_factory=list
    )
    expect: Annotated[PlanExpect, AS_JSON_OBJECT]
    inputs: list[PlanInput]
    timeout_s: int
    cpus: float
    memory_mib: int
    pids: int
    gpus: int = 0
    results_mib: int = Field(default=2048, description="Size limit of the results volume.")
    retries: int = 2
    gpu_product: str | None = None
    gpu_driver_major: int | None = None
    mig_profile: str | None = Field(
        default=None, description="MIG profile: 'gpus' devices of nvidia.com/mig-<profile>."
    )
    runtime_class: str | None = None
    verify_rootfs: Literal["used", "full"] = "used"
    queue: str | None = Field(default=None, description="The spec's Kueue LocalQueue.")
    priority_class: str | None = Field(default=None, description="The spec's PriorityClass.")
    image_pull_secrets: list[str] = Field(
        default_factory=list, description="The spec's image pull Secrets."
    )
    spec_digest: str
    lock_digest: str
    spec_name: str

    def image_digest(self) -> str:
        return parse_digest_ref(self.image_ref)[1]

    def agent_plan(self, *, emit_results: bool = False, hold_s: int | None = None) -> AgentPlan:
        """The plan the in-container agent reads (``runner.shared.protocol``; paths as inside).

        ``emit_results`` asks the agent to also print its results as a framed tar on
        stdout (for backends that cannot read the results volume). ``hold_s`` asks it
        to hold its finished results that long for collection by exec (``collect: exec``).
        """
        plan: AgentPlan = {
            "emit_results": emit_results,
            "run_id": self.run_id,
            "image_ref": self.image_ref,
            "expected_rootfs_digest": self.expected_rootfs_digest,
            "verify_rootfs": self.verify_rootfs,
            "seed": self.seed,
            "params": self.params,
            "command": self.command,
            "timeout_s": self.timeout_s,
            "metrics": self.metrics,
            "perturbations": self.perturbations,
            "expect": self.expect,
            "inputs": [i.agent_input() for i in self.inputs],
        }
        if hold_s is not None:
            plan["collect"], plan["hold_s"] = "exec", hold_s
        return plan

    def write_agent_plan(self, directory: Path) -> Path:
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / "plan.json"
        path.write_bytes(encode_agent_plan(self.agent_plan()))
        return path


class BackendResult(BaseModel):
    """How the sandboxed container ended, as the backend saw it."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    backend: str
    exit_code: int | None = Field(description="Agent exit code; None when killed/timed out.")
    timed_out: bool = False
    interrupted: bool = False
    image_digest_confirmed: bool = Field(description="The container ran the pinned digest.")
    runtime: str = Field(description="OCI runtime that actually ran the container.")
    network: str | None = Field(
        default=None,
        description="The network isolation the backend observed in force for the container "
        "(its network mode; the NetworkPolicies selecting its pod), e.g. 'none'; None when "
        "it observed nothing.",
    )
    started_at: str | None = None
    finished_at: str | None = None
    duration_s: float | None = None
    queued_at: str | None = Field(
        default=None, description="When the run entered a Kueue queue (None: not queued)."
    )
    queue_wait_s: float | None = Field(
        default=None, description="Seconds spent waiting for admission, apart from the run."
    )
    container_log: str = ""
    collection_problems: list[str] = Field(
        default_factory=list, description="What the backend refused while fetching results."
    )
    details: Annotated[BackendDetails, AS_JSON_OBJECT] = Field(
        default_factory=lambda: BackendDetails()
    )


class Backend(Protocol):
    name: str
    pulls_inputs: bool
    """True when the backend's nodes pull published inputs by digest themselves: the
    runner then only checks that each is in the registry, and never downloads it."""

    def preflight(self, plan: RunPlan) -> None:
        """Fail early (exit 4/5) if this backend cannot honour the plan's sandbox policy."""

    def run(
        self, plan: RunPlan, results_dir: Path, *, on_start: Callable[[], None] | None = None
    ) -> BackendResult:
        """Run the plan to completion; results land in ``results_dir``.

        ``on_start`` is called once, on the caller's thread, as soon as the sandbox is
        running (the caller's own work that need not precede it happens there, while the
        evaluation goes on). An exception from it ends the run: the sandbox is removed and
        the exception propagates.
        """
        ...

"""Where and how a spec runs: resources, cluster submission, the sandbox, and what the
container must find before the evaluation starts."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import (
    Field,
    field_validator,
    model_validator,
)

from runner.model.base import FrozenModel as _Model

# A MIG profile as the NVIDIA device plugin names it: <slices>g.<memory>gb[+me…].
MIG_PROFILE_PATTERN = r"^[1-8]g\.[0-9]{1,4}gb(\+[a-z]{1,8})?$"
K8S_NAME_PATTERN = r"^[a-z0-9]([a-z0-9.-]{0,251}[a-z0-9])?$"


class ResourcesSpec(_Model):
    cpus: float = Field(default=1.0, gt=0, le=256)
    memory_mib: int = Field(default=1024, ge=64, le=4 * 1024 * 1024)
    pids: int = Field(default=256, ge=16, le=65536)
    gpus: int = Field(default=0, ge=0, le=16)
    results_mib: int = Field(
        default=2048,
        ge=16,
        le=1024 * 1024,
        description="Size limit of the results volume (Kubernetes: the emptyDir's sizeLimit).",
    )
    gpu_product: str | None = Field(
        default=None,
        pattern=r"^[A-Za-z0-9]([A-Za-z0-9._-]{0,61}[A-Za-z0-9])?$",
        description="Exact node label value of nvidia.com/gpu.product to schedule onto.",
    )
    gpu_driver_major: int | None = Field(
        default=None, ge=1, description="Node label nvidia.com/cuda.driver.major to require."
    )
    mig_profile: str | None = Field(
        default=None,
        pattern=MIG_PROFILE_PATTERN,
        description="Run on MIG devices of this profile ('1g.10gb', '3g.40gb', …): 'gpus' of "
        "them, requested as nvidia.com/mig-<profile> (the NVIDIA device plugin's mixed "
        "strategy).",
    )

    @model_validator(mode="after")
    def _mig_needs_gpus(self) -> ResourcesSpec:
        if self.mig_profile is not None and self.gpus < 1:
            raise ValueError("mig_profile needs gpus >= 1 (how many MIG devices to request)")
        return self


class ClusterSpec(_Model):
    """How the run is submitted on a shared cluster (the CLI flags override each one)."""

    queue: str | None = Field(
        default=None,
        pattern=K8S_NAME_PATTERN,
        description="Kueue LocalQueue: the Job waits suspended until Kueue admits it.",
    )
    priority_class: str | None = Field(
        default=None,
        pattern=K8S_NAME_PATTERN,
        description="PriorityClass of the pod; with a queue also the Kueue "
        "WorkloadPriorityClass (the operator creates both under this name).",
    )
    image_pull_secrets: list[str] = Field(
        default_factory=list,
        max_length=8,
        description="Secrets (kubernetes.io/dockerconfigjson) in the run's namespace that "
        "the kubelet pulls the image and input artifacts with.",
    )

    @field_validator("image_pull_secrets")
    @classmethod
    def _secret_names(cls, value: list[str]) -> list[str]:
        for name in value:
            if not re.fullmatch(K8S_NAME_PATTERN, name):
                raise ValueError(f"{name!r} is not a Kubernetes object name")
        return value


class SandboxSpec(_Model):
    runtime: Literal["gvisor", "runc"] = Field(
        default="gvisor", description="gvisor (default) or runc; never silently downgraded."
    )
    network: Literal["none"] = "none"
    runtime_class: str | None = Field(
        default=None,
        pattern=r"^[a-z0-9]([a-z0-9.-]{0,61}[a-z0-9])?$",
        description="Kubernetes RuntimeClass to use (default: 'gvisor' for runtime gvisor). "
        "GPU runs must name theirs explicitly (e.g. a gVisor-with-nvproxy class).",
    )
    verify_rootfs: Literal["used", "full"] = Field(
        default="used",
        description="What the in-container agent checks of the image before results are "
        "accepted: 'used' (default) the files the evaluation uses, against the image's digest "
        "table; 'full' every file of the image, hashed while the evaluation runs.",
    )


class ExpectedEnvironment(_Model):
    """What the container must find before the evaluation starts (checked by the agent)."""

    driver: str | None = Field(default=None, description="Driver version specifier, '>=550,<600'.")
    cuda: str | None = Field(default=None, description="CUDA driver version specifier.")
    gpu_product: str | None = Field(default=None, description="Regex the GPU name must match.")
    gpu_count: int | None = Field(default=None, ge=0)
    mig: Literal["required", "forbidden"] | None = None
    mig_profile: str | None = Field(
        default=None,
        pattern=MIG_PROFILE_PATTERN,
        description="Every MIG device the container sees is of this profile ('1g.10gb').",
    )
    mig_count: int | None = Field(
        default=None, ge=1, le=56, description="Number of MIG devices the container must see."
    )
    ecc: Literal["required"] | None = None

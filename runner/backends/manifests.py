"""Pure builders: a run plan → the Kubernetes objects that run it. No client in sight.

Security is by construction: every pod satisfies Pod Security "restricted"
(non-root fixed UID/GID, seccomp RuntimeDefault, no privilege escalation, all
capabilities dropped, read-only root filesystem), has no service-account token,
no service links, no host namespaces or host paths — and nothing in the plan can
change that, because no plan field reaches those parts of the object.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass
from importlib.metadata import version as dist_version
from typing import Any

from runner.errors import InputError
from runner.model.plan import PLAN_MOUNT, RESULTS_MOUNT, SANDBOX_UID, RunPlan

MANAGED_BY = "evalrun"
LABEL_RUN_ID = "evalrun.dev/run-id"
LABEL_SPEC_HASH = "evalrun.dev/spec-hash"
LABEL_LOCK_HASH = "evalrun.dev/lock-hash"
LABEL_VERSION = "evalrun.dev/version"
LABEL_SPEC_NAME = "evalrun.dev/spec"
ANNOTATION_IMAGE = "evalrun.dev/image"
CONTAINER_NAME = "agent"
GPU_RESOURCE = "nvidia.com/gpu"
GPU_PRODUCT_LABEL = "nvidia.com/gpu.product"
GPU_DRIVER_MAJOR_LABEL = "nvidia.com/cuda.driver.major"
GPU_TAINT_KEY = "nvidia.com/gpu"
# ConfigMaps are capped at 1 MiB by the API server; leave room for metadata.
MAX_CONFIGMAP_BYTES = 900 * 1024
# Exit codes of the agent that mean "do not retry": bad plan (2), integrity (3), environment (4).
NON_RETRYABLE_EXIT_CODES = (2, 3, 4)
PREFLIGHT_ALLOWANCE_S = 300


@dataclass(frozen=True)
class JobOptions:
    """Cluster-side choices that are not part of the spec."""

    namespace: str
    ttl_after_finished_s: int = 600
    image_pull_policy: str = "IfNotPresent"
    # Cluster-specific taints to tolerate (set by the operator, never by a spec).
    extra_tolerations: tuple[tuple[str, str], ...] = ()


def _version() -> str:
    try:
        return re.sub(r"[^A-Za-z0-9._-]", "-", dist_version("evalrun"))[:63]
    except Exception:
        return "unknown"


def job_name(run_id: str) -> str:
    """Deterministic, DNS-1123 name for a run's Job and ConfigMap."""
    name = f"evalrun-{run_id}".lower()
    if not re.fullmatch(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?", name):
        raise InputError(f"run id {run_id!r} does not give a valid Kubernetes name")
    return name


def digest_label(digest: str) -> str:
    """A label-safe form of a ``sha256:…`` digest (label values are ≤ 63 chars)."""
    return digest.removeprefix("sha256:")[:63]


def labels_for(plan: RunPlan) -> dict[str, str]:
    return {
        "app.kubernetes.io/managed-by": MANAGED_BY,
        "app.kubernetes.io/name": "evalrun",
        LABEL_RUN_ID: plan.run_id,
        LABEL_SPEC_HASH: digest_label(plan.spec_digest),
        LABEL_LOCK_HASH: digest_label(plan.lock_digest),
        LABEL_SPEC_NAME: plan.spec_name,
        LABEL_VERSION: _version(),
    }


def _input_key(role: str, name: str, filename: str) -> str:
    key = re.sub(r"[^-._a-zA-Z0-9]", "_", f"{role}--{name}--{filename}")
    return key[:253]


def build_configmap(
    plan: RunPlan, plan_json: bytes, inputs: Mapping[str, bytes], options: JobOptions
) -> dict[str, Any]:
    """The ConfigMap carrying plan.json and the (small) input files, by content."""
    total = len(plan_json) + sum(len(v) for v in inputs.values())
    if total > MAX_CONFIGMAP_BYTES:
        raise InputError(
            f"the run's inputs are {total} bytes; the Kubernetes backend delivers inputs "
            f"through a ConfigMap, limited to {MAX_CONFIGMAP_BYTES} bytes",
            hint="bake large inputs into the evaluation image, or use the docker backend",
        )
    import base64

    binary = {"plan.json": base64.b64encode(plan_json).decode()}
    for item in plan.inputs:
        key = _input_key(item.role, item.name, item.host_path.name)
        binary[key] = base64.b64encode(inputs[item.name]).decode()
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": job_name(plan.run_id),
            "namespace": options.namespace,
            "labels": labels_for(plan),
        },
        "immutable": True,
        "binaryData": binary,
    }


def _runtime_class(plan: RunPlan) -> str | None:
    if plan.runtime_class:
        return plan.runtime_class
    if plan.runtime == "gvisor":
        if plan.gpus:
            raise InputError("a GPU run under gvisor needs sandbox.runtime_class named explicitly")
        return "gvisor"
    return None


def build_job(plan: RunPlan, options: JobOptions) -> dict[str, Any]:
    """The batch/v1 Job that runs the agent once for this plan."""
    name = job_name(plan.run_id)
    labels = labels_for(plan)
    resources: dict[str, dict[str, str]] = {
        "requests": {"cpu": f"{int(plan.cpus * 1000)}m", "memory": f"{plan.memory_mib}Mi"},
        "limits": {"cpu": f"{int(plan.cpus * 1000)}m", "memory": f"{plan.memory_mib}Mi"},
    }
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "hostNetwork": False,
        "hostPID": False,
        "hostIPC": False,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": SANDBOX_UID,
            "runAsGroup": SANDBOX_UID,
            "fsGroup": SANDBOX_UID,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [
            {
                "name": CONTAINER_NAME,
                "image": plan.image_ref,
                "imagePullPolicy": options.image_pull_policy,
                "args": [
                    "run",
                    "--plan",
                    f"{PLAN_MOUNT}/plan.json",
                    "--results",
                    RESULTS_MOUNT,
                ],
                "securityContext": {
                    "allowPrivilegeEscalation": False,
                    "privileged": False,
                    "readOnlyRootFilesystem": True,
                    "runAsNonRoot": True,
                    "capabilities": {"drop": ["ALL"]},
                },
                "resources": resources,
                "volumeMounts": [
                    {"name": "plan", "mountPath": PLAN_MOUNT, "readOnly": True},
                    {"name": "inputs", "mountPath": "/evalrun/inputs", "readOnly": True},
                    {"name": "results", "mountPath": RESULTS_MOUNT},
                    {"name": "tmp", "mountPath": "/tmp"},
                ],
                "terminationMessagePolicy": "FallbackToLogsOnError",
            }
        ],
        "volumes": [
            {
                "name": "plan",
                "configMap": {"name": name, "items": [{"key": "plan.json", "path": "plan.json"}]},
            },
            {
                "name": "inputs",
                "configMap": {
                    "name": name,
                    "items": [
                        {
                            "key": _input_key(i.role, i.name, i.host_path.name),
                            "path": i.container_path.removeprefix("/evalrun/inputs/"),
                        }
                        for i in plan.inputs
                    ],
                },
            },
            {"name": "results", "emptyDir": {"sizeLimit": "2Gi"}},
            {"name": "tmp", "emptyDir": {"medium": "Memory", "sizeLimit": "256Mi"}},
        ],
    }
    runtime_class = _runtime_class(plan)
    if runtime_class:
        pod_spec["runtimeClassName"] = runtime_class
    if plan.gpus:
        resources["limits"][GPU_RESOURCE] = str(plan.gpus)
        resources["requests"][GPU_RESOURCE] = str(plan.gpus)
        selector: dict[str, str] = {}
        if plan.gpu_product:
            selector[GPU_PRODUCT_LABEL] = plan.gpu_product
        if plan.gpu_driver_major:
            selector[GPU_DRIVER_MAJOR_LABEL] = str(plan.gpu_driver_major)
        if selector:
            pod_spec["nodeSelector"] = selector
        pod_spec["tolerations"] = [
            {"key": GPU_TAINT_KEY, "operator": "Exists", "effect": "NoSchedule"}
        ]
    for key, effect in options.extra_tolerations:
        pod_spec.setdefault("tolerations", []).append(
            {"key": key, "operator": "Exists", "effect": effect}
        )
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": name,
            "namespace": options.namespace,
            "labels": labels,
            "annotations": {ANNOTATION_IMAGE: plan.image_ref},
        },
        "spec": {
            "backoffLimit": plan.retries,
            "activeDeadlineSeconds": plan.timeout_s + PREFLIGHT_ALLOWANCE_S,
            "podFailurePolicy": {
                "rules": [
                    {
                        "action": "Ignore",
                        "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}],
                    },
                    {
                        "action": "FailJob",
                        "onExitCodes": {
                            "containerName": CONTAINER_NAME,
                            "operator": "In",
                            "values": list(NON_RETRYABLE_EXIT_CODES),
                        },
                    },
                    {
                        # The evaluation itself failed: retrying the same inputs won't help.
                        "action": "FailJob",
                        "onExitCodes": {
                            "containerName": CONTAINER_NAME,
                            "operator": "In",
                            "values": [20, 21, 22],
                        },
                    },
                ]
            },
            "template": {"metadata": {"labels": labels}, "spec": pod_spec},
        },
    }


def spec_hash_of(obj: Mapping[str, Any]) -> str | None:
    labels = (obj.get("metadata") or {}).get("labels") or {}
    value = labels.get(LABEL_SPEC_HASH)
    return str(value) if value is not None else None


def content_hash(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()

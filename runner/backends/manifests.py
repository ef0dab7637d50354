"""Pure builders: a run plan → the Kubernetes objects that run it. No client in sight.

Inputs arrive as read-only image volumes, pulled by digest by the node (the
ConfigMap carries only the plan); results leave through the API server's exec
stream while the agent holds the finished pod (see runner.backends.kubernetes).

Security is by construction: every pod satisfies Pod Security "restricted"
(non-root fixed UID/GID, seccomp RuntimeDefault, no privilege escalation, all
capabilities dropped, read-only root filesystem), has no service-account token,
no service links, no host namespaces or host paths — and nothing in the plan can
change that, because no plan field reaches those parts of the object.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from importlib.metadata import version as dist_version

from runner._internal.foreign import KubeObject
from runner.errors import InputError
from runner.model.plan import PLAN_MOUNT, RESULTS_MOUNT, SANDBOX_UID, PlanInput, RunPlan
from runner.shared.agent_plan import DEFAULT_HOLD_S, encode_agent_plan

MANAGED_BY = "evalrun"
LABEL_RUN_ID = "evalrun.dev/run-id"
# Set on a Job by `evalrun cancel` (the time) just before deleting it, so every runner
# following the Job knows it was cancelled, not lost.
CANCEL_ANNOTATION = "evalrun.dev/cancel-requested"
LABEL_SPEC_HASH = "evalrun.dev/spec-hash"
LABEL_LOCK_HASH = "evalrun.dev/lock-hash"
LABEL_VERSION = "evalrun.dev/version"
LABEL_SPEC_NAME = "evalrun.dev/spec"
ANNOTATION_IMAGE = "evalrun.dev/image"
# sha256 of the plan.json the Job hands its agent; the agent reports what it read (a
# follower in another process compares with this; the submitting one with its own).
ANNOTATION_PLAN_SHA256 = "evalrun.dev/plan-sha256"
CONTAINER_NAME = "agent"
GPU_RESOURCE = "nvidia.com/gpu"
# The NVIDIA device plugin's "mixed" MIG strategy: one resource per profile.
MIG_RESOURCE_PREFIX = "nvidia.com/mig-"
GPU_PRODUCT_LABEL = "nvidia.com/gpu.product"
GPU_DRIVER_MAJOR_LABEL = "nvidia.com/cuda.driver.major"
GPU_TAINT_KEY = "nvidia.com/gpu"
# Kueue: the LocalQueue a Job is submitted to, and its WorkloadPriorityClass.
KUEUE_QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
KUEUE_PRIORITY_LABEL = "kueue.x-k8s.io/priority-class"
# ConfigMaps are capped at 1 MiB by the API server; leave room for metadata.
MAX_CONFIGMAP_BYTES = 900 * 1024
# The plan travels as an annotation of the pod template, read by the agent through a
# downward API volume, when it is at most this large (the API server allows 256 KiB
# of annotations in all): the Job is then the only object a run creates (one request).
# A larger plan goes into a ConfigMap owned by the Job (the Job created suspended, the
# ConfigMap, the Job resumed: three requests).
PLAN_ANNOTATION = "evalrun.dev/plan"
MAX_PLAN_ANNOTATION_BYTES = 128 * 1024
INPUT_VOLUME_PREFIX = "input-"
# What a node's container runtime must offer for inputs by image volume.
IMAGE_VOLUME_REQUIREMENT = (
    "Kubernetes image volumes (feature gate ImageVolume, on by default from 1.35) and a "
    "container runtime that supports them: containerd >= 2.1 or CRI-O >= 1.31"
)
_MIN_RUNTIME = {"containerd": (2, 1), "cri-o": (1, 31)}
# Exit codes of the agent that mean "do not retry": bad plan (2), integrity (3), environment (4).
NON_RETRYABLE_EXIT_CODES = (2, 3, 4)
PREFLIGHT_ALLOWANCE_S = 300


@dataclass(frozen=True)
class JobOptions:
    """Cluster-side choices that are not part of the spec."""

    namespace: str
    ttl_after_finished_s: int = 600
    image_pull_policy: str = "IfNotPresent"
    # How long the agent holds its finished pod for the runner to collect the results.
    hold_s: int = DEFAULT_HOLD_S
    # Cluster-specific taints to tolerate (set by the operator, never by a spec).
    extra_tolerations: tuple[tuple[str, str], ...] = ()
    # The operator's cap on the Job's run time (activeDeadlineSeconds); None: computed.
    active_deadline_s: int | None = None
    # Secrets (kubernetes.io/dockerconfigjson) the kubelet pulls the image and inputs with.
    image_pull_secrets: tuple[str, ...] = ()
    # PriorityClass of the pod; with a queue also the Kueue WorkloadPriorityClass.
    priority_class: str | None = None
    # Kueue LocalQueue: the Job waits suspended until Kueue admits it (Kueue resumes it).
    queue: str | None = None


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


def build_configmap(
    plan: RunPlan, plan_json: bytes, options: JobOptions, *, job_uid: str
) -> KubeObject:
    """The ConfigMap carrying plan.json, and nothing else, owned by the run's Job.

    Inputs never travel here (they arrive by image volume, see :func:`input_volumes`);
    the owner reference to the Job (``job_uid``) lets the garbage collector delete the
    ConfigMap with the Job.
    """
    if len(plan_json) > MAX_CONFIGMAP_BYTES:
        raise InputError(
            f"the run's plan is {len(plan_json)} bytes; a ConfigMap holds at most "
            f"{MAX_CONFIGMAP_BYTES} bytes",
            hint="the plan carries params, metrics and input file lists; trim params",
        )
    import base64

    name = job_name(plan.run_id)
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": name,
            "namespace": options.namespace,
            "labels": labels_for(plan),
            "ownerReferences": [
                {
                    "apiVersion": "batch/v1",
                    "kind": "Job",
                    "name": name,
                    "uid": job_uid,
                    "blockOwnerDeletion": False,
                    "controller": False,
                }
            ],
        },
        "immutable": True,
        "binaryData": {"plan.json": base64.b64encode(plan_json).decode()},
    }


def _input_ref(item: PlanInput) -> str:
    if not item.artifact_ref:
        raise InputError(
            f"{item.role} {item.name!r} has no published artifact: the Kubernetes backend "
            "mounts every input by digest from a registry",
            field=f"{item.role} {item.name}",
            hint="re-lock with a registry (`evalrun lock` publishes every input next to the "
            "image), then run again",
        )
    if "@sha256:" not in item.artifact_ref:
        raise InputError(
            f"{item.role} {item.name!r}: artifact {item.artifact_ref!r} is not pinned by digest",
            field=f"{item.role} {item.name}",
            hint="re-lock with a registry",
        )
    return item.artifact_ref


def node_storage_mib(plan: RunPlan) -> int:
    """The node disk a run needs: its results volume plus its inputs.

    Requested as ``ephemeral-storage`` so the scheduler refuses, with a reason, a node
    that cannot hold the run, instead of a pull failing half way or the kubelet evicting
    the pod under disk pressure. The inputs arrive as image volumes in the node's image
    store, which the kubelet does not charge to the pod; they are counted anyway (on most
    nodes the image store shares the disk). Runs of the same inputs on one node share the
    cached copy, so this over-reserves for them: it errs towards not starting.
    """
    inputs = sum(item.size for item in plan.inputs)
    return plan.results_mib + -(-inputs // (1 << 20))


def input_volumes(plan: RunPlan) -> tuple[list[KubeObject], list[KubeObject]]:
    """(volumes, volumeMounts): one read-only image volume per input, by digest.

    The kubelet and the container runtime pull each input artifact (no network and no
    credentials in the pod) and cache it per node; the agent checks every file's sha256
    before the evaluation starts. Raises InputError naming an input without a digest.
    """
    volumes: list[KubeObject] = []
    mounts: list[KubeObject] = []
    for index, item in enumerate(plan.inputs):
        name = f"{INPUT_VOLUME_PREFIX}{index}"
        volumes.append(
            {"name": name, "image": {"reference": _input_ref(item), "pullPolicy": "IfNotPresent"}}
        )
        mounts.append({"name": name, "mountPath": item.mount_path, "readOnly": True})
    return volumes, mounts


def dropped_image_volumes(job: KubeObject) -> list[str]:
    """Input volumes the API server stored without their ``image`` source.

    An API server without the ImageVolume feature gate drops the field silently; the
    Job it returns then names the inputs that would arrive empty.
    """
    template = ((job.get("spec") or {}).get("template") or {}).get("spec") or {}
    return [
        str(v.get("name"))
        for v in template.get("volumes") or []
        if str(v.get("name", "")).startswith(INPUT_VOLUME_PREFIX) and not v.get("image")
    ]


def image_volume_support(container_runtime_version: str | None) -> bool | None:
    """Whether a node's ``status.nodeInfo.containerRuntimeVersion`` supports image volumes.

    ``containerd://2.1.4`` → True, ``containerd://1.7.24`` → False; a runtime or version
    this does not know → None (the kubelet's own error, if any, decides).
    """
    if not container_runtime_version or "://" not in container_runtime_version:
        return None
    runtime, _, version = container_runtime_version.partition("://")
    minimum = _MIN_RUNTIME.get(runtime.lower())
    match = re.match(r"v?(\d+)\.(\d+)", version)
    if minimum is None or match is None:
        return None
    return (int(match[1]), int(match[2])) >= minimum


def active_deadline_s(plan: RunPlan, options: JobOptions) -> int:
    """The Job's activeDeadlineSeconds: evaluation, agent preflight, and the results hold
    (or the operator's cap, ``options.active_deadline_s``)."""
    if options.active_deadline_s is not None:
        return options.active_deadline_s
    return plan.timeout_s + PREFLIGHT_ALLOWANCE_S + options.hold_s


def _runtime_class(plan: RunPlan) -> str | None:
    if plan.runtime_class:
        return plan.runtime_class
    if plan.runtime == "gvisor":
        if plan.gpus:
            raise InputError("a GPU run under gvisor needs sandbox.runtime_class named explicitly")
        return "gvisor"
    return None


def gpu_resource_name(plan: RunPlan) -> str:
    """``nvidia.com/gpu``, or ``nvidia.com/mig-<profile>`` for a MIG run."""
    return MIG_RESOURCE_PREFIX + plan.mig_profile if plan.mig_profile else GPU_RESOURCE


def queue_of(plan: RunPlan, options: JobOptions) -> str | None:
    """The Kueue LocalQueue the run's Job is submitted to (flag, else the spec's), if any."""
    return options.queue or plan.queue


def agent_plan_json(plan: RunPlan, options: JobOptions) -> bytes:
    """The exact ``plan.json`` the run's agent reads."""
    return encode_agent_plan(plan.agent_plan(emit_results=True, hold_s=options.hold_s))


def plan_inline(plan_json: bytes) -> bool:
    """Whether ``plan_json`` travels in the pod template (see :data:`PLAN_ANNOTATION`)."""
    return len(plan_json) <= MAX_PLAN_ANNOTATION_BYTES


def plan_in_configmap(job: KubeObject) -> bool:
    """Whether the (stored) Job reads its plan from its ConfigMap, not its template."""
    volumes = (((job.get("spec") or {}).get("template") or {}).get("spec") or {}).get("volumes")
    return any(v.get("name") == "plan" and "configMap" in v for v in volumes or [])


def _plan_volume(name: str, plan_json: bytes) -> tuple[KubeObject, dict[str, str]]:
    """The plan's volume and the pod template's annotations that go with it."""
    if plan_inline(plan_json):
        field = f"metadata.annotations['{PLAN_ANNOTATION}']"
        volume = {
            "downwardAPI": {"items": [{"path": "plan.json", "fieldRef": {"fieldPath": field}}]}
        }
        return {"name": "plan", **volume}, {PLAN_ANNOTATION: plan_json.decode()}
    items = [{"key": "plan.json", "path": "plan.json"}]
    return {"name": "plan", "configMap": {"name": name, "items": items}}, {}


def build_job(plan: RunPlan, options: JobOptions, plan_json: bytes | None = None) -> KubeObject:
    """The batch/v1 Job that runs the agent once for this plan.

    A plan of at most :data:`MAX_PLAN_ANNOTATION_BYTES` is in the Job itself (an
    annotation of its pod template, a downward API volume): the Job is created running,
    or suspended for Kueue to admit when it is queued. A larger one is in a ConfigMap:
    the Job is created suspended, the sender creates the ConfigMap
    (:func:`build_configmap`, owned by the Job) and resumes it (:data:`RESUME_PATCH`).
    """
    name = job_name(plan.run_id)
    if plan_json is None:
        plan_json = agent_plan_json(plan, options)
    plan_volume, template_annotations = _plan_volume(name, plan_json)
    labels = labels_for(plan)
    input_vols, input_mounts = input_volumes(plan)
    resources: dict[str, dict[str, str]] = {
        "requests": {
            "cpu": f"{int(plan.cpus * 1000)}m",
            "memory": f"{plan.memory_mib}Mi",
            "ephemeral-storage": f"{node_storage_mib(plan)}Mi",
        },
        "limits": {"cpu": f"{int(plan.cpus * 1000)}m", "memory": f"{plan.memory_mib}Mi"},
    }
    pod_spec: KubeObject = {
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
                    *input_mounts,
                    {"name": "results", "mountPath": RESULTS_MOUNT},
                    {"name": "tmp", "mountPath": "/tmp"},
                ],
                "terminationMessagePolicy": "FallbackToLogsOnError",
            }
        ],
        "volumes": [
            plan_volume,
            *input_vols,
            {"name": "results", "emptyDir": {"sizeLimit": f"{plan.results_mib}Mi"}},
            {"name": "tmp", "emptyDir": {"medium": "Memory", "sizeLimit": "256Mi"}},
        ],
    }
    # the operator's flags win over the spec's cluster section
    pull_secrets = options.image_pull_secrets or tuple(plan.image_pull_secrets)
    priority_class = options.priority_class or plan.priority_class
    queue = options.queue or plan.queue
    if pull_secrets:
        pod_spec["imagePullSecrets"] = [{"name": s} for s in pull_secrets]
    if priority_class:
        pod_spec["priorityClassName"] = priority_class
    job_labels = dict(labels)
    if queue:
        job_labels[KUEUE_QUEUE_LABEL] = queue
        if priority_class:
            job_labels[KUEUE_PRIORITY_LABEL] = priority_class
    runtime_class = _runtime_class(plan)
    if runtime_class:
        pod_spec["runtimeClassName"] = runtime_class
    if plan.gpus:
        gpu_resource = gpu_resource_name(plan)
        resources["limits"][gpu_resource] = str(plan.gpus)
        resources["requests"][gpu_resource] = str(plan.gpus)
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
            "labels": job_labels,
            "annotations": {
                ANNOTATION_IMAGE: plan.image_ref,
                ANNOTATION_PLAN_SHA256: hashlib.sha256(plan_json).hexdigest(),
            },
        },
        "spec": {
            # Suspended: in a Kueue queue until Kueue admits it; with its plan in a ConfigMap
            # until the ConfigMap (owned by this Job) exists.
            "suspend": bool(queue) or not template_annotations,
            "backoffLimit": plan.retries,
            "activeDeadlineSeconds": active_deadline_s(plan, options),
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
            "template": {
                "metadata": {"labels": labels, "annotations": template_annotations},
                "spec": pod_spec,
            },
        },
    }


RESUME_PATCH: KubeObject = {"spec": {"suspend": False}}


def ttl_patch(options: JobOptions) -> KubeObject:
    """After collection: let the TTL controller remove the finished Job (and its ConfigMap)."""
    return {"spec": {"ttlSecondsAfterFinished": options.ttl_after_finished_s}}


def spec_hash_of(obj: KubeObject) -> str | None:
    labels = (obj.get("metadata") or {}).get("labels") or {}
    value = labels.get(LABEL_SPEC_HASH)
    return str(value) if value is not None else None


def content_hash(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()

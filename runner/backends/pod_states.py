"""What a watched Job's pods say: stuck or disrupted, started, running; the error a stuck
one becomes; why a Job vanished. Pure functions of the API's objects (used by
:mod:`runner.backends.job_session`)."""

from __future__ import annotations

import re
from typing import Any

from runner.adapters.kueue import uncovered_resource
from runner.backends.manifests import (
    CANCEL_ANNOTATION,
    CONTAINER_NAME,
    IMAGE_VOLUME_REQUIREMENT,
    node_storage_mib,
)
from runner.errors import (
    DigestMismatch,
    EnvironmentMismatch,
    EvalrunError,
    InfrastructureError,
    RunCancelled,
)
from runner.model.plan import RunPlan
from runner.shared.protocol import ACK_RE

PULL_FAILURES = {"ImagePullBackOff", "ErrImagePull", "InvalidImageName", "ErrImageNeverPull"}
CONFIG_FAILURES = {"CreateContainerConfigError", "CreateContainerError", "RunContainerError"}
# What a kubelet or runtime says when it cannot mount an image volume.
# (A mount that fails, e.g. "ImageVolumeMountFailed" for a malformed artifact, is not this.)
_IMAGE_VOLUME_UNSUPPORTED = re.compile(
    r"image ?volumes?\b.*\b(not supported|unsupported|not enabled|disabled)", re.I
)
# containerd's words for a blob whose bytes do not match its digest.
_PULL_DIGEST = re.compile(
    r"unexpected commit digest (sha256:[0-9a-f]{64}), expected (sha256:[0-9a-f]{64})"
)


def condition(obj: Any, ctype: str) -> Any:
    for c in (obj.status.conditions or []) if obj and obj.status else []:
        if c.type == ctype and c.status == "True":
            return c
    return None


# What kube-scheduler's preemption adds to an Unschedulable pod's message for a node where
# the pod would fit once pods that are there now leave (the node's allocatable is enough;
# what it lacks is in use by pods it may not preempt), or where it waits for pods it has
# preempted, or for one already terminating. A node the pod can never fit on (it asks for
# more than the node has, or its selector, affinity or taints exclude it) is "Preemption is
# not helpful for scheduling" instead.
_CAPACITY_IN_USE = re.compile(
    r"\bpreemption: .*(No preemption victims found for incoming pod"
    r"|not eligible due to a terminating pod on the nominated node)"
)


def unschedulable(pod: Any) -> str | None:
    """The scheduler's message while ``pod`` is Unschedulable, else None."""
    for c in pod.status.conditions or []:
        if c.type == "PodScheduled" and c.status == "False" and c.reason == "Unschedulable":
            return str(c.message or "no node matches")
    return None


def waiting_for_capacity(pod: Any) -> str | None:
    """The scheduler's message when ``pod`` is Unschedulable only for now: some node has
    room for it once pods that run there now end, or it has been nominated to a node
    whose preempted pods are leaving. Such a pod waits (a busy cluster, a GPU still held
    by a pod that is terminating): it is not stuck."""
    message = unschedulable(pod)
    return message if message is not None and _in_use(pod, message) else None


def _in_use(pod: Any, message: str) -> bool:
    """The Unschedulable ``pod`` (the scheduler said ``message``) waits for capacity."""
    return bool(
        getattr(pod.status, "nominated_node_name", None) or _CAPACITY_IN_USE.search(message)
    )


def pod_problem(pod: Any, now: float, grace: dict[str, float]) -> tuple[str, str] | None:
    """A named reason why a pod cannot make progress, once it has lasted its grace time.

    A pod waiting for capacity in use (:func:`waiting_for_capacity`) is not stuck: the
    Job's own deadline bounds that wait."""
    created = (
        pod.metadata.creation_timestamp.timestamp() if pod.metadata.creation_timestamp else now
    )
    age = now - created
    message = unschedulable(pod)
    if message is not None and age > grace["unschedulable"] and not _in_use(pod, message):
        return "Unschedulable", message
    for cs in pod.status.container_statuses or []:
        waiting = cs.state.waiting if cs.state else None
        message = (waiting.message or "") if waiting else ""
        if waiting and _PULL_DIGEST.search(message):
            return "DigestMismatch", message
        if waiting and _IMAGE_VOLUME_UNSUPPORTED.search(message):
            return "ImageVolumeUnsupported", message
        if waiting and waiting.reason in PULL_FAILURES and age > grace["image_pull"]:
            return waiting.reason, message or cs.image
        if waiting and waiting.reason in CONFIG_FAILURES and age > grace["image_pull"]:
            return waiting.reason, message
    return None


def disruption(pod: Any) -> tuple[str, str] | None:
    """Why a pod was disrupted (evicted, preempted, its node drained), if it was.

    The Job's podFailurePolicy ignores such a failure: the Job starts another pod, so the
    runner records the disruption and keeps following the Job.
    """
    for c in pod.status.conditions or []:
        if c.type == "DisruptionTarget" and c.status == "True":
            return c.reason or "DisruptionTarget", c.message or ""
    if pod.status.reason == "Evicted":  # a kubelet that sets no DisruptionTarget condition
        return "Evicted", pod.status.message or "evicted by the kubelet"
    return None


def agent_status(pod: Any) -> Any:
    return next((c for c in pod.status.container_statuses or [] if c.name == CONTAINER_NAME), None)


def started(pod: Any) -> bool:
    status = agent_status(pod)
    state = status.state if status is not None else None
    return bool(state and (state.running or state.terminated))


def running(pod: Any) -> bool:
    status = agent_status(pod)
    return bool(status is not None and status.state and status.state.running)


def stuck_error(name: str, plan: RunPlan, reason: str, message: str) -> EvalrunError:
    """The error for Job ``name``, whose pod cannot make progress for ``reason``."""
    if reason == "Unschedulable" and "ephemeral-storage" in message:
        inputs = ", ".join(f"{i.role} {i.name!r} {i.size / (1 << 30):.2f} GiB" for i in plan.inputs)
        return EnvironmentMismatch(
            f"Job {name} is Unschedulable: no node has {node_storage_mib(plan)} MiB "
            f"of disk free for the run ({message})",
            expected=f"a node with {node_storage_mib(plan)} MiB of allocatable ephemeral-storage",
            hint=f"the run needs its results volume ({plan.results_mib} MiB, "
            f"resources.results_mib) plus its inputs ({inputs or 'none'}) on the node's "
            "disk; use nodes with more disk, or smaller inputs/results_mib",
        )
    if reason == "Unschedulable":
        return EnvironmentMismatch(
            f"Job {name} is Unschedulable: {message}",
            gpu_product=plan.gpu_product,
            gpus=plan.gpus or None,
            hint="no node offers what the spec asks for (resources, GPU product label, "
            "taints); check `kubectl describe nodes`",
        )
    if reason == "Inadmissible":
        # message: "LocalQueue 'q': <Kueue's reason naming the resource it lacks>"
        resource = uncovered_resource(message)
        return EnvironmentMismatch(
            f"Job {name} cannot be admitted: the ClusterQueue behind {message.split(': ', 1)[0]} "
            f"does not cover {resource}, which the run requests "
            f"(Kueue: {message.split(': ', 1)[-1]})",
            expected=f"{resource} in one of the ClusterQueue's resourceGroups[].coveredResources",
            hint=f"add {resource} to the ClusterQueue (docs/cluster-operators.md), or have "
            f"Kueue ignore it (Configuration resources.excludeResourcePrefixes: [{resource}])",
        )
    if reason == "ImageVolumeUnsupported":
        return EnvironmentMismatch(
            f"Job {name}: the node cannot mount image volumes: {message}",
            expected=IMAGE_VOLUME_REQUIREMENT,
            hint="evalrun never falls back to shipping inputs another way",
        )
    if reason == "DigestMismatch":
        match = _PULL_DIGEST.search(message)
        assert match is not None
        return DigestMismatch(
            f"Job {name}: a pulled blob (image or input artifact)",
            expected=match[2],
            found=match[1],
            hint="the registry serves bytes that are not the locked ones; re-publish "
            "the input or investigate the registry",
        )
    return InfrastructureError(f"Job {name}: {reason}: {message}", image=plan.image_ref)


def ack_exit(answer: bytes | bytearray) -> int | None:
    match = ACK_RE.match(bytes(answer).decode("ascii", "replace").strip())
    return int(match[1]) if match else None


def image_id_matches(image_id: str | None, digest: str) -> bool:
    """The pod's imageID names the pinned manifest digest (``…@sha256:…``)."""
    if not image_id:
        return False
    return image_id.rsplit("@", 1)[-1] == digest or image_id == digest


def job_gone(name: str, last: Any, *, cancel_requested: bool) -> EvalrunError:
    """Why Job ``name`` is gone before it ended: cancelled (``evalrun cancel`` annotated its
    last state, or the caller knows it asked), or deleted by something else."""
    annotations = (getattr(getattr(last, "metadata", None), "annotations", None)) or {}
    cancelled = annotations.get(CANCEL_ANNOTATION)
    if cancelled or cancel_requested:
        when = f" at {cancelled}" if cancelled else ""
        return RunCancelled(f"cancelled{when} (evalrun cancel): Job {name} was deleted")
    return InfrastructureError(
        f"Job {name} is gone before its results were collected (deleted, or removed by its "
        "TTL after another runner collected it)",
        hint="a run collected elsewhere is sealed in that runner's store",
    )

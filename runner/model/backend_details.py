"""What a backend records of how it ran the container (``BackendResult.details``, signed as
the bundle's ``sandbox.details``): one shape per part, each key present only where the
backend that ran saw it.

These are evidence, written once by the backends (``runner.backends``) and read by the
judge; :class:`BackendResult` carries them as the plain JSON they are (old bundles and
detached runs hold whatever their runner wrote).
"""

from __future__ import annotations

from typing import Literal, NotRequired, TypedDict


class QueueFacts(TypedDict):
    """A run that waited in a Kueue queue (``runner.backends.queueing.QueueClock.facts``)."""

    queue: str
    queued_at: str
    admitted_at: str | None
    queue_wait_s: float
    admissions: int
    last_queue_reason: str | None


class CollectionFacts(TypedDict):
    """How the results were taken from the pod: by exec from the holding agent (with
    its attempts, size and acknowledgement), or from an older agent's log frame."""

    pod: str
    mode: Literal["exec", "log-frame"]
    attempts: NotRequired[int]
    bytes: NotRequired[int]
    files: NotRequired[int]
    duration_s: NotRequired[float]
    acknowledged: NotRequired[bool]


class Disruption(TypedDict):
    """A pod the cluster disrupted (e.g. evicted); the Job started another."""

    pod: str
    reason: str
    message: str


class InputMount(TypedDict):
    """An input as the Docker engine mounted it."""

    target: str | None
    source: str | None
    read_only: bool


class FindingRecord(TypedDict):
    """One demand of the namespace's sandbox policy and what was found."""

    demand: str
    met: bool
    observed: str
    required: str


class NamespacePolicyRecord(TypedDict):
    """The namespace's sandbox policy as found for the run's pods."""

    namespace: str
    findings: list[FindingRecord]
    egress_denied_by: list[str]
    ingress_denied_by: list[str]


class BackendDetails(TypedDict, total=False):
    """Everything a backend may record; which keys are there depends on the backend."""

    # both backends
    plan_sha256: str
    image_id: str | None
    interrupted_by: str
    # Docker (values as the engine reported the container)
    container_id: str | None
    network_mode: str | None
    read_only_rootfs: bool | None
    cap_drop: list[str] | None
    security_opt: list[str] | None
    user: str | None
    oom_killed: bool | None
    input_mounts: list[InputMount]
    removed_container: str | None
    # the sandbox was started before the plan, from the last identical request, and handed
    # over once this run's request was found equal (runner.adapters.docker_ahead)
    started_ahead: bool
    # Kubernetes
    job: str
    namespace: str
    job_condition: str
    pods: list[str]
    job_failed_pods: int
    job_succeeded_pods: int
    active_deadline_s: int | None
    disruptions: list[Disruption]
    # pods that waited for capacity other pods held: the scheduler's message, by pod
    capacity_waits: dict[str, str]
    pod: str
    node: str | None
    termination_reason: str | None
    container_exit_code: int | None
    # the node's labels, or why they could not be read
    node_labels: dict[str, str] | str
    log_tail: str
    collection: CollectionFacts
    collection_problems: list[str]
    queue: QueueFacts
    deleted_job: str
    namespace_policy: NamespacePolicyRecord

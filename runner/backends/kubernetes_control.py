"""Controlling a run's Job from outside the runner that follows it: its state, its pod's
log, and cancelling it (``evalrun status``/``logs``/``cancel``).

Cancelling annotates the Job (:data:`~runner.backends.manifests.CANCEL_ANNOTATION`)
before deleting it, so every runner following the Job (a blocking ``run`` or a ``wait``,
from any store) sees in its last state that it was cancelled, not lost.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypedDict

from kubernetes import client as k8s

from runner.adapters.kube_streams import PodLogFollower
from runner.adapters.kubernetes import api_call
from runner.backends.kubernetes import KubernetesBackend
from runner.backends.manifests import CANCEL_ANNOTATION, CONTAINER_NAME, LABEL_RUN_ID
from runner.backends.pod_states import condition
from runner.errors import APINotFound
from runner.shared.protocol import FRAME_BEGIN, FRAME_END, READY_RE


def cancel_job(backend: KubernetesBackend, job: str, *, when: str) -> bool:
    """Mark Job ``job`` cancelled (at ``when``) and delete it with its pods; False if it was
    already gone."""
    api, namespace = backend._connect()
    batch = k8s.BatchV1Api(api)
    patch = {"metadata": {"annotations": {CANCEL_ANNOTATION: when}}}
    try:
        api_call(
            "annotate Job",
            lambda: batch.patch_namespaced_job(job, namespace, patch),
            namespace=namespace,
            name=job,
        )
        api_call(
            "delete Job",
            lambda: batch.delete_namespaced_job(job, namespace, propagation_policy="Background"),
            namespace=namespace,
            name=job,
        )
    except APINotFound:
        return False
    return True


@dataclass(frozen=True)
class PodState:
    """One pod of the run, as the API server reports it."""

    name: str
    phase: str | None
    node: str | None
    agent: str  # waiting (reason), running, terminated (exit code)


class PodStateRecord(TypedDict):
    """A :class:`PodState` as ``evalrun status --json`` shows it."""

    name: str
    phase: str | None
    node: str | None
    agent: str


class JobStateRecord(TypedDict):
    """A :class:`JobState` as ``evalrun status --json`` shows it."""

    job: str
    namespace: str
    state: str
    cancel_requested: str | None
    detail: str | None
    pods: list[PodStateRecord]


@dataclass(frozen=True)
class JobState:
    """A run's Job now: ``state`` is one of submitted, pending, running, succeeded, failed,
    cancelling, gone."""

    job: str
    namespace: str
    state: str
    pods: list[PodState] = field(default_factory=list)
    cancel_requested: str | None = None
    detail: str | None = None

    def to_json(self) -> JobStateRecord:
        return {
            "job": self.job,
            "namespace": self.namespace,
            "state": self.state,
            "cancel_requested": self.cancel_requested,
            "detail": self.detail,
            "pods": [
                {"name": p.name, "phase": p.phase, "node": p.node, "agent": p.agent}
                for p in self.pods
            ],
        }


def _agent(pod: Any) -> str:
    status = next(
        (c for c in pod.status.container_statuses or [] if c.name == CONTAINER_NAME), None
    )
    state = status.state if status is not None else None
    if state is None:
        return "not started"
    if state.terminated is not None:
        return f"terminated (exit {state.terminated.exit_code})"
    if state.running is not None:
        return "running"
    if state.waiting is not None:
        return f"waiting ({state.waiting.reason})"
    return "unknown"


def job_state(backend: KubernetesBackend, job: str, run_id: str) -> JobState:
    """Read Job ``job`` and the pods of ``run_id`` now (two GETs, no watch)."""
    api, namespace = backend._connect()
    try:
        obj = api_call(
            "read Job",
            lambda: k8s.BatchV1Api(api).read_namespaced_job(job, namespace),
            namespace=namespace,
            name=job,
        )
    except APINotFound:
        return JobState(job, namespace, "gone", detail="the Job does not exist (any more)")
    listing = api_call(
        "list pods",
        lambda: k8s.CoreV1Api(api).list_namespaced_pod(
            namespace, label_selector=f"{LABEL_RUN_ID}={run_id}"
        ),
        namespace=namespace,
    )
    pods = [
        PodState(p.metadata.name, p.status.phase, p.spec.node_name, _agent(p))
        for p in sorted(listing.items, key=lambda p: p.metadata.creation_timestamp)
    ]
    cancel = (obj.metadata.annotations or {}).get(CANCEL_ANNOTATION)
    failed = condition(obj, "Failed")
    if cancel or obj.metadata.deletion_timestamp:
        state, detail = "cancelling", None
    elif condition(obj, "Complete"):
        state, detail = "succeeded", "the Job completed; `evalrun wait` seals it"
    elif failed:
        state, detail = "failed", f"{failed.reason}: {failed.message or ''}".strip()
    elif obj.spec.suspend:
        state, detail = "submitted", "suspended until its plan is in place"
    elif any(p.agent == "running" for p in pods):
        state, detail = "running", None
    else:
        state, detail = "pending", next((p.agent for p in reversed(pods)), "no pod yet")
    return JobState(job, namespace, state, pods, cancel, detail)


class ProtocolLines:
    """Hides the agent's protocol lines (the ready line, an old agent's results frame) from
    a log; :attr:`ready` is set once the agent said it finished."""

    def __init__(self) -> None:
        self.ready = threading.Event()
        self._in_frame = False

    def __call__(self, line: str) -> bool:
        """True: the line is protocol, not the evaluation's output."""
        if READY_RE.match(line.strip()):
            self.ready.set()
            return True
        if line.startswith(FRAME_BEGIN) or self._in_frame:
            self._in_frame = line.strip() != FRAME_END
            return True
        return False


class EvaluationLines:
    """A pod log's bytes as the evaluation's lines, each to ``sink``: the agent's protocol
    lines left out, and the blank line the agent sets each of them apart with."""

    def __init__(self, sink: Callable[[str], None]) -> None:
        self.sink = sink
        self.hide = ProtocolLines()
        self._pending = bytearray()
        self._blanks = 0

    def feed(self, data: bytes) -> None:
        self._pending.extend(data)
        while (cut := self._pending.find(b"\n")) >= 0:
            line = self._pending[:cut].decode("utf-8", "replace").rstrip("\r")
            del self._pending[: cut + 1]
            self._line(line)

    def close(self) -> None:
        """Pass on an unfinished last line."""
        if self._pending:
            self._line(self._pending.decode("utf-8", "replace"))
            self._pending.clear()

    def _line(self, line: str) -> None:
        if not line:
            self._blanks += 1
            return
        if self.hide(line):
            self._blanks = max(0, self._blanks - 1)
            return
        for _ in range(self._blanks):
            self.sink("")
        self._blanks = 0
        self.sink(line)


def newest_pod(backend: KubernetesBackend, run_id: str) -> str | None:
    """The name of the run's newest pod, or None when it has none."""
    api, namespace = backend._connect()
    listing = api_call(
        "list pods",
        lambda: k8s.CoreV1Api(api).list_namespaced_pod(
            namespace, label_selector=f"{LABEL_RUN_ID}={run_id}"
        ),
        namespace=namespace,
    )
    pods = sorted(listing.items, key=lambda p: p.metadata.creation_timestamp)
    return str(pods[-1].metadata.name) if pods else None


def pod_log(
    backend: KubernetesBackend,
    pod: str,
    sink: Callable[[str], None],
    *,
    follow: bool,
    poll_s: float = 1.0,
) -> None:
    """Each line of ``pod``'s evaluation output to ``sink`` (protocol lines left out).

    With ``follow`` it keeps going until the agent says it finished or the container ends.
    """
    api, namespace = backend._connect()
    lines = EvaluationLines(sink)
    on_data = lines.feed

    if not follow:
        text = api_call(
            "read pod log",
            lambda: k8s.CoreV1Api(api).read_namespaced_pod_log(
                pod, namespace, container=CONTAINER_NAME
            ),
            namespace=namespace,
            name=pod,
        )
        on_data(str(text).encode("utf-8"))
        lines.close()
        return

    def still_running() -> bool:
        try:
            obj = k8s.CoreV1Api(api).read_namespaced_pod(pod, namespace)
        except Exception:
            return False
        return _agent(obj) == "running"

    follower = PodLogFollower(
        api, namespace, pod, CONTAINER_NAME, on_data, still_running=still_running
    ).start()
    while not follower.done.is_set() and not lines.hide.ready.is_set():
        follower.done.wait(poll_s)
    # The agent is done but its pod holds on: the follower's read stays blocked (closing
    # the response under it would block too); it is a daemon thread and ends with us.
    lines.close()

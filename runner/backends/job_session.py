"""Following one run's Job: its pods' state and logs, the held results, how it ended.

Used by :class:`runner.backends.kubernetes.KubernetesBackend`, which submits the Job and
owns the cluster-side choices; this module only watches, collects and reports.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kubernetes import client as k8s

from runner._internal.foreign import KubeModel
from runner.adapters.kube_streams import PodLogFollower
from runner.adapters.kube_watch import NamespaceWatch
from runner.adapters.kueue import uncovered_resource, workload_reason
from runner.backends.job_results import Collection, PodResults
from runner.backends.live import LineRelay, OutputLine
from runner.backends.manifests import (
    ANNOTATION_PLAN_SHA256,
    CONTAINER_NAME,
    IMAGE_VOLUME_REQUIREMENT,
    active_deadline_s,
    image_volume_support,
    queue_of,
)
from runner.backends.pod_states import (
    agent_status,
    condition,
    disruption,
    image_id_matches,
    job_gone,
    pod_problem,
    running,
    started,
    stuck_error,
    waiting_for_capacity,
)
from runner.backends.queueing import QueueClock, is_suspended
from runner.errors import (
    EnvironmentMismatch,
    InfrastructureError,
    StillRunning,
)
from runner.model.backend_details import BackendDetails, Disruption, QueueFacts
from runner.model.plan import BackendResult, RunPlan
from runner.shared.protocol import (
    FRAME_BEGIN,
    FRAME_END,
    READY_RE,
)

if TYPE_CHECKING:
    from runner.backends.kubernetes import KubernetesBackend

log = logging.getLogger("evalrun.backend.kubernetes")


@dataclass
class _Tracked:
    """What the runner knows about one pod of the run."""

    follower: PodLogFollower | None = None
    relay: LineRelay | None = None
    ready_exit: int | None = None  # from the agent's ready line
    collected: bool = False
    node_checked: bool = False
    frame_lines: int = 0
    capacity_wait: str | None = None  # the scheduler's message, once reported


class RunSession:
    """Following one run's Job: its pods' logs, their held results, how it ended."""

    def __init__(
        self,
        backend: KubernetesBackend,
        api: k8s.ApiClient,
        watch: NamespaceWatch,
        plan: RunPlan,
        name: str,
        results_dir: Path,
    ) -> None:
        self.backend = backend
        self.api = api
        self.watch = watch
        self.namespace = watch.namespace
        self.plan = plan
        self.name = name
        self.results_dir = results_dir
        self.pods: dict[str, _Tracked] = {}
        self.results = PodResults(backend, api, watch, results_dir, plan.run_id)
        # the results taken from the run's pods (the last pod's win)
        self.collection: Collection | None = None
        self.cancel_requested = False
        queue = queue_of(plan, backend.options(self.namespace))
        self.clock = QueueClock(queue) if queue else None
        self.disruptions: dict[str, Disruption] = {}
        self._lock = threading.Lock()

    def close(self) -> None:
        for tracked in self.pods.values():
            if tracked.follower is not None:
                tracked.follower.stop()

    # ---- live log

    def _follow_log(self, pod_name: str) -> None:
        tracked = self.pods[pod_name]

        def intercept(line: str) -> bool:
            match = READY_RE.match(line.strip())
            if match:
                with self._lock:
                    tracked.ready_exit = int(match[1])
                self.watch.notify()
                return True
            # an older agent's results frame (base64 on the log) is no one's reading
            if line.startswith(FRAME_BEGIN) or tracked.frame_lines:
                tracked.frame_lines = 0 if line.strip() == FRAME_END else tracked.frame_lines + 1
                return True
            return False

        relay = LineRelay(self.plan.run_id, self.backend.output, intercept=intercept)
        tracked.relay = relay

        def still_running() -> bool:
            pod = self.watch.pods.objects.get(pod_name)
            return bool(pod is not None and running(pod))

        def on_data(data: bytes) -> None:
            relay.feed("log", data)

        follower = PodLogFollower(
            self.api,
            self.namespace,
            pod_name,
            CONTAINER_NAME,
            on_data,
            still_running=still_running,
        )
        tracked.follower = follower
        follower.start()

    # ---- waiting

    def _next(self) -> Any:
        job = self.watch.job(self.name)
        clock = self.clock
        if clock is not None and job is not None:
            # a queued Job has no pod: waiting for admission is not being stuck
            if is_suspended(job) and not (condition(job, "Complete") or condition(job, "Failed")):
                if clock.suspended() or clock.due_for_reason():
                    return ("queued", job)
                return None
            if clock.waiting:
                clock.admitted()
                return ("admitted", job)
        for pod in self.watch.pods_of(self.plan.run_id):
            pod_name = pod.metadata.name
            tracked = self.pods.setdefault(pod_name, _Tracked())
            if pod_name not in self.disruptions and (disrupted := disruption(pod)):
                return ("disrupted", (pod_name, *disrupted))
            with self._lock:
                ready = tracked.ready_exit is not None and not tracked.collected
            if ready:
                return ("ready", pod)
            if pod.spec.node_name and not tracked.node_checked:
                return ("scheduled", pod)
            if tracked.follower is None and started(pod):
                return ("follow", pod)
            if tracked.capacity_wait is None and (waiting := waiting_for_capacity(pod)):
                return ("waiting", (pod_name, waiting))
            problem = pod_problem(pod, time.time(), self.backend.grace)
            if problem:
                return ("stuck", problem)
        if condition(job, "Complete") or condition(job, "Failed"):
            return ("done", job)
        if job is None and (gone := self.watch.deleted_job(self.name)) is not None:
            return ("gone", gone)
        return None

    def follow(self, started: str, t0: float, *, give_up_at: float | None = None) -> BackendResult:
        options = self.backend.options(self.namespace)
        limit = active_deadline_s(self.plan, options) + 600
        deadline = time.monotonic() + limit
        until = deadline if give_up_at is None else min(deadline, give_up_at)
        while True:
            outcome = self.watch.wait(self._next, timeout=max(0.0, until - time.monotonic()))
            if outcome is None and give_up_at is not None and give_up_at < deadline:
                raise StillRunning(
                    f"run {self.plan.run_id} is still running (Job {self.name}); nothing was "
                    "sealed",
                    hint="wait again later, or cancel it with `evalrun cancel`",
                )
            if outcome is None:
                self.backend._delete(self.api, self.namespace, self.name)
                raise InfrastructureError(f"Job {self.name} did not finish within {limit} s")
            kind, obj = outcome
            if kind == "gone":
                raise job_gone(self.name, obj, cancel_requested=self.cancel_requested)
            if kind in ("queued", "admitted"):
                # the run's own deadline starts at admission, as the Job's does
                deadline = time.monotonic() + limit
                until = deadline if give_up_at is None else min(deadline, give_up_at)
                self._report_queue(kind, obj)
            elif kind == "scheduled":
                self._check_node(obj)
            elif kind == "follow":
                self._follow_log(obj.metadata.name)
            elif kind == "ready":
                self._collect(obj.metadata.name)
            elif kind == "waiting":
                self._waiting(*obj)
            elif kind == "stuck":
                self._stuck(*obj)
            elif kind == "disrupted":
                self._disrupted(*obj)
            else:
                return self._result(obj, started, t0)

    def _report_queue(self, kind: str, job: KubeModel) -> None:
        clock = self.clock
        assert clock is not None
        if kind == "queued":
            reason = workload_reason(self.api, self.namespace, job.metadata.uid, clock.queue)
            clock.reason = reason or clock.reason
            text = f"queued in {clock.queue}" + (f": {reason}" if reason else "")
            # a ClusterQueue that does not cover what the run requests never admits it
            if uncovered_resource(reason) and clock.waited() >= self.backend.grace["unschedulable"]:
                self._stuck("Inadmissible", f"LocalQueue {clock.queue!r}: {reason}")
        else:
            text = f"admitted by Kueue after {clock.waited_s:.1f} s in {clock.queue}"
        log.info(
            text,
            extra={
                "event": f"k8s_{kind}",
                "run_id": self.plan.run_id,
                "job": self.name,
                "queue": clock.queue,
                "reason": clock.reason,
                "queue_wait_s": round(clock.waited_s, 3),
            },
        )
        if self.backend.output is not None:
            self.backend.output(OutputLine(self.plan.run_id, "queue", text))

    def _check_node(self, pod: KubeModel) -> None:
        """Refuse (exit 4) a node whose container runtime cannot mount image volumes."""
        self.pods[pod.metadata.name].node_checked = True
        if not self.plan.inputs:
            return
        node = self.backend.node(self.api, pod.spec.node_name)
        info = getattr(getattr(node, "status", None), "node_info", None)
        version = getattr(info, "container_runtime_version", None)
        if image_volume_support(version) is False:
            self.backend._delete(self.api, self.namespace, self.name)
            raise EnvironmentMismatch(
                f"node {pod.spec.node_name} runs {version}, which cannot mount the run's "
                "inputs as image volumes",
                expected=IMAGE_VOLUME_REQUIREMENT,
                found=version,
                hint="upgrade the node's container runtime, or keep evalrun Jobs off such "
                "nodes; evalrun never falls back to shipping inputs another way",
            )

    def _disrupted(self, pod_name: str, reason: str, message: str) -> None:
        """Report a disrupted pod (e.g. evicted); the Job retries it without counting a failure."""
        self.disruptions[pod_name] = {"pod": pod_name, "reason": reason, "message": message}
        text = (
            f"pod {pod_name} was disrupted ({reason}: {message or 'no message'}); the Job "
            "starts another pod (disruptions do not count against its retries)"
        )
        self._tell(logging.WARNING, "pod_disrupted", text, pod_name, reason)

    def _waiting(self, pod_name: str, message: str) -> None:
        """Report (once per pod) a pod that waits for capacity other pods hold: not stuck."""
        self.pods[pod_name].capacity_wait = message
        text = (
            f"pod {pod_name} waits for capacity in use by other pods (scheduler: {message}); "
            "it starts when they end (--stuck-after does not apply, the Job's deadline does)"
        )
        self._tell(logging.INFO, "k8s_waiting_for_capacity", text, pod_name, message)

    def _tell(self, level: int, event: str, text: str, pod_name: str, reason: str) -> None:
        """What happened to one of the run's pods: a log event, and a line on the terminal."""
        log.log(
            level,
            text,
            extra={"event": event, "run_id": self.plan.run_id, "pod": pod_name, "reason": reason},
        )
        if self.backend.output is not None:
            self.backend.output(OutputLine(self.plan.run_id, "evalrun", text))

    def _stuck(self, reason: str, message: str) -> None:
        self.backend._delete(self.api, self.namespace, self.name)
        raise stuck_error(self.name, self.plan, reason, message)

    # ---- collection

    def _collect(self, pod_name: str) -> None:
        """Take the held results of ``pod_name`` (:mod:`runner.backends.job_results`)."""
        tracked = self.pods[pod_name]
        with self._lock:
            tracked.collected = True
        self.collection = self.results.collect(pod_name)

    # ---- the end

    def _result(self, job: KubeModel, started: str, t0: float) -> BackendResult:
        api, namespace, plan = self.api, self.namespace, self.plan
        failed = condition(job, "Failed")
        pods = self.watch.pods_of(plan.run_id)
        pod = next(
            (p for p in reversed(pods) if p.status.phase in ("Succeeded", "Failed")),
            pods[-1] if pods else None,
        )
        details: BackendDetails = {
            "job": self.name,
            "namespace": namespace,
            "job_condition": (failed.reason if failed else "Complete"),
            "pods": [p.metadata.name for p in pods],
            "job_failed_pods": job.status.failed or 0,
            "job_succeeded_pods": job.status.succeeded or 0,
            "active_deadline_s": job.spec.active_deadline_seconds,
            "disruptions": list(self.disruptions.values()),
        }
        waits = {n: t.capacity_wait for n, t in self.pods.items() if t.capacity_wait is not None}
        if waits:
            details["capacity_waits"] = waits
        # the plan this runner sent, or (following another's run) the one the Job records
        sent = self.backend.sent_plans.get(self.name) or (job.metadata.annotations or {}).get(
            ANNOTATION_PLAN_SHA256
        )
        if sent:
            details["plan_sha256"] = sent
        exit_code: int | None = None
        image_ok = False
        runtime = job.spec.template.spec.runtime_class_name or "runc (cluster default)"
        timed_out = bool(failed and failed.reason == "DeadlineExceeded")
        collection: list[str] = []
        if pod is not None:
            pod_name = pod.metadata.name
            details["pod"] = pod_name
            details["node"] = pod.spec.node_name
            status = agent_status(pod)
            if status is not None:
                term = status.state.terminated if status.state else None
                if term is not None:
                    exit_code = term.exit_code
                    details["termination_reason"] = term.reason
                    details["container_exit_code"] = term.exit_code
                details["image_id"] = status.image_id
                image_ok = image_id_matches(status.image_id, plan.image_digest())
            details["node_labels"] = self.backend._node_labels(api, pod.spec.node_name)
            tracked = self.pods.get(pod_name)
            if tracked is not None and tracked.follower and tracked.relay:
                tracked.follower.done.wait(10.0)
                tracked.relay.close()
                details["log_tail"] = "\n".join(list(tracked.relay.tail)[-20:])
            taken = self.collection
            if taken is not None and taken.pod == pod_name:
                collection = taken.problems
                details["collection"] = taken.facts
                if exit_code is None:
                    exit_code = taken.acked_exit
            else:
                collection, facts = self.results.from_log(pod_name)
                if facts is not None:
                    details["collection"] = facts
        else:
            collection = ["the Job has no pod to collect from"]
        details["collection_problems"] = collection
        self.backend._expire(api, namespace, self.name)
        if timed_out:
            exit_code = None
        queued: QueueFacts | None = None
        if self.clock is not None:
            queued = self.clock.facts()
            details["queue"] = queued
            # the run's span starts at admission; the wait is counted apart
            started = self.clock.admitted_at or started
        return BackendResult(
            backend=self.backend.name,
            exit_code=exit_code,
            timed_out=timed_out,
            image_digest_confirmed=image_ok,
            runtime=runtime,
            started_at=started,
            finished_at=dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds"),
            duration_s=round(
                time.monotonic() - t0 - (queued["queue_wait_s"] if queued else 0.0), 3
            ),
            queued_at=queued["queued_at"] if queued else None,
            queue_wait_s=queued["queue_wait_s"] if queued else None,
            details=details,
            collection_problems=collection,
        )

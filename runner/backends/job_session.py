"""Following one run's Job: its pods' state and logs, the held results, how it ended.

Used by :class:`runner.backends.kubernetes.KubernetesBackend`, which submits the Job and
owns the cluster-side choices; this module only watches, collects and reports.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kubernetes import client as k8s

from runner.adapters.kube_streams import PodLogFollower, exec_in_pod
from runner.adapters.kube_watch import NamespaceWatch
from runner.adapters.kubernetes import api_call
from runner.adapters.kueue import uncovered_resource, workload_reason
from runner.backends.collect import StreamReceiver, extract_results_frame
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
    ack_exit,
    agent_status,
    condition,
    disruption,
    image_id_matches,
    job_gone,
    pod_problem,
    running,
    started,
    stuck_error,
)
from runner.backends.queueing import QueueClock, is_suspended
from runner.errors import (
    APIForbidden,
    APINotFound,
    EnvironmentMismatch,
    EvalrunError,
    InfrastructureError,
    StillRunning,
    TransientKubernetesError,
)
from runner.model.plan import BackendResult, RunPlan
from runner.shared.protocol import (
    ACK_COMMAND,
    EMIT_COMMAND,
    FRAME_BEGIN,
    FRAME_END,
    NOT_HOLDING_EXIT,
    READY_RE,
)

if TYPE_CHECKING:
    from runner.backends.kubernetes import KubernetesBackend

log = logging.getLogger("evalrun.backend.kubernetes")

# Attempts at one collection (a stream cut half way is retried; a refused one is not).
COLLECT_ATTEMPTS = 3
# How long collection waits out an unreachable API server (a restart) before giving up,
# and the pause between tries; the holding agent keeps its results meanwhile.
COLLECT_UNREACHABLE_S = 180.0
COLLECT_BACKOFF_S = 3.0


@dataclass
class _Tracked:
    """What the runner knows about one pod of the run."""

    follower: PodLogFollower | None = None
    relay: LineRelay | None = None
    ready_exit: int | None = None  # from the agent's ready line
    collected: bool = False
    node_checked: bool = False
    frame_lines: int = 0


@dataclass
class _Collection:
    """The results the runner took from the run's pods (the last pod's win)."""

    pod: str | None = None
    problems: list[str] = field(default_factory=list)
    acked_exit: int | None = None
    facts: dict[str, Any] = field(default_factory=dict)


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
        self.collection = _Collection()
        self.cancel_requested = False
        queue = queue_of(plan, backend.options(self.namespace))
        self.clock = QueueClock(queue) if queue else None
        self.disruptions: dict[str, dict[str, str]] = {}
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
            elif kind == "stuck":
                self._stuck(*obj)
            elif kind == "disrupted":
                self._disrupted(*obj)
            else:
                return self._result(obj, started, t0)

    def _report_queue(self, kind: str, job: Any) -> None:
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

    def _check_node(self, pod: Any) -> None:
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
        log.warning(
            text,
            extra={
                "event": "pod_disrupted",
                "run_id": self.plan.run_id,
                "pod": pod_name,
                "reason": reason,
            },
        )
        if self.backend.output is not None:
            self.backend.output(OutputLine(self.plan.run_id, "evalrun", text))

    def _stuck(self, reason: str, message: str) -> None:
        self.backend._delete(self.api, self.namespace, self.name)
        raise stuck_error(self.name, self.plan, reason, message)

    # ---- collection

    def _collect(self, pod_name: str) -> None:
        """Take the held results of ``pod_name`` (retrying a cut stream), then acknowledge."""
        tracked = self.pods[pod_name]
        with self._lock:
            tracked.collected = True
        t0 = time.monotonic()
        problems: list[str] = []
        facts: dict[str, Any] = {"pod": pod_name, "mode": "exec"}
        unreachable_until = time.monotonic() + COLLECT_UNREACHABLE_S
        attempt = 0
        while attempt < COLLECT_ATTEMPTS:
            attempt += 1
            receiver = StreamReceiver(self.results_dir.parent)
            try:
                ran = exec_in_pod(
                    self.api,
                    self.namespace,
                    pod_name,
                    CONTAINER_NAME,
                    list(EMIT_COMMAND),
                    stdout=receiver.feed,
                )
            except TransientKubernetesError as exc:
                receiver.discard()
                problems = [f"collection attempt {attempt}: {exc.message}"]
                log.warning(
                    "results stream broke; retrying",
                    extra={"event": "collect_retry", "pod": pod_name, "error": exc.message},
                )
                if time.monotonic() < unreachable_until:
                    # an API server away (e.g. restarting) is not a cut stream: wait it out
                    attempt -= 1
                    time.sleep(COLLECT_BACKOFF_S)
                continue
            except APINotFound:
                receiver.discard()
                problems = [f"pod {pod_name} disappeared before its results were collected"]
                break
            except APIForbidden as exc:
                receiver.discard()
                raise InfrastructureError(
                    f"the runner may not exec into pod {pod_name}: {exc.message}",
                    hint="the runner's Role needs pods/exec (create, get): install the evalrun "
                    "chart (charts/evalrun) or manifests/evalrun.yaml",
                ) from exc
            facts["attempts"] = attempt
            if ran.exit_code == NOT_HOLDING_EXIT:
                receiver.discard()
                problems = [f"pod {pod_name}: the agent no longer holds its results"]
                break
            if ran.exit_code != 0:
                receiver.discard()
                problems = [
                    f"emit-results in pod {pod_name} failed ({ran.message or ran.exit_code}): "
                    + ran.stderr.strip()[-300:]
                ]
                break
            collected = receiver.unpack(self.results_dir)
            facts.update(bytes=ran.stdout_bytes, files=len(collected.files))
            problems = collected.problems
            if problems and "truncated" in problems[0] and attempt < COLLECT_ATTEMPTS:
                continue
            break
        facts["duration_s"] = round(time.monotonic() - t0, 3)
        released, acked = self._ack(pod_name)
        facts["acknowledged"] = released
        self.collection = _Collection(pod_name, problems, acked, facts)
        log.info(
            "results collected",
            extra={"event": "results_collected_exec", "run_id": self.plan.run_id, **facts},
        )

    def _ack(self, pod_name: str) -> tuple[bool, int | None]:
        """Release the holding agent: (released, the exit code it answered, if it did).

        The agent exits right after answering, so the exec's own status may be lost with
        its container; an agent container that has ended after an ack counts as released.
        """
        answer = bytearray()
        for _ in range(COLLECT_ATTEMPTS):
            answer.clear()
            try:
                ran = exec_in_pod(
                    self.api,
                    self.namespace,
                    pod_name,
                    CONTAINER_NAME,
                    list(ACK_COMMAND),
                    stdout=answer.extend,
                    idle_timeout_s=30.0,
                )
            except TransientKubernetesError:
                if self._agent_ended(pod_name):
                    return True, ack_exit(answer)
                continue
            except EvalrunError:
                return self._agent_ended(pod_name), ack_exit(answer)
            code = ack_exit(answer)
            if ran.exit_code == 0 and code is not None:
                return True, code
            return self._agent_ended(pod_name), code
        return self._agent_ended(pod_name), None

    def _agent_ended(self, pod_name: str, timeout_s: float = 30.0) -> bool:
        """Whether the pod's agent container stops running (or the pod goes) within a while."""

        def ended() -> bool:
            pod = self.watch.pods.objects.get(pod_name)
            return pod is None or not running(pod)

        return bool(self.watch.wait(ended, timeout=timeout_s))

    # ---- the end

    def _result(self, job: Any, started: str, t0: float) -> BackendResult:
        api, namespace, plan = self.api, self.namespace, self.plan
        failed = condition(job, "Failed")
        pods = self.watch.pods_of(plan.run_id)
        pod = next(
            (p for p in reversed(pods) if p.status.phase in ("Succeeded", "Failed")),
            pods[-1] if pods else None,
        )
        details: dict[str, Any] = {
            "job": self.name,
            "namespace": namespace,
            "job_condition": (failed.reason if failed else "Complete"),
            "pods": [p.metadata.name for p in pods],
            "job_failed_pods": job.status.failed or 0,
            "job_succeeded_pods": job.status.succeeded or 0,
            "active_deadline_s": job.spec.active_deadline_seconds,
            "disruptions": list(self.disruptions.values()),
        }
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
            if self.collection.pod == pod_name:
                collection = self.collection.problems
                details["collection"] = self.collection.facts
                if exit_code is None:
                    exit_code = self.collection.acked_exit
            else:
                collection = self._from_log(pod_name, details)
        else:
            collection = ["the Job has no pod to collect from"]
        details["collection_problems"] = collection
        self.backend._expire(api, namespace, self.name)
        if timed_out:
            exit_code = None
        queued: dict[str, Any] = {}
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
            duration_s=round(time.monotonic() - t0 - queued.get("queue_wait_s", 0.0), 3),
            queued_at=queued.get("queued_at"),
            queue_wait_s=queued.get("queue_wait_s"),
            details=details,
            collection_problems=collection,
        )

    def _from_log(self, pod_name: str, details: dict[str, Any]) -> list[str]:
        """Results of a pod that was not collected by exec: an older agent's log frame."""
        try:
            text = api_call(
                "read pod log",
                lambda: k8s.CoreV1Api(self.api).read_namespaced_pod_log(
                    pod_name, self.namespace, container=CONTAINER_NAME
                ),
                namespace=self.namespace,
                name=pod_name,
            )
            self.backend.requests += 1
        except EvalrunError as exc:
            return [f"could not read the pod log: {exc.message}"]
        if FRAME_BEGIN not in text:
            return [
                f"the results of pod {pod_name} were not collected: the agent ended without "
                f"holding them (crashed, killed, or its hold of {self.backend.hold_s} s expired)"
            ]
        details["collection"] = {"pod": pod_name, "mode": "log-frame"}
        return extract_results_frame(text, self.results_dir).problems

"""Kubernetes backend: one sandboxed Job per run, watched, collected without trust.

Submission is idempotent (the Job and ConfigMap names derive from the run id; a
409 attaches after comparing the spec-hash label). The Job is created suspended,
then its ConfigMap (the plan, nothing else) owned by the Job, then the Job is
resumed: no pod starts without its plan, and the ConfigMap goes with the Job.
Inputs arrive as read-only image volumes pulled by digest by the node (no network,
no credentials in the pod); a cluster that cannot mount them is refused (exit 4).

One shared watch per namespace follows every evalrun Job and Pod (see
runner.adapters.kubernetes, which also translates every API error). The pod's log
is followed live (each line to the caller's sink and the JSON-lines log). When the
agent has finished it holds the pod and prints a ready line; the runner then
execs ``emit-results`` through the API server, checks the stream and every tar
member before anything is unpacked (runner.backends.collect), and execs ``ack``;
the agent exits with its real exit code. A runner that re-attaches (same run id,
same Job) collects from the holding pod. The signing key never enters the cluster.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kubernetes import client as k8s

from runner.adapters.kubernetes import (
    ClusterTarget,
    NamespaceWatch,
    PodLogFollower,
    api_call,
    as_plain,
    connect,
    exec_in_pod,
    read_namespace_policy,
)
from runner.adapters.kubernetes import shared_watch as watch_matching
from runner.adapters.kueue import workload_reason
from runner.backends.collect import StreamReceiver, extract_results_frame
from runner.backends.live import LineRelay, OutputLine, OutputSink
from runner.backends.manifests import (
    CONTAINER_NAME,
    IMAGE_VOLUME_REQUIREMENT,
    LABEL_RUN_ID,
    MANAGED_BY,
    RESUME_PATCH,
    JobOptions,
    active_deadline_s,
    build_configmap,
    build_job,
    dropped_image_volumes,
    image_volume_support,
    input_volumes,
    labels_for,
    queue_of,
    spec_hash_of,
    ttl_patch,
)
from runner.backends.namespace_policy import (
    NamespaceObjects,
    NamespacePolicy,
    check_namespace,
    runtime_class_of,
)
from runner.backends.queueing import QueueClock, is_suspended
from runner.errors import (
    APIConflict,
    APIForbidden,
    APINotFound,
    DigestMismatch,
    EnvironmentMismatch,
    EvalrunError,
    InfrastructureError,
    InputError,
    KubernetesRejected,
    TransientKubernetesError,
)
from runner.model.plan import BackendResult, RunPlan
from runner.shared.protocol import (
    ACK_COMMAND,
    ACK_RE,
    DEFAULT_HOLD_S,
    EMIT_COMMAND,
    FRAME_BEGIN,
    FRAME_END,
    NOT_HOLDING_EXIT,
    READY_RE,
    encode_agent_plan,
)

log = logging.getLogger("evalrun.backend.kubernetes")

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
# Attempts at one collection (a stream cut half way is retried; a refused one is not).
COLLECT_ATTEMPTS = 3
# How long collection waits out an unreachable API server (a restart) before giving up,
# and the pause between tries; the holding agent keeps its results meanwhile.
COLLECT_UNREACHABLE_S = 180.0
COLLECT_BACKOFF_S = 3.0


def shared_watch(api: k8s.ApiClient, namespace: str) -> NamespaceWatch:
    """The process-wide watch of evalrun's Jobs and Pods in ``namespace`` (started on first use)."""
    return watch_matching(
        api,
        namespace,
        selector=f"app.kubernetes.io/managed-by={MANAGED_BY}",
        run_label=LABEL_RUN_ID,
    )


# --------------------------------------------------------------------------- backend


def _condition(obj: Any, ctype: str) -> Any:
    for c in (obj.status.conditions or []) if obj and obj.status else []:
        if c.type == ctype and c.status == "True":
            return c
    return None


def _pod_problem(pod: Any, now: float, grace: dict[str, float]) -> tuple[str, str] | None:
    """A named reason why a pod cannot make progress, once it has lasted its grace time."""
    created = (
        pod.metadata.creation_timestamp.timestamp() if pod.metadata.creation_timestamp else now
    )
    age = now - created
    for c in pod.status.conditions or []:
        if (
            c.type == "PodScheduled"
            and c.status == "False"
            and c.reason == "Unschedulable"
            and age > grace["unschedulable"]
        ):
            return "Unschedulable", c.message or "no node matches"
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
    if pod.status.reason == "Evicted":
        return "Evicted", pod.status.message or "evicted"
    return None


def _agent_status(pod: Any) -> Any:
    return next((c for c in pod.status.container_statuses or [] if c.name == CONTAINER_NAME), None)


def _started(pod: Any) -> bool:
    status = _agent_status(pod)
    state = status.state if status is not None else None
    return bool(state and (state.running or state.terminated))


def _running(pod: Any) -> bool:
    status = _agent_status(pod)
    return bool(status is not None and status.state and status.state.running)


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


class KubernetesBackend:
    """Runs a :class:`RunPlan` as a Job in a namespace."""

    name = "kubernetes"

    def __init__(
        self,
        target: ClusterTarget,
        *,
        unschedulable_grace_s: float = 60.0,
        image_pull_grace_s: float = 60.0,
        extra_tolerations: tuple[tuple[str, str], ...] = (),
        hold_s: int = DEFAULT_HOLD_S,
        ttl_after_finished_s: int = 600,
        image_pull_secrets: tuple[str, ...] = (),
        priority_class: str | None = None,
        queue: str | None = None,
        output: OutputSink | None = None,
    ) -> None:
        self.target = target
        self.extra_tolerations = extra_tolerations
        self.image_pull_secrets = image_pull_secrets
        self.priority_class = priority_class
        self.queue = queue
        self.hold_s = hold_s
        self.ttl_after_finished_s = ttl_after_finished_s
        self.output = output
        self._api: k8s.ApiClient | None = None
        self._namespace: str | None = None
        self.grace = {"unschedulable": unschedulable_grace_s, "image_pull": image_pull_grace_s}
        self.requests = 0
        self._nodes: dict[str, Any] = {}
        self._policy: NamespacePolicy | None = None

    def _connect(self) -> tuple[k8s.ApiClient, str]:
        if self._api is None or self._namespace is None:
            self._api, self._namespace = connect(self.target)
        return self._api, self._namespace

    @property
    def namespace(self) -> str:
        return self._connect()[1]

    def options(self, namespace: str) -> JobOptions:
        """The cluster-side choices this backend makes for every Job."""
        return JobOptions(
            namespace=namespace,
            ttl_after_finished_s=self.ttl_after_finished_s,
            extra_tolerations=self.extra_tolerations,
            hold_s=self.hold_s,
            image_pull_secrets=self.image_pull_secrets,
            priority_class=self.priority_class,
            queue=self.queue,
        )

    def preflight(self, plan: RunPlan) -> None:
        input_volumes(plan)  # every input must be published by digest (exit 2 naming it)
        api, namespace = self._connect()
        # the namespace must enforce the sandbox policy, the RuntimeClass included (exit 4
        # naming what it lacks); what was observed, not what the spec says, goes into the
        # bundle
        self._policy = namespace_policy(api, namespace, plan).enforce()

    def submit(self, plan: RunPlan, options: JobOptions | None = None) -> str:
        """Create (or attach to) the Job and ConfigMap of ``plan``; returns the Job name.

        Order: the Job, suspended; its ConfigMap, owned by it; the Job resumed. A Job whose
        stored template lost its image volumes (the API server lacks the ImageVolume
        feature) is deleted and refused with exit 4.
        """
        api, namespace = self._connect()
        options = options or self.options(namespace)
        plan_json = encode_agent_plan(plan.agent_plan(emit_results=True, hold_s=options.hold_s))
        job = build_job(plan, options)
        name = str(job["metadata"]["name"])
        core, batch = k8s.CoreV1Api(api), k8s.BatchV1Api(api)
        try:
            stored = self._create_or_attach(
                "Job",
                namespace,
                job,
                lambda: batch.create_namespaced_job(namespace, job),
                lambda: batch.read_namespaced_job(name, namespace),
            )
        except KubernetesRejected as exc:
            if plan.inputs and re.search(r"volumes\[\d+\]", exc.message):
                raise EnvironmentMismatch(
                    f"the API server refused the Job's input volumes: {exc.message}",
                    expected=IMAGE_VOLUME_REQUIREMENT,
                    hint="enable the ImageVolume feature gate (kube-apiserver and kubelet); "
                    "evalrun never falls back to shipping inputs another way",
                ) from exc
            raise
        dropped = dropped_image_volumes(stored)
        if dropped:
            self._delete(api, namespace, name)
            raise EnvironmentMismatch(
                f"the API server dropped the Job's image volumes {dropped}: it does not "
                "support image volumes",
                expected=IMAGE_VOLUME_REQUIREMENT,
                hint="enable the ImageVolume feature gate (kube-apiserver and kubelet); "
                "evalrun never falls back to shipping inputs another way",
            )
        uid = str(stored["metadata"]["uid"])
        configmap = build_configmap(plan, plan_json, options, job_uid=uid)
        self._ensure_configmap(core, namespace, configmap, uid)
        # a queued Job is Kueue's to resume (on admission); evalrun never does it itself
        if (stored.get("spec") or {}).get("suspend") and not queue_of(plan, options):
            api_call(
                "resume Job",
                lambda: batch.patch_namespaced_job(name, namespace, RESUME_PATCH),
                namespace=namespace,
                name=name,
            )
            self.requests += 1
        return name

    def _ensure_configmap(
        self, core: k8s.CoreV1Api, namespace: str, body: dict[str, Any], uid: str
    ) -> None:
        """Create the ConfigMap; one left by an earlier Job of the same name is replaced."""
        name = body["metadata"]["name"]
        existing = self._create_or_attach(
            "ConfigMap",
            namespace,
            body,
            lambda: core.create_namespaced_config_map(namespace, body),
            lambda: core.read_namespaced_config_map(name, namespace),
        )
        owners = {
            o.get("uid") for o in (existing.get("metadata") or {}).get("ownerReferences") or []
        }
        if uid in owners:
            return
        # Owned by a Job that is gone (or by none): the garbage collector would take it away.
        api_call(
            "replace stale ConfigMap",
            lambda: core.delete_namespaced_config_map(name, namespace),
            namespace=namespace,
            name=name,
        )
        api_call(
            "create ConfigMap",
            lambda: core.create_namespaced_config_map(namespace, body),
            namespace=namespace,
            name=name,
        )
        self.requests += 2

    def _create_or_attach(
        self,
        kind: str,
        namespace: str,
        body: dict[str, Any],
        create: Callable[[], Any],
        read: Callable[[], Any],
    ) -> dict[str, Any]:
        """The object as stored: created now, or the existing one for the same spec."""
        name = body["metadata"]["name"]
        try:
            created = api_call(f"create {kind} {name}", create, namespace=namespace, name=name)
            self.requests += 1
            return dict(as_plain(created))
        except (APIConflict, APIForbidden) as exc:
            self.requests += 1
            try:
                existing = api_call(f"read {kind} {name}", read, namespace=namespace, name=name)
                self.requests += 1
            except APINotFound:
                # Nothing to attach to: the create's refusal is the error to report.
                raise exc from exc.__cause__
        existing_dict = dict(as_plain(existing))
        if spec_hash_of(existing_dict) != spec_hash_of(body):
            raise InputError(
                f"{kind} {name} already exists for a different spec",
                expected=spec_hash_of(body),
                found=spec_hash_of(existing_dict),
                hint="a run id names exactly one locked spec; delete the stale object",
            )
        log.info(
            "attached to existing object",
            extra={"event": "k8s_attach", "kind": kind, "object": name},
        )
        return existing_dict

    def run(self, plan: RunPlan, results_dir: Path) -> BackendResult:
        api, namespace = self._connect()
        results_dir.mkdir(parents=True, exist_ok=True)
        started = dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds")
        t0 = time.monotonic()
        name = self.submit(plan)
        watch = shared_watch(api, namespace)
        session = _RunSession(self, api, watch, plan, name, results_dir)
        try:
            result = session.follow(started, t0)
            return self._policy.observed(result) if self._policy else result
        except KeyboardInterrupt:
            self._delete(api, namespace, name)
            return BackendResult(
                backend=self.name,
                exit_code=None,
                interrupted=True,
                image_digest_confirmed=False,
                runtime="?",
                started_at=started,
                duration_s=round(time.monotonic() - t0, 3),
            )
        finally:
            session.close()

    def _delete(self, api: k8s.ApiClient, namespace: str, name: str) -> None:
        with contextlib.suppress(EvalrunError):
            api_call(
                "delete Job",
                lambda: k8s.BatchV1Api(api).delete_namespaced_job(
                    name, namespace, propagation_policy="Background"
                ),
                namespace=namespace,
                name=name,
                retries=False,
            )

    def node(self, api: k8s.ApiClient, node: str | None) -> Any:
        """The Node object (cached), or a string saying why it could not be read."""
        if not node:
            return None
        if node not in self._nodes:
            try:
                self._nodes[node] = api_call(
                    "read node",
                    lambda: k8s.CoreV1Api(api).read_node(node),
                    name=node,
                    retries=False,
                )
                self.requests += 1
            except EvalrunError as exc:
                return f"unavailable: {exc.message}"
        return self._nodes[node]

    def _node_labels(self, api: k8s.ApiClient, node: str | None) -> dict[str, str] | str:
        obj = self.node(api, node)
        if obj is None:
            return {}
        if isinstance(obj, str):
            return obj
        return dict(obj.metadata.labels or {})

    def _expire(self, api: k8s.ApiClient, namespace: str, name: str) -> None:
        """After collection: the TTL option starts counting for the finished Job."""
        body = ttl_patch(self.options(namespace))
        with contextlib.suppress(EvalrunError):
            api_call(
                "set Job TTL",
                lambda: k8s.BatchV1Api(api).patch_namespaced_job(name, namespace, body),
                namespace=namespace,
                name=name,
                retries=False,
            )
            self.requests += 1


class _RunSession:
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
        self._lock = threading.Lock()
        queue = queue_of(plan, backend.options(self.namespace))
        self.clock = QueueClock(queue) if queue else None

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
            return bool(pod is not None and _running(pod))

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
            if is_suspended(job) and not (_condition(job, "Complete") or _condition(job, "Failed")):
                if clock.suspended() or clock.due_for_reason():
                    return ("queued", job)
                return None
            if clock.waiting:
                clock.admitted()
                return ("admitted", job)
        for pod in self.watch.pods_of(self.plan.run_id):
            pod_name = pod.metadata.name
            tracked = self.pods.setdefault(pod_name, _Tracked())
            with self._lock:
                ready = tracked.ready_exit is not None and not tracked.collected
            if ready:
                return ("ready", pod)
            if pod.spec.node_name and not tracked.node_checked:
                return ("scheduled", pod)
            if tracked.follower is None and _started(pod):
                return ("follow", pod)
            problem = _pod_problem(pod, time.time(), self.backend.grace)
            if problem:
                return ("stuck", problem)
        if _condition(job, "Complete") or _condition(job, "Failed"):
            return ("done", job)
        return None

    def follow(self, started: str, t0: float) -> BackendResult:
        options = self.backend.options(self.namespace)
        limit = active_deadline_s(self.plan, options) + 600
        deadline = time.monotonic() + limit
        while True:
            outcome = self.watch.wait(self._next, timeout=max(0.0, deadline - time.monotonic()))
            if outcome is None:
                self.backend._delete(self.api, self.namespace, self.name)
                raise InfrastructureError(f"Job {self.name} did not finish within {limit} s")
            kind, obj = outcome
            if kind in ("queued", "admitted"):
                # the run's own deadline starts at admission, as the Job's does
                deadline = time.monotonic() + limit
                self._report_queue(kind, obj)
            elif kind == "scheduled":
                self._check_node(obj)
            elif kind == "follow":
                self._follow_log(obj.metadata.name)
            elif kind == "ready":
                self._collect(obj.metadata.name)
            elif kind == "stuck":
                self._stuck(*obj)
            else:
                return self._result(obj, started, t0)

    def _report_queue(self, kind: str, job: Any) -> None:
        clock = self.clock
        assert clock is not None
        if kind == "queued":
            reason = workload_reason(self.api, self.namespace, job.metadata.uid, clock.queue)
            clock.reason = reason or clock.reason
            text = f"queued in {clock.queue}" + (f": {reason}" if reason else "")
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

    def _stuck(self, reason: str, message: str) -> None:
        self.backend._delete(self.api, self.namespace, self.name)
        plan = self.plan
        if reason == "Unschedulable":
            raise EnvironmentMismatch(
                f"Job {self.name} is Unschedulable: {message}",
                gpu_product=plan.gpu_product,
                gpus=plan.gpus or None,
                hint="no node offers what the spec asks for (resources, GPU product label, "
                "taints); check `kubectl describe nodes`",
            )
        if reason == "ImageVolumeUnsupported":
            raise EnvironmentMismatch(
                f"Job {self.name}: the node cannot mount image volumes: {message}",
                expected=IMAGE_VOLUME_REQUIREMENT,
                hint="evalrun never falls back to shipping inputs another way",
            )
        if reason == "DigestMismatch":
            match = _PULL_DIGEST.search(message)
            assert match is not None
            raise DigestMismatch(
                f"Job {self.name}: a pulled blob (image or input artifact)",
                expected=match[2],
                found=match[1],
                hint="the registry serves bytes that are not the locked ones; re-publish "
                "the input or investigate the registry",
            )
        raise InfrastructureError(f"Job {self.name}: {reason}: {message}", image=plan.image_ref)

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
                    return True, _ack_exit(answer)
                continue
            except EvalrunError:
                return self._agent_ended(pod_name), _ack_exit(answer)
            code = _ack_exit(answer)
            if ran.exit_code == 0 and code is not None:
                return True, code
            return self._agent_ended(pod_name), code
        return self._agent_ended(pod_name), None

    def _agent_ended(self, pod_name: str, timeout_s: float = 30.0) -> bool:
        """Whether the pod's agent container stops running (or the pod goes) within a while."""

        def ended() -> bool:
            pod = self.watch.pods.objects.get(pod_name)
            return pod is None or not _running(pod)

        return bool(self.watch.wait(ended, timeout=timeout_s))

    # ---- the end

    def _result(self, job: Any, started: str, t0: float) -> BackendResult:
        api, namespace, plan = self.api, self.namespace, self.plan
        failed = _condition(job, "Failed")
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
        }
        exit_code: int | None = None
        image_ok = False
        runtime = job.spec.template.spec.runtime_class_name or "runc (cluster default)"
        timed_out = bool(failed and failed.reason == "DeadlineExceeded")
        collection: list[str] = []
        if pod is not None:
            pod_name = pod.metadata.name
            details["pod"] = pod_name
            details["node"] = pod.spec.node_name
            status = _agent_status(pod)
            if status is not None:
                term = status.state.terminated if status.state else None
                if term is not None:
                    exit_code = term.exit_code
                    details["termination_reason"] = term.reason
                details["image_id"] = status.image_id
                image_ok = _image_id_matches(status.image_id, plan.image_digest())
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


def _ack_exit(answer: bytes | bytearray) -> int | None:
    match = ACK_RE.match(bytes(answer).decode("ascii", "replace").strip())
    return int(match[1]) if match else None


def namespace_policy(api: k8s.ApiClient, namespace: str, plan: RunPlan) -> NamespacePolicy:
    """What ``namespace`` enforces for ``plan``'s pods, read now (see backends.namespace_policy)."""
    runtime_class = runtime_class_of(plan)
    read = read_namespace_policy(api, namespace, runtime_class)
    objects = NamespaceObjects(
        namespace=namespace,
        namespace_object=read.namespace,
        network_policies=read.network_policies,
        runtime_class=runtime_class,
        runtime_class_found=read.runtime_class_found,
        unreadable=read.unreadable,
    )
    return check_namespace(objects, pod_labels=labels_for(plan), network=plan.network)


def _image_id_matches(image_id: str | None, digest: str) -> bool:
    """The pod's imageID names the pinned manifest digest (``…@sha256:…``)."""
    if not image_id:
        return False
    return image_id.rsplit("@", 1)[-1] == digest or image_id == digest


# ClusterTarget is part of this backend's interface (callers build one to construct it).
__all__ = ["ClusterTarget", "KubernetesBackend", "NamespaceWatch", "shared_watch"]

"""Kubernetes backend: one sandboxed Job per run, watched, collected without trust.

Submission is idempotent (the Job and ConfigMap names derive from the run id; a
409 attaches after comparing the spec-hash label). One shared watch per
namespace follows every evalrun Job and Pod (resourceVersion bookkeeping, 410 →
re-list, reconnects across API server restarts; see runner.adapters.kubernetes,
which also translates every API error). Waits are bounded and end with a named
reason. The objects are built by the pure runner.backends.manifests. Results
leave the pod as a framed, checksummed tar on the log stream; the runner checks
and unpacks it. The signing key never enters the cluster.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kubernetes import client as k8s

from runner.adapters.kubernetes import (
    ClusterTarget,
    NamespaceWatch,
    api_call,
    as_plain,
    connect,
    read_namespace_policy,
)
from runner.adapters.kubernetes import shared_watch as watch_matching
from runner.backends.collect import extract_results_frame
from runner.backends.manifests import (
    CONTAINER_NAME,
    LABEL_RUN_ID,
    MANAGED_BY,
    JobOptions,
    build_configmap,
    build_job,
    labels_for,
    spec_hash_of,
)
from runner.backends.namespace_policy import (
    NamespaceObjects,
    NamespacePolicy,
    check_namespace,
    runtime_class_of,
)
from runner.errors import (
    APIConflict,
    APIForbidden,
    APINotFound,
    EnvironmentMismatch,
    EvalrunError,
    InfrastructureError,
    InputError,
)
from runner.model.plan import BackendResult, RunPlan

log = logging.getLogger("evalrun.backend.kubernetes")

PULL_FAILURES = {"ImagePullBackOff", "ErrImagePull", "InvalidImageName", "ErrImageNeverPull"}
CONFIG_FAILURES = {"CreateContainerConfigError", "CreateContainerError", "RunContainerError"}


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
        if waiting and waiting.reason in PULL_FAILURES and age > grace["image_pull"]:
            return waiting.reason, waiting.message or cs.image
        if waiting and waiting.reason in CONFIG_FAILURES and age > grace["image_pull"]:
            return waiting.reason, waiting.message or ""
    if pod.status.reason == "Evicted":
        return "Evicted", pod.status.message or "evicted"
    return None


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
    ) -> None:
        self.target = target
        self.extra_tolerations = extra_tolerations
        self._api: k8s.ApiClient | None = None
        self._namespace: str | None = None
        self.grace = {"unschedulable": unschedulable_grace_s, "image_pull": image_pull_grace_s}
        self.requests = 0
        self._policy: NamespacePolicy | None = None

    def _connect(self) -> tuple[k8s.ApiClient, str]:
        if self._api is None or self._namespace is None:
            self._api, self._namespace = connect(self.target)
        return self._api, self._namespace

    @property
    def namespace(self) -> str:
        return self._connect()[1]

    def preflight(self, plan: RunPlan) -> None:
        api, namespace = self._connect()
        # the namespace must enforce the sandbox policy (exit 4 naming what it lacks); what
        # was observed, not what the spec says, goes into the bundle
        self._policy = namespace_policy(api, namespace, plan).enforce()

    def submit(self, plan: RunPlan, options: JobOptions | None = None) -> str:
        """Create (or attach to) the ConfigMap and Job of ``plan``; returns the Job name."""
        api, namespace = self._connect()
        options = options or JobOptions(
            namespace=namespace, extra_tolerations=self.extra_tolerations
        )
        inputs = {i.name: i.host_path.read_bytes() for i in plan.inputs}
        plan_json = (
            json.dumps(plan.agent_plan(emit_results=True), indent=2, sort_keys=True) + "\n"
        ).encode()
        configmap = build_configmap(plan, plan_json, inputs, options)
        job = build_job(plan, options)
        core, batch = k8s.CoreV1Api(api), k8s.BatchV1Api(api)
        self._create_or_attach(
            "ConfigMap",
            namespace,
            configmap,
            lambda: core.create_namespaced_config_map(namespace, configmap),
            lambda: core.read_namespaced_config_map(configmap["metadata"]["name"], namespace),
        )
        self._create_or_attach(
            "Job",
            namespace,
            job,
            lambda: batch.create_namespaced_job(namespace, job),
            lambda: batch.read_namespaced_job(job["metadata"]["name"], namespace),
        )
        return str(job["metadata"]["name"])

    def _create_or_attach(
        self,
        kind: str,
        namespace: str,
        body: dict[str, Any],
        create: Callable[[], Any],
        read: Callable[[], Any],
    ) -> None:
        name = body["metadata"]["name"]
        try:
            api_call(f"create {kind} {name}", create, namespace=namespace, name=name)
            self.requests += 1
            return
        except (APIConflict, APIForbidden) as exc:
            self.requests += 1
            try:
                existing = api_call(f"read {kind} {name}", read, namespace=namespace, name=name)
                self.requests += 1
            except APINotFound:
                # Nothing to attach to: the create's refusal is the error to report.
                raise exc from exc.__cause__
        existing_dict = as_plain(existing)
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

    def run(self, plan: RunPlan, results_dir: Path) -> BackendResult:
        api, namespace = self._connect()
        results_dir.mkdir(parents=True, exist_ok=True)
        started = dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds")
        t0 = time.monotonic()
        name = self.submit(plan)
        watch = shared_watch(api, namespace)
        try:
            result = self._follow(api, watch, plan, name, results_dir, started, t0)
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

    def _follow(
        self,
        api: k8s.ApiClient,
        watch: NamespaceWatch,
        plan: RunPlan,
        name: str,
        results_dir: Path,
        started: str,
        t0: float,
    ) -> BackendResult:
        namespace = watch.namespace
        limit = plan.timeout_s + 600

        def finished_or_stuck() -> Any:
            job = watch.job(name)
            if _condition(job, "Complete") or _condition(job, "Failed"):
                return ("done", job)
            for pod in watch.pods_of(plan.run_id):
                problem = _pod_problem(pod, time.time(), self.grace)
                if problem:
                    return ("stuck", problem)
            return None

        outcome = watch.wait(finished_or_stuck, timeout=limit)
        if outcome is None:
            self._delete(api, namespace, name)
            raise InfrastructureError(f"Job {name} did not finish within {limit} s")
        if outcome[0] == "stuck":
            reason, message = outcome[1]
            self._delete(api, namespace, name)
            if reason == "Unschedulable":
                raise EnvironmentMismatch(
                    f"Job {name} is Unschedulable: {message}",
                    gpu_product=plan.gpu_product,
                    gpus=plan.gpus or None,
                    hint="no node offers what the spec asks for (resources, GPU product label, "
                    "taints); check `kubectl describe nodes`",
                )
            raise InfrastructureError(f"Job {name}: {reason}: {message}", image=plan.image_ref)
        job = outcome[1]
        failed = _condition(job, "Failed")
        pods = watch.pods_of(plan.run_id)
        pod = next(
            (p for p in reversed(pods) if p.status.phase in ("Succeeded", "Failed")),
            pods[-1] if pods else None,
        )
        details: dict[str, Any] = {
            "job": name,
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
            details["pod"] = pod.metadata.name
            details["node"] = pod.spec.node_name
            status = next(
                (c for c in pod.status.container_statuses or [] if c.name == CONTAINER_NAME), None
            )
            if status is not None:
                term = status.state.terminated if status.state else None
                if term is not None:
                    exit_code = term.exit_code
                    details["termination_reason"] = term.reason
                details["image_id"] = status.image_id
                image_ok = _image_id_matches(status.image_id, plan.image_digest())
            details["node_labels"] = self._node_labels(api, pod.spec.node_name)
            try:
                text = api_call(
                    "read pod log",
                    lambda: k8s.CoreV1Api(api).read_namespaced_pod_log(
                        pod.metadata.name, namespace, container=CONTAINER_NAME
                    ),
                    namespace=namespace,
                    name=pod.metadata.name,
                )
                self.requests += 1
                collected = extract_results_frame(text, results_dir)
                collection = collected.problems
                details["log_tail"] = "\n".join(
                    line for line in text.splitlines()[-20:] if not line.startswith(("-----", " "))
                )
            except EvalrunError as exc:
                collection = [f"could not read the pod log: {exc.message}"]
        else:
            collection = ["the Job has no pod to collect from"]
        details["collection_problems"] = collection
        self._expire(api, namespace, name)
        if timed_out:
            exit_code = None
        return BackendResult(
            backend=self.name,
            exit_code=exit_code,
            timed_out=timed_out,
            image_digest_confirmed=image_ok,
            runtime=runtime,
            started_at=started,
            finished_at=dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds"),
            duration_s=round(time.monotonic() - t0, 3),
            details=details,
            collection_problems=collection,
        )

    def _node_labels(self, api: k8s.ApiClient, node: str | None) -> dict[str, str] | str:
        if not node:
            return {}
        try:
            obj = api_call(
                "read node", lambda: k8s.CoreV1Api(api).read_node(node), name=node, retries=False
            )
            self.requests += 1
            return dict(obj.metadata.labels or {})
        except EvalrunError as exc:
            return f"unavailable: {exc.message}"

    def _expire(self, api: k8s.ApiClient, namespace: str, name: str) -> None:
        """After collection: let the TTL controller remove the finished Job."""
        body = {"spec": {"ttlSecondsAfterFinished": 300}}
        with contextlib.suppress(EvalrunError):
            api_call(
                "set Job TTL",
                lambda: k8s.BatchV1Api(api).patch_namespaced_job(name, namespace, body),
                namespace=namespace,
                name=name,
                retries=False,
            )
            self.requests += 1


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

"""Kubernetes backend: one sandboxed Job per run, watched, collected without trust.

Submission is idempotent (the Job and ConfigMap names derive from the run id; a
409 attaches after comparing the spec-hash label). A plan of up to 128 KiB is in
the Job itself (a pod-template annotation the agent reads through a downward API
volume): one request per run. A larger one goes into a ConfigMap: the Job is
created suspended, then its ConfigMap (the plan, nothing else) owned by the Job,
then the Job is resumed: no pod starts without its plan, and the ConfigMap goes
with the Job.
Inputs arrive as read-only image volumes pulled by digest by the node (no network,
no credentials in the pod); a cluster that cannot mount them is refused (exit 4).

One shared watch per namespace follows every evalrun Job and Pod (see
runner.adapters.kube_watch; runner.adapters.kubernetes translates every API error). The pod's log
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
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kubernetes import client as k8s

from runner._internal.foreign import KubeModel, KubeObject
from runner.adapters.kube_watch import NamespaceWatch
from runner.adapters.kube_watch import shared_watch as watch_matching
from runner.adapters.kubernetes import (
    ClusterTarget,
    api_call,
    as_plain,
    connect,
    read_namespace_policy,
)
from runner.backends.job_session import RunSession
from runner.backends.live import OutputSink
from runner.backends.manifests import (
    ANNOTATION_PLAN_SHA256,
    IMAGE_VOLUME_REQUIREMENT,
    LABEL_RUN_ID,
    MANAGED_BY,
    RESUME_PATCH,
    JobOptions,
    agent_plan_json,
    build_configmap,
    build_job,
    dropped_image_volumes,
    input_volumes,
    job_name,
    labels_for,
    plan_in_configmap,
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
from runner.backends.pod_states import job_gone
from runner.errors import (
    APIConflict,
    APIForbidden,
    APINotFound,
    EnvironmentMismatch,
    EvalrunError,
    InfrastructureError,
    InputError,
    KubernetesRejected,
)
from runner.model.plan import BackendResult, RunPlan
from runner.shared.agent_plan import DEFAULT_HOLD_S

log = logging.getLogger("evalrun.backend.kubernetes")


def shared_watch(api: k8s.ApiClient, namespace: str) -> NamespaceWatch:
    """The process-wide watch of evalrun's Jobs and Pods in ``namespace`` (started on first use)."""
    return watch_matching(
        api,
        namespace,
        selector=f"app.kubernetes.io/managed-by={MANAGED_BY}",
        run_label=LABEL_RUN_ID,
    )


# --------------------------------------------------------------------------- backend


# --------------------------------------------------------------------------- backend


class KubernetesBackend:
    """Runs a :class:`RunPlan` as a Job in a namespace."""

    name = "kubernetes"
    pulls_inputs = True

    def __init__(
        self,
        target: ClusterTarget,
        *,
        unschedulable_grace_s: float = 60.0,
        image_pull_grace_s: float = 60.0,
        extra_tolerations: tuple[tuple[str, str], ...] = (),
        hold_s: int = DEFAULT_HOLD_S,
        ttl_after_finished_s: int = 600,
        active_deadline_s: int | None = None,
        image_pull_secrets: tuple[str, ...] = (),
        priority_class: str | None = None,
        queue: str | None = None,
        output: OutputSink | None = None,
    ) -> None:
        self.target = target
        self.active_deadline_s = active_deadline_s
        self.image_pull_secrets = image_pull_secrets
        self.priority_class = priority_class
        self.queue = queue
        self.extra_tolerations = extra_tolerations
        self.hold_s = hold_s
        self.ttl_after_finished_s = ttl_after_finished_s
        self.output = output
        self._api: k8s.ApiClient | None = None
        self._namespace: str | None = None
        self.grace = {"unschedulable": unschedulable_grace_s, "image_pull": image_pull_grace_s}
        self.requests = 0
        # sha256 of the plan.json each Job this backend submitted hands its agent
        self.sent_plans: dict[str, str] = {}
        self._nodes: dict[str, KubeModel] = {}
        self._policy: NamespacePolicy | None = None

    def _connect(self) -> tuple[k8s.ApiClient, str]:
        if self._api is None or self._namespace is None:
            self._api, self._namespace = connect(self.target)
        return self._api, self._namespace

    @property
    def namespace(self) -> str:
        return self._connect()[1]

    @property
    def run_target(self) -> str:
        """Where this backend runs, as part of a run's identity: API server and namespace.

        Read from the kubeconfig (no request is sent): the same spec on another cluster
        or in another namespace is another run.
        """
        api, namespace = self._connect()
        return f"kubernetes {api.configuration.host} namespace {namespace}"

    def options(self, namespace: str) -> JobOptions:
        """The cluster-side choices this backend makes for every Job."""
        return JobOptions(
            namespace=namespace,
            ttl_after_finished_s=self.ttl_after_finished_s,
            extra_tolerations=self.extra_tolerations,
            hold_s=self.hold_s,
            active_deadline_s=self.active_deadline_s,
            image_pull_secrets=self.image_pull_secrets,
            priority_class=self.priority_class,
            queue=self.queue,
        )

    def preflight(self, plan: RunPlan) -> None:
        api, namespace = self._connect()
        # the namespace must enforce the sandbox policy, the RuntimeClass included (exit 4
        # naming what it lacks); what was observed, not what the spec says, goes into the
        # bundle. Checked first: a namespace that cannot take the run at all says so first.
        self._policy = namespace_policy(api, namespace, plan).enforce()
        input_volumes(plan)  # every input must be published by digest (exit 2 naming it)

    def submit(self, plan: RunPlan, options: JobOptions | None = None) -> str:
        """Create (or attach to) the Job of ``plan`` (and its ConfigMap when the plan is
        too large for the Job itself); returns the Job name.

        A plan that fits (:func:`plan_inline`) is in the Job: one request. Otherwise: the
        Job, suspended; its ConfigMap, owned by it; the Job resumed. A Job whose stored
        template lost its image volumes (the API server lacks the ImageVolume feature)
        is deleted and refused with exit 4.
        """
        api, namespace = self._connect()
        options = options or self.options(namespace)
        plan_json = agent_plan_json(plan, options)
        job = build_job(plan, options, plan_json)
        name = str(job["metadata"]["name"])
        self.sent_plans[name] = job["metadata"]["annotations"][ANNOTATION_PLAN_SHA256]
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
        if not plan_in_configmap(stored):
            return name
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
        self, core: k8s.CoreV1Api, namespace: str, body: KubeObject, uid: str
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
        body: KubeObject,
        create: Callable[[], Any],
        read: Callable[[], Any],
    ) -> KubeObject:
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

    def run(
        self, plan: RunPlan, results_dir: Path, *, on_start: Callable[[], None] | None = None
    ) -> BackendResult:
        api, namespace = self._connect()
        results_dir.mkdir(parents=True, exist_ok=True)
        started = dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds")
        t0 = time.monotonic()
        name = self.submit(plan)
        try:
            watch = shared_watch(api, namespace)
        except APIForbidden as exc:
            raise self._refused_after_create(api, namespace, name, exc) from exc
        session = RunSession(self, api, watch, plan, name, results_dir)
        try:
            if on_start is not None:  # while the Job starts and runs
                try:
                    on_start()
                except Exception:
                    self._delete(api, namespace, name)  # nothing keeps running unwatched
                    raise
            result = session.follow(started, t0)
            return self._policy.observed(result) if self._policy else result
        except APIForbidden as exc:
            raise self._refused_after_create(api, namespace, name, exc) from exc
        except KeyboardInterrupt as stop:
            # Ctrl-C or SIGTERM: the Job goes (nothing keeps running unwatched); a re-run
            # starts a new attempt
            self._delete(api, namespace, name)
            return BackendResult(
                backend=self.name,
                exit_code=None,
                interrupted=True,
                image_digest_confirmed=False,
                runtime="?",
                started_at=started,
                duration_s=round(time.monotonic() - t0, 3),
                details={
                    "interrupted_by": getattr(stop, "signal_name", "SIGINT"),
                    "deleted_job": name,
                    "namespace": namespace,
                },
            )
        finally:
            session.close()

    def attach(
        self,
        plan: RunPlan,
        results_dir: Path,
        *,
        started: str,
        cancel_requested: bool = False,
        give_up_at: float | None = None,
    ) -> BackendResult:
        """Follow the Job of ``plan`` that was submitted earlier (``run --detach``), collect
        its results and say how it ended, as :meth:`run` would have; never submits.

        A Job that is gone raises RunCancelled when it was cancelled (its last state carries
        the cancel annotation, or ``cancel_requested``), else InfrastructureError. At
        ``give_up_at`` (``time.monotonic()``) it raises StillRunning and leaves the Job be.
        Ctrl-C propagates (the run goes on).
        """
        api, namespace = self._connect()
        results_dir.mkdir(parents=True, exist_ok=True)
        name = job_name(plan.run_id)
        try:
            api_call(
                "read Job",
                lambda: k8s.BatchV1Api(api).read_namespaced_job(name, namespace),
                namespace=namespace,
                name=name,
            )
            self.requests += 1
        except APINotFound as exc:
            raise job_gone(name, None, cancel_requested=cancel_requested) from exc
        watch = shared_watch(api, namespace)
        session = RunSession(self, api, watch, plan, name, results_dir)
        session.cancel_requested = cancel_requested
        try:
            result = session.follow(started, time.monotonic(), give_up_at=give_up_at)
            return self._policy.observed(result) if self._policy else result
        finally:
            session.close()

    def _delete(self, api: k8s.ApiClient, namespace: str, name: str) -> bool:
        """Delete the Job (its pods and ConfigMap follow); whether the API server accepted."""
        try:
            api_call(
                "delete Job",
                lambda: k8s.BatchV1Api(api).delete_namespaced_job(
                    name, namespace, propagation_policy="Background"
                ),
                namespace=namespace,
                name=name,
                retries=False,
            )
        except APINotFound:
            return True
        except EvalrunError:
            return False
        return True

    def _refused_after_create(
        self, api: k8s.ApiClient, namespace: str, name: str, exc: APIForbidden
    ) -> InfrastructureError:
        """The API server refused the runner after its Job was created: say where the Job is.

        The Job is deleted when the runner still may; otherwise the message names it and
        how to delete it. Never left behind silently.
        """
        if self._delete(api, namespace, name):
            fate = f"the Job {name} in namespace {namespace} was deleted"
        else:
            fate = (
                f"the Job {name} is LEFT in namespace {namespace} (the runner may not delete "
                f"it): delete it with `kubectl -n {namespace} delete job {name}`"
            )
        return InfrastructureError(
            f"Job {name} was created, then {exc.message}; {fate}",
            namespace=namespace,
            job=name,
            hint=exc.hint,
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


# ClusterTarget is part of this backend's interface (callers build one to construct it).
__all__ = ["ClusterTarget", "KubernetesBackend", "NamespaceWatch", "shared_watch"]

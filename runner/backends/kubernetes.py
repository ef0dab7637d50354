"""Kubernetes backend: one sandboxed Job per run, watched, collected without trust.

Submission is idempotent (the Job and ConfigMap names derive from the run id; a
409 attaches after comparing the spec-hash label). One shared watch per
namespace follows every evalrun Job and Pod (resourceVersion bookkeeping, 410 →
re-list, reconnects across API server restarts). Waits are bounded and end with
a named reason. Results leave the pod as a framed, checksummed tar on the log
stream; the runner checks and unpacks it. The signing key never enters the cluster.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import urllib3.exceptions
from kubernetes import client as k8s
from kubernetes import config as k8s_config
from kubernetes import watch as k8s_watch
from kubernetes.client.rest import ApiException

from runner._internal.retry import call_with_retries
from runner.backends.collect import extract_results_frame
from runner.backends.manifests import (
    CONTAINER_NAME,
    LABEL_RUN_ID,
    MANAGED_BY,
    JobOptions,
    build_configmap,
    build_job,
    spec_hash_of,
)
from runner.errors import (
    EnvironmentMismatch,
    EvalrunError,
    InfrastructureError,
    InputError,
    TransientInfrastructureError,
)
from runner.model.plan import BackendResult, RunPlan

log = logging.getLogger("evalrun.backend.kubernetes")

PULL_FAILURES = {"ImagePullBackOff", "ErrImagePull", "InvalidImageName", "ErrImageNeverPull"}
CONFIG_FAILURES = {"CreateContainerConfigError", "CreateContainerError", "RunContainerError"}


class APIConflict(InfrastructureError):
    kind = "k8s_conflict"


class APIForbidden(InfrastructureError):
    kind = "k8s_forbidden"


class APINotFound(InfrastructureError):
    kind = "k8s_not_found"


class APIGone(TransientInfrastructureError):
    kind = "k8s_gone"


@contextlib.contextmanager
def translated(what: str) -> Iterator[None]:
    """Turn ApiException/transport errors into evalrun errors, once, here."""
    try:
        yield
    except ApiException as exc:
        status = exc.status or 0
        reason = _api_message(exc)
        if status == 409:
            raise APIConflict(f"{what}: conflict: {reason}") from None
        if status == 403:
            raise APIForbidden(f"{what}: forbidden: {reason}") from None
        if status == 404:
            raise APINotFound(f"{what}: not found: {reason}") from None
        if status == 410:
            raise APIGone(f"{what}: resource version too old") from None
        if status in (0, 429) or status >= 500:
            raise TransientInfrastructureError(
                f"{what}: API server error {status}: {reason}"
            ) from None
        if status in (400, 422):
            raise InputError(f"{what}: rejected by the API server: {reason}") from None
        raise InfrastructureError(f"{what}: API error {status}: {reason}") from None
    except (urllib3.exceptions.HTTPError, ConnectionError, TimeoutError, OSError) as exc:
        raise TransientInfrastructureError(
            f"{what}: API server unreachable: {exc.__class__.__name__}",
            hint="check the kubeconfig/context and that the cluster is up",
        ) from None


def _api_message(exc: ApiException) -> str:
    import json

    try:
        body = json.loads(exc.body or "{}")
        return str(body.get("message") or exc.reason)
    except (ValueError, TypeError):
        return str(exc.reason)


def api_call(what: str, fn: Callable[[], Any], *, retries: bool = True) -> Any:
    def attempt() -> Any:
        with translated(what):
            return fn()

    return call_with_retries(attempt, what=what) if retries else attempt()


@dataclass(frozen=True)
class ClusterTarget:
    """Where to run: kubeconfig, context and namespace, as kubectl users expect."""

    kubeconfig: str | None = None
    context: str | None = None
    namespace: str | None = None


def connect(target: ClusterTarget) -> tuple[k8s.ApiClient, str]:
    """An API client and the namespace (flag, then the context's, then 'default')."""
    if (
        target.kubeconfig is None
        and target.context is None
        and not os.environ.get("KUBECONFIG")
        and not Path("~/.kube/config").expanduser().exists()
        and os.environ.get("KUBERNETES_SERVICE_HOST")
    ):
        # Inside a pod (e.g. the audit CronJob): the mounted service-account token.
        cfg = k8s.Configuration()
        k8s_config.load_incluster_config(client_configuration=cfg)
        ns_file = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
        in_pod_ns = target.namespace or (
            ns_file.read_text().strip() if ns_file.exists() else "default"
        )
        return k8s.ApiClient(cfg), in_pod_ns
    try:
        api = k8s_config.new_client_from_config(
            config_file=target.kubeconfig, context=target.context, persist_config=False
        )
        contexts, active = k8s_config.list_kube_config_contexts(config_file=target.kubeconfig)
    except (k8s_config.ConfigException, FileNotFoundError, TypeError) as exc:
        raise InputError(f"cannot load kubeconfig: {exc}", file=target.kubeconfig) from None
    namespace = target.namespace
    if namespace is None:
        chosen = next((c for c in contexts if c["name"] == target.context), active)
        namespace = (chosen or {}).get("context", {}).get("namespace") or "default"
    return api, namespace


# --------------------------------------------------------------------------- shared watch


@dataclass
class _Cache:
    objects: dict[str, Any] = field(default_factory=dict)
    resource_version: str | None = None
    relists: int = 0
    events: int = 0


class NamespaceWatch:
    """One watch per kind per namespace for every evalrun object; waiters share it."""

    def __init__(self, api: k8s.ApiClient, namespace: str) -> None:
        self.namespace = namespace
        self._core = k8s.CoreV1Api(api)
        self._batch = k8s.BatchV1Api(api)
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self.jobs = _Cache()
        self.pods = _Cache()
        self.requests = 0
        self._threads = [
            threading.Thread(target=self._loop, args=("jobs",), daemon=True),
            threading.Thread(target=self._loop, args=("pods",), daemon=True),
        ]
        self._synced = {"jobs": threading.Event(), "pods": threading.Event()}

    def start(self) -> NamespaceWatch:
        for t in self._threads:
            t.start()
        for event in self._synced.values():
            if not event.wait(60):
                raise InfrastructureError(
                    f"could not list evalrun objects in namespace {self.namespace!r}"
                )
        return self

    def stop(self) -> None:
        self._stop.set()
        with self._cond:
            self._cond.notify_all()

    def _list_fn(self, kind: str) -> Any:
        if kind == "jobs":
            return self._batch.list_namespaced_job
        return self._core.list_namespaced_pod

    def _relist(self, kind: str, cache: _Cache) -> None:
        listing = self._list_fn(kind)(
            self.namespace, label_selector=f"app.kubernetes.io/managed-by={MANAGED_BY}"
        )
        self.requests += 1
        with self._cond:
            cache.objects = {o.metadata.name: o for o in listing.items}
            cache.resource_version = listing.metadata.resource_version
            cache.relists += 1
            self._cond.notify_all()
        self._synced[kind].set()

    def _loop(self, kind: str) -> None:
        cache = self.jobs if kind == "jobs" else self.pods
        backoff = 0.2
        need_list = True
        while not self._stop.is_set():
            try:
                if need_list:
                    self._relist(kind, cache)
                    need_list = False
                w = k8s_watch.Watch()
                self.requests += 1
                for event in w.stream(
                    self._list_fn(kind),
                    self.namespace,
                    label_selector=f"app.kubernetes.io/managed-by={MANAGED_BY}",
                    resource_version=cache.resource_version,
                    timeout_seconds=30,
                    allow_watch_bookmarks=True,
                ):
                    if self._stop.is_set():
                        w.stop()
                        break
                    obj = event["object"]
                    etype = event["type"]
                    if etype == "ERROR":
                        code = obj.get("code") if isinstance(obj, dict) else None
                        if code == 410:
                            need_list = True
                            break
                        continue
                    with self._cond:
                        cache.resource_version = obj.metadata.resource_version
                        cache.events += 1
                        if etype == "DELETED":
                            cache.objects.pop(obj.metadata.name, None)
                        elif etype != "BOOKMARK":
                            cache.objects[obj.metadata.name] = obj
                        self._cond.notify_all()
                backoff = 0.2
            except ApiException as exc:
                if exc.status == 410:
                    need_list = True
                else:
                    log.warning(
                        "watch error; re-listing",
                        extra={"event": "watch_error", "kind": kind, "status": exc.status},
                    )
                    need_list = True
                    self._stop.wait(backoff)
                    backoff = min(backoff * 2, 5.0)
            except Exception as exc:  # connection refused during an API server restart
                log.warning(
                    "watch disconnected; re-listing",
                    extra={"event": "watch_disconnected", "kind": kind, "error": repr(exc)},
                )
                need_list = True
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 5.0)

    def wait(self, check: Callable[[], Any], timeout: float) -> Any:
        """Block until ``check()`` returns something truthy (re-checked on every event)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                result = check()
                if result:
                    return result
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return None
                self._cond.wait(min(remaining, 1.0))

    def job(self, name: str) -> Any:
        return self.jobs.objects.get(name)

    def pods_of(self, run_id: str) -> list[Any]:
        return sorted(
            (
                p
                for p in self.pods.objects.values()
                if (p.metadata.labels or {}).get(LABEL_RUN_ID) == run_id
            ),
            key=lambda p: p.metadata.creation_timestamp or dt.datetime.min,
        )


_WATCHES: dict[tuple[int, str], NamespaceWatch] = {}
_WATCH_LOCK = threading.Lock()


def shared_watch(api: k8s.ApiClient, namespace: str) -> NamespaceWatch:
    """The process-wide watch for this client and namespace (started on first use)."""
    key = (id(api), namespace)
    with _WATCH_LOCK:
        watch = _WATCHES.get(key)
        if watch is None:
            watch = NamespaceWatch(api, namespace).start()
            _WATCHES[key] = watch
        return watch


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

    def _connect(self) -> tuple[k8s.ApiClient, str]:
        if self._api is None or self._namespace is None:
            self._api, self._namespace = connect(self.target)
        return self._api, self._namespace

    @property
    def namespace(self) -> str:
        return self._connect()[1]

    def preflight(self, plan: RunPlan) -> None:
        api, _ = self._connect()
        if plan.runtime == "gvisor" or plan.runtime_class:
            wanted = plan.runtime_class or "gvisor"
            try:
                api_call("read RuntimeClass", lambda: k8s.NodeV1Api(api).read_runtime_class(wanted))
                self.requests += 1
            except APINotFound:
                raise EnvironmentMismatch(
                    f"the spec demands RuntimeClass {wanted!r}, which the cluster does not have",
                    expected=wanted,
                    hint="install the evalrun chart (charts/evalrun) or manifests/; evalrun "
                    "never falls back to a weaker sandbox",
                ) from None
            except APIForbidden:
                # The runner may not read cluster-scoped objects; admission will decide.
                pass

    def submit(self, plan: RunPlan, options: JobOptions | None = None) -> str:
        """Create (or attach to) the ConfigMap and Job of ``plan``; returns the Job name."""
        api, namespace = self._connect()
        options = options or JobOptions(
            namespace=namespace, extra_tolerations=self.extra_tolerations
        )
        inputs = {i.name: i.host_path.read_bytes() for i in plan.inputs}
        import json

        plan_json = (
            json.dumps(plan.agent_plan(emit_results=True), indent=2, sort_keys=True) + "\n"
        ).encode()
        configmap = build_configmap(plan, plan_json, inputs, options)
        job = build_job(plan, options)
        core, batch = k8s.CoreV1Api(api), k8s.BatchV1Api(api)
        self._create_or_attach(
            "ConfigMap",
            configmap,
            lambda: core.create_namespaced_config_map(namespace, configmap),
            lambda: core.read_namespaced_config_map(configmap["metadata"]["name"], namespace),
        )
        self._create_or_attach(
            "Job",
            job,
            lambda: batch.create_namespaced_job(namespace, job),
            lambda: batch.read_namespaced_job(job["metadata"]["name"], namespace),
        )
        return str(job["metadata"]["name"])

    def _create_or_attach(
        self, kind: str, body: dict[str, Any], create: Callable[[], Any], read: Callable[[], Any]
    ) -> None:
        name = body["metadata"]["name"]
        try:
            api_call(f"create {kind} {name}", create)
            self.requests += 1
            return
        except (APIConflict, APIForbidden) as exc:
            self.requests += 1
            try:
                existing = api_call(f"read {kind} {name}", read)
                self.requests += 1
            except APINotFound:
                raise exc from None
        existing_dict = k8s.ApiClient().sanitize_for_serialization(existing)
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
            return self._follow(api, watch, plan, name, results_dir, started, t0)
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
            obj = api_call("read node", lambda: k8s.CoreV1Api(api).read_node(node), retries=False)
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
                retries=False,
            )
            self.requests += 1


def _image_id_matches(image_id: str | None, digest: str) -> bool:
    """The pod's imageID names the pinned manifest digest (``…@sha256:…``)."""
    if not image_id:
        return False
    return image_id.rsplit("@", 1)[-1] == digest or image_id == digest

"""The boundary to the Kubernetes API: connect, translate its errors once, watch.

``kubernetes.client.ApiException`` and urllib3/transport errors become evalrun
errors here (and only here), split into transient ones (unreachable, 429, 5xx,
410 Gone), which the retry policy retries by type, and permanent ones that name
the namespace, the object, the HTTP status and the API server's reason.

Exec (:func:`exec_in_pod`: binary websocket frames, demultiplexed as they arrive)
and log following (:class:`PodLogFollower`) live here too, for the same reason.

One shared watch per client, namespace and label selector follows Jobs and Pods:
list, then watch from the listed resourceVersion; a 410 (in the stream or as an
error) re-lists; a dropped connection (API server restart) re-lists after a
bounded backoff. Waiters share its cache instead of polling the API server.
"""

from __future__ import annotations

import ast
import base64
import binascii
import contextlib
import datetime as dt
import json
import logging
import os
import re
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
from kubernetes.stream import stream as k8s_stream
from tenacity import Retrying
from websocket import ABNF, WebSocketException

from runner._internal.retry import call_with_retries
from runner.errors import (
    APIConflict,
    APIForbidden,
    APIGone,
    APINotFound,
    EvalrunError,
    InputError,
    KubernetesAPIError,
    KubernetesError,
    KubernetesRejected,
    TransientKubernetesError,
)

# The watch logged under this name before it moved here; log consumers filter on it.
log = logging.getLogger("evalrun.backend.kubernetes")

UNREACHABLE_HINT = "check the kubeconfig/context and that the cluster is up"


# --------------------------------------------------------------------------- errors


def _classify(status: int, message: str) -> tuple[type[KubernetesError], str]:
    """The error class and message tail for an API status (0: no HTTP answer at all)."""
    if status == 409:
        return APIConflict, f"conflict: {message}"
    if status == 403:
        return APIForbidden, f"forbidden: {message}"
    if status == 404:
        return APINotFound, f"not found: {message}"
    if status == 410:
        return APIGone, "resource version too old"
    if status in (0, 429) or status >= 500:
        return TransientKubernetesError, f"API server error {status}: {message}"
    if status in (400, 422):
        return KubernetesRejected, f"rejected by the API server: {message}"
    return KubernetesAPIError, f"API error {status}: {message}"


def _status_body(exc: ApiException) -> dict[str, Any]:
    """The ``Status`` object the API server sent with the error, if it parses."""
    try:
        body = json.loads(exc.body or "{}")
    except (ValueError, TypeError):
        return {}
    return body if isinstance(body, dict) else {}


@contextlib.contextmanager
def translated(
    what: str, *, namespace: str | None = None, name: str | None = None
) -> Iterator[None]:
    """Turn ApiException/transport errors raised inside the block into evalrun errors."""
    try:
        yield
    except ApiException as exc:
        body = _status_body(exc)
        cls, tail = _classify(exc.status or 0, str(body.get("message") or exc.reason))
        reason = body.get("reason") or exc.reason  # the Status reason, e.g. AlreadyExists
        raise cls(
            f"{what}: {tail}",
            namespace=namespace,
            name=name,
            status=exc.status,
            reason=str(reason) if reason else None,
        ) from exc
    except (urllib3.exceptions.HTTPError, ConnectionError, TimeoutError, OSError) as exc:
        raise TransientKubernetesError(
            f"{what}: API server unreachable: {exc.__class__.__name__}",
            namespace=namespace,
            name=name,
            hint=UNREACHABLE_HINT,
        ) from exc


def api_call(
    what: str,
    fn: Callable[[], Any],
    *,
    namespace: str | None = None,
    name: str | None = None,
    retries: bool = True,
    policy: Retrying | None = None,
) -> Any:
    """Call ``fn`` with translation and (by default) transient errors retried by type."""

    def attempt() -> Any:
        with translated(what, namespace=namespace, name=name):
            return fn()

    return call_with_retries(attempt, what=what, policy=policy) if retries else attempt()


def as_plain(obj: Any) -> Any:
    """An API object (or anything the client returns) as plain JSON-compatible data."""
    return k8s.ApiClient().sanitize_for_serialization(obj)


# --------------------------------------------------------------------------- connect


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
        raise InputError(f"cannot load kubeconfig: {exc}", file=target.kubeconfig) from exc
    namespace = target.namespace
    if namespace is None:
        chosen = next((c for c in contexts if c["name"] == target.context), active)
        namespace = (chosen or {}).get("context", {}).get("namespace") or "default"
    return api, namespace


def read_secret_data(target: ClusterTarget, namespace: str, name: str) -> dict[str, bytes]:
    """The decoded ``data`` of Secret ``namespace/name`` (field name -> bytes).

    Errors are translated (404: APINotFound, 403: APIForbidden); a field that is not
    valid base64 is left out rather than guessed at.
    """
    api, _ = connect(ClusterTarget(target.kubeconfig, target.context, namespace))
    try:
        secret = api_call(
            f"read Secret {namespace}/{name}",
            lambda: k8s.CoreV1Api(api).read_namespaced_secret(name, namespace),
            namespace=namespace,
            name=name,
        )
    finally:
        api.close()
    data: dict[str, bytes] = {}
    for field_name, value in ((secret.data or {}) if secret is not None else {}).items():
        try:
            data[str(field_name)] = base64.b64decode(str(value), validate=True)
        except binascii.Error:
            continue
    return data


# --------------------------------------------------------------------------- namespace policy


@dataclass(frozen=True)
class NamespaceRead:
    """The Namespace, its NetworkPolicies and a RuntimeClass as plain JSON; None (with a
    reason in ``unreadable``) where the API server refused to show them."""

    namespace: dict[str, Any] | None
    network_policies: list[dict[str, Any]] | None
    runtime_class_found: bool | None
    unreadable: tuple[str, ...] = ()


def read_namespace_policy(
    api: k8s.ApiClient, namespace: str, runtime_class: str | None
) -> NamespaceRead:
    """Read what decides whether ``namespace`` enforces a run's sandbox policy.

    Forbidden or absent objects are reported, not raised (the pure check turns them into
    findings); a transient failure is retried and then raised like any API error.
    """
    unreadable: list[str] = []
    ns_object: dict[str, Any] | None = None
    policies: list[dict[str, Any]] | None = None
    found: bool | None = None
    try:
        ns_object = as_plain(
            api_call(
                f"read Namespace {namespace}",
                lambda: k8s.CoreV1Api(api).read_namespace(namespace),
                name=namespace,
            )
        )
    except (APIForbidden, APINotFound) as exc:
        unreadable.append(exc.message)
    try:
        listing = api_call(
            f"list NetworkPolicies in {namespace}",
            lambda: k8s.NetworkingV1Api(api).list_namespaced_network_policy(namespace),
            namespace=namespace,
        )
        policies = [as_plain(p) for p in (listing.items or [])]
    except (APIForbidden, APINotFound) as exc:
        unreadable.append(exc.message)
    if runtime_class is not None:
        try:
            api_call(
                f"read RuntimeClass {runtime_class}",
                lambda: k8s.NodeV1Api(api).read_runtime_class(runtime_class),
                name=runtime_class,
            )
            found = True
        except APINotFound:
            found = False
        except APIForbidden:
            found = None  # cluster-scoped: the runner may not read it; admission decides
    return NamespaceRead(ns_object, policies, found, tuple(unreadable))


# --------------------------------------------------------------------------- shared watch


def slim(obj: Any) -> Any:
    """What the runner reads of a watched Job or Pod, and nothing else.

    Kept: name, namespace, uid, labels, creation and deletion times, resource version;
    a pod's node and runtime class; a Job's annotations, suspend flag, deadline and pod
    template runtime class; the whole status. Dropped: the rest of the spec (containers,
    volumes, env), a pod's annotations and managed fields — most of an object's memory,
    for every run in the namespace.
    Anything that is not a Job or Pod model is kept as it is.
    """
    if not isinstance(obj, k8s.V1Pod | k8s.V1Job) or obj.metadata is None:
        return obj
    meta = obj.metadata
    kept_meta = k8s.V1ObjectMeta.model_construct(
        name=meta.name,
        namespace=meta.namespace,
        uid=meta.uid,
        labels=meta.labels,
        creation_timestamp=meta.creation_timestamp,
        deletion_timestamp=meta.deletion_timestamp,
        resource_version=meta.resource_version,
    )
    if isinstance(obj, k8s.V1Pod):
        spec = obj.spec
        return k8s.V1Pod.model_construct(
            metadata=kept_meta,
            spec=k8s.V1PodSpec.model_construct(
                containers=[],
                node_name=spec.node_name if spec else None,
                runtime_class_name=spec.runtime_class_name if spec else None,
            ),
            status=obj.status,
        )
    template = obj.spec.template.spec if obj.spec and obj.spec.template else None
    # a Job's own annotations (a cancel request), whether it is suspended (queued), and its
    # deadline are read too; they are a few bytes
    kept_meta.annotations = meta.annotations
    return k8s.V1Job.model_construct(
        metadata=kept_meta,
        spec=k8s.V1JobSpec.model_construct(
            suspend=obj.spec.suspend if obj.spec else None,
            active_deadline_seconds=obj.spec.active_deadline_seconds if obj.spec else None,
            template=k8s.V1PodTemplateSpec.model_construct(
                spec=k8s.V1PodSpec.model_construct(
                    containers=[],
                    runtime_class_name=template.runtime_class_name if template else None,
                )
            ),
        ),
        status=obj.status,
    )


@dataclass
class _Cache:
    objects: dict[str, Any] = field(default_factory=dict)
    # the last state of each object seen deleted (its annotations say why it went)
    gone: dict[str, Any] = field(default_factory=dict)
    resource_version: str | None = None
    relists: int = 0
    events: int = 0


class NamespaceWatch:
    """One watch per kind (Jobs, Pods) of the objects ``selector`` matches; waiters share it.

    ``run_label`` is the label whose value :meth:`pods_of` looks up.
    """

    def __init__(
        self, api: k8s.ApiClient, namespace: str, *, selector: str, run_label: str
    ) -> None:
        self.namespace = namespace
        self.selector = selector
        self.run_label = run_label
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
        # A refusal (401/403) of a list or watch: every waiter fails with it, instead of
        # waiting for events that will never come. Cleared by the next listing that works.
        self.refused: APIForbidden | None = None

    def start(self, sync_timeout_s: float = 60.0) -> NamespaceWatch:
        """Start both watches; raises once a first listing has not arrived in time."""
        for t in self._threads:
            t.start()
        for event in self._synced.values():
            if not event.wait(sync_timeout_s):
                raise KubernetesAPIError(
                    f"could not list evalrun objects in namespace {self.namespace!r}",
                    namespace=self.namespace,
                    hint=UNREACHABLE_HINT,
                )
            if self.refused is not None:
                self.stop()
                raise self.refused
        return self

    def stop(self) -> None:
        self._stop.set()
        with self._cond:
            self._cond.notify_all()

    def _list_fn(self, kind: str) -> Any:
        if kind == "jobs":
            return self._batch.list_namespaced_job
        return self._core.list_namespaced_pod

    def _new_watch(self, kind: str) -> Any:
        return k8s_watch.Watch()

    def _relist(self, kind: str, cache: _Cache) -> None:
        listing = self._list_fn(kind)(self.namespace, label_selector=self.selector)
        self.requests += 1
        with self._cond:
            cache.objects = {o.metadata.name: slim(o) for o in listing.items}
            cache.resource_version = listing.metadata.resource_version
            cache.relists += 1
            self.refused = None
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
                w = self._new_watch(kind)
                self.requests += 1
                for event in w.stream(
                    self._list_fn(kind),
                    self.namespace,
                    label_selector=self.selector,
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
                    if isinstance(obj, dict):
                        # kubernetes >= 37 leaves a BOOKMARK's object undeserialized
                        version = (obj.get("metadata") or {}).get("resourceVersion")
                        if etype == "BOOKMARK" and version:
                            with self._cond:
                                cache.resource_version = str(version)
                        continue
                    with self._cond:
                        cache.resource_version = obj.metadata.resource_version
                        cache.events += 1
                        if etype == "DELETED":
                            cache.objects.pop(obj.metadata.name, None)
                            cache.gone[obj.metadata.name] = obj
                        elif etype != "BOOKMARK":
                            cache.objects[obj.metadata.name] = slim(obj)
                        self._cond.notify_all()
                backoff = 0.2
            except ApiException as exc:
                if exc.status == 410:
                    need_list = True
                elif exc.status in (401, 403):
                    self._refuse(kind, exc)
                    need_list = True
                    self._stop.wait(backoff)
                    backoff = min(backoff * 2, 5.0)
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

    def _refuse(self, kind: str, exc: ApiException) -> None:
        message = str(_status_body(exc).get("message") or exc.reason)
        refused = APIForbidden(
            f"watch {kind} in namespace {self.namespace}: forbidden: {message}",
            namespace=self.namespace,
            status=exc.status,
            hint="the runner's Role needs get, list and watch on jobs and pods: install the "
            "evalrun chart (charts/evalrun) or manifests/evalrun.yaml",
        )
        log.warning(
            "watch refused",
            extra={"event": "watch_refused", "kind": kind, "status": exc.status},
        )
        with self._cond:
            self.refused = refused
            self._cond.notify_all()
        self._synced[kind].set()

    def wait(self, check: Callable[[], Any], timeout: float) -> Any:
        """Block until ``check()`` returns something truthy (re-checked on every event).

        Raises :class:`APIForbidden` once the API server refuses the watch (RBAC).
        """
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                if self.refused is not None:
                    raise self.refused
                result = check()
                if result:
                    return result
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return None
                self._cond.wait(min(remaining, 1.0))

    def notify(self) -> None:
        """Wake every :meth:`wait` to re-check now (something outside the watch changed)."""
        with self._cond:
            self._cond.notify_all()

    def job(self, name: str) -> Any:
        return self.jobs.objects.get(name)

    def deleted_job(self, name: str) -> Any:
        """The last state of Job ``name`` if this watch saw it deleted (else None)."""
        return self.jobs.gone.get(name)

    def pods_of(self, run_id: str) -> list[Any]:
        return sorted(
            (
                p
                for p in self.pods.objects.values()
                if (p.metadata.labels or {}).get(self.run_label) == run_id
            ),
            key=lambda p: p.metadata.creation_timestamp or dt.datetime.min,
        )


_WATCHES: dict[tuple[int, str, str], NamespaceWatch] = {}
_WATCH_LOCK = threading.Lock()


def shared_watch(
    api: k8s.ApiClient, namespace: str, *, selector: str, run_label: str
) -> NamespaceWatch:
    """The process-wide watch for this client, namespace and selector (started on first use)."""
    key = (id(api), namespace, selector)
    with _WATCH_LOCK:
        watch = _WATCHES.get(key)
        if watch is None:
            watch = NamespaceWatch(api, namespace, selector=selector, run_label=run_label).start()
            _WATCHES[key] = watch
        return watch


# --------------------------------------------------------------------------- exec stream

# The API server's exec channels (v4/v5.channel.k8s.io): one byte before each frame's data.
_STDOUT, _STDERR, _STATUS, _CLOSE = 1, 2, 3, 255
_STDERR_KEEP = 64 * 1024
_HANDSHAKE_RE = re.compile(r"Handshake status (\d{3})")


@dataclass(frozen=True)
class ExecOutcome:
    """How a command run through the exec stream ended."""

    exit_code: int | None  # None: the API server reported a failure that is not an exit code
    stderr: str
    message: str = ""
    stdout_bytes: int = 0


def _exec_status(raw: bytes) -> tuple[int | None, str]:
    """Exit code and message from the status channel's ``Status`` object."""
    try:
        status = json.loads(raw.decode("utf-8", "replace"))
    except ValueError:
        return None, f"unreadable exec status {raw[:200]!r}"
    if not isinstance(status, dict):
        return None, "unreadable exec status"
    if status.get("status") == "Success":
        return 0, ""
    message = str(status.get("message") or status.get("reason") or "exec failed")
    for cause in (status.get("details") or {}).get("causes") or []:
        if isinstance(cause, dict) and cause.get("reason") == "ExitCode":
            with contextlib.suppress(TypeError, ValueError):
                return int(str(cause.get("message"))), message
    return None, message


def read_exec_frames(
    recv: Callable[[], tuple[int, bytes]],
    stdout: Callable[[bytes], None],
    *,
    what: str,
    namespace: str | None = None,
    name: str | None = None,
) -> ExecOutcome:
    """Demultiplex exec frames from ``recv`` (opcode, data) until the status arrives.

    Stdout bytes go to ``stdout`` as they arrive; stderr is kept (bounded). A stream
    that ends, or breaks, before the API server's status is a transient error: the
    command's outcome is unknown, the caller may retry.
    """
    err = bytearray()
    received = 0
    while True:
        try:
            opcode, data = recv()
        except (WebSocketException, OSError) as exc:
            raise TransientKubernetesError(
                f"{what}: exec stream cut after {received} bytes ({exc.__class__.__name__})",
                namespace=namespace,
                name=name,
            ) from exc
        if opcode == ABNF.OPCODE_CLOSE:
            raise TransientKubernetesError(
                f"{what}: exec stream closed after {received} bytes without a status",
                namespace=namespace,
                name=name,
            )
        if opcode not in (ABNF.OPCODE_BINARY, ABNF.OPCODE_TEXT) or not data:
            continue
        channel, payload = data[0], data[1:]
        if channel == _STDOUT:
            received += len(payload)
            stdout(payload)
        elif channel == _STDERR:
            err += payload[: max(0, _STDERR_KEEP - len(err))]
        elif channel == _STATUS:
            code, message = _exec_status(payload)
            return ExecOutcome(code, err.decode("utf-8", "replace"), message, received)


def exec_in_pod(
    api: k8s.ApiClient,
    namespace: str,
    pod: str,
    container: str,
    command: list[str],
    *,
    stdout: Callable[[bytes], None],
    idle_timeout_s: float = 120.0,
) -> ExecOutcome:
    """Run ``command`` in a running container through the API server's exec stream.

    Stdout arrives as binary websocket frames and goes to ``stdout`` as it comes;
    a refused or failed exec is translated like any API error (403: the runner
    lacks ``pods/exec``; 404: the pod is gone); a stream that breaks or idles for
    ``idle_timeout_s`` is a transient error.
    """
    what = f"exec {' '.join(command[-1:])} in pod {pod}"
    # The stream helper swaps the client's transport while it runs: never share one.
    own = k8s.ApiClient(api.configuration)
    try:
        try:
            ws = k8s_stream(
                k8s.CoreV1Api(own).connect_get_namespaced_pod_exec,
                pod,
                namespace,
                container=container,
                command=command,
                stdin=False,
                stdout=True,
                stderr=True,
                tty=False,
                binary=True,
                _preload_content=False,
            )
        except ApiException as exc:
            text = str(exc.reason or "")
            match = _HANDSHAKE_RE.search(text)
            if match is None:
                raise TransientKubernetesError(
                    f"{what}: API server unreachable: {text[:200]}",
                    namespace=namespace,
                    name=pod,
                    hint=UNREACHABLE_HINT,
                ) from exc
            status = int(match[1])
            cls, tail = _classify(status, _handshake_message(text))
            raise cls(f"{what}: {tail}", namespace=namespace, name=pod, status=status) from exc
        try:
            ws.sock.settimeout(idle_timeout_s)
            return read_exec_frames(
                lambda: _frame(ws.sock), stdout, what=what, namespace=namespace, name=pod
            )
        finally:
            with contextlib.suppress(Exception):
                ws.close()
    finally:
        own.close()


def _handshake_message(text: str) -> str:
    """The API server's ``Status`` message from a refused websocket handshake's text.

    websocket-client words it ``Handshake status 403 Forbidden -+-+- {headers} -+-+- b'{…}'``.
    """
    body = text.rsplit("-+-+-", 1)[-1].strip()
    with contextlib.suppress(ValueError, SyntaxError):
        if body.startswith(("b'", 'b"')):
            body = ast.literal_eval(body).decode("utf-8", "replace")
        status = json.loads(body)
        if isinstance(status, dict) and status.get("message"):
            return str(status["message"])
    return text[:300]


def _frame(sock: Any) -> tuple[int, bytes]:
    opcode, frame = sock.recv_data_frame(True)
    return int(opcode), bytes(frame.data)


# --------------------------------------------------------------------------- pod logs

LOG_QUIET_S = 600


class PodLogFollower:
    """Follows one container's log from its start, in a thread, as raw bytes.

    ``on_data`` gets the log's bytes as they arrive. When the stream ends while
    ``still_running()`` says the container runs (an API server restart), it
    reconnects and skips the bytes already delivered. :attr:`done` is set when
    the log has ended for good or :meth:`stop` was called; :attr:`error` says why
    the last attempt failed, if it did.
    """

    def __init__(
        self,
        api: k8s.ApiClient,
        namespace: str,
        pod: str,
        container: str,
        on_data: Callable[[bytes], None],
        *,
        still_running: Callable[[], bool] = lambda: False,
        max_reconnects: int = 30,
    ) -> None:
        self.namespace, self.pod, self.container = namespace, pod, container
        self._core = k8s.CoreV1Api(api)
        self._on_data = on_data
        self._still_running = still_running
        self._max_reconnects = max_reconnects
        self._stop = threading.Event()
        self._response: Any = None
        self.delivered = 0
        self.error: str | None = None
        self.done = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True, name=f"log-{pod}")

    def start(self) -> PodLogFollower:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        response = self._response
        if response is not None:
            # shut the socket down first: close() alone waits for the reading thread, which
            # a live log (a pod still running) never releases
            with contextlib.suppress(Exception):
                response.shutdown()
            with contextlib.suppress(Exception):
                response.close()

    def _loop(self) -> None:
        reconnects, backoff = 0, 0.5
        try:
            while not self._stop.is_set():
                before = self.delivered
                try:
                    self._follow_once()
                    self.error = None
                except EvalrunError as exc:
                    self.error = exc.message
                except Exception as exc:  # a body read cut by stop() or a restart
                    self.error = f"log stream broke: {exc.__class__.__name__}"
                if self._stop.is_set() or not self._still_running():
                    return
                if self.delivered > before:  # only attempts that brought nothing count
                    reconnects, backoff = 0, 0.5
                reconnects += 1
                if reconnects > self._max_reconnects:
                    return
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 5.0)
        finally:
            self.done.set()

    def _follow_once(self) -> None:
        skip = self.delivered
        with translated("follow pod log", namespace=self.namespace, name=self.pod):
            self._response = self._core.read_namespaced_pod_log(
                self.pod,
                self.namespace,
                container=self.container,
                follow=True,
                _preload_content=False,
                # (connect, read): a log quiet this long is re-followed, skipping what came
                _request_timeout=(30, LOG_QUIET_S),
            )
        try:
            for chunk in self._response.stream(64 * 1024, decode_content=True):
                if skip >= len(chunk):
                    skip -= len(chunk)
                    continue
                chunk, skip = chunk[skip:], 0
                self.delivered += len(chunk)
                self._on_data(chunk)
        finally:
            with contextlib.suppress(Exception):
                self._response.release_conn()
            self._response = None

"""One shared watch per client, namespace and label selector follows Jobs and Pods.

List, then watch from the listed resourceVersion; a 410 (in the stream or as an
error) re-lists; a dropped connection (API server restart) re-lists after a bounded
backoff. Waiters share its cache (a slim projection of each object, :func:`slim`)
instead of polling the API server. API errors are translated by
:mod:`runner.adapters.kubernetes`.
"""

from __future__ import annotations

import datetime as dt
import logging
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from kubernetes import client as k8s
from kubernetes import watch as k8s_watch
from kubernetes.client.rest import ApiException
from pydantic import BaseModel

# The watch logged under this name before it moved here; log consumers filter on it.
from runner._internal.foreign import KubeModel
from runner.adapters.kubernetes import UNREACHABLE_HINT, _status_body
from runner.errors import (
    APIForbidden,
    KubernetesAPIError,
)

# Logged under the backend's name, as before the split; log consumers filter on it.
log = logging.getLogger("evalrun.backend.kubernetes")


# --------------------------------------------------------------------------- shared watch


class Kept:
    """A read-only projection of a Kubernetes API model, as the watch cache holds it.

    The attributes it was built with are set; any other reads as None, as an unset field of
    the model does. No pydantic instance (its field dict, its set of set fields) per object
    and sub-object, and no None fields: about a tenth of the model's memory.
    """

    def __init__(self, **fields: Any) -> None:
        self.__dict__.update(fields)

    def __getattr__(self, name: str) -> Any:  # only called for attributes not set
        if name.startswith("__"):
            raise AttributeError(name)
        return None

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"a watched object is read-only (setting {name})")

    def __repr__(self) -> str:
        return f"Kept({', '.join(f'{k}={v!r}' for k, v in self.__dict__.items())})"


# Status fields no part of the runner reads (addresses, QoS class, restart counts, previous
# container states, volume mounts, resources, probe and transition times, a Job's pod
# counters in flight): not kept. Anything else of a status is.
UNREAD_STATUS = frozenset(
    {
        "host_ip",
        "host_i_ps",
        "pod_ip",
        "pod_i_ps",
        "qos_class",
        "start_time",
        "last_state",
        "restart_count",
        "allocated_resources",
        "resources",
        "volume_mounts",
        "last_probe_time",
        "last_transition_time",
        "uncounted_terminated_pods",
        "completion_time",
        "terminating",
    }
)


def keep(value: Any, drop: frozenset[str] = frozenset()) -> Any:
    """``value`` with every API model in it (nested, in lists and dicts) made :class:`Kept`,
    without the fields named in ``drop`` (at any depth).

    Strings are interned: label keys and values, condition types and reasons repeat in
    every run's objects and are held once.
    """
    if isinstance(value, str):
        return sys.intern(value)
    if isinstance(value, BaseModel):
        return Kept(
            **{
                k: keep(v, drop)
                for k, v in value.__dict__.items()
                if v is not None and k not in drop
            }
        )
    if isinstance(value, list):
        return [keep(v, drop) for v in value]
    if isinstance(value, dict):
        return {sys.intern(k) if isinstance(k, str) else k: keep(v, drop) for k, v in value.items()}
    return value


def slim(obj: Any) -> Any:
    """What the runner reads of a watched Job or Pod, and nothing else, as :class:`Kept`.

    Kept: name, namespace, uid, labels, creation and deletion times, resource version;
    a pod's node and runtime class; a Job's annotations, suspend flag, deadline and pod
    template runtime class; the status' set fields but those in :data:`UNREAD_STATUS`.
    Dropped: the rest of the spec (containers, volumes, env), a pod's annotations and
    managed fields — most of an object's memory, for every run in the namespace.
    Anything that is not a Job or Pod model is kept as it is.
    """
    if not isinstance(obj, k8s.V1Pod | k8s.V1Job) or obj.metadata is None:
        return obj
    meta = obj.metadata
    kept_meta = {
        "name": meta.name,
        "namespace": meta.namespace,
        "uid": meta.uid,
        "labels": meta.labels,
        "creation_timestamp": meta.creation_timestamp,
        "deletion_timestamp": meta.deletion_timestamp,
        "resource_version": meta.resource_version,
    }
    kept_meta = keep(kept_meta)
    status = keep(obj.status, UNREAD_STATUS) if obj.status is not None else None
    if isinstance(obj, k8s.V1Pod):
        spec = obj.spec
        return Kept(
            metadata=Kept(**_set(kept_meta)),
            spec=Kept(
                **_set(
                    {
                        "containers": [],
                        "node_name": spec.node_name if spec else None,
                        "runtime_class_name": spec.runtime_class_name if spec else None,
                    }
                )
            ),
            status=status,
        )
    template = obj.spec.template.spec if obj.spec and obj.spec.template else None
    # a Job's own annotations (a cancel request), whether it is suspended (queued), and its
    # deadline are read too; they are a few bytes
    kept_meta["annotations"] = keep(meta.annotations)
    job_spec = {
        "suspend": obj.spec.suspend if obj.spec else None,
        "active_deadline_seconds": obj.spec.active_deadline_seconds if obj.spec else None,
        "template": Kept(
            spec=Kept(
                **_set(
                    {
                        "containers": [],
                        "runtime_class_name": template.runtime_class_name if template else None,
                    }
                )
            )
        ),
    }
    return Kept(metadata=Kept(**_set(kept_meta)), spec=Kept(**_set(job_spec)), status=status)


def _set(fields: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in fields.items() if v is not None}


# a re-list reads this many objects a page: the full objects of one page (tens of KiB
# each) are all that is ever held at once, not those of every run in the namespace
LIST_PAGE = 200


@dataclass
class _Cache:
    objects: dict[str, KubeModel] = field(default_factory=dict)
    # the last state of each object seen deleted (its annotations say why it went)
    gone: dict[str, KubeModel] = field(default_factory=dict)
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
        objects: dict[str, Any] = {}
        token: str | None = None
        version: str | None = None
        while True:
            page = self._list_fn(kind)(
                self.namespace, label_selector=self.selector, limit=LIST_PAGE, _continue=token
            )
            self.requests += 1
            for o in page.items:
                # an object unchanged since it was cached (same resource version) is the
                # cached one: a re-list does not hold every run's object twice
                cached = cache.objects.get(o.metadata.name)
                same = cached is not None and (
                    cached.metadata.resource_version == o.metadata.resource_version
                )
                objects[o.metadata.name] = cached if same else slim(o)
            # every page is of the first one's snapshot: watch from its version
            version = version or page.metadata.resource_version
            token = getattr(page.metadata, "var_continue", None)
            del page
            if not token:
                break
        with self._cond:
            cache.objects = objects
            cache.resource_version = version
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
                            cache.gone[obj.metadata.name] = slim(obj)
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

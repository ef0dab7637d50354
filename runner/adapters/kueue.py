"""Reading Kueue's view of a queued Job: its Workload's admission state and its queue.

Best effort by design: a cluster without Kueue's CRDs, or a runner without read
access to them, yields None (the run still reports "queued", just without why).
"""

from __future__ import annotations

import logging
import re
import threading
import time
from typing import Any

from kubernetes import client as k8s
from kubernetes.client.rest import ApiException

log = logging.getLogger("evalrun.adapters.kueue")

KUEUE_GROUP = "kueue.x-k8s.io"
# v1beta2 is the storage version from Kueue 0.15 on; older releases serve only v1beta1.
KUEUE_VERSIONS = ("v1beta2", "v1beta1")
JOB_UID_LABEL = "kueue.x-k8s.io/job-uid"
# Kueue's QuotaReserved message when the ClusterQueue does not cover a requested resource
# at all: no amount of waiting admits such a Workload, only changing the ClusterQueue.
_UNCOVERED = re.compile(r"resource (\S+) unavailable in ClusterQueue")
_TIMEOUT_S = 10


def _first_served(call: Any) -> Any:
    for version in KUEUE_VERSIONS:
        try:
            return call(version)
        except ApiException as exc:
            if exc.status != 404 or version == KUEUE_VERSIONS[-1]:
                raise
    return None


def _list(api: k8s.ApiClient, namespace: str, plural: str, **kw: Any) -> list[dict[str, Any]]:
    custom = k8s.CustomObjectsApi(api)
    found = _first_served(
        lambda v: custom.list_namespaced_custom_object(
            KUEUE_GROUP, v, namespace, plural, _request_timeout=_TIMEOUT_S, **kw
        )
    )
    items = found.get("items") if isinstance(found, dict) else None
    return [i for i in items or [] if isinstance(i, dict)]


# One list of a namespace's Workloads serves every run waiting there for this long: a
# sweep of 500 queued runs reads them once per interval, not 500 times.
_LIST_TTL_S = 5.0
_lists: dict[tuple[int, str], tuple[float, list[dict[str, Any]]]] = {}
_lists_lock = threading.Lock()


def _workloads(api: k8s.ApiClient, namespace: str) -> list[dict[str, Any]]:
    key = (id(api), namespace)
    with _lists_lock:
        cached = _lists.get(key)
        if cached is not None and time.monotonic() - cached[0] < _LIST_TTL_S:
            return cached[1]
    items = _list(api, namespace, "workloads")
    with _lists_lock:
        _lists[key] = (time.monotonic(), items)
    return items


def _part(obj: Any, key: str) -> dict[str, Any]:
    """``obj[key]`` when both are mappings (a Workload read from the API may be odd)."""
    value = obj.get(key) if isinstance(obj, dict) else None
    return value if isinstance(value, dict) else {}


def _conditions(workload: dict[str, Any]) -> dict[str, dict[str, Any]]:
    status = _part(workload, "status")
    return {str(c.get("type")): c for c in status.get("conditions") or [] if isinstance(c, dict)}


def _waiting(workload: dict[str, Any]) -> bool:
    """Not (yet, or no longer) holding quota, and not finished."""
    conditions = _conditions(workload)
    return not any(
        (conditions.get(kind) or {}).get("status") == "True"
        for kind in ("QuotaReserved", "Admitted", "Finished")
    )


def _order_key(workload: dict[str, Any]) -> tuple[int, str, str]:
    """Kueue's order within a queue: higher priority first, then the older Workload."""
    spec = _part(workload, "spec")
    meta = _part(workload, "metadata")
    priority = spec.get("priority")
    return (
        -(priority if isinstance(priority, int) else 0),
        str(meta.get("creationTimestamp") or ""),
        str(meta.get("name") or ""),
    )


def _own(items: list[dict[str, Any]], job_uid: str) -> dict[str, Any] | None:
    """The Workload Kueue made for the Job ``job_uid``, if it has made it."""
    return next(
        (w for w in items if _part(_part(w, "metadata"), "labels").get(JOB_UID_LABEL) == job_uid),
        None,
    )


def queue_position(items: list[dict[str, Any]], job_uid: str) -> tuple[int, int] | None:
    """Where the Job's Workload waits in its LocalQueue: (position from 1, how many wait),
    in Kueue's order (priority, then age); None when it is not waiting there."""
    own = _own(items, job_uid)
    if own is None or not _waiting(own):
        return None
    queue = _part(own, "spec").get("queueName")
    waiting = [w for w in items if _part(w, "spec").get("queueName") == queue and _waiting(w)]
    ahead = sum(1 for w in waiting if _order_key(w) < _order_key(own))
    return ahead + 1, len(waiting)


def workload_reason(api: k8s.ApiClient, namespace: str, job_uid: str, queue: str) -> str | None:
    """Why Kueue has not admitted the Job yet and where it waits in its LocalQueue; None if
    unknown (no Kueue, no read access)."""
    try:
        items = _workloads(api, namespace)
    except (ApiException, OSError, ValueError) as exc:  # no CRDs or no RBAC
        log.debug("cannot read Kueue objects: %s", exc)
        return None
    own = _own(items, job_uid)
    if own is None:
        return "waiting for Kueue to create the Workload"
    conditions = _conditions(own)
    reserved = conditions.get("QuotaReserved") or {}
    evicted = conditions.get("Evicted") or {}
    if evicted.get("status") == "True":
        message = f"evicted: {evicted.get('message') or evicted.get('reason')}"
    elif reserved.get("status") == "False":
        message = str(reserved.get("message") or reserved.get("reason") or "pending")
    else:
        message = "pending admission"
    position = queue_position(items, job_uid)
    if position is not None:
        message += f"; position {position[0]} of {position[1]} waiting in LocalQueue {queue}"
    return message


def uncovered_resource(reason: str | None) -> str | None:
    """The resource Kueue's reason says the ClusterQueue does not cover, if it says so."""
    match = _UNCOVERED.search(reason or "")
    return match[1] if match else None

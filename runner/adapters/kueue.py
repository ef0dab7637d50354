"""Reading Kueue's view of a queued Job: its Workload's admission state and its queue.

Best effort by design: a cluster without Kueue's CRDs, or a runner without read
access to them, yields None (the run still reports "queued", just without why).
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from kubernetes import client as k8s
from kubernetes.client.rest import ApiException

from runner._internal.foreign import KubeObject

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


def _list(api: k8s.ApiClient, namespace: str, plural: str, **kw: Any) -> list[KubeObject]:
    custom = k8s.CustomObjectsApi(api)
    found = _first_served(
        lambda v: custom.list_namespaced_custom_object(
            KUEUE_GROUP, v, namespace, plural, _request_timeout=_TIMEOUT_S, **kw
        )
    )
    items = found.get("items") if isinstance(found, dict) else None
    return [i for i in items or [] if isinstance(i, dict)]


@dataclass(frozen=True)
class WorkloadCondition:
    """One condition of a Workload, its values as the API gave them."""

    status: object = None
    reason: object = None
    message: object = None


@dataclass(frozen=True)
class Workload:
    """What evalrun reads of a Kueue Workload: which Job it is for, where it waits, in what
    order, and its conditions. Parsed leniently (:func:`parse_workload`): a part that is
    not what Kueue writes reads as absent."""

    job_uid: object
    queue_name: object
    priority: int
    created: str
    name: str
    conditions: dict[str, WorkloadCondition]

    def condition(self, kind: str) -> WorkloadCondition:
        return self.conditions.get(kind) or WorkloadCondition()

    @property
    def waiting(self) -> bool:
        """Not (yet, or no longer) holding quota, and not finished."""
        return not any(
            self.condition(kind).status == "True"
            for kind in ("QuotaReserved", "Admitted", "Finished")
        )

    @property
    def order_key(self) -> tuple[int, str, str]:
        """Kueue's order within a queue: higher priority first, then the older Workload."""
        return (-self.priority, self.created, self.name)


def _part(obj: object, key: str) -> KubeObject:
    """``obj[key]`` when both are mappings (a Workload read from the API may be odd)."""
    value = obj.get(key) if isinstance(obj, dict) else None
    return value if isinstance(value, dict) else {}


def parse_workload(obj: object) -> Workload:
    """The parts of a Workload evalrun reads, from the object the API returned."""
    spec, meta, status = _part(obj, "spec"), _part(obj, "metadata"), _part(obj, "status")
    priority = spec.get("priority")
    conditions = {
        str(c.get("type")): WorkloadCondition(c.get("status"), c.get("reason"), c.get("message"))
        for c in status.get("conditions") or []
        if isinstance(c, dict)
    }
    return Workload(
        job_uid=_part(meta, "labels").get(JOB_UID_LABEL),
        queue_name=spec.get("queueName"),
        priority=priority if isinstance(priority, int) else 0,
        created=str(meta.get("creationTimestamp") or ""),
        name=str(meta.get("name") or ""),
        conditions=conditions,
    )


# One list of a namespace's Workloads serves every run waiting there for this long: a
# sweep of 500 queued runs reads them once per interval, not 500 times.
_LIST_TTL_S = 5.0
_lists: dict[tuple[int, str], tuple[float, list[Workload]]] = {}
_lists_lock = threading.Lock()


def _workloads(api: k8s.ApiClient, namespace: str) -> list[Workload]:
    key = (id(api), namespace)
    with _lists_lock:
        cached = _lists.get(key)
        if cached is not None and time.monotonic() - cached[0] < _LIST_TTL_S:
            return cached[1]
    items = [parse_workload(i) for i in _list(api, namespace, "workloads")]
    with _lists_lock:
        _lists[key] = (time.monotonic(), items)
    return items


def _own(items: Sequence[Workload], job_uid: str) -> Workload | None:
    """The Workload Kueue made for the Job ``job_uid``, if it has made it."""
    return next((w for w in items if w.job_uid == job_uid), None)


def _position(items: Sequence[Workload], job_uid: str) -> tuple[int, int] | None:
    own = _own(items, job_uid)
    if own is None or not own.waiting:
        return None
    waiting = [w for w in items if w.queue_name == own.queue_name and w.waiting]
    ahead = sum(1 for w in waiting if w.order_key < own.order_key)
    return ahead + 1, len(waiting)


def queue_position(items: Sequence[KubeObject], job_uid: str) -> tuple[int, int] | None:
    """Where the Job's Workload waits in its LocalQueue: (position from 1, how many wait),
    in Kueue's order (priority, then age); None when it is not waiting there."""
    return _position([parse_workload(i) for i in items], job_uid)


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
    reserved, evicted = own.condition("QuotaReserved"), own.condition("Evicted")
    if evicted.status == "True":
        message = f"evicted: {evicted.message or evicted.reason}"
    elif reserved.status == "False":
        message = str(reserved.message or reserved.reason or "pending")
    else:
        message = "pending admission"
    position = _position(items, job_uid)
    if position is not None:
        message += f"; position {position[0]} of {position[1]} waiting in LocalQueue {queue}"
    return message


def uncovered_resource(reason: str | None) -> str | None:
    """The resource Kueue's reason says the ClusterQueue does not cover, if it says so."""
    match = _UNCOVERED.search(reason or "")
    return match[1] if match else None

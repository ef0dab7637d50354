"""Reading Kueue's view of a queued Job: its Workload's admission state and its queue.

Best effort by design: a cluster without Kueue's CRDs, or a runner without read
access to them, yields None (the run still reports "queued", just without why).
"""

from __future__ import annotations

import logging
import re
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


def _pending_in(api: k8s.ApiClient, namespace: str, queue: str) -> int | None:
    custom = k8s.CustomObjectsApi(api)
    found = _first_served(
        lambda v: custom.get_namespaced_custom_object(
            KUEUE_GROUP, v, namespace, "localqueues", queue, _request_timeout=_TIMEOUT_S
        )
    )
    pending = ((found or {}).get("status") or {}).get("pendingWorkloads")
    return pending if isinstance(pending, int) else None


def workload_reason(api: k8s.ApiClient, namespace: str, job_uid: str, queue: str) -> str | None:
    """Why Kueue has not admitted the Job yet, and how many wait in its queue; None if unknown."""
    try:
        items = _list(api, namespace, "workloads", label_selector=f"{JOB_UID_LABEL}={job_uid}")
        pending = _pending_in(api, namespace, queue)
    except (ApiException, OSError, ValueError) as exc:  # no CRDs or no RBAC
        log.debug("cannot read Kueue objects: %s", exc)
        return None
    if not items:
        message = "waiting for Kueue to create the Workload"
    else:
        status = items[0].get("status") or {}
        conditions = {c.get("type"): c for c in status.get("conditions") or []}
        reserved = conditions.get("QuotaReserved") or {}
        evicted = conditions.get("Evicted") or {}
        if evicted.get("status") == "True":
            message = f"evicted: {evicted.get('message') or evicted.get('reason')}"
        elif reserved.get("status") == "False":
            message = str(reserved.get("message") or reserved.get("reason") or "pending")
        else:
            message = "pending admission"
    if pending is not None:
        message += f"; {pending} pending in LocalQueue {queue}"
    return message


def uncovered_resource(reason: str | None) -> str | None:
    """The resource Kueue's reason says the ClusterQueue does not cover, if it says so."""
    match = _UNCOVERED.search(reason or "")
    return match[1] if match else None

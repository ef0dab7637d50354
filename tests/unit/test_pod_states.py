"""A pod kube-scheduler cannot place now: waiting for capacity other pods hold, or stuck.

The messages are kube-scheduler's (v1.35: FitError plus the preemption PostFilter's
statuses), as the PodScheduled condition carries them."""

from __future__ import annotations

import datetime as dt

import pytest
from kubernetes import client

from runner.backends.pod_states import pod_problem, unschedulable, waiting_for_capacity
from runner.model.plan import BackendResult
from runner.workflows.judge import _timeout_reason

pytestmark = pytest.mark.unit

GRACE = {"unschedulable": 60.0, "image_pull": 60.0}
IN_USE = (
    "0/3 nodes are available: 1 Insufficient nvidia.com/gpu, 2 node(s) didn't match Pod's "
    "node affinity/selector. preemption: 0/3 nodes are available: 1 No preemption victims "
    "found for incoming pod, 2 Preemption is not helpful for scheduling."
)
NEVER_FITS = (
    "0/1 nodes are available: 1 Insufficient nvidia.com/gpu. preemption: 0/1 nodes are "
    "available: 1 Preemption is not helpful for scheduling."
)
NO_MATCH = (
    "0/51 nodes are available: 51 node(s) didn't match Pod's node affinity/selector. "
    "preemption: 0/51 nodes are available: 51 Preemption is not helpful for scheduling."
)
TERMINATING = (
    "0/1 nodes are available: 1 Insufficient cpu. preemption: not eligible due to a "
    "terminating pod on the nominated node."
)
NEVER_PREEMPTS = (
    "0/1 nodes are available: 1 Insufficient cpu. preemption: not eligible due to "
    "preemptionPolicy=Never."
)


def _pod(message: str | None, *, age_s: float, nominated: str | None = None) -> client.V1Pod:
    created = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=age_s)
    conditions = (
        [client.V1PodCondition(type="PodScheduled", status="False", reason="Unschedulable",
                               message=message)]
        if message is not None
        else [client.V1PodCondition(type="PodScheduled", status="True")]
    )
    return client.V1Pod(
        metadata=client.V1ObjectMeta(name="evalrun-r-1-abcde", creation_timestamp=created),
        status=client.V1PodStatus(phase="Pending", conditions=conditions,
                                  nominated_node_name=nominated),
    )


@pytest.mark.parametrize("message", [IN_USE, TERMINATING])
def test_a_pod_that_waits_for_capacity_in_use_is_never_stuck(message):
    pod = _pod(message, age_s=3600)
    assert waiting_for_capacity(pod) == message
    assert pod_problem(pod, dt.datetime.now(dt.UTC).timestamp(), GRACE) is None


def test_a_pod_nominated_to_a_node_waits_for_its_preempted_pods():
    pod = _pod(NEVER_PREEMPTS, age_s=3600, nominated="node-1")
    assert waiting_for_capacity(pod) == NEVER_PREEMPTS
    assert pod_problem(pod, dt.datetime.now(dt.UTC).timestamp(), GRACE) is None


@pytest.mark.parametrize("message", [NEVER_FITS, NO_MATCH, NEVER_PREEMPTS, "", None])
def test_a_pod_no_node_can_ever_take_is_stuck_after_its_grace(message):
    now = dt.datetime.now(dt.UTC).timestamp()
    condition = message if message is not None else ""
    young, old = _pod(condition, age_s=5), _pod(condition, age_s=61)
    assert waiting_for_capacity(old) is None
    assert pod_problem(young, now, GRACE) is None
    assert pod_problem(old, now, GRACE) == ("Unschedulable", message or "no node matches")


def test_a_scheduled_pod_is_neither_waiting_nor_unschedulable():
    pod = _pod(None, age_s=3600)
    assert unschedulable(pod) is None and waiting_for_capacity(pod) is None
    assert pod_problem(pod, dt.datetime.now(dt.UTC).timestamp(), GRACE) is None


def _deadline_result(details: dict) -> BackendResult:
    return BackendResult(backend="kubernetes", exit_code=None, timed_out=True,
                         image_digest_confirmed=False, runtime="runsc", details=details)


def test_a_run_that_waited_for_capacity_until_its_deadline_says_so():
    details = {"job_condition": "DeadlineExceeded", "active_deadline_s": 900,
               "capacity_waits": {"evalrun-r-1-abcde": IN_USE}}
    reason = _timeout_reason(None, _deadline_result(details))  # type: ignore[arg-type]
    assert "activeDeadlineSeconds (900 s)" in reason
    assert "evalrun-r-1-abcde had waited for capacity in use by other pods" in reason
    assert "Insufficient nvidia.com/gpu" in reason
    plain = _timeout_reason(None, _deadline_result(  # type: ignore[arg-type]
        {"job_condition": "DeadlineExceeded", "active_deadline_s": 900}))
    assert "waited" not in plain

"""The Kubernetes adapter: API errors translated once, by type; the shared watch's bookkeeping.

No cluster: ApiException values stand in for the API server's answers, and a scripted
list/watch pair stands in for its list and watch endpoints. The k8s and kwok tiers
run the same code against a real API server (restarts, real 410s).
"""

from __future__ import annotations

import json
import threading
from collections import deque
from types import SimpleNamespace
from typing import Any

import pytest
import urllib3.exceptions
from kubernetes import client as k8s
from kubernetes.client.rest import ApiException

from runner._internal.retry import transient_policy
from runner.adapters.kubernetes import api_call, translated
from runner.adapters.kube_watch import LIST_PAGE, NamespaceWatch
from runner.errors import (
    APIConflict,
    APIForbidden,
    APIGone,
    APINotFound,
    InfrastructureError,
    InputError,
    KubernetesAPIError,
    KubernetesError,
    KubernetesRejected,
    TransientInfrastructureError,
    TransientKubernetesError,
)

pytestmark = pytest.mark.unit


def _api_exception(status: int, message: str = "boom", reason: str = "Because") -> ApiException:
    exc = ApiException(status=status, reason="HTTP phrase")
    exc.body = json.dumps({"kind": "Status", "message": message, "reason": reason, "code": status})
    return exc


@pytest.mark.parametrize(
    ("status", "cls", "exit_code", "transient", "text"),
    [
        (409, APIConflict, 5, False, "create Job j: conflict: boom"),
        (403, APIForbidden, 5, False, "create Job j: forbidden: boom"),
        (404, APINotFound, 5, False, "create Job j: not found: boom"),
        (410, APIGone, 5, True, "create Job j: resource version too old"),
        (429, TransientKubernetesError, 5, True, "create Job j: API server error 429: boom"),
        (503, TransientKubernetesError, 5, True, "create Job j: API server error 503: boom"),
        (422, KubernetesRejected, 2, False, "create Job j: rejected by the API server: boom"),
        (400, KubernetesRejected, 2, False, "create Job j: rejected by the API server: boom"),
        (418, KubernetesAPIError, 5, False, "create Job j: API error 418: boom"),
    ],
)
def test_api_errors_are_translated_by_status_with_namespace_name_status_reason(
    status: int, cls: type[KubernetesError], exit_code: int, transient: bool, text: str
) -> None:
    original = _api_exception(status)
    with pytest.raises(cls) as caught, translated("create Job j", namespace="evals", name="j"):
        raise original
    err = caught.value
    assert type(err) is cls and err.message == text
    assert err.exit_code == exit_code
    assert isinstance(err, TransientInfrastructureError) is transient
    assert (err.namespace, err.name, err.status, err.reason) == ("evals", "j", status, "Because")
    assert err.__cause__ is original
    assert err.as_dict()["namespace"] == "evals" and err.as_dict()["status"] == str(status)
    assert "  namespace: evals" in err.diagnostics()


def test_rejected_request_is_bad_input_not_infrastructure() -> None:
    with pytest.raises(InputError) as caught, translated("create Job j"):
        raise _api_exception(422)
    assert not isinstance(caught.value, InfrastructureError)


def test_status_without_a_json_body_uses_the_http_reason() -> None:
    exc = ApiException(status=403, reason="Forbidden")
    exc.body = "<html>nope</html>"
    with pytest.raises(APIForbidden) as caught, translated("read node", name="n1"):
        raise exc
    assert caught.value.message == "read node: forbidden: Forbidden"
    assert caught.value.reason == "Forbidden"


@pytest.mark.parametrize(
    "transport",
    [
        urllib3.exceptions.MaxRetryError(None, "/api", "refused"),
        urllib3.exceptions.ProtocolError("connection aborted"),
        ConnectionRefusedError(111, "refused"),
        TimeoutError("read timed out"),
    ],
)
def test_unreachable_api_server_is_transient_with_a_hint(transport: Exception) -> None:
    with pytest.raises(TransientKubernetesError) as caught, translated("list jobs", namespace="e"):
        raise transport
    err = caught.value
    assert err.message == f"list jobs: API server unreachable: {transport.__class__.__name__}"
    assert err.namespace == "e" and err.status is None
    assert err.hint and "kubeconfig" in err.hint
    assert err.__cause__ is transport


def _fast_policy() -> Any:
    return transient_policy(attempts=4, max_delay_s=60.0, sleep=lambda _s: None)


def test_api_call_retries_transient_errors_then_succeeds() -> None:
    answers: deque[Any] = deque([_api_exception(503), urllib3.exceptions.ProtocolError("x"), "ok"])
    calls = []

    def fn() -> Any:
        calls.append(1)
        answer = answers.popleft()
        if isinstance(answer, Exception):
            raise answer
        return answer

    assert api_call("read Job j", fn, namespace="e", name="j", policy=_fast_policy()) == "ok"
    assert len(calls) == 3


def test_api_call_does_not_retry_permanent_errors() -> None:
    calls = []

    def fn() -> Any:
        calls.append(1)
        raise _api_exception(409)

    with pytest.raises(APIConflict):
        api_call("create Job j", fn, namespace="e", name="j", policy=_fast_policy())
    assert len(calls) == 1


def test_api_call_gives_up_after_retries_keeping_the_facts() -> None:
    def fn() -> Any:
        raise _api_exception(500, message="etcd down")

    with pytest.raises(InfrastructureError) as caught:
        api_call("create Job j", fn, namespace="e", name="j", policy=_fast_policy())
    err = caught.value
    assert not isinstance(err, TransientInfrastructureError) and err.exit_code == 5
    assert "still failing after retries" in err.message and "etcd down" in err.message
    assert err.fields["namespace"] == "e" and err.fields["name"] == "j"
    assert isinstance(err.__cause__, TransientKubernetesError)


def test_api_call_without_retries_raises_the_transient_error_itself() -> None:
    def fn() -> Any:
        raise _api_exception(503)

    with pytest.raises(TransientKubernetesError):
        api_call("delete Job j", fn, retries=False)


# --------------------------------------------------------------------------- shared watch


def _obj(name: str, rv: str, run_id: str | None = None) -> Any:
    labels = {"evalrun.dev/run-id": run_id} if run_id else {}
    return SimpleNamespace(
        metadata=SimpleNamespace(
            name=name, resource_version=rv, labels=labels, creation_timestamp=None
        )
    )


def _listing(items: list[Any], rv: str) -> Any:
    return SimpleNamespace(items=items, metadata=SimpleNamespace(resource_version=rv))


class _ScriptedServer:
    """One kind's list and watch endpoints, answering from scripts in order."""

    def __init__(self, listings: list[Any], streams: list[Any]) -> None:
        self.listings = deque(listings)
        self.streams = deque(streams)
        self.list_calls = 0
        self.watched_from: list[str | None] = []
        self.idle = threading.Event()

    def list(self, namespace: str, **kwargs: Any) -> Any:
        self.list_calls += 1
        return self.listings.popleft() if len(self.listings) > 1 else self.listings[0]

    def stream(self, func: Any, namespace: str, **kwargs: Any) -> Any:
        self.watched_from.append(kwargs["resource_version"])
        if not self.streams:
            self.idle.set()
            threading.Event().wait(0.02)  # the API server's watch timeout, shortened
            return
        script = self.streams.popleft()
        if isinstance(script, BaseException):
            raise script
        yield from script


class _FakeWatch:
    def __init__(self, server: _ScriptedServer) -> None:
        self.server = server

    def stream(self, func: Any, namespace: str, **kwargs: Any) -> Any:
        return self.server.stream(func, namespace, **kwargs)

    def stop(self) -> None:
        pass


class _ScriptedWatch(NamespaceWatch):
    def __init__(self, jobs: _ScriptedServer, pods: _ScriptedServer) -> None:
        super().__init__(
            k8s.ApiClient(), "evals", selector="app=evalrun", run_label="evalrun.dev/run-id"
        )
        self.servers = {"jobs": jobs, "pods": pods}

    def _list_fn(self, kind: str) -> Any:
        return self.servers[kind].list

    def _new_watch(self, kind: str) -> Any:
        return _FakeWatch(self.servers[kind])


def _event(etype: str, obj: Any) -> dict[str, Any]:
    return {"type": etype, "object": obj}


def test_watch_relists_on_410_and_disconnects_and_keeps_resource_versions() -> None:
    jobs = _ScriptedServer(
        listings=[
            _listing([_obj("job-a", "1")], "1"),
            _listing([_obj("job-b", "2"), _obj("job-c", "9")], "10"),
        ],
        streams=[
            [
                _event("ADDED", _obj("job-b", "2")),
                _event("BOOKMARK", _obj("bookmark", "3")),
                _event("DELETED", _obj("job-a", "4")),
                _event("ERROR", {"code": 410, "message": "too old"}),
            ],
            ApiException(status=410, reason="Gone"),
            ConnectionRefusedError(111, "API server restarting"),
            [_event("ADDED", _obj("job-d", "11"))],
        ],
    )
    pods = _ScriptedServer(listings=[_listing([_obj("pod-1", "5", run_id="r1")], "5")], streams=[])
    watch = _ScriptedWatch(jobs, pods).start(sync_timeout_s=5)
    try:
        assert watch.wait(lambda: watch.job("job-d"), timeout=10)
        assert jobs.idle.wait(10)
        # list → watch from its version; every 410 (in-stream or raised) and the
        # dropped connection re-list, and the next watch starts from the new listing.
        assert watch.jobs.relists == jobs.list_calls == 4
        assert jobs.watched_from[:5] == ["1", "10", "10", "10", "11"]
        assert sorted(watch.jobs.objects) == ["job-b", "job-c", "job-d"]
        assert watch.jobs.resource_version == "11"
        assert [p.metadata.name for p in watch.pods_of("r1")] == ["pod-1"]
        assert watch.pods_of("other") == []
    finally:
        watch.stop()


def test_watch_events_update_the_cache_bookmarks_only_the_version() -> None:
    jobs = _ScriptedServer(
        listings=[_listing([_obj("job-a", "1")], "1")],
        streams=[
            [
                _event("ADDED", _obj("job-b", "2")),
                _event("BOOKMARK", _obj("bookmark", "3")),
                _event("DELETED", _obj("job-a", "4")),
            ]
        ],
    )
    pods = _ScriptedServer(listings=[_listing([], "1")], streams=[])
    watch = _ScriptedWatch(jobs, pods).start(sync_timeout_s=5)
    try:
        assert jobs.idle.wait(10)
        assert watch.wait(lambda: watch.jobs.events == 3, timeout=10)
        assert sorted(watch.jobs.objects) == ["job-b"]
        assert watch.jobs.resource_version == "4" and watch.jobs.relists == 1
        assert jobs.watched_from[:2] == ["1", "4"]
    finally:
        watch.stop()


def test_a_bookmark_left_as_a_dict_moves_the_version_without_a_relist() -> None:
    # kubernetes >= 37 hands BOOKMARK objects over undeserialized
    bookmark = {"kind": "Job", "metadata": {"resourceVersion": "7"}}
    jobs = _ScriptedServer(
        listings=[_listing([_obj("job-a", "1")], "1")],
        streams=[[_event("BOOKMARK", bookmark), _event("ADDED", _obj("job-b", "8"))]],
    )
    pods = _ScriptedServer(listings=[_listing([], "1")], streams=[])
    watch = _ScriptedWatch(jobs, pods).start(sync_timeout_s=5)
    try:
        assert watch.wait(lambda: "job-b" in watch.jobs.objects, timeout=10)
        assert watch.jobs.relists == 1 and watch.jobs.resource_version == "8"
        assert sorted(watch.jobs.objects) == ["job-a", "job-b"]
    finally:
        watch.stop()


def test_watch_that_cannot_list_fails_start_with_the_namespace() -> None:
    class Unlistable(_ScriptedServer):
        def list(self, namespace: str, **kwargs: Any) -> Any:
            raise ConnectionRefusedError(111, "refused")

    watch = _ScriptedWatch(Unlistable([], []), _ScriptedServer([_listing([], "1")], []))
    try:
        with pytest.raises(KubernetesAPIError) as caught:
            watch.start(sync_timeout_s=0.3)
        assert caught.value.namespace == "evals" and caught.value.exit_code == 5
        assert "could not list evalrun objects in namespace 'evals'" in caught.value.message
    finally:
        watch.stop()


def _full_pod(name: str) -> Any:
    """A pod as the API server returns it: spec, managed fields, status."""
    return k8s.ApiClient()._ApiClient__deserialize(  # the client's own deserializer
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": name,
                "namespace": "evals",
                "uid": "u-" + name,
                "resourceVersion": "7",
                "labels": {"evalrun.dev/run-id": "r1"},
                "annotations": {"a": "x" * 2000},
                "creationTimestamp": "2026-01-01T00:00:00Z",
                "managedFields": [
                    {"manager": "kubelet", "operation": "Update", "fieldsV1": {"f:status": {}}}
                ]
                * 5,
            },
            "spec": {
                "nodeName": "node-1",
                "runtimeClassName": "gvisor",
                "containers": [
                    {
                        "name": "agent",
                        "image": "reg/x@sha256:" + "a" * 64,
                        "env": [{"name": f"E{i}", "value": "v" * 50} for i in range(40)],
                        "volumeMounts": [{"name": f"v{i}", "mountPath": f"/m/{i}"} for i in range(8)],
                    }
                ],
                "volumes": [{"name": f"v{i}", "emptyDir": {}} for i in range(8)],
            },
            "status": {
                "phase": "Running",
                "containerStatuses": [
                    {
                        "name": "agent",
                        "image": "reg/x",
                        "imageID": "reg/x@sha256:" + "a" * 64,
                        "ready": True,
                        "restartCount": 0,
                        "state": {"running": {"startedAt": "2026-01-01T00:00:01Z"}},
                    }
                ],
            },
        },
        "V1Pod",
    )


def test_the_watch_cache_keeps_what_the_runner_reads_and_drops_the_rest() -> None:
    import tracemalloc

    from runner.adapters.kube_watch import slim

    pod = _full_pod("pod-1")
    kept = slim(pod)
    assert kept.metadata.name == "pod-1" and kept.metadata.labels == {"evalrun.dev/run-id": "r1"}
    assert kept.metadata.creation_timestamp == pod.metadata.creation_timestamp
    assert kept.spec.node_name == "node-1" and kept.spec.runtime_class_name == "gvisor"
    # the status is kept whole (its set fields), read as the model's attributes read
    assert kept.status.phase == pod.status.phase == "Running"
    running = kept.status.container_statuses[0].state.running
    assert running.started_at == pod.status.container_statuses[0].state.running.started_at
    assert kept.status.container_statuses[0].image_id == "reg/x@sha256:" + "a" * 64
    assert kept.status.container_statuses[0].state.terminated is None  # unset: None
    assert kept.status.conditions is None and kept.status.reason is None
    with pytest.raises(AttributeError):
        kept.status.phase = "Failed"  # the cache is read-only
    assert not kept.spec.containers and not kept.metadata.managed_fields
    assert kept.metadata.annotations is None
    job = k8s.V1Job(
        metadata=k8s.V1ObjectMeta(name="job-1", annotations={"a": "b"}),
        spec=k8s.V1JobSpec(
            template=k8s.V1PodTemplateSpec(
                spec=k8s.V1PodSpec(containers=[k8s.V1Container(name="c")], runtime_class_name="g")
            )
        ),
        status=k8s.V1JobStatus(succeeded=1),
    )
    slim_job = slim(job)
    assert slim_job.spec.template.spec.runtime_class_name == "g"
    assert slim_job.status.succeeded == 1 and not slim_job.spec.template.spec.containers
    # what 200 cached pods hold: the slim form is a fraction of the full one
    sizes = []
    for keep in (lambda p: p, slim):
        tracemalloc.start()
        held = [keep(_full_pod(f"p{i}")) for i in range(200)]
        sizes.append(tracemalloc.get_traced_memory()[0])
        tracemalloc.stop()
        del held
    assert sizes[1] < sizes[0] / 8, sizes


def test_a_relist_keeps_the_cached_object_of_an_unchanged_resource_version() -> None:
    first = _obj("job-a", "1")
    jobs = _ScriptedServer(
        listings=[
            _listing([first, _obj("job-b", "2")], "2"),
            _listing([_obj("job-a", "1"), _obj("job-b", "3")], "3"),
        ],
        streams=[[_event("ERROR", {"code": 410, "message": "too old"})]],
    )
    pods = _ScriptedServer(listings=[_listing([], "1")], streams=[])
    watch = _ScriptedWatch(jobs, pods).start(sync_timeout_s=5)
    try:
        assert watch.wait(lambda: watch.jobs.relists == 2, timeout=10)
        assert watch.job("job-a") is first  # unchanged: the cached object, not a second one
        assert watch.job("job-b").metadata.resource_version == "3"  # changed: the new one
    finally:
        watch.stop()


def test_a_relist_reads_pages_and_watches_from_the_first_pages_version() -> None:
    pages = deque(
        [
            SimpleNamespace(
                items=[_obj("job-a", "1")],
                metadata=SimpleNamespace(resource_version="5", var_continue="next"),
            ),
            SimpleNamespace(
                items=[_obj("job-b", "2")],
                metadata=SimpleNamespace(resource_version="5", var_continue=None),
            ),
        ]
    )
    calls: list[dict[str, Any]] = []

    class Paged(_ScriptedServer):
        def list(self, namespace: str, **kwargs: Any) -> Any:
            calls.append(kwargs)
            return pages.popleft()

    jobs = Paged(listings=[], streams=[])
    pods = _ScriptedServer(listings=[_listing([], "1")], streams=[])
    watch = _ScriptedWatch(jobs, pods).start(sync_timeout_s=5)
    try:
        assert jobs.idle.wait(10)
        assert sorted(watch.jobs.objects) == ["job-a", "job-b"]
        assert [c["_continue"] for c in calls] == [None, "next"]
        assert all(c["limit"] == LIST_PAGE for c in calls)
        assert jobs.watched_from[0] == "5" and watch.requests >= 3
    finally:
        watch.stop()

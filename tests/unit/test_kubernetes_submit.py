"""What the Kubernetes backend sends, in which order: the Job alone, its plan inside,
when the plan fits; else the Job suspended, its plan-only ConfigMap owned by it, the Job
resumed; and the clusters it refuses (exit 2 and 4).

No cluster: the API classes are replaced by a recorder that answers like the API server
(the created object, 409 for an existing one, 422 for a volume it cannot store). The k8s
tier sends the same objects to a real API server.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from kubernetes.client.rest import ApiException

import runner.backends.kubernetes as backend_mod
import runner.backends.manifests as manifests
from runner.backends.kubernetes import ClusterTarget, KubernetesBackend
from runner.errors import EnvironmentMismatch, InputError
from runner.model.plan import PlanInput, RunPlan

pytestmark = pytest.mark.unit

REF = "127.0.0.1:5000/evalrun/x-inputs@sha256:" + "1" * 64


def _plan(artifact_ref: str | None = REF) -> RunPlan:
    return RunPlan(
        run_id="r-abc", attempt=0, image_ref="127.0.0.1:5000/x@sha256:" + "a" * 64,
        expected_rootfs_digest="sha256:" + "b" * 64, runtime="runc", command=["true"],
        params={}, seed=0, metrics=[], expect={}, timeout_s=60, cpus=1.0, memory_mib=256,
        pids=64, spec_digest="sha256:" + "3" * 64, lock_digest="sha256:" + "4" * 64,
        spec_name="n",
        inputs=[PlanInput(role="model", name="m", host_path=Path("/m.bin"), sha256="c" * 64,
                          artifact_ref=artifact_ref)],
    )


class _Server:
    """Records every call; stores what it is sent, like the API server would."""

    def __init__(self, *, drop_image: bool = False, refuse_image: bool = False) -> None:
        self.calls: list[tuple[str, Any]] = []
        self.objects: dict[str, dict[str, Any]] = {}
        self.drop_image, self.refuse_image = drop_image, refuse_image

    def _conflict(self) -> ApiException:
        exc = ApiException(status=409, reason="Conflict")
        exc.body = json.dumps({"reason": "AlreadyExists", "message": "exists"})
        return exc

    def create(self, kind: str, body: dict[str, Any]) -> Any:
        self.calls.append((f"create {kind}", body))
        if kind in self.objects:
            raise self._conflict()
        stored = json.loads(json.dumps(body))
        if kind == "Job":
            volumes = stored["spec"]["template"]["spec"]["volumes"]
            if self.refuse_image:
                exc = ApiException(status=422, reason="Unprocessable Entity")
                exc.body = json.dumps({"message": "Job.batch is invalid: spec.template.spec."
                                       "volumes[1]: Required value: must specify a volume type"})
                raise exc
            if self.drop_image:
                for v in volumes:
                    v.pop("image", None)
            stored["metadata"]["uid"] = "job-uid-1"
        self.objects[kind] = stored
        return stored

    def read(self, kind: str) -> Any:
        self.calls.append((f"read {kind}", None))
        return self.objects[kind]


@pytest.fixture
def server(monkeypatch: pytest.MonkeyPatch) -> _Server:
    srv = _Server()

    class Batch:
        def __init__(self, api: Any) -> None:
            pass

        def create_namespaced_job(self, ns: str, body: dict[str, Any]) -> Any:
            return srv.create("Job", body)

        def read_namespaced_job(self, name: str, ns: str) -> Any:
            return srv.read("Job")

        def patch_namespaced_job(self, name: str, ns: str, body: dict[str, Any]) -> Any:
            srv.calls.append(("patch Job", body))

        def delete_namespaced_job(self, name: str, ns: str, **kw: Any) -> Any:
            srv.calls.append(("delete Job", kw))

    class Core:
        def __init__(self, api: Any) -> None:
            pass

        def create_namespaced_config_map(self, ns: str, body: dict[str, Any]) -> Any:
            return srv.create("ConfigMap", body)

        def read_namespaced_config_map(self, name: str, ns: str) -> Any:
            return srv.read("ConfigMap")

        def delete_namespaced_config_map(self, name: str, ns: str) -> Any:
            srv.calls.append(("delete ConfigMap", None))
            srv.objects.pop("ConfigMap")

    monkeypatch.setattr(backend_mod.k8s, "BatchV1Api", Batch)
    monkeypatch.setattr(backend_mod.k8s, "CoreV1Api", Core)
    monkeypatch.setattr(backend_mod, "as_plain", lambda obj: obj)
    return srv


def _backend() -> KubernetesBackend:
    backend = KubernetesBackend(ClusterTarget(namespace="evals"), hold_s=90)
    backend._api, backend._namespace = SimpleNamespace(), "evals"  # type: ignore[assignment]
    return backend


@pytest.fixture
def large_plans(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every plan is too large for the Job itself: it goes into a ConfigMap."""
    monkeypatch.setattr(manifests, "MAX_PLAN_ANNOTATION_BYTES", 10)


def test_a_plan_that_fits_is_one_request_the_job_with_its_plan(server: _Server) -> None:
    name = _backend().submit(_plan())
    assert [c for c, _ in server.calls] == ["create Job"]
    (_, job), = server.calls
    assert job["spec"]["suspend"] is False
    plan = json.loads(job["spec"]["template"]["metadata"]["annotations"]["evalrun.dev/plan"])
    assert (plan["collect"], plan["hold_s"], plan["emit_results"]) == ("exec", 90, True)
    assert plan["run_id"] == "r-abc" and name == job["metadata"]["name"]


def test_the_job_comes_suspended_then_its_owned_plan_then_the_resume(
    server: _Server, large_plans: None
) -> None:
    name = _backend().submit(_plan())
    assert [c for c, _ in server.calls] == ["create Job", "create ConfigMap", "patch Job"]
    job, configmap, resume = (body for _, body in server.calls)
    assert job["spec"]["suspend"] is True and resume == {"spec": {"suspend": False}}
    assert configmap["metadata"]["ownerReferences"][0]["uid"] == "job-uid-1"
    plan = json.loads(base64.b64decode(configmap["binaryData"]["plan.json"]))
    assert (plan["collect"], plan["hold_s"], plan["emit_results"]) == ("exec", 90, True)
    assert name == job["metadata"]["name"] == configmap["metadata"]["name"]


def test_a_second_submit_attaches_and_replaces_a_configmap_owned_by_a_gone_job(
    server: _Server, large_plans: None
) -> None:
    backend = _backend()
    backend.submit(_plan())
    server.objects["ConfigMap"]["metadata"]["ownerReferences"][0]["uid"] = "an-older-job"
    server.objects["Job"]["spec"]["suspend"] = False
    server.calls.clear()
    backend.submit(_plan())
    assert [c for c, _ in server.calls] == [
        "create Job", "read Job", "create ConfigMap", "read ConfigMap", "delete ConfigMap",
        "create ConfigMap",
    ]  # attached; the Job already runs, so no resume


def test_an_input_without_a_published_artifact_is_refused_before_anything_is_sent(
    server: _Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the namespace's policy is read first (tests/k8s checks that against a real API
    # server); here it passes, and the input is refused before any Job or ConfigMap request
    class Passing:
        def enforce(self) -> None:
            return None

    monkeypatch.setattr(backend_mod, "namespace_policy", lambda *a: Passing())
    with pytest.raises(InputError, match="re-lock with a registry|no published artifact"):
        _backend().preflight(_plan(artifact_ref=None))
    assert server.calls == []


@pytest.mark.parametrize("how", ["drop_image", "refuse_image"])
def test_an_api_server_without_image_volumes_is_exit_4_never_a_fallback(
    server: _Server, how: str
) -> None:
    setattr(server, how, True)
    with pytest.raises(EnvironmentMismatch) as caught:
        _backend().submit(_plan())
    assert caught.value.exit_code == 4
    assert "containerd >= 2.1" in caught.value.diagnostics()
    assert "create ConfigMap" not in [c for c, _ in server.calls]
    if how == "drop_image":
        assert [c for c, _ in server.calls][-1] == "delete Job"

import itertools
import json
from pathlib import Path

import pytest
import yaml

from runner.model.plan import PlanInput
from runner.errors import InputError, SpecError
from runner.workflows.run import make_plan, run_id_for
from runner.backends.manifests import (
    GPU_PRODUCT_LABEL,
    IMAGE_VOLUME_REQUIREMENT,
    LABEL_RUN_ID,
    LABEL_SPEC_HASH,
    MAX_CONFIGMAP_BYTES,
    MAX_PLAN_ANNOTATION_BYTES,
    PLAN_ANNOTATION,
    PREFLIGHT_ALLOWANCE_S,
    RESUME_PATCH,
    JobOptions,
    active_deadline_s,
    agent_plan_json,
    build_configmap,
    build_job,
    dropped_image_volumes,
    image_volume_support,
    input_volumes,
    job_name,
    plan_in_configmap,
    plan_inline,
    ttl_patch,
)
from runner.model.spec import load_spec, parse_spec
from runner.model.lock import LockedSpec

pytestmark = pytest.mark.unit
ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "digits" / "eval.yaml"
OPTS = JobOptions(namespace="evals")
IMAGE = "127.0.0.1:5000/evalrun/digits@sha256:" + "a" * 64
INPUTS = "127.0.0.1:5000/evalrun/digits-inputs@sha256:"
MODEL_REF, DATA_REF = INPUTS + "1" * 64, INPUTS + "2" * 64


def _lock(spec) -> LockedSpec:
    return LockedSpec.model_validate({
        "schema": "evalrun/lock/v1", "spec_name": spec.metadata.name,
        "spec_digest": spec.digest(), "base": None, "wheels": [],
        "image": {"ref": IMAGE, "rootfs_digest": "sha256:" + "b" * 64},
        "model": {"path": "model/weights.json", "sha256": "c" * 64, "size": 1},
        "datasets": [{"path": "d.jsonl", "sha256": "d" * 64, "size": 1, "name": "digits-test",
                      "split": "test", "license": "x", "source": "y"}],
        "source": {"commit": None, "dirty": False, "tree_sha256": "e" * 64},
    })


def _inputs(model_ref=MODEL_REF, data_ref=DATA_REF):
    return [PlanInput(role="model", name="model", host_path=Path("/x/weights.json"),
                      sha256="c" * 64, artifact_ref=model_ref),
            PlanInput(role="dataset", name="digits-test", host_path=Path("/x/d.jsonl"),
                      sha256="d" * 64, artifact_ref=data_ref)]


def _plan(inputs=None, **changes):
    data = yaml.safe_load(EXAMPLE.read_text())
    for key, value in changes.items():
        section, _, field = key.partition("__")
        if field:
            data.setdefault(section, {})[field] = value
        else:
            data[section] = value
    spec = parse_spec(data, source="test")
    return make_plan(spec, _lock(spec), _inputs() if inputs is None else inputs, attempt=0)


def _pod(job):
    return job["spec"]["template"]["spec"]


def _assert_restricted(job):
    pod = _pod(job)
    assert pod["automountServiceAccountToken"] is False
    assert pod["enableServiceLinks"] is False
    assert not pod["hostNetwork"] and not pod["hostPID"] and not pod["hostIPC"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == 65532
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    for c in pod["containers"]:
        sc = c["securityContext"]
        assert sc["allowPrivilegeEscalation"] is False and sc["privileged"] is False
        assert sc["readOnlyRootFilesystem"] is True
        assert sc["capabilities"] == {"drop": ["ALL"]}
        assert "@sha256:" in c["image"]
    for v in pod["volumes"]:
        assert set(v) - {"name"} <= {"configMap", "downwardAPI", "emptyDir", "image"}, v
    for c in pod["containers"]:
        for m in c["volumeMounts"]:
            if m["name"] != "results" and m["name"] != "tmp":
                assert m["readOnly"] is True, m
    # the plan rides along as the template's one annotation: data for the agent, no pod field
    template = dict(job["spec"]["template"], metadata=dict(job["spec"]["template"]["metadata"]))
    assert set(template["metadata"].pop("annotations", {})) <= {PLAN_ANNOTATION}
    text = json.dumps(dict(job, spec=dict(job["spec"], template=template)))
    assert "hostPath" not in text and '"privileged": true' not in text


def test_job_is_restricted_by_construction():
    job = build_job(_plan(), OPTS)
    _assert_restricted(job)
    assert job["metadata"]["name"] == job_name(_plan().run_id)
    assert _pod(job)["runtimeClassName"] == "gvisor"


@pytest.mark.parametrize(("runtime", "gpus", "params", "timeout"), list(itertools.product(
    ["gvisor", "runc"], [0, 2], [{}, {"privileged": True, "hostPath": "/"}], [1, 3600])))
def test_no_spec_value_can_weaken_the_pod(runtime, gpus, params, timeout):
    sandbox = {"runtime": runtime, "network": "none"}
    if gpus and runtime == "gvisor":
        sandbox["runtime_class"] = "gvisor-nvproxy"
    plan = _plan(sandbox=sandbox, resources__gpus=gpus, params=params, timeout_s=timeout)
    _assert_restricted(build_job(plan, OPTS))


def test_spec_cannot_carry_pod_fields():
    data = yaml.safe_load(EXAMPLE.read_text())
    data["sandbox"]["privileged"] = True
    with pytest.raises(SpecError) as exc:
        parse_spec(data, source="test")
    assert "sandbox.privileged" in dict(exc.value.problems)


def test_labels_deadline_and_failure_policy():
    plan = _plan(timeout_s=100, retries=3)
    job = build_job(plan, OPTS)
    labels = job["metadata"]["labels"]
    assert labels[LABEL_RUN_ID] == plan.run_id
    assert labels[LABEL_SPEC_HASH] == plan.spec_digest.removeprefix("sha256:")[:63]
    assert all(len(v) <= 63 for v in labels.values())
    assert job["spec"]["activeDeadlineSeconds"] > 100
    assert job["spec"]["backoffLimit"] == 3
    rules = job["spec"]["podFailurePolicy"]["rules"]
    assert rules[0] == {"action": "Ignore",
                        "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]}
    fail_codes = {c for r in rules if r["action"] == "FailJob" for c in r["onExitCodes"]["values"]}
    assert {3, 4} <= fail_codes
    assert _pod(job)["restartPolicy"] == "Never"


def test_gpu_job_requests_gpus_selects_product_and_tolerates_taint():
    plan = _plan(resources__gpus=1, resources__gpu_product="NVIDIA-H100-80GB-HBM3",
                 resources__gpu_driver_major=550,
                 sandbox={"runtime": "runc", "network": "none"})
    pod = _pod(build_job(plan, OPTS))
    assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert pod["nodeSelector"] == {GPU_PRODUCT_LABEL: "NVIDIA-H100-80GB-HBM3",
                                   "nvidia.com/cuda.driver.major": "550"}
    assert pod["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert "runtimeClassName" not in pod  # runc chosen explicitly, recorded as such


def test_gpu_under_gvisor_must_name_its_runtime_class():
    with pytest.raises(SpecError) as exc:
        _plan(resources__gpus=1)
    assert "runtime_class" in exc.value.diagnostics()
    pod = _pod(build_job(_plan(resources__gpus=1, sandbox={"runtime": "gvisor",
                                                           "runtime_class": "gvisor-nvproxy"}),
                         OPTS))
    assert pod["runtimeClassName"] == "gvisor-nvproxy"


def test_configmap_carries_only_the_plan_owned_by_the_job():
    plan = _plan()
    cm = build_configmap(plan, b'{"plan": 1}', OPTS, job_uid="uid-123")
    assert cm["immutable"] is True
    assert set(cm["binaryData"]) == {"plan.json"}
    assert cm["metadata"]["name"] == job_name(plan.run_id)
    assert cm["metadata"]["ownerReferences"] == [{
        "apiVersion": "batch/v1", "kind": "Job", "name": job_name(plan.run_id),
        "uid": "uid-123", "blockOwnerDeletion": False, "controller": False}]
    # a plan too large for the Job itself: the plan volume is the only ConfigMap volume;
    # no input bytes ride in any ConfigMap
    job = build_job(plan, OPTS, b" " * (MAX_PLAN_ANNOTATION_BYTES + 1))
    assert [v["name"] for v in _pod(job)["volumes"] if "configMap" in v] == ["plan"]
    assert plan_in_configmap(job)
    assert job["spec"]["template"]["metadata"]["annotations"] == {}
    with pytest.raises(InputError, match="ConfigMap"):
        build_configmap(plan, b"x" * (MAX_CONFIGMAP_BYTES + 1), OPTS, job_uid="u")


def test_inputs_arrive_as_read_only_image_volumes_by_digest():
    job = build_job(_plan(), OPTS)
    volumes = {v["name"]: v for v in _pod(job)["volumes"]}
    mounts = {m["name"]: m for m in _pod(job)["containers"][0]["volumeMounts"]}
    assert volumes["input-0"] == {"name": "input-0",
                                  "image": {"reference": MODEL_REF, "pullPolicy": "IfNotPresent"}}
    assert volumes["input-1"]["image"]["reference"] == DATA_REF
    assert mounts["input-0"] == {"name": "input-0", "mountPath": "/evalrun/inputs/model",
                                 "readOnly": True}
    assert mounts["input-1"]["mountPath"] == "/evalrun/inputs/data/digits-test"
    # what the agent opens lies inside the mounted artifact
    plan = _plan()
    paths = [i["path"] for i in plan.agent_plan()["inputs"]]
    assert paths == ["/evalrun/inputs/model/weights.json",
                     "/evalrun/inputs/data/digits-test/d.jsonl"]
    assert "hostPath" not in json.dumps(job)


@pytest.mark.parametrize("ref", [None, "127.0.0.1:5000/evalrun/digits-inputs:latest"])
def test_an_input_without_a_digest_reference_is_refused_naming_it(ref):
    plan = _plan(inputs=_inputs(data_ref=ref))
    with pytest.raises(InputError) as exc:
        build_job(plan, OPTS)
    assert exc.value.exit_code == 2
    assert "digits-test" in exc.value.message
    assert "re-lock with a registry" in exc.value.diagnostics()
    with pytest.raises(InputError):
        input_volumes(plan)


def test_a_plan_that_fits_travels_in_the_job_read_through_the_downward_api():
    plan = _plan()
    job = build_job(plan, OPTS)
    plan_json = agent_plan_json(plan, OPTS)
    assert plan_inline(plan_json) and not plan_in_configmap(job)
    # one object, created running: nothing to wait for
    assert job["spec"]["suspend"] is False
    assert job["spec"]["template"]["metadata"]["annotations"] == {
        PLAN_ANNOTATION: plan_json.decode()}
    volume = next(v for v in _pod(job)["volumes"] if v["name"] == "plan")
    assert volume == {"name": "plan", "downwardAPI": {"items": [{"path": "plan.json", "fieldRef": {
        "fieldPath": f"metadata.annotations['{PLAN_ANNOTATION}']"}}]}}
    # queued: suspended all the same, for Kueue to admit
    queued = build_job(plan, JobOptions(namespace="evals", queue="gpus"))
    assert queued["spec"]["suspend"] is True and not plan_in_configmap(queued)


def test_a_plan_in_a_configmap_means_a_suspended_job_resumed_by_patch():
    job = build_job(_plan(), OPTS, b" " * (MAX_PLAN_ANNOTATION_BYTES + 1))
    assert job["spec"]["suspend"] is True and plan_in_configmap(job)
    assert RESUME_PATCH == {"spec": {"suspend": False}}
    assert ttl_patch(JobOptions(namespace="x", ttl_after_finished_s=42)) == {
        "spec": {"ttlSecondsAfterFinished": 42}}


def test_deadline_covers_evaluation_preflight_and_the_results_hold():
    plan = _plan(timeout_s=100)
    for hold in (1, 600, 3600):
        opts = JobOptions(namespace="evals", hold_s=hold)
        expected = 100 + PREFLIGHT_ALLOWANCE_S + hold
        assert active_deadline_s(plan, opts) == expected
        assert build_job(plan, opts)["spec"]["activeDeadlineSeconds"] == expected


def test_the_operators_deadline_replaces_the_computed_one():
    opts = JobOptions(namespace="evals", active_deadline_s=20)
    assert build_job(_plan(timeout_s=100), opts)["spec"]["activeDeadlineSeconds"] == 20


def test_results_volume_is_bounded_by_the_spec():
    default = next(v for v in _pod(build_job(_plan(), OPTS))["volumes"] if v["name"] == "results")
    assert default["emptyDir"] == {"sizeLimit": "2048Mi"}
    sized = build_job(_plan(resources__results_mib=300), OPTS)
    results = next(v for v in _pod(sized)["volumes"] if v["name"] == "results")
    assert results["emptyDir"] == {"sizeLimit": "300Mi"}
    with pytest.raises(SpecError):
        _plan(resources__results_mib=1)


def test_the_pod_requests_the_node_disk_for_its_results_and_inputs():
    from runner.model.plan import PlanInputFile

    def requests(plan):
        return _pod(build_job(plan, OPTS))["containers"][0]["resources"]["requests"]

    assert requests(_plan(resources__results_mib=300))["ephemeral-storage"] == "300Mi"
    shards = tuple(PlanInputFile(path=f"s{i}", sha256="f" * 64, size=(1 << 30) + 1)
                   for i in range(2))
    big = [PlanInput(role="model", name="model", host_path=Path("/x/m"), sha256="c" * 64,
                     kind="directory", files=shards, artifact_ref=MODEL_REF), _inputs()[1]]
    # 2 GiB and 2 bytes round up to 2049 MiB, plus the results volume
    assert requests(_plan(big, resources__results_mib=300))["ephemeral-storage"] == "2349Mi"
    assert "ephemeral-storage" not in _pod(build_job(_plan(), OPTS))["containers"][0][
        "resources"]["limits"]


def test_dropped_image_volumes_are_named():
    job = build_job(_plan(), OPTS)
    assert dropped_image_volumes(job) == []
    stored = json.loads(json.dumps(job))
    for v in stored["spec"]["template"]["spec"]["volumes"]:
        v.pop("image", None)
    assert dropped_image_volumes(stored) == ["input-0", "input-1"]
    assert dropped_image_volumes({}) == []


@pytest.mark.parametrize(("version", "supported"), [
    ("containerd://2.1.0", True), ("containerd://2.2.1", True), ("containerd://v2.1.4", True),
    ("containerd://3.0.0", True), ("containerd://2.0.5", False), ("containerd://1.7.24", False),
    ("cri-o://1.31.0", True), ("cri-o://1.30.9", False), ("docker://28.0.1", None),
    ("containerd://dev", None), ("", None), (None, None),
])
def test_container_runtime_versions_that_mount_image_volumes(version, supported):
    assert image_volume_support(version) is supported
    assert "containerd >= 2.1" in IMAGE_VOLUME_REQUIREMENT


def test_job_name_is_deterministic_and_valid():
    rid = run_id_for("sha256:" + "1" * 64, 0)
    assert job_name(rid) == job_name(rid) == f"evalrun-{rid}"
    assert len(job_name(rid)) <= 63


def test_example_spec_builds():
    spec = load_spec(EXAMPLE)
    assert spec.sandbox.runtime == "gvisor"

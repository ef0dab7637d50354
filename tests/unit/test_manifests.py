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
    LABEL_RUN_ID,
    LABEL_SPEC_HASH,
    MAX_CONFIGMAP_BYTES,
    JobOptions,
    build_configmap,
    build_job,
    job_name,
)
from runner.model.spec import LockedSpec, load_spec, parse_spec

pytestmark = pytest.mark.unit
ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "digits" / "eval.yaml"
OPTS = JobOptions(namespace="evals")
IMAGE = "127.0.0.1:5000/evalrun/digits@sha256:" + "a" * 64


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


def _plan(**changes):
    data = yaml.safe_load(EXAMPLE.read_text())
    for key, value in changes.items():
        section, _, field = key.partition("__")
        if field:
            data.setdefault(section, {})[field] = value
        else:
            data[section] = value
    spec = parse_spec(data, source="test")
    inputs = [PlanInput(role="model", name="model", host_path=Path("/x/weights.json"),
                        sha256="c" * 64),
              PlanInput(role="dataset", name="digits-test", host_path=Path("/x/d.jsonl"),
                        sha256="d" * 64)]
    return make_plan(spec, _lock(spec), inputs, attempt=0)


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
        assert set(v) - {"name"} <= {"configMap", "emptyDir"}, v
    text = json.dumps(job)
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


def test_configmap_carries_plan_and_inputs_and_is_bounded():
    plan = _plan()
    cm = build_configmap(plan, b"{}", {"model": b"m", "digits-test": b"d"}, OPTS)
    assert cm["immutable"] is True
    assert set(cm["binaryData"]) == {"plan.json", "model--model--weights.json",
                                     "dataset--digits-test--d.jsonl"}
    job = build_job(plan, OPTS)
    items = next(v for v in _pod(job)["volumes"] if v["name"] == "inputs")["configMap"]["items"]
    assert {i["path"] for i in items} == {"model/weights.json", "data/digits-test/d.jsonl"}
    with pytest.raises(InputError, match="ConfigMap"):
        build_configmap(plan, b"{}", {"model": b"x" * MAX_CONFIGMAP_BYTES, "digits-test": b""},
                        OPTS)


def test_job_name_is_deterministic_and_valid():
    rid = run_id_for("sha256:" + "1" * 64, 0)
    assert job_name(rid) == job_name(rid) == f"evalrun-{rid}"
    assert len(job_name(rid)) <= 63


def test_example_spec_builds():
    spec = load_spec(EXAMPLE)
    assert spec.sandbox.runtime == "gvisor"

"""The Kubernetes backend on the real local cluster: real pods under gVisor."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from kubernetes import client
from kubernetes.client.rest import ApiException

import cluster as cluster_mod
from runner.model.plan import PlanInput
from runner.workflows.run import make_plan
from runner.backends.manifests import JobOptions, build_job
from runner.model.spec import load_spec
from runner.model.lock import load_lock

pytestmark = pytest.mark.k8s

ROOT = Path(__file__).resolve().parents[2]
EVALRUN = [sys.executable, "-m", "runner.cli"]
# what the preflight demands of a namespace: Pod Security restricted, default-deny egress
RESTRICTED = [{"pod-security": "restricted", "default-deny": True}]


def _evalrun(home: Path, *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "EVALRUN_HOME": str(home)}
    if not (home / "keys" / "evalrun.key").exists():
        # evalrun never creates a signing key without a terminal: make this store's key first
        made = subprocess.run(
            [*EVALRUN, "keys", "generate"], capture_output=True, text=True, env=env, cwd=ROOT
        )
        assert made.returncode == 0, made.stderr
    return subprocess.run(
        [*EVALRUN, *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=timeout,
        check=False,
    )


@pytest.fixture(scope="session")
def k8s_example(cluster, tmp_path_factory) -> Path:
    """examples/digits copied and locked once (image built and pushed to the registry)."""
    subprocess.run(["bash", str(ROOT / "scripts" / "host-up.sh")], check=True, capture_output=True)
    dest = tmp_path_factory.mktemp("k8s") / "digits"
    shutil.copytree(
        ROOT / "examples" / "digits", dest, ignore=shutil.ignore_patterns("eval.lock.json")
    )
    spec = yaml.safe_load((dest / "eval.yaml").read_text())
    spec["image"]["template"] = str(ROOT / "images" / "python-eval.Dockerfile.j2")
    (dest / "eval.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    proc = _evalrun(tmp_path_factory.mktemp("home"), "lock", str(dest / "eval.yaml"))
    assert proc.returncode == 0, proc.stderr
    return dest


def _variant(base: Path, tmp: Path, **changes) -> Path:
    dest = tmp / "variant"
    shutil.copytree(base, dest, ignore=shutil.ignore_patterns("eval.lock.json"))
    ref = json.loads((base / "eval.lock.json").read_text())["image"]["ref"]
    spec = yaml.safe_load((dest / "eval.yaml").read_text())
    spec["image"] = {"ref": ref}
    for key, value in changes.items():
        spec[key] = value
    (dest / "eval.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    return dest / "eval.yaml"


def _run_args(cluster, namespace: str, spec: Path, *extra: str) -> list[str]:
    return [
        "run",
        str(spec),
        "--backend",
        "kubernetes",
        "--kubeconfig",
        str(cluster.kubeconfig),
        "-n",
        namespace,
        "--json",
        *extra,
    ]


@pytest.mark.parametrize("namespace", RESTRICTED, indirect=True)
def test_kubernetes_run_end_to_end_and_resubmit(cluster, namespace, k8s_example, tmp_path):
    spec = k8s_example / "eval.yaml"
    home = tmp_path / "home"
    proc = _evalrun(home, *_run_args(cluster, namespace, spec))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = json.loads(proc.stdout)
    assert out["outcome"] == "passed" and out["verified"].startswith("valid")
    pred = json.loads((Path(out["bundle"]) / "statement.json").read_text())["predicate"]
    details = pred["sandbox"]["details"]
    assert pred["backend"] == "kubernetes"
    assert pred["sandbox"]["runtime_used"] == "gvisor"
    assert pred["image"]["digest_confirmed_by_backend"] is True
    assert details["image_id"].endswith(pred["image"]["digest"])
    assert details["node"] == "evalrun-node" and details["node_labels"]["kubernetes.io/os"]
    assert pred["image"]["rootfs_found"] == pred["image"]["rootfs_expected"]
    assert "gVisor" in (Path(out["bundle"]) / "results" / "env.json").read_text() or True

    # resubmit with the same store: the existing run, no new Job
    again = _evalrun(home, *_run_args(cluster, namespace, spec))
    assert again.returncode == 0 and json.loads(again.stdout)["reused"] is True

    # resubmit from a fresh store: the Job already exists and is attached to, not duplicated
    t0 = time.monotonic()
    fresh = _evalrun(tmp_path / "home2", *_run_args(cluster, namespace, spec))
    assert fresh.returncode == 0, fresh.stderr
    batch = client.BatchV1Api(client.ApiClient(_config(cluster)))
    jobs = batch.list_namespaced_job(namespace).items
    assert len(jobs) == 1
    assert time.monotonic() - t0 < 60


def _config(cluster):
    from kubernetes import config

    cfg = client.Configuration()
    config.load_kube_config(config_file=str(cluster.kubeconfig), client_configuration=cfg)
    return cfg


def _plan_for(spec_path: Path, **overrides):
    spec = load_spec(spec_path)
    if overrides:
        data = spec.model_dump(mode="json")
        for key, value in overrides.items():
            data[key] = {**data.get(key, {}), **value} if isinstance(value, dict) else value
        from runner.model.spec import parse_spec

        spec = parse_spec(data, source="test")
    lock = load_lock(spec_path.with_name("eval.lock.json"))
    inputs = [PlanInput(role="model", name="model", host_path=Path("/x/w.json"), sha256="c" * 64,
                        artifact_ref="127.0.0.1:5000/evalrun/inputs@sha256:" + "c" * 64)]
    return make_plan(spec, lock, inputs, attempt=0)


@pytest.mark.parametrize("namespace", RESTRICTED, indirect=True)
@pytest.mark.parametrize("variant", ["default", "runc", "gpu-runc", "gpu-nvproxy"])
def test_every_built_job_is_admitted_in_a_restricted_namespace(
    cluster, namespace, k8s_client, k8s_example, variant
):
    overrides = {
        "default": {},
        "runc": {"sandbox": {"runtime": "runc"}},
        "gpu-runc": {
            "sandbox": {"runtime": "runc"},
            "resources": {"gpus": 1, "gpu_product": "NVIDIA-H100-80GB-HBM3"},
        },
        "gpu-nvproxy": {
            "sandbox": {"runtime": "gvisor", "runtime_class": "gvisor"},
            "resources": {"gpus": 2},
        },
    }[variant]
    job = build_job(
        _plan_for(k8s_example / "eval.yaml", **overrides), JobOptions(namespace=namespace)
    )
    batch = client.BatchV1Api(k8s_client)
    created = batch.create_namespaced_job(namespace, job, dry_run="All")
    assert created.metadata.name == job["metadata"]["name"]


@pytest.mark.parametrize("namespace", RESTRICTED, indirect=True)
def test_privilege_is_rejected_by_admission_too(cluster, namespace, k8s_client, k8s_example):
    job = build_job(_plan_for(k8s_example / "eval.yaml"), JobOptions(namespace=namespace))
    # What no spec can express: forcing it into the object must still be refused.
    container = job["spec"]["template"]["spec"]["containers"][0]
    container["securityContext"]["privileged"] = True
    container["securityContext"]["allowPrivilegeEscalation"] = True
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "forced-privileged", "namespace": namespace},
        "spec": job["spec"]["template"]["spec"],
    }
    with pytest.raises(ApiException) as exc:
        client.CoreV1Api(k8s_client).create_namespaced_pod(namespace, pod)
    assert exc.value.status == 403
    assert "privileged" in exc.value.body


@pytest.mark.parametrize("namespace", RESTRICTED, indirect=True)
def test_unknown_gpu_product_ends_unschedulable_with_reason(
    cluster, namespace, k8s_example, tmp_path
):
    spec = _variant(
        k8s_example,
        tmp_path,
        sandbox={"runtime": "runc", "network": "none"},
        resources={
            "cpus": 1,
            "memory_mib": 512,
            "pids": 128,
            "gpus": 1,
            "gpu_product": "NVIDIA-NO-SUCH-GPU",
        },
    )
    assert _evalrun(tmp_path / "home", "lock", str(spec)).returncode == 0
    proc = _evalrun(tmp_path / "home", *_run_args(cluster, namespace, spec, "--stuck-after", "5"))
    assert proc.returncode == 4, proc.stdout + proc.stderr
    out = json.loads(proc.stdout)
    assert out["outcome"] == "environment_mismatch"
    assert "Unschedulable" in out["reason"]
    assert "node affinity/selector" in out["reason"] or "nvidia.com/gpu" in out["reason"]


def _start_run_until_running(cluster, namespace, k8s_example, tmp_path, sleep_s):
    """Start `evalrun run` in the background; return it and the name of its running pod."""
    spec = _variant(k8s_example, tmp_path, params={"sleep_s": sleep_s})
    home = tmp_path / "home"
    assert _evalrun(home, "lock", str(spec)).returncode == 0
    env = {**os.environ, "EVALRUN_HOME": str(home)}
    proc = subprocess.Popen(
        [*EVALRUN, *_run_args(cluster, namespace, spec)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    core = client.CoreV1Api(client.ApiClient(_config(cluster)))
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        running = [
            p for p in core.list_namespaced_pod(namespace).items if p.status.phase == "Running"
        ]
        if running:
            return proc, core, running[0].metadata.name
        time.sleep(0.5)
    proc.kill()
    pytest.fail("the pod never ran")


@pytest.mark.parametrize("namespace", RESTRICTED, indirect=True)
def test_api_server_restart_mid_run_is_survived(cluster, namespace, k8s_example, tmp_path):
    proc, _, _ = _start_run_until_running(cluster, namespace, k8s_example, tmp_path, 15)
    cluster_mod.restart_component("kube-apiserver")
    stdout, stderr = proc.communicate(timeout=400)
    assert proc.returncode == 0, stdout + stderr
    assert json.loads(stdout)["outcome"] == "passed"


@pytest.mark.parametrize("namespace", RESTRICTED, indirect=True)
def test_pod_deleted_mid_run_follows_the_failure_policy(cluster, namespace, k8s_example, tmp_path):
    proc, core, victim = _start_run_until_running(cluster, namespace, k8s_example, tmp_path, 30)
    core.delete_namespaced_pod(victim, namespace, grace_period_seconds=0)
    stdout, stderr = proc.communicate(timeout=400)
    out = json.loads(stdout)
    # The deleted pod counts as a failure; backoffLimit lets the Job retry: it still passes.
    assert proc.returncode == 0, stdout + stderr
    pred = json.loads((Path(out["bundle"]) / "statement.json").read_text())["predicate"]
    details = pred["sandbox"]["details"]
    assert details["pod"] != victim  # collected from the retry, not the deleted pod
    assert details["job_failed_pods"] >= 1 and details["job_succeeded_pods"] == 1


@pytest.mark.parametrize("namespace", RESTRICTED, indirect=True)
def test_a_changed_file_the_evaluation_reads_fails_the_pod_run_with_exit_3(
    cluster, namespace, k8s_example, tmp_path
):
    # the locked image plus a layer that changes the evaluation's script: the pod runs content
    # that differs from the pinned digest table, as a swapped blob or node cache would make it
    ref = json.loads((k8s_example / "eval.lock.json").read_text())["image"]["ref"]
    context = tmp_path / "changed"
    context.mkdir()
    (context / "Dockerfile").write_text(
        f"FROM {ref}\nUSER 0:0\n"
        'RUN ["/bin/sh", "-c", "echo \'# changed\' >> /app/evaluate.py"]\nUSER 65532:65532\n'
    )
    tag = f"127.0.0.1:5000/evalrun/test-changed:k8s-{namespace}"
    for cmd in (["docker", "build", "-q", "--network", "none", "-t", tag, str(context)],
                ["docker", "push", "-q", tag]):
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=300)
        assert proc.returncode == 0, proc.stderr
    changed = json.loads(subprocess.run(
        ["docker", "inspect", "--format", "{{json .RepoDigests}}", tag],
        capture_output=True, text=True, check=True,
    ).stdout)[0]
    subprocess.run(["docker", "rmi", tag], capture_output=True, check=False)
    dest = tmp_path / "digits"
    shutil.copytree(k8s_example, dest)
    lock = json.loads((dest / "eval.lock.json").read_text())
    lock["image"]["ref"] = changed  # the locked rootfs digest (and so the table) stays
    (dest / "eval.lock.json").write_text(json.dumps(lock, indent=2))

    proc = _evalrun(tmp_path / "home", *_run_args(cluster, namespace, dest / "eval.yaml"))
    assert proc.returncode == 3, proc.stdout + proc.stderr
    out = json.loads(proc.stdout)
    assert out["outcome"] == "integrity_failure" and "/app/evaluate.py" in out["reason"]
    pred = json.loads((Path(out["bundle"]) / "statement.json").read_text())["predicate"]
    assert pred["backend"] == "kubernetes"
    assert pred["image"]["rootfs_check"]["mode"] == "used"
    assert pred["image"]["rootfs_check"]["passed"] is False

"""The Kubernetes data plane on the real cluster: inputs by image volume, results by exec.

Under gVisor, in a restricted namespace: the inputs arrive as image volumes pulled by
digest (the agent verifies every file before the evaluation), ≥ 20 MiB of results leave
through the API server's exec stream while the agent holds the pod, the bundle verifies;
a runner killed in the middle of a collection is replaced by a second `evalrun run` of
the same spec, which collects from the held pod; the pod reaches nothing on the network;
the plan travels inside the Job and the agent read exactly it. Data stays small (tens of MiB).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest
from input_artifacts import publish_input
from kubernetes import client

# the locked digits example (its image built once), and the spec variant helper
from k8s.test_backend_kubernetes import EVALRUN, _evalrun, _variant, k8s_example  # noqa: F401
from runner.backends.manifests import job_name
from runner.model.lock import load_lock

pytestmark = pytest.mark.k8s

ROOT = Path(__file__).resolve().parents[2]
DRIVER = Path(__file__).resolve().parent / "data_plane_driver.py"
# what the preflight demands of a namespace: Pod Security restricted, default-deny egress
RESTRICTED = [{"pod-security": "restricted", "default-deny": True}]
BLOB_MIB = 24
SHAPE = os.environ.get("EVALRUN_INPUT_SHAPE", "artifact")

# The evaluation: a live line on each stream, BLOB_MIB of seeded bytes in the results, a try
# at the network, then the digits evaluation itself.
EVALUATE = r"""
import json, os, random, runpy, socket, sys
out = os.path.dirname(os.environ["EVALRUN_OUTPUT"])
params = json.loads(os.environ["EVALRUN_PARAMS"])
print("data-plane: live on stdout", flush=True)
print("data-plane: live on stderr", file=sys.stderr, flush=True)
rng = random.Random(params["blob_seed"])
with open(os.path.join(out, "blob.bin"), "wb") as f:
    for _ in range(params["blob_mib"]):
        f.write(rng.randbytes(1 << 20))
reached = {}
for target in params["targets"]:
    host, port = target.rsplit(":", 1)
    try:
        socket.create_connection((host, int(port)), timeout=3).close()
        reached[target] = "connected"
    except OSError as exc:
        reached[target] = type(exc).__name__
with open(os.path.join(out, "network.json"), "w") as f:
    json.dump(reached, f)
sys.argv = ["/app/evaluate.py"]
runpy.run_path("/app/evaluate.py", run_name="__main__")
"""


def _blob_sha(seed: int, mib: int) -> str:
    rng, h = random.Random(seed), hashlib.sha256()
    for _ in range(mib):
        h.update(rng.randbytes(1 << 20))
    return h.hexdigest()


def _locked_variant(cluster, k8s_example, tmp, k8s_client, **params):  # noqa: F811
    """The digits example with the data-plane evaluation, locked, and its inputs published."""
    node = client.CoreV1Api(k8s_client).read_node(cluster.node_name)
    node_ip = next(a.address for a in node.status.addresses if a.type == "InternalIP")
    spec = _variant(
        k8s_example,
        tmp,
        command=["python3", "-c", EVALUATE],
        params={
            "blob_mib": BLOB_MIB,
            "blob_seed": 7,
            "targets": [f"{node_ip}:10250", "10.96.0.1:443", "1.1.1.1:53"],
            **params,
        },
    )
    assert _evalrun(tmp / "home", "lock", str(spec)).returncode == 0
    lock = load_lock(spec.with_name("eval.lock.json"))
    base = spec.parent
    published = [
        publish_input(cluster.registry, "evalrun/digits-inputs", "model", "model",
                      base / lock.model.path, shape=SHAPE),
        *(
            publish_input(cluster.registry, "evalrun/digits-inputs", "dataset", d.name,
                          base / d.path, shape=SHAPE)
            for d in lock.datasets
        ),
    ]
    inputs = tmp / "inputs.json"
    inputs.write_text(json.dumps([p.model_dump(mode="json") for p in published]))
    return spec, inputs


@pytest.fixture(scope="module")
def data_plane_spec(cluster, k8s_example, tmp_path_factory, k8s_client):  # noqa: F811
    return _locked_variant(cluster, k8s_example, tmp_path_factory.mktemp("data-plane"),
                           k8s_client)


def _run(cluster, namespace, spec, inputs, home, *extra, die_after=0):
    args = [sys.executable, str(DRIVER), "--inputs", str(inputs)]
    if die_after:
        args += ["--die-after-bytes", str(die_after)]
    args += ["--", "run", str(spec), "--backend", "kubernetes", "--kubeconfig",
             str(cluster.kubeconfig), "-n", namespace, "--json", *extra]
    env = {**os.environ, "EVALRUN_HOME": str(home), "PYTHONPATH": str(ROOT)}
    if not (home / "keys" / "evalrun.key").exists():
        # evalrun never creates a signing key without a terminal
        made = subprocess.run([*EVALRUN, "keys", "generate"], capture_output=True, text=True,
                              env=env, cwd=ROOT, check=False)
        assert made.returncode == 0, made.stderr
    return subprocess.run(args, capture_output=True, text=True, env=env, cwd=ROOT, timeout=900,
                          check=False)


def _predicate(out: dict) -> dict:
    return json.loads((Path(out["bundle"]) / "statement.json").read_text())["predicate"]


@pytest.mark.parametrize("namespace", RESTRICTED, indirect=True)
def test_inputs_by_image_volume_and_results_by_exec_under_gvisor(
    cluster, namespace, k8s_client, data_plane_spec, tmp_path
):
    spec, inputs = data_plane_spec
    proc = _run(cluster, namespace, spec, inputs, tmp_path / "home", "--ttl-after-finished", "900",
                "--log-json")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = json.loads(proc.stdout)
    assert out["outcome"] == "passed" and out["verified"].startswith("valid")
    pred = _predicate(out)
    details = pred["sandbox"]["details"]
    assert pred["sandbox"]["runtime_used"] == "gvisor"
    assert details["collection"]["mode"] == "exec" and details["collection"]["acknowledged"]
    assert details["collection"]["bytes"] >= BLOB_MIB << 20
    assert details["collection_problems"] == []
    bundle = Path(out["bundle"])
    blob = bundle / "results" / "blob.bin"
    assert hashlib.sha256(blob.read_bytes()).hexdigest() == _blob_sha(7, BLOB_MIB)
    # the agent read its inputs from the image volumes and checked every file first
    preflight = json.loads((bundle / "results" / "preflight.json").read_text())
    assert preflight["inputs"] and all(i["passed"] for i in preflight["inputs"])
    # live output reached the JSON-lines log while it ran (stdout and stderr, via the pod log)
    records = [json.loads(line) for line in proc.stderr.splitlines() if line.startswith("{")]
    live = [r for r in records if r.get("event") == "evaluation_output"]
    assert {r["line"] for r in live} >= {"data-plane: live on stdout", "data-plane: live on stderr"}
    assert {r["run_id"] for r in live} == {pred["run_id"]}
    assert not any("EVALRUN RESULTS READY" in r["line"] for r in live)
    collected_at = next(r["ts"] for r in records if r.get("event") == "results_collected_exec")
    assert max(r["ts"] for r in live if r["line"].startswith("data-plane")) < collected_at
    # the pod reached nothing: gVisor runs it without a network
    reached = json.loads((bundle / "results" / "network.json").read_text())
    assert reached and "connected" not in reached.values(), reached
    # the Job: inputs as image volumes, the plan inside it (no ConfigMap: one request), the
    # TTL set; the agent read exactly the plan evalrun sent
    batch, core = client.BatchV1Api(k8s_client), client.CoreV1Api(k8s_client)
    name = job_name(pred["run_id"])
    job = batch.read_namespaced_job(name, namespace)
    volumes = {v.name: v for v in job.spec.template.spec.volumes}
    assert volumes["input-0"].image.reference.startswith(cluster.registry)
    assert volumes["plan"].downward_api is not None and volumes["plan"].config_map is None
    assert job.spec.ttl_seconds_after_finished == 900
    plan_text = job.spec.template.metadata.annotations["evalrun.dev/plan"]
    sent = hashlib.sha256(plan_text.encode()).hexdigest()
    assert job.metadata.annotations["evalrun.dev/plan-sha256"] == sent == details["plan_sha256"]
    summary = json.loads((bundle / "results" / "summary.json").read_text())
    assert summary["plan_sha256"] == sent
    assert not core.list_namespaced_config_map(
        namespace, field_selector=f"metadata.name={name}").items


@pytest.mark.parametrize("namespace", RESTRICTED, indirect=True)
def test_a_runner_killed_mid_collection_is_replaced_by_a_second_run_that_collects(
    cluster, namespace, k8s_client, data_plane_spec, tmp_path
):
    spec, inputs = data_plane_spec
    home = tmp_path / "home"
    first = _run(cluster, namespace, spec, inputs, home, die_after=4 << 20)
    assert first.returncode == -9, first.stdout + first.stderr
    assert "dying after" in first.stderr
    # the agent still holds: its pod runs, the Job is not finished
    core = client.CoreV1Api(k8s_client)
    pods = core.list_namespaced_pod(
        namespace, label_selector="app.kubernetes.io/managed-by=evalrun"
    )
    assert [p.status.phase for p in pods.items] == ["Running"]
    run_id = pods.items[0].metadata.labels["evalrun.dev/run-id"]
    t0 = time.monotonic()
    second = _run(cluster, namespace, spec, inputs, home)
    assert second.returncode == 0, second.stdout + second.stderr
    out = json.loads(second.stdout)
    assert out["run_id"] == run_id and out["reused"] is False
    details = _predicate(out)["sandbox"]["details"]
    assert details["collection"]["pod"] == pods.items[0].metadata.name
    assert details["collection"]["bytes"] >= BLOB_MIB << 20
    blob = Path(out["bundle"]) / "results" / "blob.bin"
    assert hashlib.sha256(blob.read_bytes()).hexdigest() == _blob_sha(7, BLOB_MIB)
    assert time.monotonic() - t0 < 120  # it attached and collected; it did not re-evaluate
    jobs = client.BatchV1Api(k8s_client).list_namespaced_job(namespace).items
    assert len(jobs) == 1 and jobs[0].status.succeeded == 1


@pytest.mark.parametrize("namespace", RESTRICTED, indirect=True)
def test_a_pod_deleted_mid_run_is_retried_and_the_retry_is_collected(
    cluster, namespace, k8s_client, k8s_example, tmp_path  # noqa: F811
):
    spec, inputs = _locked_variant(cluster, k8s_example, tmp_path, k8s_client, sleep_s=20)
    env = {**os.environ, "EVALRUN_HOME": str(tmp_path / "home"), "PYTHONPATH": str(ROOT)}
    subprocess.run([*EVALRUN, "keys", "generate", "--if-absent"], env=env, cwd=ROOT, check=True,
                   capture_output=True)
    args = [sys.executable, str(DRIVER), "--inputs", str(inputs), "--", "run", str(spec),
            "--backend", "kubernetes", "--kubeconfig", str(cluster.kubeconfig), "-n", namespace,
            "--json"]
    proc = subprocess.Popen(args, env=env, cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    core = client.CoreV1Api(k8s_client)
    deadline = time.monotonic() + 300
    while not (running := [p for p in core.list_namespaced_pod(namespace).items
                           if p.status.phase == "Running"]):
        assert time.monotonic() < deadline and proc.poll() is None, "the pod never ran"
        time.sleep(0.5)
    victim = running[0].metadata.name
    core.delete_namespaced_pod(victim, namespace, grace_period_seconds=0)
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stdout + stderr
    details = _predicate(json.loads(stdout))["sandbox"]["details"]
    assert details["pod"] != victim and details["collection"]["pod"] == details["pod"]
    assert details["collection"]["acknowledged"] and details["collection_problems"] == []


REGISTRY_DIR = Path(os.environ.get("EVALRUN_REGISTRY_DIR", "/var/lib/evalrun-registry"))


@pytest.mark.parametrize("namespace", RESTRICTED, indirect=True)
def test_an_input_blob_altered_in_the_registry_is_refused_before_the_evaluation(
    cluster, namespace, k8s_client, data_plane_spec, tmp_path
):
    spec, inputs = data_plane_spec
    published = json.loads(inputs.read_text())
    # a model artifact no node has cached: the model file plus a fresh file beside it
    folder = tmp_path / "model"
    folder.mkdir()
    lock = load_lock(spec.with_name("eval.lock.json"))
    (folder / Path(lock.model.path).name).write_bytes((spec.parent / lock.model.path).read_bytes())
    (folder / "nonce").write_bytes(os.urandom(200_000))
    fresh = publish_input(cluster.registry, "evalrun/digits-inputs", "model", "model", folder)
    victim = next(f for f in fresh.files if f.path == "nonce")
    manifest = json.loads(subprocess.run(
        ["curl", "-fsS", "-H", "Accept: application/vnd.oci.image.manifest.v1+json",
         f"http://{cluster.registry}/v2/evalrun/digits-inputs/manifests/"
         + fresh.artifact_ref.split("@")[1]], capture_output=True, check=True).stdout)
    layer = next(x["digest"] for x in manifest["layers"]
                 if x["annotations"]["org.opencontainers.image.title"] == victim.path)[7:]
    data = REGISTRY_DIR / "docker/registry/v2/blobs/sha256" / layer[:2] / layer / "data"
    original = data.read_bytes()
    data.write_bytes(original[:600] + bytes(b ^ 0xFF for b in original[600:700]) + original[700:])
    try:
        model = next(p for p in published if p["role"] == "model")
        model["artifact_ref"] = fresh.artifact_ref
        altered = tmp_path / "inputs.json"
        altered.write_text(json.dumps(published))
        proc = _run(cluster, namespace, spec, altered, tmp_path / "home")
    finally:
        data.write_bytes(original)
    assert proc.returncode == 3, proc.stdout + proc.stderr
    out = json.loads(proc.stdout)
    assert out["outcome"] == "integrity_failure" and out["verified"].startswith("valid")
    assert "digest mismatch" in out["reason"] and f"sha256:{layer}" in out["reason"]
    # refused before any evaluation: the Job is gone, nothing ran
    assert not client.BatchV1Api(k8s_client).list_namespaced_job(namespace).items

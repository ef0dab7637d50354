"""The Kubernetes data plane on the local cluster, under gVisor: results out, inputs in.

1. **Results**: ``--results-mib`` of results collected by evalrun (exec ``emit-results``:
   the checksummed stream spooled, checked member by member, unpacked; then ``ack``) vs a
   raw ``kubectl cp`` (the cluster's pinned kubectl) of the same bytes from a plain pod on
   the same node. Reports both rates and their ratio.
2. **Inputs**: ``--inputs-gib`` in ``--shards`` files, published as input artifacts and
   mounted as image volumes: time from Job creation to the evaluation's start (pull +
   rootfs and per-file sha256 verification in the pod), a second run of the same inputs on
   the same node (cached), vs a plain image holding the same amount of (other) bytes as
   layers, pulled and ``sha256sum``-ed in the pod, cold and cached.

Prints one JSON line per measurement (``make bench``):

    python benchmarks/bench_k8s_data.py [--inputs-gib 2] [--results-mib 1024] [--shards 8]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests" / "cluster")]

import cluster as cluster_mod  # noqa: E402
import yaml  # noqa: E402
from input_artifacts import _layer, publish_input  # noqa: E402
from kubernetes import client, config  # noqa: E402

from runner.adapters.registry import ImageName, get_manifest_bytes, put_manifest  # noqa: E402
from runner.adapters.registry_blobs import get_blob_bytes, push_blob, put_blob_bytes  # noqa: E402
from runner.backends.kubernetes import ClusterTarget, KubernetesBackend  # noqa: E402
from runner.model.plan import PlanInput, RunPlan  # noqa: E402

EVALRUN = [sys.executable, "-m", "runner.cli"]
MIB = 1 << 20
SECURITY = {
    "allowPrivilegeEscalation": False,
    "runAsNonRoot": True,
    "runAsUser": 65532,
    "capabilities": {"drop": ["ALL"]},
    "seccompProfile": {"type": "RuntimeDefault"},
}
# Writes params.mib MiB of seeded bytes into the results (or to argv[1]); one sample.
GENERATE = r"""
import json, os, random, sys
params = json.loads(os.environ.get("EVALRUN_PARAMS", "{}")) or json.loads(sys.argv[1])
out = params.get("dir") or os.path.dirname(os.environ["EVALRUN_OUTPUT"])
os.makedirs(out, exist_ok=True)
rng = random.Random(params["seed"])
for i in range(params["files"]):
    with open(os.path.join(out, f"part-{i:03d}.bin"), "wb") as f:
        for _ in range(params["mib"] // params["files"]):
            f.write(rng.randbytes(1 << 20))
if "EVALRUN_OUTPUT" in os.environ:
    with open(os.environ["EVALRUN_OUTPUT"], "w") as f:
        f.write('{"id": "0"}\n')
print("generated", flush=True)
"""


def emit(record: dict[str, Any]) -> None:
    print(json.dumps(record, sort_keys=True), flush=True)


def locked_image(home: Path) -> tuple[str, str]:
    """The digits example's image (built and pushed by `evalrun lock`): ref, rootfs digest."""
    work = home / "digits"
    shutil.copytree(ROOT / "examples" / "digits", work,
                    ignore=shutil.ignore_patterns("eval.lock.json"))
    spec = yaml.safe_load((work / "eval.yaml").read_text())
    spec["image"]["template"] = str(ROOT / "images" / "python-eval.Dockerfile.j2")
    (work / "eval.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    env = {**os.environ, "EVALRUN_HOME": str(home)}
    subprocess.run([*EVALRUN, "lock", str(work / "eval.yaml")], check=True, env=env,
                   capture_output=True, cwd=ROOT)
    lock = json.loads((work / "eval.lock.json").read_text())
    return lock["image"]["ref"], lock["image"]["rootfs_digest"]


def plan(run_id: str, image: tuple[str, str], command: list[str], params: dict[str, Any],
         inputs: list[PlanInput], results_mib: int) -> RunPlan:
    return RunPlan(
        run_id=run_id, attempt=0, image_ref=image[0], expected_rootfs_digest=image[1],
        runtime="gvisor", command=command, params=params, seed=0, metrics=[], expect={},
        inputs=inputs, timeout_s=3600, cpus=1.0, memory_mib=1024, pids=256,
        results_mib=results_mib, retries=0, spec_digest="sha256:" + "3" * 64,
        lock_digest="sha256:" + run_id.encode().hex()[:64].ljust(64, "0"), spec_name="bench",
    )


def events(results: Path) -> dict[str, dict[str, Any]]:
    lines = (results / "logs" / "events.jsonl").read_text().splitlines()
    return {e["event"]: e for e in map(json.loads, lines)}


def wait_pod(core: client.CoreV1Api, ns: str, name: str, phases: tuple[str, ...]) -> Any:
    return cluster_mod.wait_for_pod(core, ns, name, phases=phases, timeout_s=1800)


def plain_pod(name: str, image: str, command: list[str],
              volumes: list[dict[str, Any]] | None = None,
              mounts: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    return {
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": name},
        "spec": {
            "restartPolicy": "Never", "runtimeClassName": "gvisor",
            "automountServiceAccountToken": False, "terminationGracePeriodSeconds": 0,
            "securityContext": {"runAsNonRoot": True, "runAsUser": 65532, "fsGroup": 65532,
                                "seccompProfile": {"type": "RuntimeDefault"}},
            "containers": [{"name": "main", "image": image, "command": command,
                            "securityContext": SECURITY, "volumeMounts": mounts or []}],
            "volumes": volumes or [],
        },
    }


# --------------------------------------------------------------------------- results


def bench_results(info: Any, api: client.ApiClient, ns: str, image: tuple[str, str],
                  mib: int, work: Path) -> None:
    files = max(1, min(16, mib // 64))
    backend = KubernetesBackend(ClusterTarget(kubeconfig=str(info.kubeconfig), namespace=ns),
                                ttl_after_finished_s=60)
    params = {"mib": mib, "files": files, "seed": 11}
    run = plan(f"r-bench-res-{int(time.time())}", image, ["python3", "-c", GENERATE], params,
               [], results_mib=mib + 512)
    result = backend.run(run, work / "evalrun-results")
    collection = result.details.get("collection") or {}
    assert not result.collection_problems, result.collection_problems
    got = sum(p.stat().st_size for p in (work / "evalrun-results").rglob("part-*.bin"))
    assert got == mib * MIB, got
    evalrun_s = float(collection["duration_s"])

    core = client.CoreV1Api(api)
    name = "bench-kubectl-cp"
    generate = ["python3", "-c", GENERATE + "\nimport time; time.sleep(3600)",
                json.dumps({**params, "dir": "/data/out"})]
    core.create_namespaced_pod(ns, plain_pod(name, image[0], generate,
                                             [{"name": "data", "emptyDir": {}}],
                                             [{"name": "data", "mountPath": "/data"}]))
    wait_pod(core, ns, name, ("Running",))
    deadline = time.monotonic() + 1800
    while "generated" not in core.read_namespaced_pod_log(name, ns):
        assert time.monotonic() < deadline
        time.sleep(1)
    dest = work / "kubectl-cp"
    t0 = time.perf_counter()
    copied = subprocess.run(info.kubectl_cmd("cp", "-n", ns, f"{name}:/data/out", str(dest)),
                            capture_output=True, text=True, check=False)
    kubectl_s = time.perf_counter() - t0
    assert copied.returncode == 0, copied.stderr
    got = sum(p.stat().st_size for p in dest.rglob("part-*.bin"))
    assert got == mib * MIB, got
    binary_s, text_s = transports(api, ns, name, mib)
    core.delete_namespaced_pod(name, ns, grace_period_seconds=0)
    emit({
        "benchmark": "k8s_results_collect", "results_mib": mib, "files": files,
        "evalrun_s": round(evalrun_s, 3), "evalrun_mib_s": round(mib / evalrun_s, 1),
        "evalrun_stream_bytes": collection.get("bytes"),
        "kubectl_cp_s": round(kubectl_s, 3), "kubectl_cp_mib_s": round(mib / kubectl_s, 1),
        "rate_ratio": round(kubectl_s / evalrun_s, 3),
        "exec_binary_stream_s": binary_s,
        "exec_base64_frame_s": text_s,
        "note": "evalrun: exec emit-results + stream sha256/size + tar member checks + unpack "
                "+ ack; kubectl cp: tar over exec, unchecked",
    })


# The same tar two ways through the exec stream: the binary results stream, and the base64
# text frame of the log path (held whole in memory by both sides).
EMIT_BINARY = (
    "import sys; from pathlib import Path; import runner.agent.__main__ as a; "
    "from runner.shared.protocol import StreamWriter; w = StreamWriter(sys.stdout.buffer); "
    "a.write_results_tar(Path('/data/out'), w); w.close()"
)
EMIT_TEXT = (
    "import sys; from pathlib import Path; import runner.agent.__main__ as a; "
    "from runner.shared.protocol import encode_frame; "
    "sys.stdout.write(encode_frame(a.results_tar(Path('/data/out')))); sys.stdout.flush()"
)


def transports(api: client.ApiClient, ns: str, pod: str, mib: int) -> tuple[float, float | None]:
    """Seconds to receive and check the pod's /data/out as a binary stream, as a text frame
    (the latter only up to 512 MiB: both sides hold it whole, base64 in a string)."""
    import base64

    from runner.adapters.kube_streams import exec_in_pod
    from runner.shared.protocol import StreamReader

    reader = StreamReader(1 << 40)
    t0 = time.perf_counter()
    ran = exec_in_pod(api, ns, pod, "main", ["python3", "-c", EMIT_BINARY],
                      stdout=lambda b: reader.feed(b) and None)
    reader.finish()
    binary_s = time.perf_counter() - t0
    assert ran.exit_code == 0, ran.stderr
    if mib > 512:
        return round(binary_s, 3), None
    text = bytearray()
    t0 = time.perf_counter()
    ran = exec_in_pod(api, ns, pod, "main", ["python3", "-c", EMIT_TEXT], stdout=text.extend)
    lines = bytes(text).split(b"\n")
    data = base64.b64decode(b"".join(lines[2:-2]))
    header = lines[1].decode()
    assert f"sha256={hashlib.sha256(data).hexdigest()} bytes={len(data)}" in header, header[:120]
    text_s = time.perf_counter() - t0
    assert ran.exit_code == 0, ran.stderr
    return round(binary_s, 3), round(text_s, 3)


# --------------------------------------------------------------------------- inputs


def shards(folder: Path, count: int, total_mib: int, seed: int) -> list[Path]:
    folder.mkdir(parents=True)
    out = []
    for i in range(count):
        path = folder / f"shard-{i:02d}.bin"
        rng = random.Random(seed * 100 + i)  # noqa: S311 - test bytes, not secrets
        with path.open("wb") as fh:
            for _ in range(total_mib // count):
                fh.write(rng.randbytes(MIB))
        out.append(path)
    return out


def start_to_evaluation(backend: KubernetesBackend, run: RunPlan, results: Path) -> dict[str, Any]:
    t0 = time.time()
    result = backend.run(run, results)
    assert result.exit_code == 0, (result.exit_code, result.details.get("log_tail"))
    ev = events(results)
    return {
        "job_to_evaluation_s": round(ev["evaluation_start"]["ts"] - t0, 3),
        "rootfs_check_s": ev["preflight_rootfs"]["duration_s"],
        "preflight_s": ev["preflight_done"]["duration_s"],
    }


def data_image(info: Any, base_ref: str, files: list[Path]) -> str:
    """``base_ref`` plus one layer per file under /bench: a plain image of the same bytes."""
    base_name, digest = base_ref.split("@")
    base = ImageName.parse(base_name)
    target = ImageName.parse(f"{info.registry}/evalrun/bench-data-image")
    manifest = json.loads(get_manifest_bytes(base, digest))
    cfg = json.loads(get_blob_bytes(base, manifest["config"]["digest"], limit=16 << 20))
    for layer in manifest["layers"]:
        push_blob(target, layer["digest"], layer["size"], None, mount_from=[base.repository])
    with tempfile.TemporaryDirectory() as tmp:
        for i, path in enumerate(files):
            tar = Path(tmp) / f"{i}.tar"
            sha, size = _layer(path, f"bench/{path.name}", tar)
            push_blob(target, f"sha256:{sha}", size, tar)
            tar.unlink()
            manifest["layers"].append({"mediaType": "application/vnd.oci.image.layer.v1.tar",
                                       "digest": f"sha256:{sha}", "size": size})
            cfg["rootfs"]["diff_ids"].append(f"sha256:{sha}")
    config_bytes = json.dumps(cfg, sort_keys=True).encode()
    config_digest = "sha256:" + hashlib.sha256(config_bytes).hexdigest()
    put_blob_bytes(target, config_digest, config_bytes)
    manifest["config"] = {**manifest["config"], "digest": config_digest, "size": len(config_bytes)}
    body = json.dumps(manifest, sort_keys=True).encode()
    ref_digest = "sha256:" + hashlib.sha256(body).hexdigest()
    put_manifest(target, ref_digest, body, manifest["mediaType"])
    return f"{target}@{ref_digest}"


def plain_pull_and_hash(api: client.ApiClient, ns: str, image: str, name: str) -> float:
    core = client.CoreV1Api(api)
    t0 = time.time()
    core.create_namespaced_pod(ns, plain_pod(
        name, image, ["sh", "-c", "sha256sum /bench/* >/dev/null && date +%s.%N"]))
    wait_pod(core, ns, name, ("Succeeded",))
    done = float(core.read_namespaced_pod_log(name, ns).strip().splitlines()[-1])
    core.delete_namespaced_pod(name, ns, grace_period_seconds=0)
    return round(done - t0, 3)


def bench_inputs(info: Any, api: client.ApiClient, ns: str, image: tuple[str, str],
                 gib: float, count: int, work: Path, shape: str) -> None:
    total_mib = int(gib * 1024)
    seed = int(time.time())  # fresh bytes: the node has never cached them
    files = shards(work / "inputs", count, total_mib, seed)
    t0 = time.perf_counter()
    inputs = [
        publish_input(info.registry, "evalrun/bench-inputs", "model" if i == 0 else "dataset",
                      "model" if i == 0 else f"shard{i}", path, shape=shape)  # type: ignore[arg-type]
        for i, path in enumerate(files)
    ]
    publish_s = time.perf_counter() - t0
    backend = KubernetesBackend(ClusterTarget(kubeconfig=str(info.kubeconfig), namespace=ns),
                                ttl_after_finished_s=60)
    command = ["python3", "-c",
               "import os; open(os.environ['EVALRUN_OUTPUT'], 'w').write('{\"id\": \"0\"}\\n')"]
    first = start_to_evaluation(
        backend, plan(f"r-bench-in1-{seed}", image, command, {}, inputs, 64), work / "r1")
    second = start_to_evaluation(
        backend, plan(f"r-bench-in2-{seed}", image, command, {}, inputs, 64), work / "r2")
    other = shards(work / "plain", count, total_mib, seed + 1)
    plain = data_image(info, image[0], other)
    plain_cold = plain_pull_and_hash(api, ns, plain, "bench-plain-1")
    plain_warm = plain_pull_and_hash(api, ns, plain, "bench-plain-2")
    emit({
        "benchmark": "k8s_inputs_start", "inputs_gib": gib, "shards": count, "shape": shape,
        "publish_s": round(publish_s, 3),
        "evalrun_first": first, "evalrun_cached": second,
        "plain_pull_sha256sum_s": plain_cold, "plain_cached_s": plain_warm,
        "ratio_first_vs_plain": round(first["job_to_evaluation_s"] / plain_cold, 3),
        "ratio_first_minus_rootfs_vs_plain": round(
            (first["job_to_evaluation_s"] - first["rootfs_check_s"]) / plain_cold, 3),
        "ratio_cached_vs_first": round(
            second["job_to_evaluation_s"] / first["job_to_evaluation_s"], 3),
    })


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--inputs-gib", type=float, default=2.0)
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--results-mib", type=int, default=1024)
    parser.add_argument("--shape", choices=["artifact", "image"],
                        default=os.environ.get("EVALRUN_INPUT_SHAPE", "artifact"))
    parser.add_argument("--skip", choices=["inputs", "results"], action="append", default=[])
    args = parser.parse_args()
    info = cluster_mod.ensure_cluster()
    api = config.new_client_from_config(config_file=str(info.kubeconfig))
    core = client.CoreV1Api(api)
    ns = f"bench-data-{int(time.time())}"
    labels = {f"pod-security.kubernetes.io/{m}": "restricted" for m in ("enforce", "warn")}
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=ns,
                                                                          labels=labels)))
    while not core.list_namespaced_service_account(
        ns, field_selector="metadata.name=default"
    ).items:
        time.sleep(0.2)
    try:
        with tempfile.TemporaryDirectory(prefix="evalrun-bench-k8s-") as tmp:
            work = Path(tmp)
            image = locked_image(work / "home")
            if "results" not in args.skip:
                bench_results(info, api, ns, image, args.results_mib, work / "results")
            if "inputs" not in args.skip:
                bench_inputs(info, api, ns, image, args.inputs_gib, args.shards,
                             work / "in", args.shape)
    finally:
        core.delete_namespace(ns)


if __name__ == "__main__":
    main()

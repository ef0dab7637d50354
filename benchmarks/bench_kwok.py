"""Submit N evalrun Jobs to kwok GPU nodes and wait for all, vs pinned kubectl apply + wait.

Both sides create the same objects (one ConfigMap + one Job per run, built by
runner.backends.manifests) in fresh namespaces of the local test cluster. Reports wall time,
API requests per run and peak memory of each side, and the ratio, from one run.

    python benchmarks/bench_kwok.py [--runs 500] [--parallel 16]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests" / "cluster"))

import cluster as cluster_mod  # noqa: E402
import yaml  # noqa: E402
from kubernetes import client, config  # noqa: E402

from runner.model.plan import PlanInput, RunPlan  # noqa: E402
from runner.backends.kubernetes import ClusterTarget, KubernetesBackend, shared_watch  # noqa: E402
from runner.backends.manifests import JobOptions, build_job, job_name  # noqa: E402

PRODUCTS = ["NVIDIA-H100-80GB-HBM3", "NVIDIA-A100-SXM4-80GB"]
KWOK_TAINT = (("kwok.x-k8s.io/node", "NoSchedule"),)


def plans(n: int, tmp: Path, prefix: str) -> list[RunPlan]:
    model = tmp / "w.json"
    model.write_text("{}")
    return [RunPlan(
        run_id=f"r-{prefix}{i:05d}", attempt=0,
        image_ref="127.0.0.1:5000/evalrun/probe@sha256:" + "0" * 64,
        expected_rootfs_digest="sha256:" + "1" * 64, runtime="runc", command=["true"],
        params={}, seed=0, metrics=[], expect={}, timeout_s=600, cpus=0.01, memory_mib=64,
        pids=64, gpus=1, gpu_product=PRODUCTS[i % 2],
        inputs=[PlanInput(role="model", name="model", host_path=model, sha256="2" * 64,
                          artifact_ref="127.0.0.1:5000/evalrun/kwok-inputs@sha256:" + "2" * 64)],
        spec_digest="sha256:" + "3" * 64, lock_digest="sha256:" + "4" * 64, spec_name="bench",
    ) for i in range(n)]


def make_namespace(api: client.ApiClient, name: str) -> None:
    core = client.CoreV1Api(api)
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=name)))
    while not core.list_namespaced_service_account(
            name, field_selector="metadata.name=default").items:
        time.sleep(0.2)


def evalrun_side(kubeconfig: str, namespace: str, n: int, parallel: int) -> dict:
    backend = KubernetesBackend(ClusterTarget(kubeconfig=kubeconfig, namespace=namespace),
                                extra_tolerations=KWOK_TAINT)
    with tempfile.TemporaryDirectory() as tmp:
        ps = plans(n, Path(tmp), "e")
        t0 = time.perf_counter()
        api, ns = backend._connect()
        watch = shared_watch(api, ns)
        with ThreadPoolExecutor(parallel) as pool:
            list(pool.map(backend.submit, ps))
        names = [job_name(p.run_id) for p in ps]

        def done() -> bool:
            for name in names:
                job = watch.job(name)
                if job is None or not any(c.type == "Complete" and c.status == "True"
                                          for c in job.status.conditions or []):
                    return False
            return True

        ok = watch.wait(done, timeout=1800)
        wall = time.perf_counter() - t0
        watch.stop()
    return {"wall_s": round(wall, 2), "completed": bool(ok),
            "requests_per_run": round(backend.requests / n, 2),
            "watch_requests": watch.requests,
            "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}


def kubectl_side(info: cluster_mod.ClusterInfo, namespace: str, n: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        opts = JobOptions(namespace=namespace, extra_tolerations=KWOK_TAINT)
        docs = []
        for p in plans(n, Path(tmp), "k"):
            # the same Job evalrun sends: its plan inside (a pod-template annotation)
            docs.append(build_job(p, opts))
        path = Path(tmp) / "all.yaml"
        path.write_text(yaml.safe_dump_all(docs))
        t0 = time.perf_counter()
        before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        subprocess.run(info.kubectl_cmd("apply", "-f", str(path)), check=True,
                       capture_output=True)
        subprocess.run(info.kubectl_cmd("wait", "--for=condition=complete", "job", "--all",
                                        "-n", namespace, "--timeout=1800s"),
                       check=True, capture_output=True)
        wall = time.perf_counter() - t0
        peak = max(before, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
    return {"wall_s": round(wall, 2), "peak_rss_mib": round(peak / 1024, 1)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=500)
    parser.add_argument("--parallel", type=int, default=16)
    parser.add_argument("--side", choices=["both", "evalrun"], default="both")
    parser.add_argument("--namespace")
    args = parser.parse_args()
    info = cluster_mod.ensure_cluster()
    if args.side == "evalrun":  # child process, so its memory is measured alone
        print(json.dumps(evalrun_side(str(info.kubeconfig), args.namespace, args.runs,
                                      args.parallel)))
        return
    api = config.new_client_from_config(config_file=str(info.kubeconfig))
    stamp = int(time.time())
    ns_e, ns_k = f"bench-evalrun-{stamp}", f"bench-kubectl-{stamp}"
    core = client.CoreV1Api(api)
    try:
        make_namespace(api, ns_e)
        make_namespace(api, ns_k)
        # kubectl first: its peak RSS is then the only one in RUSAGE_CHILDREN.
        kc = kubectl_side(info, ns_k, args.runs)
        child = subprocess.run([sys.executable, __file__, "--side", "evalrun", "--runs",
                                str(args.runs), "--parallel", str(args.parallel),
                                "--namespace", ns_e], capture_output=True, text=True, check=True)
        ev = json.loads(child.stdout.strip().splitlines()[-1])
    finally:
        for ns in (ns_e, ns_k):
            try:
                core.delete_namespace(ns)
            except Exception:  # noqa: S110 - best effort cleanup
                pass
    print(json.dumps({"benchmark": "kwok_submit_and_wait", "runs": args.runs,
                      "evalrun": ev, "kubectl": kc,
                      "wall_ratio_evalrun_over_kubectl": round(ev["wall_s"] / kc["wall_s"], 3)}))


if __name__ == "__main__":
    main()

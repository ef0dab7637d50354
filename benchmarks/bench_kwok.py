"""Submit N evalrun Jobs to kwok GPU nodes and wait for all, vs pinned kubectl apply + wait.

Both sides create the same Jobs (built by runner.backends.manifests, the plan inside) in
fresh namespaces of the local test cluster. The evalrun side is a child process (so its
memory and CPU time are its own): KubernetesBackend.submit from a thread pool plus one
shared watch, the path `evalrun sweep` drives on Kubernetes. Reports, as one JSON line:
wall time, API requests per run and watch requests, peak RSS of each side and their ratio,
CPU time per run, whether every Job completed (none lost) and how many nodes ran them.

``--nodes N`` makes sure the cluster has N kwok GPU nodes (label type=kwok): missing ones
are created as tests/cluster/up.sh does (kwok-nodes.sh N, capacity patched into status),
waited for until Ready, and deleted again when the bench ends (the base nodes stay).

    python benchmarks/bench_kwok.py [--runs 500] [--nodes 50] [--parallel 16] [--no-kubectl]

`make bench` runs 500 runs on the 50 base nodes (about 3 minutes). Issue 15's size,
``--runs 5000 --nodes 500``, takes about 32 minutes on the 2-core test machine (kubectl's
side alone about 21: `kubectl apply` sends one object after another and `kubectl wait`
follows one Job after another), too long for `make bench`; run it by hand.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests" / "cluster"))

import cluster as cluster_mod  # noqa: E402
import yaml  # noqa: E402
from kubernetes import client, config  # noqa: E402

from runner.backends.kubernetes import ClusterTarget, KubernetesBackend, shared_watch  # noqa: E402
from runner.backends.manifests import JobOptions, build_job, job_name  # noqa: E402
from runner.backends.pod_states import condition  # noqa: E402
from runner.model.plan import PlanInput, RunPlan  # noqa: E402

PRODUCTS = ["NVIDIA-H100-80GB-HBM3", "NVIDIA-A100-SXM4-80GB"]
KWOK_TAINT = (("kwok.x-k8s.io/node", "NoSchedule"),)
KWOK_NODES_SH = ROOT / "tests" / "cluster" / "kwok-nodes.sh"
# what up.sh's start_kwok patches into each kwok GPU node's status
NODE_RESOURCES = {"cpu": "96", "memory": "1843Gi", "pods": "110",
                  "ephemeral-storage": "7Ti", "nvidia.com/gpu": "8"}


def _ready(node: dict) -> bool:
    return any(c.get("type") == "Ready" and c.get("status") == "True"
               for c in (node.get("status") or {}).get("conditions") or [])


def _kwok_nodes(info: cluster_mod.ClusterInfo) -> list[dict]:
    out = subprocess.run(info.kubectl_cmd("get", "nodes", "-l", "type=kwok", "-o", "json"),
                         check=True, capture_output=True, text=True).stdout
    return list(json.loads(out)["items"])


@contextmanager
def kwok_gpu_nodes(info: cluster_mod.ClusterInfo, n: int, timeout_s: float = 600) -> Iterator[int]:
    """At least ``n`` Ready kwok GPU nodes while the block runs; yields how many were added.

    The missing ones (by kwok-nodes.sh's names) are created like up.sh creates them and
    deleted afterwards, even when the block fails.
    """
    have = {node["metadata"]["name"] for node in _kwok_nodes(info)}
    docs = [d for d in yaml.safe_load_all(subprocess.run(
        ["bash", str(KWOK_NODES_SH), str(n)], check=True, capture_output=True, text=True).stdout)
        if d]
    missing = [d for d in docs if d["metadata"]["name"] not in have]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "nodes.yaml"
        path.write_text(yaml.safe_dump_all(missing))
        try:
            if missing:
                subprocess.run(info.kubectl_cmd("create", "-f", str(path)), check=True,
                               capture_output=True)
                status = {"status": {"capacity": NODE_RESOURCES, "allocatable": NODE_RESOURCES}}
                subprocess.run(info.kubectl_cmd("patch", "-f", str(path), "--subresource=status",
                                                "--type=merge", "-p", json.dumps(status)),
                               check=True, capture_output=True)
            deadline = time.monotonic() + timeout_s
            while sum(_ready(node) for node in _kwok_nodes(info)) < n:
                if time.monotonic() > deadline:
                    raise SystemExit(f"bench_kwok: fewer than {n} kwok GPU nodes Ready after "
                                     f"{timeout_s:.0f}s")
                time.sleep(2)
            yield len(missing)
        finally:
            if missing:
                subprocess.run(info.kubectl_cmd("delete", "-f", str(path), "--wait=false",
                                                "--ignore-not-found"), capture_output=True)


def plan(i: int, model: Path, prefix: str) -> RunPlan:
    return RunPlan(
        run_id=f"r-{prefix}{i:05d}", attempt=0,
        image_ref="127.0.0.1:5000/evalrun/probe@sha256:" + "0" * 64,
        expected_rootfs_digest="sha256:" + "1" * 64, runtime="runc", command=["true"],
        params={}, seed=0, metrics=[], expect={}, timeout_s=600, cpus=0.01, memory_mib=64,
        pids=64, gpus=1, gpu_product=PRODUCTS[i % 2],
        inputs=[PlanInput(role="model", name="model", host_path=model, sha256="2" * 64,
                          artifact_ref="127.0.0.1:5000/evalrun/kwok-inputs@sha256:" + "2" * 64)],
        spec_digest="sha256:" + "3" * 64, lock_digest="sha256:" + "4" * 64, spec_name="bench",
    )


def plans(n: int, tmp: Path, prefix: str) -> list[RunPlan]:
    model = tmp / "w.json"
    model.write_text("{}")
    return [plan(i, model, prefix) for i in range(n)]


def vm_hwm_mib(pid: int | str = "self") -> float:
    """Peak RSS of the process's own memory (VmHWM). Not ru_maxrss: Linux carries that
    over fork and exec, so a child of a large parent reports the parent's size."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def run_measured(cmd: list[str]) -> tuple[str, float, float]:
    """Run ``cmd`` to the end: its stdout, CPU seconds, and peak RSS in MiB (its VmHWM,
    sampled every 50 ms until it exits)."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err)
        peak = [0.0]
        stop = threading.Event()

        def sample() -> None:
            while not stop.is_set():
                with suppress(OSError, ValueError):
                    peak[0] = max(peak[0], vm_hwm_mib(proc.pid))
                stop.wait(0.05)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        _, status, usage = os.wait4(proc.pid, 0)
        stop.set()
        sampler.join()
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        if proc.returncode != 0:
            sys.stderr.write(err.read().decode(errors="replace")[-4000:])
            raise SystemExit(f"bench_kwok: {cmd[0]} ... {cmd[-1]} failed ({proc.returncode})")
        return out.read().decode(), usage.ru_utime + usage.ru_stime, peak[0]


def wait_for_earlier_benches(api: client.ApiClient, timeout_s: float = 900) -> None:
    """Let the namespaces of an earlier bench finish terminating: deleting thousands of
    Jobs and pods would compete with the side measured first."""
    core = client.CoreV1Api(api)
    deadline = time.monotonic() + timeout_s
    while any(ns.metadata.name.startswith(("bench-evalrun-", "bench-kubectl-"))
              for ns in core.list_namespace().items) and time.monotonic() < deadline:
        time.sleep(5)


def make_namespace(api: client.ApiClient, name: str) -> None:
    core = client.CoreV1Api(api)
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=name)))
    while not core.list_namespaced_service_account(
            name, field_selector="metadata.name=default").items:
        time.sleep(0.2)


def _complete(job: object) -> bool:
    return condition(job, "Complete") is not None


def evalrun_side(kubeconfig: str, namespace: str, n: int, parallel: int) -> dict:
    backend = KubernetesBackend(ClusterTarget(kubeconfig=kubeconfig, namespace=namespace),
                                extra_tolerations=KWOK_TAINT)
    rss_imports = vm_hwm_mib()
    with tempfile.TemporaryDirectory() as tmp:
        model = Path(tmp) / "w.json"
        model.write_text("{}")
        names = [job_name(f"r-e{i:05d}") for i in range(n)]
        start = resource.getrusage(resource.RUSAGE_SELF)
        t0 = time.perf_counter()
        api, ns = backend._connect()
        watch = shared_watch(api, ns)

        def submit(i: int) -> str:
            # each worker builds its run's plan, as `evalrun sweep` builds each cell's
            return backend.submit(plan(i, model, "e"))

        with ThreadPoolExecutor(parallel) as pool:
            list(pool.map(submit, range(n)))
        submitted = time.perf_counter() - t0
        pending = set(names)
        last = [0.0]

        def done() -> bool:
            # scan (under the watch's lock) at most twice a second, not on every event
            now = time.monotonic()
            if now - last[0] >= 0.5:
                last[0] = now
                pending.difference_update([name for name in pending
                                           if _complete(watch.job(name))])
            return not pending

        watch.wait(done, timeout=3600)
        wall = time.perf_counter() - t0
        watch.stop()
        with watch._cond:
            nodes = {p.spec.node_name for p in watch.pods.objects.values() if p.spec.node_name}
            complete = sum(_complete(watch.job(name)) for name in names)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    # CPU time of submitting and following (imports and building the plans excluded)
    cpu = usage.ru_utime + usage.ru_stime - start.ru_utime - start.ru_stime
    return {"wall_s": round(wall, 2), "submit_s": round(submitted, 2),
            "completed": complete == n, "jobs_complete": complete,
            "nodes_used": len(nodes),
            "requests_per_run": round(backend.requests / n, 3),
            "watch_requests": watch.requests,
            "cpu_s": round(cpu, 2), "cpu_ms_per_run": round(cpu * 1000 / n, 2),
            "peak_rss_mib": round(vm_hwm_mib(), 1),
            "rss_imports_mib": round(rss_imports, 1)}  # peak RSS before submitting


def kubectl_side(info: cluster_mod.ClusterInfo, namespace: str, n: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        opts = JobOptions(namespace=namespace, extra_tolerations=KWOK_TAINT)
        docs = []
        for p in plans(n, Path(tmp), "k"):
            # the same Job evalrun sends: its plan inside (a pod-template annotation)
            docs.append(build_job(p, opts))
        path = Path(tmp) / "all.yaml"
        path.write_text(yaml.safe_dump_all(docs))
        del docs
        t0 = time.perf_counter()
        _, apply_cpu, apply_rss = run_measured(info.kubectl_cmd("apply", "-f", str(path)))
        _, wait_cpu, wait_rss = run_measured(info.kubectl_cmd(
            "wait", "--for=condition=complete", "job", "--all", "-n", namespace,
            "--timeout=3600s"))
        wall = time.perf_counter() - t0
    cpu = apply_cpu + wait_cpu
    return {"wall_s": round(wall, 2), "cpu_s": round(cpu, 2),
            "cpu_ms_per_run": round(cpu * 1000 / n, 2),
            "peak_rss_mib": round(max(apply_rss, wait_rss), 1),
            "apply_peak_rss_mib": round(apply_rss, 1), "wait_peak_rss_mib": round(wait_rss, 1)}


def check_namespace(api: client.ApiClient, namespace: str) -> dict:
    """Independently of either side: how many Jobs exist, how many completed, on how many
    nodes their pods ran (paged raw listings, so the bench itself stays small)."""
    batch, core = client.BatchV1Api(api), client.CoreV1Api(api)
    jobs = complete = 0
    nodes: set[str] = set()
    for list_fn, kind in ((batch.list_namespaced_job, "jobs"), (core.list_namespaced_pod, "pods")):
        token = None
        while True:
            resp = list_fn(namespace, limit=500, _continue=token, _preload_content=False)
            page = json.loads(resp.data)
            for item in page["items"]:
                if kind == "jobs":
                    jobs += 1
                    complete += any(c.get("type") == "Complete" and c.get("status") == "True"
                                    for c in item.get("status", {}).get("conditions") or [])
                elif item.get("spec", {}).get("nodeName"):
                    nodes.add(item["spec"]["nodeName"])
            token = page["metadata"].get("continue")
            if not token:
                break
    return {"jobs": jobs, "complete": complete, "nodes_used": len(nodes)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=500)
    parser.add_argument("--nodes", type=int, default=50,
                        help="kwok GPU nodes to run on (missing ones are added, then removed)")
    parser.add_argument("--parallel", type=int, default=16)
    parser.add_argument("--side", choices=["both", "evalrun"], default="both")
    parser.add_argument("--namespace")
    parser.add_argument("--no-kubectl", action="store_true",
                        help="measure the evalrun side only (kubectl's numbers from another run)")
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
    wait_for_earlier_benches(api)
    t_all = time.perf_counter()
    try:
        with kwok_gpu_nodes(info, args.nodes) as added:
            make_namespace(api, ns_e)
            kc = None
            if not args.no_kubectl:
                make_namespace(api, ns_k)
                kc = kubectl_side(info, ns_k, args.runs)
                kc["check"] = check_namespace(api, ns_k)
            out, cpu, rss = run_measured([sys.executable, __file__, "--side", "evalrun",
                                          "--runs", str(args.runs), "--parallel",
                                          str(args.parallel), "--namespace", ns_e])
            ev = json.loads(out.strip().splitlines()[-1])
            # the child as its parent sees it: the whole process, interpreter start included
            ev["process_cpu_s"] = round(cpu, 2)
            ev["process_peak_rss_mib_sampled"] = round(rss, 1)
            ev["check"] = check_namespace(api, ns_e)
    finally:
        for ns in (ns_e, ns_k):
            with suppress(Exception):  # best effort (ns_k is never made with --no-kubectl)
                core.delete_namespace(ns)
    lost = args.runs - ev["check"]["complete"]
    print(json.dumps({"benchmark": "kwok_submit_and_wait", "runs": args.runs,
                      "kwok_gpu_nodes": args.nodes, "nodes_added": added,
                      "none_lost": lost == 0 and ev["completed"], "lost": lost,
                      "evalrun": ev, "kubectl": kc,
                      "wall_ratio_evalrun_over_kubectl":
                          round(ev["wall_s"] / kc["wall_s"], 3) if kc else None,
                      "rss_ratio_evalrun_over_kubectl":
                          round(ev["peak_rss_mib"] / kc["peak_rss_mib"], 3) if kc else None,
                      "bench_wall_s": round(time.perf_counter() - t_all, 1)}))


if __name__ == "__main__":
    main()

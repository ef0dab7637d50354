"""Two teams on one shared GPU cluster, end to end with real, sealed evaluations.

The scenario the operator guide (docs/cluster-operators.md) describes, on the local test
cluster, every part real:

- the chart installs two tenant namespaces (Pod Security restricted, default-deny
  network, their own quota and runner ServiceAccount) with a LocalQueue each, pointing
  at one Kueue ClusterQueue: a shared quota of ``quota`` GPUs, preemption of lower
  priorities within it;
- the real node advertises ``nvidia.com/gpu`` (an extended resource in its status, as a
  device plugin would; removed afterwards), so the queued runs are real evaluations
  under gVisor that the runner seals, not kwok pods;
- team B's image lives only in a TLS registry with htpasswd auth: evalrun locks it with
  the Docker config's credentials and CA, and its Jobs pull through a pull Secret;
- each team runs one ``evalrun sweep`` of nightly-priority runs with its own
  ServiceAccount's token (no admin rights); once the quota is full, team A starts one
  urgent run, which Kueue admits ahead of the waiting nightly runs by preempting one.

Admission is observed from the API (Kueue's Workloads, polled by an admin client), never
from evalrun's own bookkeeping. Used by tests/k8s/test_k8s_shared_cluster.py (small) and
benchmarks/demo_shared_cluster.py (the issue's 64 runs).
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from kubernetes import client

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "cluster"))

from private_registry import PrivateRegistry, running_registry  # noqa: E402

from runner.adapters import registry, registry_blobs  # noqa: E402
from runner.backends.manifests import job_name  # noqa: E402

EVALRUN = [sys.executable, "-m", "runner.cli"]
GROUP, VERSION = "kueue.x-k8s.io", "v1beta2"
KUEUE_UP = ROOT / "tests" / "cluster" / "kueue-up.sh"
CHART = ROOT / "charts" / "evalrun"
GPU = "nvidia.com/gpu"
PRIORITIES = {"evalrun-nightly": 10, "evalrun-urgent": 100000}
PULL_SECRET = "team-registry"


@dataclass
class Outcome:
    """What the scenario saw: per-run results and what the API showed of admission."""

    sweeps: dict[str, dict[str, Any]]
    urgent: dict[str, Any]
    peak_admitted: int
    admitted_at: dict[str, float]
    finished_at: dict[str, float]
    preempted: set[str]
    waiting_when_urgent_admitted: int
    wall_s: float
    bundles: list[dict[str, Any]] = field(default_factory=list)


def _run(cmd: list[str], env: dict[str, str], timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=timeout, check=False)


def _apply(custom: client.CustomObjectsApi, plural: str, body: dict[str, Any]) -> None:
    try:
        custom.create_cluster_custom_object(GROUP, VERSION, plural, body)
    except client.ApiException as exc:
        if exc.status != 409:
            raise


def _tenant_kubeconfig(api: client.ApiClient, admin_kubeconfig: Path, namespace: str,
                       dest: Path) -> Path:
    """A kubeconfig with the token of the tenant's runner ServiceAccount (what a team has)."""
    token = client.CoreV1Api(api).create_namespaced_service_account_token(
        "evalrun-runner", namespace, client.AuthenticationV1TokenRequest(
            spec=client.V1TokenRequestSpec(audiences=[], expiration_seconds=7200)),
    ).status.token
    admin = yaml.safe_load(admin_kubeconfig.read_text())
    cluster_entry = admin["clusters"][0]["cluster"]
    dest.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "tenant",
        "clusters": [{"name": "local", "cluster": cluster_entry}],
        "users": [{"name": "runner", "user": {"token": token}}],
        "contexts": [{"name": "tenant", "context": {
            "cluster": "local", "user": "runner", "namespace": namespace}}],
    }))
    return dest


def copy_image(source_ref: str, dest_registry: str, repo: str) -> str:
    """Copy an image by digest into another registry (blobs, then the manifest)."""
    repo_ref, digest = source_ref.split("@")
    source = registry.ImageName.parse(repo_ref)
    dest = registry.ImageName(dest_registry, repo)
    manifest = registry.get_manifest_bytes(source, digest)
    document = json.loads(manifest)
    for blob in [document["config"], *document["layers"]]:
        data = registry_blobs.get_blob_bytes(source, blob["digest"], limit=2 << 30)
        registry_blobs.put_blob_bytes(dest, blob["digest"], data)
    media_type = document.get("mediaType", registry.OCI_MANIFEST)
    assert registry.put_manifest(dest, digest, manifest, media_type) == digest
    return f"{dest}@{digest}"


class AdmissionWatch:
    """Kueue's Workloads in the tenants' namespaces, polled: who is admitted when, the peak
    admitted-and-unfinished at once, and which were preempted."""

    def __init__(self, custom: client.CustomObjectsApi, namespaces: list[str]) -> None:
        self.custom, self.namespaces = custom, namespaces
        self.admitted_at: dict[str, float] = {}
        self.finished_at: dict[str, float] = {}
        self.preempted: set[str] = set()
        self.seen: set[str] = set()
        self.running = 0
        self.peak = 0
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    @staticmethod
    def _true(wl: dict[str, Any], kind: str) -> dict[str, Any] | None:
        for c in (wl.get("status") or {}).get("conditions") or []:
            if c.get("type") == kind and c.get("status") == "True":
                return dict(c)
        return None

    def _sample(self) -> None:
        running = 0
        now = time.monotonic()
        for ns in self.namespaces:
            for wl in self.custom.list_namespaced_custom_object(
                    GROUP, VERSION, ns, "workloads")["items"]:
                job = next((o["name"] for o in wl["metadata"].get("ownerReferences") or []
                            if o.get("kind") == "Job"), wl["metadata"]["name"])
                key = f"{ns}/{job}"
                self.seen.add(key)
                finished = self._true(wl, "Finished")
                reserved = self._true(wl, "QuotaReserved")
                evicted = self._true(wl, "Evicted")
                if evicted and evicted.get("reason") == "Preempted":
                    self.preempted.add(key)
                if reserved and key not in self.admitted_at:
                    self.admitted_at[key] = now
                if finished:
                    self.finished_at.setdefault(key, now)
                elif reserved:
                    running += 1
        with self._lock:
            self.running = running
            self.peak = max(self.peak, running)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self._sample()
            except Exception as exc:  # kept, and reported by the scenario
                self.errors.append(repr(exc))
            self._stop.wait(0.25)

    def admitted_now(self) -> int:
        with self._lock:
            return self.running

    def stop(self) -> None:
        self._stop.set()
        self.thread.join(10)


@contextmanager
def gpus_on_the_real_node(core: client.CoreV1Api, node: str, count: int) -> Iterator[None]:
    """The real node advertises ``count`` nvidia.com/gpu (as a device plugin would)."""
    key = GPU.replace("/", "~1")
    # a list body is sent as a JSON patch
    core.patch_node_status(node, [
        {"op": "add", "path": f"/status/capacity/{key}", "value": str(count)}])
    deadline = time.monotonic() + 60
    while (core.read_node(node).status.allocatable or {}).get(GPU) != str(count):
        if time.monotonic() > deadline:
            raise AssertionError(f"node {node} did not advertise {count} {GPU}")
        time.sleep(0.5)
    try:
        yield
    finally:
        core.patch_node_status(node, [{"op": "remove", "path": f"/status/capacity/{key}"}])


def _spec(base: Path, dest: Path, image: dict[str, Any], sleep_s: float) -> Path:
    """The digits evaluation as a one-GPU run that takes ``sleep_s`` longer."""
    shutil.copytree(base, dest, ignore=shutil.ignore_patterns("eval.lock.json"))
    spec = yaml.safe_load((dest / "eval.yaml").read_text())
    spec["image"] = image
    spec["params"] = {"sleep_s": sleep_s}
    # a real GPU cluster names its nvproxy RuntimeClass; here gVisor, the node has no GPU
    spec["sandbox"] = {**spec["sandbox"], "runtime_class": "gvisor"}
    spec["resources"] = {**spec["resources"], "gpus": 1, "cpus": 0.2, "memory_mib": 384}
    spec["retries"] = 0
    (dest / "eval.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    return dest / "eval.yaml"


def _check_bundle(home: Path, env: dict[str, str], bundle: str) -> dict[str, Any]:
    statement = json.loads((Path(bundle) / "statement.json").read_text())
    verified = _run([*EVALRUN, "verify", bundle, "--key", str(home / "keys" / "evalrun.pub"),
                     "--json"], env, 120)
    pred = statement["predicate"]
    return {"bundle": bundle, "verify_rc": verified.returncode,
            "verify": verified.stdout.strip()[-300:] or verified.stderr.strip()[-300:],
            "outcome": pred.get("outcome"),
            "details": (pred.get("sandbox") or {}).get("details") or {},
            "image": (pred.get("image") or {}).get("ref")}


def run_scenario(cluster: Any, api: client.ApiClient, digits: Path, work: Path, *,
                 runs_per_team: int, quota: int, sleep_s: float,
                 log: Any = print) -> Outcome:
    """The whole scenario; everything it creates in the cluster is removed afterwards."""
    t_start = time.monotonic()
    proc = subprocess.run(["bash", str(KUEUE_UP)], capture_output=True, text=True,
                          check=False, timeout=3600)
    if proc.returncode != 0:
        raise AssertionError(f"Kueue did not start:\n{proc.stderr[-3000:]}")
    core = client.CoreV1Api(api)
    custom = client.CustomObjectsApi(api)
    sched = client.SchedulingV1Api(api)
    suffix = secrets.token_hex(3)
    team_a, team_b = f"t-shared-a-{suffix}", f"t-shared-b-{suffix}"
    cq, flavor, release = f"shared-gpus-{suffix}", f"real-node-{suffix}", f"shared-{suffix}"
    helm_env = {**os.environ, "KUBECONFIG": str(cluster.kubeconfig)}
    base_env = {k: v for k, v in os.environ.items() if k != "DOCKER_CONFIG"}
    processes: list[subprocess.Popen[str]] = []
    watch: AdmissionWatch | None = None
    with running_registry(work / "private-registry", auth="basic") as reg, \
            gpus_on_the_real_node(core, cluster.node_name, quota):
        hosts = cluster.state_dir / "containerd" / "certs.d" / reg.addr
        try:
            for name, value in PRIORITIES.items():
                _apply(custom, "workloadpriorityclasses", {
                    "apiVersion": f"{GROUP}/{VERSION}", "kind": "WorkloadPriorityClass",
                    "metadata": {"name": name}, "value": value})
                try:
                    sched.create_priority_class(client.V1PriorityClass(
                        metadata=client.V1ObjectMeta(name=name), value=value))
                except client.ApiException as exc:
                    if exc.status != 409:
                        raise
            _apply(custom, "resourceflavors", {
                "apiVersion": f"{GROUP}/{VERSION}", "kind": "ResourceFlavor",
                "metadata": {"name": flavor},
                "spec": {"nodeLabels": {"kubernetes.io/hostname": cluster.node_name}}})
            custom.create_cluster_custom_object(GROUP, VERSION, "clusterqueues", {
                "apiVersion": f"{GROUP}/{VERSION}", "kind": "ClusterQueue",
                "metadata": {"name": cq},
                "spec": {
                    "namespaceSelector": {"matchExpressions": [{
                        "key": "kubernetes.io/metadata.name", "operator": "In",
                        "values": [team_a, team_b]}]},
                    "stopPolicy": "Hold",  # opened once both sweeps have queued everything
                    "preemption": {"withinClusterQueue": "LowerPriority"},
                    "resourceGroups": [{
                        "coveredResources": ["cpu", "memory", "ephemeral-storage", GPU],
                        "flavors": [{"name": flavor, "resources": [
                            {"name": "cpu", "nominalQuota": "100"},
                            {"name": "memory", "nominalQuota": "1000Gi"},
                            {"name": "ephemeral-storage", "nominalQuota": "10Ti"},
                            {"name": GPU, "nominalQuota": quota}]}]}]}})
            installed = _run([str(cluster.helm), "install", release, str(CHART),
                              "--namespace", "default",
                              "--set", f"namespace.name=t-shared-main-{suffix}",
                              "--set", "runtimeClass.create=false",
                              "--set", "runner.readNodes=false",
                              *[arg for i, team in enumerate((team_a, team_b)) for arg in (
                                  "--set", f"tenants[{i}].name={team}",
                                  "--set", f"tenants[{i}].quota.gpus={quota}",
                                  "--set", f"tenants[{i}].localQueue.name=gpus",
                                  "--set", f"tenants[{i}].localQueue.clusterQueue={cq}")],
                              "--wait", "--timeout", "120s"], helm_env, 300)
            if installed.returncode != 0:
                raise AssertionError(f"helm install: {installed.stdout}{installed.stderr}")
            # the operator's part for team B: the registry's CA on the node, a pull Secret
            hosts.mkdir(parents=True, exist_ok=True)
            (hosts / "ca.crt").write_bytes(reg.ca_pem)
            (hosts / "hosts.toml").write_text(
                f'server = "https://{reg.addr}"\n\n[host."https://{reg.addr}"]\n'
                f'  capabilities = ["pull", "resolve"]\n  ca = "{hosts / "ca.crt"}"\n')
            auth = base64.b64encode(f"{reg.username}:{reg.password}".encode()).decode()
            core.create_namespaced_secret(team_b, client.V1Secret(
                metadata=client.V1ObjectMeta(name=PULL_SECRET),
                type="kubernetes.io/dockerconfigjson",
                data={".dockerconfigjson": base64.b64encode(json.dumps(
                    {"auths": {reg.addr: {"auth": auth}}}).encode()).decode()}))
            watch = AdmissionWatch(custom, [team_a, team_b])
            return _play(cluster, api, reg, digits, work, watch, team_a, team_b, cq,
                         base_env, processes, runs_per_team=runs_per_team, quota=quota,
                         sleep_s=sleep_s, t_start=t_start, log=log)
        finally:
            for p in processes:
                if p.poll() is None:
                    p.kill()
            if watch is not None:
                watch.stop()
            shutil.rmtree(hosts, ignore_errors=True)
            _run([str(cluster.helm), "uninstall", release, "--namespace", "default", "--wait"],
                 helm_env, 300)
            for ns in (team_a, team_b):
                try:
                    core.delete_namespace(ns, body=client.V1DeleteOptions(
                        propagation_policy="Background"))
                except client.ApiException as exc:
                    if exc.status != 404:
                        raise
            for plural, name in (("clusterqueues", cq), ("resourceflavors", flavor)):
                try:
                    custom.delete_cluster_custom_object(GROUP, VERSION, plural, name)
                except client.ApiException as exc:
                    if exc.status != 404:
                        raise


def _play(cluster: Any, api: client.ApiClient, reg: PrivateRegistry, digits: Path, work: Path,
          watch: AdmissionWatch, team_a: str, team_b: str, cq: str, base_env: dict[str, str],
          processes: list[subprocess.Popen[str]], *, runs_per_team: int, quota: int,
          sleep_s: float, t_start: float, log: Any) -> Outcome:
    custom = client.CustomObjectsApi(api)
    locked = json.loads((digits / "eval.lock.json").read_text())["image"]["ref"]
    docker_b = reg.docker_config(work / "docker-b")
    old = os.environ.get("DOCKER_CONFIG")
    os.environ["DOCKER_CONFIG"] = str(docker_b)  # the copy writes with team B's credentials
    try:
        private_ref = copy_image(locked, reg.addr, "team-b/digits")
    finally:
        if old is None:
            os.environ.pop("DOCKER_CONFIG", None)
        else:
            os.environ["DOCKER_CONFIG"] = old
    log(f"team B's image copied into the TLS registry: {private_ref}")
    homes = {team_a: work / "home-a", team_b: work / "home-b"}
    envs = {team_a: {**base_env, "EVALRUN_HOME": str(homes[team_a])},
            team_b: {**base_env, "EVALRUN_HOME": str(homes[team_b]),
                     "DOCKER_CONFIG": str(docker_b)}}
    specs = {team_a: _spec(digits, work / "team-a", {"ref": locked}, sleep_s),
             team_b: _spec(digits, work / "team-b", {"ref": private_ref}, sleep_s)}
    urgent_spec = _spec(digits, work / "urgent", {"ref": locked}, 0)
    (work / "matrix.yaml").write_text(yaml.safe_dump(
        {"seed": list(range(1, runs_per_team + 1))}))
    kubeconfigs = {}
    for team in (team_a, team_b):
        kubeconfigs[team] = _tenant_kubeconfig(api, cluster.kubeconfig, team,
                                               work / f"{team}.kubeconfig")
        for args in (["keys", "generate"], ["lock", str(specs[team])]):
            done = _run([*EVALRUN, *args], envs[team], 600)
            if done.returncode != 0:
                raise AssertionError(f"{team}: evalrun {args[0]}: {done.stderr[-2000:]}")
    done = _run([*EVALRUN, "lock", str(urgent_spec)], envs[team_a], 600)
    if done.returncode != 0:
        raise AssertionError(f"urgent lock: {done.stderr[-2000:]}")

    def cluster_args(team: str, priority: str) -> list[str]:
        extra = ["--image-pull-secret", PULL_SECRET] if team == team_b else []
        return ["--backend", "kubernetes", "--kubeconfig", str(kubeconfigs[team]),
                "-n", team, "--queue", "gpus", "--priority-class", priority, "--json", *extra]

    sweeps = {}
    for team in (team_a, team_b):
        p = subprocess.Popen(
            [*EVALRUN, "sweep", str(specs[team]), "--matrix", str(work / "matrix.yaml"),
             "--parallel", str(runs_per_team), *cluster_args(team, "evalrun-nightly")],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=envs[team],
            cwd=ROOT)
        processes.append(p)
        sweeps[team] = p
    total = 2 * runs_per_team
    deadline = time.monotonic() + 600
    while len(watch.seen) < total:
        if time.monotonic() > deadline or any(p.poll() is not None for p in processes):
            raise AssertionError(f"only {len(watch.seen)}/{total} Workloads queued; "
                                 + "; ".join((p.stderr.read() if p.poll() is not None
                                              and p.stderr else "")[-1500:] for p in processes))
        time.sleep(0.5)
    log(f"{total} nightly runs queued by two teams; opening ClusterQueue {cq} ({quota} GPUs)")
    custom.patch_cluster_custom_object(GROUP, VERSION, "clusterqueues", cq,
                                       {"spec": {"stopPolicy": "None"}})
    while watch.admitted_now() < quota:
        if time.monotonic() > deadline:
            raise AssertionError(f"the quota never filled: {watch.admitted_now()}/{quota}")
        time.sleep(0.2)
    log(f"quota full ({quota} admitted); team A starts an urgent run")
    urgent = subprocess.Popen(
        [*EVALRUN, "run", str(urgent_spec), *cluster_args(team_a, "evalrun-urgent")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=envs[team_a], cwd=ROOT)
    processes.append(urgent)
    waiting_when_urgent = -1
    urgent_key = None
    outputs: dict[str, dict[str, Any]] = {}
    timeout = 600 + total * (sleep_s + 30) / max(1, quota)
    end = time.monotonic() + timeout
    for team, p in sweeps.items():
        out, err = p.communicate(timeout=max(1.0, end - time.monotonic()))
        outputs[team] = {"rc": p.returncode, "stdout": out, "stderr": err[-3000:]}
    u_out, u_err = urgent.communicate(timeout=max(1.0, end - time.monotonic()))
    time.sleep(1.0)  # the last Finished conditions into the watch
    watch.stop()
    urgent_result = {"rc": urgent.returncode, "stdout": u_out, "stderr": u_err[-3000:]}
    with suppress(ValueError, KeyError):
        urgent_key = f"{team_a}/{job_name(json.loads(u_out)['run_id'])}"
    if urgent_key in watch.admitted_at:
        at = watch.admitted_at[urgent_key]
        waiting_when_urgent = sum(1 for k in watch.seen if k != urgent_key
                                  and watch.admitted_at.get(k, float("inf")) > at)
    bundles = []
    for team, result in outputs.items():
        try:
            cells = json.loads(result["stdout"])["cells"]
        except (ValueError, KeyError):
            cells = []
        result["cells"] = cells
        for cell in cells:
            if cell.get("bundle"):
                bundles.append({"team": team, **_check_bundle(homes[team], envs[team],
                                                              cell["bundle"])})
    try:
        bundle = json.loads(u_out)["bundle"]
        bundles.append({"team": "urgent", **_check_bundle(homes[team_a], envs[team_a], bundle)})
    except (ValueError, KeyError):
        pass
    if watch.errors:
        log(f"admission watch errors: {watch.errors[:3]}")
    return Outcome(sweeps=outputs, urgent=urgent_result, peak_admitted=watch.peak,
                   admitted_at=dict(watch.admitted_at), finished_at=dict(watch.finished_at),
                   preempted=set(watch.preempted),
                   waiting_when_urgent_admitted=waiting_when_urgent,
                   wall_s=time.monotonic() - t_start, bundles=bundles)

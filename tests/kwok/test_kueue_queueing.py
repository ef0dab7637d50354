"""Kueue in front of the kwok GPU nodes: quota holds, priorities overtake, nothing is lost.

Kueue (pinned KUEUE_VERSION, built from its Go module) is installed by
tests/cluster/kueue-up.sh. Each test makes its own ClusterQueue (a GPU quota on
the kwok nodes' ResourceFlavor) and a LocalQueue in its fresh namespace, and
observes admission from the API (the Jobs' suspend flag, watched), not from
evalrun's own bookkeeping.
"""

from __future__ import annotations

import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from kubernetes import client

from runner.backends.kubernetes import ClusterTarget, KubernetesBackend, shared_watch
from runner.backends.manifests import job_name
from runner.errors import EnvironmentMismatch

from .test_backend_kwok import H100, gpu_plan

pytestmark = pytest.mark.kwok

KUEUE_UP = Path(__file__).resolve().parents[1] / "cluster" / "kueue-up.sh"
GROUP, VERSION = "kueue.x-k8s.io", "v1beta2"
FLAVOR = "evalrun-kwok-gpu"


@pytest.fixture(scope="module")
def kueue(cluster) -> None:
    proc = subprocess.run(["bash", str(KUEUE_UP)], capture_output=True, text=True, check=False,
                          timeout=3600)
    if proc.returncode != 0:
        pytest.fail(f"Kueue did not start (tests/cluster/kueue-up.sh):\n{proc.stderr[-3000:]}")


def _apply(custom: client.CustomObjectsApi, plural: str, body: dict) -> None:
    try:
        custom.create_cluster_custom_object(GROUP, VERSION, plural, body)
    except client.ApiException as exc:
        if exc.status != 409:
            raise


@pytest.fixture
def second_tenant(k8s_client, namespace) -> Iterator[str]:
    """Another team's namespace next to ``namespace`` (deleted afterwards)."""
    core = client.CoreV1Api(k8s_client)
    name = f"{namespace[:55]}-b"
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(
        name=name, labels={"evalrun.dev/test": "true"})))
    deadline = time.monotonic() + 60
    while not core.list_namespaced_service_account(
            name, field_selector="metadata.name=default").items:
        assert time.monotonic() < deadline
        time.sleep(0.2)
    yield name
    core.delete_namespace(name, body=client.V1DeleteOptions(
        grace_period_seconds=0, propagation_policy="Background"))


@pytest.fixture
def gpu_queue(kueue, k8s_client, namespace, request) -> Iterator[tuple[str, str]]:
    """A ClusterQueue with 8 GPUs of quota on the kwok nodes, and LocalQueue 'gpus' to it
    in ``namespace`` (and in ``second_tenant``'s, when the test uses it: a shared quota)."""
    tenants = [namespace]
    if "second_tenant" in request.fixturenames:
        tenants.append(request.getfixturevalue("second_tenant"))
    custom = client.CustomObjectsApi(k8s_client)
    _apply(custom, "resourceflavors", {
        "apiVersion": f"{GROUP}/{VERSION}", "kind": "ResourceFlavor",
        "metadata": {"name": FLAVOR}, "spec": {"nodeLabels": {"type": "kwok"}}})
    cq = f"cq-{namespace}"[:63]
    custom.create_cluster_custom_object(GROUP, VERSION, "clusterqueues", {
        "apiVersion": f"{GROUP}/{VERSION}", "kind": "ClusterQueue", "metadata": {"name": cq},
        "spec": {
            "namespaceSelector": {"matchExpressions": [{
                "key": "kubernetes.io/metadata.name", "operator": "In", "values": tenants}]},
            "queueingStrategy": "StrictFIFO",
            "stopPolicy": "Hold",  # nothing is admitted until the test has queued everything
            "resourceGroups": [{
                "coveredResources": ["cpu", "memory", "ephemeral-storage", "nvidia.com/gpu"],
                "flavors": [{"name": FLAVOR, "resources": [
                    {"name": "cpu", "nominalQuota": "1000"},
                    {"name": "memory", "nominalQuota": "10000Gi"},
                    {"name": "ephemeral-storage", "nominalQuota": "100Ti"},
                    {"name": "nvidia.com/gpu", "nominalQuota": 8}]}],
            }],
        }})
    for tenant in tenants:
        custom.create_namespaced_custom_object(GROUP, VERSION, tenant, "localqueues", {
            "apiVersion": f"{GROUP}/{VERSION}", "kind": "LocalQueue",
            "metadata": {"name": "gpus"}, "spec": {"clusterQueue": cq}})
    yield cq, "gpus"
    custom.delete_cluster_custom_object(GROUP, VERSION, "clusterqueues", cq)


def _release(k8s_client, cq: str) -> None:
    client.CustomObjectsApi(k8s_client).patch_cluster_custom_object(
        GROUP, VERSION, "clusterqueues", cq, {"spec": {"stopPolicy": "None"}})


class AdmissionLog:
    """Every Job's admission moment and the most admitted-and-unfinished at once."""

    def __init__(self, watch, names: list[str], *, start: bool = True) -> None:
        self.watch, self.names = watch, names
        self.admitted: dict[str, float] = {}
        self.finished: set[str] = set()
        self.peak = 0
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        if start:
            self.thread.start()

    def sample_running(self) -> int:
        """Admitted and unfinished Jobs now (and note admissions and finishes)."""
        self._sample()
        return self._running

    def _sample(self) -> bool:
        running = 0
        for name in self.names:
            job = self.watch.job(name)
            if job is None:
                continue
            done = any(c.type in ("Complete", "Failed") and c.status == "True"
                       for c in job.status.conditions or [])
            if not job.spec.suspend and name not in self.admitted:
                self.admitted[name] = time.monotonic()
            if done:
                self.finished.add(name)
            elif not job.spec.suspend:
                running += 1
        self._running = running
        self.peak = max(self.peak, running)
        return len(self.finished) == len(self.names) or self._stop.is_set()

    def _run(self) -> None:
        self.watch.wait(self._sample, timeout=900)

    def wait(self, timeout: float) -> None:
        self.thread.join(timeout)
        self._stop.set()
        self.watch.notify()
        self.thread.join(5)


class SharedAdmissionLog:
    """Admissions across several namespaces' watches: the peak of all of them together."""

    def __init__(self, pairs) -> None:
        self.logs = [AdmissionLog(watch, names, start=False) for watch, names in pairs]
        self.peak = 0
        self._done = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        deadline = time.monotonic() + 900
        while time.monotonic() < deadline and not self._done.is_set():
            running = sum(log.sample_running() for log in self.logs)
            self.peak = max(self.peak, running)
            if all(len(log.finished) == len(log.names) for log in self.logs):
                return
            time.sleep(0.05)

    def wait(self, timeout: float) -> None:
        self.thread.join(timeout)
        self._done.set()
        self.thread.join(5)


def _backend(cluster, namespace: str, **kw) -> KubernetesBackend:
    return KubernetesBackend(
        ClusterTarget(kubeconfig=str(cluster.kubeconfig), namespace=namespace),
        extra_tolerations=(("kwok.x-k8s.io/node", "NoSchedule"),), **kw)


def test_sixty_four_one_gpu_runs_of_two_tenants_share_a_quota_of_eight(
    cluster, namespace, second_tenant, gpu_queue, k8s_client, tmp_path
):
    cq, queue = gpu_queue
    teams = {namespace: range(0, 32), second_tenant: range(32, 64)}
    logs, names_of = [], {}
    for ns, runs in teams.items():
        backend = _backend(cluster, ns, queue=queue)
        plans = [gpu_plan(tmp_path, i, H100, gpus=1) for i in runs]
        for plan in plans:
            backend.submit(plan)
        api, _ = backend._connect()
        watch = shared_watch(api, ns)
        names = [job_name(p.run_id) for p in plans]
        # queued, not started: suspended, no pod, evalrun left them for Kueue
        assert watch.wait(lambda w=watch, n=names: all(w.job(x) for x in n), timeout=60)
        assert all(watch.job(n).spec.suspend for n in names)
        assert all(watch.job(n).metadata.labels["kueue.x-k8s.io/queue-name"] == queue
                   for n in names)
        names_of[ns] = names
        logs.append((watch, names))
    both = SharedAdmissionLog(logs)
    _release(k8s_client, cq)
    both.wait(600)
    finished = sum(len(log.finished) for log in both.logs)
    assert finished == 64, f"{finished}/64 finished"
    assert sum(len(log.admitted) for log in both.logs) == 64
    print(f"64 runs of 2 tenants: at most {both.peak} admitted at once (quota 8 GPUs)")
    assert 1 <= both.peak <= 8, f"{both.peak} admitted at once against a quota of 8 GPUs"
    assert all(log.admitted for log in both.logs)  # each team got GPUs


def test_a_high_priority_run_is_admitted_before_waiting_low_priority_ones(
    cluster, namespace, gpu_queue, k8s_client, tmp_path
):
    cq, queue = gpu_queue
    custom = client.CustomObjectsApi(k8s_client)
    sched = client.SchedulingV1Api(k8s_client)
    classes = {"evalrun-test-nightly": 10, "evalrun-test-urgent": 100000}
    for name, value in classes.items():
        _apply(custom, "workloadpriorityclasses", {
            "apiVersion": f"{GROUP}/{VERSION}", "kind": "WorkloadPriorityClass",
            "metadata": {"name": name}, "value": value})
        try:
            sched.create_priority_class(client.V1PriorityClass(
                metadata=client.V1ObjectMeta(name=name), value=value))
        except client.ApiException as exc:
            if exc.status != 409:
                raise
    try:
        low = _backend(cluster, namespace, queue=queue, priority_class="evalrun-test-nightly")
        high = _backend(cluster, namespace, queue=queue, priority_class="evalrun-test-urgent")
        lows = [gpu_plan(tmp_path, i, H100, gpus=1) for i in range(24)]
        for plan in lows:
            low.submit(plan)
        urgent = gpu_plan(tmp_path, 999, H100, gpus=1)
        high.submit(urgent)  # the last one queued
        api, ns = low._connect()
        watch = shared_watch(api, ns)
        names = [job_name(p.run_id) for p in [*lows, urgent]]
        assert watch.wait(lambda: all(watch.job(n) for n in names), timeout=60)
        # all of them waiting in Kueue (each with its Workload) before the queue opens
        deadline = time.monotonic() + 120
        while len(custom.list_namespaced_custom_object(
                GROUP, VERSION, namespace, "workloads")["items"]) < len(names):
            assert time.monotonic() < deadline, "Kueue did not create every Workload"
            time.sleep(0.5)
        log = AdmissionLog(watch, names)
        _release(k8s_client, cq)
        log.wait(600)
        assert log.finished == set(names)
        # runs seen admitted in the same sample share a moment: only strictly earlier counts
        at = log.admitted[job_name(urgent.run_id)]
        before = sorted(t for n, t in log.admitted.items() if t < at)
        print(f"urgent run: {len(before)} of 24 low-priority runs admitted before it; "
              f"peak {log.peak}")
        # admitted in the first round of 8, ahead of at least 16 low-priority runs queued before it
        assert len(before) < 8, f"{len(before)} low-priority runs were admitted before it"
        labels = watch.job(job_name(urgent.run_id)).metadata.labels
        assert labels["kueue.x-k8s.io/priority-class"] == "evalrun-test-urgent"
    finally:
        for name in classes:
            custom.delete_cluster_custom_object(GROUP, VERSION, "workloadpriorityclasses", name)
            sched.delete_priority_class(name)


def test_a_queued_run_reports_queued_is_never_stuck_and_times_the_wait_apart(
    cluster, namespace, gpu_queue, k8s_client, tmp_path
):
    cq, queue = gpu_queue
    lines: list[str] = []
    # a grace of one second: a queued Job taken for a stuck pod would fail at once
    backend = _backend(cluster, namespace, queue=queue, unschedulable_grace_s=1.0,
                       image_pull_grace_s=1.0, output=lambda line: lines.append(line.text))
    plan = gpu_plan(tmp_path, 7, H100, gpus=1)
    results: list = []
    runner = threading.Thread(target=lambda: results.append(
        backend.run(plan, tmp_path / "results")), daemon=True)
    started = time.monotonic()
    runner.start()
    # the reason is read again every 10 s: the second reading names the Workload's place
    # (on a quick cluster the first one may already)
    deadline = started + 30
    while not any("position 1 of 1 waiting in LocalQueue" in x for x in lines):
        assert time.monotonic() < deadline, lines
        time.sleep(0.5)
    # queued for at least 8 s, whichever reading named the place: the wait measured below
    time.sleep(max(0.0, started + 8.0 - time.monotonic()))
    assert runner.is_alive(), "the run ended while its Job waited in the queue"
    _release(k8s_client, cq)
    runner.join(300)
    assert results, "the run did not end after admission"
    result = results[0]
    assert any(line.startswith(f"queued in {queue}") for line in lines), lines
    assert any(line.startswith("admitted by Kueue") for line in lines), lines
    facts = result.details["queue"]
    assert facts["queue"] == queue and facts["admissions"] == 1
    assert result.queue_wait_s is not None and result.queue_wait_s >= 7.0
    assert result.started_at == facts["admitted_at"] and result.queued_at == facts["queued_at"]
    # the run's own span excludes the wait
    assert result.duration_s is not None and result.duration_s < 60


def test_a_queue_that_can_never_admit_the_run_fails_it_naming_the_resource(
    kueue, cluster, namespace, k8s_client, tmp_path
):
    """A ClusterQueue that does not cover ephemeral-storage (which every run requests):
    Kueue can never admit the run; evalrun says why (exit 4) instead of waiting forever."""
    custom = client.CustomObjectsApi(k8s_client)
    cq = f"cq-{namespace}"[:63]
    custom.create_cluster_custom_object(GROUP, VERSION, "clusterqueues", {
        "apiVersion": f"{GROUP}/{VERSION}", "kind": "ClusterQueue", "metadata": {"name": cq},
        "spec": {
            "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": namespace}},
            "resourceGroups": [{
                "coveredResources": ["cpu", "memory", "nvidia.com/gpu"],
                "flavors": [{"name": FLAVOR, "resources": [
                    {"name": "cpu", "nominalQuota": "1000"},
                    {"name": "memory", "nominalQuota": "10000Gi"},
                    {"name": "nvidia.com/gpu", "nominalQuota": 8}]}]}]}})
    try:
        custom.create_namespaced_custom_object(GROUP, VERSION, namespace, "localqueues", {
            "apiVersion": f"{GROUP}/{VERSION}", "kind": "LocalQueue",
            "metadata": {"name": "gpus"}, "spec": {"clusterQueue": cq}})
        backend = _backend(cluster, namespace, queue="gpus", unschedulable_grace_s=1.0)
        plan = gpu_plan(tmp_path, 8, H100, gpus=1)
        t0 = time.monotonic()
        with pytest.raises(EnvironmentMismatch) as caught:
            backend.run(plan, tmp_path / "results")
        took = time.monotonic() - t0
        text = str(caught.value)
        assert "does not cover ephemeral-storage" in text and "'gpus'" in text, text
        assert caught.value.exit_code == 4
        assert took < 60, f"took {took:.0f} s to give up"
        # and the refused Job is gone, not left suspended in the queue
        watch = shared_watch(backend._connect()[0], namespace)
        assert watch.wait(lambda: watch.job(job_name(plan.run_id)) is None, timeout=30)
    finally:
        custom.delete_cluster_custom_object(GROUP, VERSION, "clusterqueues", cq)

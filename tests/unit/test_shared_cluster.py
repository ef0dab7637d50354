"""Shared GPU clusters: pull secrets, priorities, Kueue queues, MIG shapes (pure parts)."""

from __future__ import annotations

import pytest
from test_manifests import _plan, _pod

from runner.agent.__main__ import check_expected_environment
from runner.backends.manifests import (
    KUEUE_PRIORITY_LABEL,
    KUEUE_QUEUE_LABEL,
    JobOptions,
    build_job,
    queue_of,
)
from runner.adapters.kueue import queue_position, uncovered_resource
from runner.backends.queueing import QueueClock
from runner.errors import SpecError

pytestmark = pytest.mark.unit
OPTS = JobOptions(namespace="evals")


def _container(job):
    return _pod(job)["containers"][0]


def test_plain_jobs_carry_no_queue_priority_or_pull_secret():
    job = build_job(_plan(), OPTS)
    assert KUEUE_QUEUE_LABEL not in job["metadata"]["labels"]
    assert "imagePullSecrets" not in _pod(job) and "priorityClassName" not in _pod(job)


def test_pull_secrets_from_the_spec_go_on_every_job_and_the_flag_replaces_them():
    plan = _plan(cluster={"image_pull_secrets": ["team-a-registry"]})
    assert _pod(build_job(plan, OPTS))["imagePullSecrets"] == [{"name": "team-a-registry"}]
    flagged = JobOptions(namespace="evals", image_pull_secrets=("ops-registry", "mirror"))
    assert _pod(build_job(plan, flagged))["imagePullSecrets"] == [
        {"name": "ops-registry"}, {"name": "mirror"}]


def test_queue_label_and_workload_priority_class_on_the_job_not_the_pod():
    plan = _plan(cluster={"queue": "team-a", "priority_class": "nightly"})
    job = build_job(plan, OPTS)
    labels = job["metadata"]["labels"]
    assert labels[KUEUE_QUEUE_LABEL] == "team-a" and labels[KUEUE_PRIORITY_LABEL] == "nightly"
    assert job["spec"]["suspend"] is True
    assert _pod(job)["priorityClassName"] == "nightly"
    assert KUEUE_QUEUE_LABEL not in job["spec"]["template"]["metadata"]["labels"]
    urgent = JobOptions(namespace="evals", queue="team-b", priority_class="urgent")
    labels = build_job(plan, urgent)["metadata"]["labels"]
    assert labels[KUEUE_QUEUE_LABEL] == "team-b" and labels[KUEUE_PRIORITY_LABEL] == "urgent"
    assert queue_of(plan, urgent) == "team-b" and queue_of(_plan(), OPTS) is None


def test_priority_without_a_queue_sets_only_the_pod_priority_class():
    job = build_job(_plan(), JobOptions(namespace="evals", priority_class="urgent"))
    assert _pod(job)["priorityClassName"] == "urgent"
    assert KUEUE_PRIORITY_LABEL not in job["metadata"]["labels"]


def test_mig_profile_requests_the_device_plugins_mig_resource():
    plan = _plan(resources={"gpus": 2, "mig_profile": "1g.10gb"},
                 sandbox={"runtime": "runc"})
    limits = _container(build_job(plan, OPTS))["resources"]["limits"]
    assert limits["nvidia.com/mig-1g.10gb"] == "2" and "nvidia.com/gpu" not in limits


def test_several_whole_gpus_per_pod():
    plan = _plan(resources={"gpus": 4}, sandbox={"runtime": "runc"})
    resources = _container(build_job(plan, OPTS))["resources"]
    assert resources["limits"]["nvidia.com/gpu"] == resources["requests"]["nvidia.com/gpu"] == "4"


@pytest.mark.parametrize("bad", [
    {"resources": {"gpus": 0, "mig_profile": "1g.10gb"}},
    {"resources": {"gpus": 1, "mig_profile": "1g10gb"}},
    {"cluster": {"queue": "Team_A"}},
    {"cluster": {"image_pull_secrets": ["not a name"]}},
    {"cluster": {"priority": "high"}},
])
def test_bad_cluster_and_mig_fields_are_refused_naming_the_field(bad):
    with pytest.raises(SpecError) as caught:
        _plan(**bad)
    section = next(iter(bad))
    assert section in caught.value.diagnostics()


def _nvml(*names):
    return {"visible": True, "count": 1, "gpus": [{
        "name": "NVIDIA H100 80GB HBM3", "mig": {"current": "enabled", "pending": "enabled"},
        "mig_devices": [{"slot": i, "name": n} for i, n in enumerate(names)]}]}


def test_mig_profile_and_count_checks_read_the_devices_nvml_shows():
    gpu = _nvml("NVIDIA H100 80GB HBM3 MIG 1g.10gb", "NVIDIA H100 80GB HBM3 MIG 1g.10gb")
    checks = {c["check"]: c for c in check_expected_environment(
        {"mig": "required", "mig_profile": "1g.10gb", "mig_count": 2}, gpu)}
    assert all(c["passed"] for c in checks.values()), checks
    assert checks["mig_profile"]["found"] == ["1g.10gb", "1g.10gb"]


def test_a_mig_device_of_another_profile_or_count_fails_closed():
    gpu = _nvml("NVIDIA H100 80GB HBM3 MIG 1g.10gb", "NVIDIA H100 80GB HBM3 MIG 3g.40gb")
    checks = {c["check"]: c for c in check_expected_environment(
        {"mig_profile": "1g.10gb", "mig_count": 1}, gpu)}
    assert not checks["mig_profile"]["passed"] and not checks["mig_count"]["passed"]
    none = {c["check"]: c for c in check_expected_environment(
        {"mig_profile": "1g.10gb"}, _nvml())}
    assert none["mig_profile"]["passed"] is False  # no MIG device at all is not a pass
    unreadable = _nvml()
    unreadable["gpus"][0]["mig_devices"] = [{"slot": 0, "error": "NVMLError_NoPermission"}]
    assert not check_expected_environment({"mig_profile": "1g.10gb"}, unreadable)[0]["passed"]


def test_queue_clock_counts_every_wait_including_after_preemption(monkeypatch):
    now = [100.0]
    monkeypatch.setattr("runner.backends.queueing.time.monotonic", lambda: now[0])
    clock = QueueClock("team-a")
    assert clock.waiting
    now[0] = 130.0
    clock.admitted()
    now[0] = 200.0
    assert clock.suspended() is True  # taken back by preemption
    assert clock.suspended() is False
    now[0] = 205.0
    clock.admitted()
    facts = clock.facts()
    assert facts["queue_wait_s"] == 35.0 and facts["admissions"] == 2
    assert facts["admitted_at"] is not None and not clock.waiting


def _workload(uid: str, *, queue: str = "gpus", priority: int | None = None,
              created: str = "2026-11-30T10:00:00Z", reserved: bool = False) -> dict:
    conditions = [{"type": "QuotaReserved", "status": "True" if reserved else "False"}]
    return {"metadata": {"name": f"job-{uid}", "creationTimestamp": created,
                         "labels": {"kueue.x-k8s.io/job-uid": uid}},
            "spec": {"queueName": queue, "priority": priority},
            "status": {"conditions": conditions}}


def test_queue_position_follows_kueues_order_priority_then_age():
    items = [
        _workload("old", created="2026-11-30T09:00:00Z"),
        _workload("running", created="2026-11-30T08:00:00Z", reserved=True),  # not waiting
        _workload("urgent", priority=100, created="2026-11-30T11:00:00Z"),
        _workload("me", created="2026-11-30T10:00:00Z"),
        _workload("later", created="2026-11-30T12:00:00Z"),
        _workload("elsewhere", queue="cpus", created="2026-11-30T07:00:00Z"),
    ]
    assert queue_position(items, "me") == (3, 4)  # behind the urgent one and the older one
    assert queue_position(items, "urgent") == (1, 4)
    assert queue_position(items, "running") is None  # admitted: no position
    assert queue_position(items, "gone") is None
    assert queue_position([{"metadata": None, "spec": "odd"}, *items], "later") == (4, 4)


@pytest.mark.parametrize(("reason", "resource"), [
    ("couldn't assign flavors to pod set main: resource ephemeral-storage unavailable in "
     "ClusterQueue; 3 pending in LocalQueue gpus", "ephemeral-storage"),
    ("couldn't assign flavors to pod set main: resource nvidia.com/mig-1g.10gb unavailable "
     "in ClusterQueue", "nvidia.com/mig-1g.10gb"),
    # quota used up, or a held queue: waiting helps, so no verdict
    ("couldn't assign flavors to pod set main: insufficient unused quota for nvidia.com/gpu "
     "in flavor h100, 1 more needed", None),
    ("ClusterQueue cq is inactive", None),
    (None, None),
])
def test_only_a_resource_the_cluster_queue_does_not_cover_is_a_verdict(reason, resource):
    assert uncovered_resource(reason) == resource


@pytest.mark.parametrize("command", [["run", "eval.yaml"],
                                     ["sweep", "eval.yaml", "--matrix", "m.yaml"]])
def test_queue_priority_and_pull_secret_flags_reach_every_job(command):
    from runner.cli.common import backend_for
    from runner.cli.main import build_parser

    argv = [*command, "--backend", "kubernetes", "--queue", "gpus", "--priority-class",
            "urgent", "--image-pull-secret", "reg-a", "--image-pull-secret", "reg-b"]
    args = build_parser().parse_args(argv)
    options = backend_for(args).options("evals")
    assert options.queue == "gpus" and options.priority_class == "urgent"
    assert options.image_pull_secrets == ("reg-a", "reg-b")
    job = build_job(_plan(), options)
    assert job["metadata"]["labels"][KUEUE_QUEUE_LABEL] == "gpus"
    assert _pod(job)["imagePullSecrets"] == [{"name": "reg-a"}, {"name": "reg-b"}]

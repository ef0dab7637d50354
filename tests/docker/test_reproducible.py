"""Reproducible images: same lock → same manifest digest, proven by `evalrun build --check`."""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
from pathlib import Path

import docker
import pytest

from runner.build.wheels import resolve_wheels
from runner._internal.settings import Settings

pytestmark = pytest.mark.docker


def _lock(spec_dir: Path) -> dict:
    return json.loads((spec_dir / "eval.lock.json").read_text())


def test_lock_records_what_a_rebuild_needs(locked_example):
    lock = _lock(locked_example)
    base, image = lock["base"], lock["image"]
    assert base["recipe"] == "bookworm-python" and base["suite"] == "bookworm"
    assert base["source_date_epoch"] == image["source_date_epoch"] == 1735689600
    assert base["layer_digest"].startswith("sha256:")
    # exact versions as installed, read from the rootfs's dpkg status
    assert base["packages"]["python3.11:amd64"] and base["packages"]["libc6:amd64"]
    assert image["assembly"] == "evalrun-oci/v1"
    assert image["layers"][0] == base["layer_digest"]
    for key in ("template_sha256", "context_sha256", "agent_sha256", "config_digest"):
        assert image[key]
    assert [w["name"] for w in lock["wheels"]] == ["numpy"]


def test_check_rebuilds_from_nothing_to_the_same_digest(cli, locked_example):
    spec = locked_example / "eval.yaml"
    locked_ref = _lock(locked_example)["image"]["ref"]
    code, report = cli.json("build", "--check", str(spec), timeout=900)
    assert code == 0, report
    assert report["result"] == "identical" and report["from_scratch"] is True
    assert report["rebuilt_image"] == report["locked_image"] == locked_ref
    assert report["base_identical"] is True and report["package_drift"] == []
    assert report["files"] == [] and report["config"] == []
    record = _lock(locked_example)["image"]["reproducibility"]
    assert record["result"] == "identical" and record["from_scratch"] is True
    assert record["rebuilt_ref"] == locked_ref


def test_image_runs_under_gvisor_after_a_pull_by_digest(locked_example, variant, vcli):
    ref = _lock(locked_example)["image"]["ref"]
    client = docker.from_env()
    with contextlib.suppress(docker.errors.ImageNotFound):  # gone already: the same start
        client.images.remove(ref, force=True)  # the backend must pull it from the registry
    path = variant()
    code, out = vcli.json("run", str(path))
    assert code == 0, out
    pred = json.loads((Path(out["bundle"]) / "statement.json").read_text())["predicate"]
    assert pred["sandbox"]["runtime_used"] == "runsc"
    assert pred["image"]["digest_confirmed_by_backend"] is True
    assert pred["image"]["rootfs_found"] == pred["image"]["rootfs_expected"]


def test_check_names_the_wheel_that_changed(cli, locked_example, tmp_path):
    dest = tmp_path / "digits"
    shutil.copytree(locked_example, dest)
    lock = _lock(dest)
    (other,) = [w for w in resolve_wheels(["numpy==2.2.5"], Settings()) if w.name == "numpy"]
    lock["wheels"] = [other.model_dump(mode="json")]
    # as if the mirror had moved on since the lock: the report names the package
    installed_bash = lock["base"]["packages"]["bash:amd64"]
    lock["base"]["packages"]["bash:amd64"] = "5.0-1"
    (dest / "eval.lock.json").write_text(json.dumps(lock, indent=2))

    code, report = cli.json("build", "--check", "--cached-base", str(dest / "eval.yaml"))
    assert code == 3, report
    assert report["result"] == "differs" and report["base_identical"] is True
    changes = {(d["change"], d["path"]) for d in report["files"]}
    assert ("added", f"/opt/evalrun/wheels/{other.filename}") in changes
    assert any(c == "added" and "/numpy-2.2.5.dist-info/" in p for c, p in changes)
    assert any(c == "removed" and "/numpy-2.2.6.dist-info/" in p for c, p in changes)
    assert ("changed", "/opt/evalrun/requirements.lock.txt") in changes
    assert {d["field"] for d in report["config"]} == {"config.Labels.org.evalrun.inputs"}
    assert report["rootfs_identical"] is False
    assert report["package_drift"] == [
        {"package": "bash:amd64", "expected": "5.0-1", "found": installed_bash}]
    assert _lock(dest)["image"]["reproducibility"]["result"] == "differs"

    proc = cli("build", "--check", "--cached-base", str(dest / "eval.yaml"))
    assert proc.returncode == 3
    assert "numpy-2.2.5.dist-info" in proc.stdout and "DIFFERS" in proc.stdout
    assert f"bash:amd64: 5.0-1 → {installed_bash}" in proc.stdout


def test_containerd_pulls_and_runs_the_image_with_the_same_rootfs(locked_example):
    """The Kubernetes runtime (containerd) takes the uncompressed OCI layers too."""
    sock = "/run/docker/containerd/containerd.sock"
    if shutil.which("ctr") is None or not Path(sock).exists():
        pytest.fail("containerd (ctr, dockerd's containerd socket) is part of the docker tier")
    lock = _lock(locked_example)
    ref = lock["image"]["ref"]
    ctr = ["ctr", "-a", sock, "-n", "evalrun-test-oci"]
    try:
        pull = subprocess.run([*ctr, "images", "pull", "--plain-http", ref],
                              capture_output=True, text=True, timeout=300, check=False)
        assert pull.returncode == 0, pull.stderr
        run = subprocess.run([*ctr, "run", "--rm", ref, "evalrun-oci-probe",
                              "python3", "-m", "runner.agent", "rootfs-digest"],
                             capture_output=True, text=True, timeout=300, check=False)
        assert run.returncode == 0, run.stderr
        assert json.loads(run.stdout.splitlines()[-1])["rootfs_digest"] == lock["image"][
            "rootfs_digest"]
    finally:
        subprocess.run([*ctr, "images", "rm", ref], capture_output=True, check=False)
        blobs = subprocess.run([*ctr, "content", "ls", "-q"], capture_output=True, text=True,
                               check=False).stdout.split()
        if blobs:
            subprocess.run([*ctr, "content", "rm", *blobs], capture_output=True, check=False)

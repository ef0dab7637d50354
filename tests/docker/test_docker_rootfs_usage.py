"""In-container rootfs verification on Docker + gVisor: the digest table and what is used.

A "changed" image is the locked image plus one layer that appends to files, pushed under
another digest and put in a copy of the lock: the container then runs content that
differs from the pinned table, as a swapped registry blob or node cache would make it.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest

pytestmark = pytest.mark.docker


def predicate_of(bundle: Path) -> dict:
    return json.loads((bundle / "statement.json").read_text())["predicate"]


def _changed_image(ref: str, files: list[str], tmp: Path) -> str:
    """``ref`` with a line appended to each of ``files``; returns the new digest ref."""
    context = tmp / f"changed-{uuid.uuid4().hex[:8]}"
    context.mkdir()
    script = " && ".join(f"echo '# changed' >> {f}" for f in files)
    (context / "Dockerfile").write_text(
        f"FROM {ref}\nUSER 0:0\nRUN [\"/bin/sh\", \"-c\", {json.dumps(script)}]\n"
        "USER 65532:65532\n"
    )
    tag = f"127.0.0.1:5000/evalrun/test-changed:{context.name}"
    for cmd in (["docker", "build", "-q", "--network", "none", "-t", tag, str(context)],
                ["docker", "push", "-q", tag]):
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=300)
        assert proc.returncode == 0, proc.stderr
    digests = subprocess.run(
        ["docker", "inspect", "--format", "{{json .RepoDigests}}", tag],
        capture_output=True, text=True, check=True,
    ).stdout
    subprocess.run(["docker", "rmi", tag], capture_output=True, check=False)
    return json.loads(digests)[0]


def _locked_on(locked_example: Path, ref: str, dest: Path) -> Path:
    shutil.copytree(locked_example, dest)
    lock_path = dest / "eval.lock.json"
    lock = json.loads(lock_path.read_text())
    lock["image"]["ref"] = ref  # the locked rootfs digest (and so the table) stays
    lock_path.write_text(json.dumps(lock, indent=2))
    return dest / "eval.yaml"


def test_the_bundle_says_what_was_verified_and_how(cli, locked_example):
    code, out = cli.json("run", str(locked_example / "eval.yaml"))
    assert code == 0, out
    pred = predicate_of(Path(out["bundle"]))
    check = pred["image"]["rootfs_check"]
    assert check["mode"] == "used" and check["passed"] is True
    assert check["table_digest"] == pred["image"]["rootfs_expected"]
    assert check["files_verified"] > 100 and check["traced_processes"] >= 1
    assert check["entries"] > check["files_verified"]
    # the agent's modules came from one file, checked with the rest
    assert check["module_pack"] == "/opt/evalrun/agent/runner/agent/modules.pack"
    rootfs = pred["preflight"]["rootfs"]
    assert rootfs["failure_count"] == 0 and rootfs["failures"] == []


def test_a_changed_file_the_evaluation_reads_fails_the_run_with_exit_3(
    vcli, locked_example, tmp_path
):
    ref = json.loads((locked_example / "eval.lock.json").read_text())["image"]["ref"]
    changed = _changed_image(ref, ["/app/evaluate.py"], tmp_path)
    spec = _locked_on(locked_example, changed, tmp_path / "changed")
    code, out = vcli.json("run", str(spec))
    assert code == 3, out
    assert out["outcome"] == "integrity_failure"
    assert "/app/evaluate.py" in out["reason"] and "differs from the image" in out["reason"]
    pred = predicate_of(Path(out["bundle"]))  # signed, saying why
    assert pred["image"]["rootfs_check"]["passed"] is False
    assert pred["image"]["rootfs_check"]["failure_count"] == 1
    # a rerun's sandbox started ahead of its runner (docker_ahead) is checked the same way
    code, out = vcli.json("run", str(spec), "--rerun")
    assert code == 3, out
    assert "/app/evaluate.py" in out["reason"] and "differs from the image" in out["reason"]
    pred = predicate_of(Path(out["bundle"]))
    assert pred["sandbox"]["details"]["started_ahead"] is True
    assert pred["image"]["rootfs_check"]["passed"] is False


def test_a_changed_file_nothing_uses_passes_used_and_fails_full(vcli, locked_example, tmp_path):
    ref = json.loads((locked_example / "eval.lock.json").read_text())["image"]["ref"]
    changed = _changed_image(ref, ["/usr/lib/python3.11/turtle.py"], tmp_path)
    spec = _locked_on(locked_example, changed, tmp_path / "unused")
    code, out = vcli.json("run", str(spec))
    assert code == 0, out
    assert predicate_of(Path(out["bundle"]))["image"]["rootfs_check"]["mode"] == "used"

    code, out = vcli.json("run", str(spec), "--rerun", "--verify-rootfs", "full")
    assert code == 3, out
    assert out["outcome"] == "integrity_failure" and "rootfs digest mismatch" in out["reason"]
    check = predicate_of(Path(out["bundle"]))["image"]["rootfs_check"]
    assert check["mode"] == "full" and check["requested"] == "full"
    assert check["files_verified"] == check["entries"] > 5000


def test_a_changed_module_pack_fails_the_run_with_exit_3(vcli, locked_example, tmp_path):
    # the agent's own modules, loaded from the pack, are checked like the evaluation's files
    ref = json.loads((locked_example / "eval.lock.json").read_text())["image"]["ref"]
    pack = "/opt/evalrun/agent/runner/agent/modules.pack"
    changed = _changed_image(ref, [pack], tmp_path)
    spec = _locked_on(locked_example, changed, tmp_path / "changed-pack")
    code, out = vcli.json("run", str(spec))
    assert code == 3, out
    assert out["outcome"] == "integrity_failure"
    assert pack in out["reason"] and "differs from the image" in out["reason"]

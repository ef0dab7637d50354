"""Inputs as the run delivers them: plan building from lock + cache, the Docker mounts,
and the agent's check of every file (streamed) before the evaluation starts."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest

from runner._internal.cas import ContentStore
from runner._internal.input_tree import scan_tree
from runner._internal.settings import Settings
from runner.adapters.sources import acquire
from runner.agent import inputs as agent_inputs
from runner.agent.__main__ import run_plan
from runner.backends.docker_policy import container_policy
from runner.errors import DigestMismatch
from runner.model.lock import LockedArtifact, LockedSpec
from runner.model.plan import RunPlan
from runner.shared.protocol import AgentExit
from runner.shared.agent_plan import PlanError, parse_agent_plan
from runner.shared.inputs import MAP_FROM, hash_mapped
from runner.workflows.inputs import InputResolver, host_inputs

pytestmark = pytest.mark.unit

LEGACY_LOCK = Path(__file__).resolve().parent / "fixtures" / "legacy" / "source" / "eval.lock.json"


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _shards(root: Path) -> dict[str, bytes]:
    files = {
        "model-00001-of-00003.safetensors": os.urandom(3 << 20),
        "model-00002-of-00003.safetensors": os.urandom(2 << 20),
        "model-00003-of-00003.safetensors": os.urandom(1000),
        "config.json": b'{"hidden": 8}',
        "tokenizer/vocab.txt": b"a\nb\nc\n",
    }
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return files


def _lock_with(model: dict, data_file: Path, tmp_path: Path) -> LockedSpec:
    data = json.loads(LEGACY_LOCK.read_text())
    data["model"] = model
    data["datasets"][0].update(
        path=os.path.relpath(data_file, tmp_path),
        sha256=sha(data_file.read_bytes()),
        size=data_file.stat().st_size,
    )
    return LockedSpec.model_validate(data)


@pytest.fixture
def locked(tmp_path: Path):
    """A directory model and a file dataset, locked into an empty cache."""
    settings = Settings(home=tmp_path / "home", cache=tmp_path / "cache")
    spec_dir = tmp_path / "spec"
    files = _shards(spec_dir / "model")
    (spec_dir / "data.jsonl").write_bytes(b'{"id": "1"}\n')
    store = ContentStore(settings.input_cache)
    got = acquire(
        "model",
        scan_tree(spec_dir / "model", what="m").digest,
        field="model",
        spec_dir=spec_dir,
        store=store,
    )
    model = {
        "kind": "directory",
        "path": "model",
        "sha256": got.sha256,
        "size": got.size,
        "files": [f.model_dump() for f in got.files],
        "artifact": "127.0.0.1:5000/evalrun/demo-inputs@sha256:" + "a" * 64,
    }
    lock = _lock_with(model, spec_dir / "data.jsonl", spec_dir)
    return settings, spec_dir, lock, files


def _plan(inputs) -> RunPlan:
    return RunPlan(
        run_id="r-" + "0" * 24,
        attempt=0,
        image_ref="127.0.0.1:5000/x@sha256:" + "1" * 64,
        expected_rootfs_digest="sha256:" + "2" * 64,
        runtime="gvisor",
        command=["true"],
        params={},
        seed=0,
        metrics=[],
        expect={},
        inputs=inputs,
        timeout_s=60,
        cpus=1,
        memory_mib=256,
        pids=64,
        spec_digest="sha256:" + "3" * 64,
        lock_digest="sha256:" + "4" * 64,
        spec_name="demo",
    )


# --------------------------------------------------------------------------- plan building


def test_plan_inputs_come_from_the_cache_with_kind_files_and_artifact(locked):
    settings, spec_dir, lock, files = locked
    model, data = host_inputs(lock, InputResolver(settings, spec_dir=spec_dir))
    store = ContentStore(settings.input_cache)
    assert model.kind == "directory" and model.host_path == store.tree_path(lock.model.digest)
    assert model.container_path == model.mount_path == "/evalrun/inputs/model"
    assert [f.path for f in model.files] == sorted(files)
    assert model.artifact_ref == lock.model.artifact and model.sha256 == lock.model.sha256
    assert data.kind == "file" and data.host_path == store.blob_path(lock.datasets[0].sha256)
    assert data.container_path == "/evalrun/inputs/data/digits-tiny/data.jsonl"
    assert data.file_name == "data.jsonl" and data.artifact_ref is None


def test_the_docker_sandbox_mounts_each_input_read_only_from_the_cache(locked, tmp_path):
    settings, spec_dir, lock, _ = locked
    inputs = host_inputs(lock, InputResolver(settings, spec_dir=spec_dir))
    policy = container_policy(_plan(inputs), plan_dir=tmp_path / "p", results_dir=tmp_path / "r")
    mounts = {m.target: m for m in policy.mounts}
    for item in inputs:
        mount = mounts[item.container_path]
        assert mount.read_only and Path(mount.source).is_relative_to(settings.input_cache)


def test_agent_plan_lists_a_directory_file_by_file_and_files_as_before(locked):
    settings, spec_dir, lock, files = locked
    plan = _plan(host_inputs(lock, InputResolver(settings, spec_dir=spec_dir))).agent_plan()
    model, data = plan["inputs"]
    assert model["kind"] == "directory" and len(model["files"]) == len(files)
    assert set(data) == {"role", "name", "path", "sha256"}  # a file input: the old shape
    assert parse_agent_plan(json.loads(json.dumps(plan)))["inputs"][0]["files"] == model["files"]


def test_an_input_edited_since_the_lock_stops_the_run(locked):
    settings, spec_dir, lock, _ = locked
    (spec_dir / "model" / "config.json").write_bytes(b'{"hidden": 9}')
    with pytest.raises(DigestMismatch) as err:
        host_inputs(lock, InputResolver(settings, spec_dir=spec_dir))
    assert err.value.exit_code == 3 and "model" in err.value.message


def test_an_input_gone_from_the_spec_dir_is_taken_from_the_cache(locked):
    settings, spec_dir, lock, _ = locked
    shutil.rmtree(spec_dir / "model")
    model, _ = host_inputs(lock, InputResolver(settings, spec_dir=spec_dir))
    assert model.host_path == ContentStore(settings.input_cache).tree_path(lock.model.digest)


def test_an_input_found_nowhere_is_exit_3_naming_it(locked, tmp_path):
    settings, spec_dir, lock, _ = locked
    shutil.rmtree(spec_dir / "model")
    shutil.rmtree(settings.input_cache)
    with pytest.raises(DigestMismatch) as err:
        host_inputs(lock, InputResolver(settings, spec_dir=spec_dir, fetch=False))
    assert err.value.exit_code == 3 and err.value.message.startswith("model model")


# --------------------------------------------------------------------------- agent checks


def _directory_item(root: Path, files: dict[str, bytes]) -> dict:
    listed = [{"path": p, "sha256": sha(d), "size": len(d)} for p, d in sorted(files.items())]
    from runner.shared.inputs import tree_digest_of

    digest = tree_digest_of((f["path"], f["sha256"], f["size"]) for f in listed)
    return {
        "role": "model",
        "name": "model",
        "path": str(root),
        "sha256": digest[7:],
        "kind": "directory",
        "files": listed,
    }


def test_agent_accepts_exactly_the_planned_directory(tmp_path):
    files = _shards(tmp_path / "m")
    record = agent_inputs.check_input(_directory_item(tmp_path / "m", files), workers=3)
    assert record["passed"] and record["found"] == record["expected"]
    assert record["files"] == len(files) and record["bytes"] == sum(map(len, files.values()))


@pytest.mark.parametrize(
    "damage, problem",
    [
        (lambda r: (r / "config.json").unlink(), "missing file config.json"),
        (lambda r: (r / "notes.txt").write_text("x"), "extra file notes.txt"),
        (
            lambda r: (r / "tokenizer" / "vocab.txt").write_bytes(b"a\nb\nd\n"),
            "changed file tokenizer/vocab.txt (sha256",
        ),
        (
            lambda r: (r / "model-00003-of-00003.safetensors").write_bytes(b"short"),
            "changed file model-00003-of-00003.safetensors (size 5, expected 1000)",
        ),
        (lambda r: (r / "link").symlink_to("/etc/passwd"), "unexpected symbolic link link"),
        (lambda r: os.mkfifo(r / "fifo"), "unexpected special file fifo"),
    ],
)
def test_agent_names_every_missing_extra_or_changed_file(tmp_path, damage, problem):
    files = _shards(tmp_path / "m")
    item = _directory_item(tmp_path / "m", files)
    damage(tmp_path / "m")
    record = agent_inputs.check_input(item, workers=2)
    assert not record["passed"] and any(problem in p for p in record["problems"])
    assert problem in agent_inputs.failure_reason([record])


def test_agent_refuses_a_plan_whose_list_is_not_the_pinned_tree(tmp_path):
    files = _shards(tmp_path / "m")
    item = _directory_item(tmp_path / "m", files)
    item["sha256"] = "0" * 64
    record = agent_inputs.check_input(item)
    assert not record["passed"] and "does not give the pinned tree digest" in record["problems"][0]


def test_agent_file_inputs_are_checked_as_before(tmp_path):
    (tmp_path / "w.json").write_bytes(b"weights")
    item = {
        "role": "model",
        "name": "model",
        "path": str(tmp_path / "w.json"),
        "sha256": sha(b"weights"),
    }
    assert agent_inputs.check_input(item) == {
        "name": "model",
        "role": "model",
        "expected": sha(b"weights"),
        "found": sha(b"weights"),
        "passed": True,
    }
    (tmp_path / "w.json").write_bytes(b"other")
    assert "changed file w.json" in agent_inputs.check_input(item)["problems"][0]
    (tmp_path / "w.json").unlink()
    assert agent_inputs.check_input(item)["found"] == "missing"


def test_agent_stops_before_the_evaluation_with_exit_3(tmp_path, monkeypatch):
    import runner.agent.__main__ as agent

    monkeypatch.setattr(agent, "rootfs_digest", lambda _: ("sha256:" + "2" * 64, 1))
    # the full check runs in the agent's usage module (no digest table here)
    monkeypatch.setattr("runner.agent.usage.rootfs_digest", lambda _: ("sha256:" + "2" * 64, 1))
    monkeypatch.setattr(agent, "capture_environment", lambda _: {"gpu": {}})
    files = _shards(tmp_path / "m")
    item = _directory_item(tmp_path / "m", files)
    (tmp_path / "m" / "config.json").unlink()
    marker = tmp_path / "ran"
    plan = {
        "emit_results": False,
        "run_id": "r-1",
        "image_ref": "x",
        "expected_rootfs_digest": "sha256:" + "2" * 64,
        "seed": 0,
        "params": {},
        "command": ["touch", str(marker)],
        "timeout_s": 10,
        "metrics": [],
        "perturbations": [],
        "expect": {},
        "inputs": [item],
    }
    results = tmp_path / "results"
    assert run_plan(parse_agent_plan(plan), results) == AgentExit.INTEGRITY
    summary = json.loads((results / "summary.json").read_text())
    assert summary["outcome"] == "integrity_failure"
    assert "model model: missing file config.json" in summary["reason"]
    assert not marker.exists()  # the evaluation never started


@pytest.mark.parametrize(
    "item, field",
    [
        ({"kind": "tarball"}, "inputs[0].kind"),
        ({"kind": "directory"}, "inputs[0].files"),
        ({"kind": "directory", "files": []}, "inputs[0].files"),
        (
            {"kind": "directory", "files": [{"path": "../x", "sha256": "0" * 64, "size": 1}]},
            "inputs[0].files[0].path",
        ),
        (
            {"kind": "directory", "files": [{"path": "x", "sha256": "0" * 64, "size": -1}]},
            "inputs[0].files[0].size",
        ),
    ],
)
def test_plan_directory_inputs_are_parsed_strictly(item, field):
    base = {
        "run_id": "r",
        "image_ref": "x",
        "expected_rootfs_digest": "sha256:x",
        "seed": 0,
        "command": ["x"],
        "timeout_s": 1,
        "metrics": [],
        "inputs": [{"role": "model", "name": "m", "path": "/p", "sha256": "0" * 64, **item}],
    }
    with pytest.raises(PlanError) as err:
        parse_agent_plan(base)
    assert err.value.field == field


def test_plans_from_before_directories_still_parse():
    plan = {
        "run_id": "r",
        "image_ref": "x",
        "expected_rootfs_digest": "sha256:x",
        "seed": 0,
        "command": ["x"],
        "timeout_s": 1,
        "metrics": [],
        "inputs": [{"role": "model", "name": "m", "path": "/p", "sha256": "0" * 64}],
    }
    (item,) = parse_agent_plan(plan)["inputs"]
    assert item.get("kind", "file") == "file" and "files" not in item


def test_lock_file_entry_defaults_to_its_path_name():
    locked = LockedArtifact(path="data/d.jsonl", sha256="0" * 64, size=3)
    assert locked.entries()[0].path == "d.jsonl"


@pytest.mark.parametrize("size", [MAP_FROM - 1, MAP_FROM, MAP_FROM + 4097, 3 * MAP_FROM + 1])
def test_a_large_file_is_hashed_from_a_mapping_to_the_same_digest(tmp_path, size):
    path = tmp_path / "blob"
    data = os.urandom(size)
    path.write_bytes(data)
    fd = os.open(path, os.O_RDONLY)
    try:
        mapped = hash_mapped(fd, size)
        assert mapped == (hashlib.sha256(data).hexdigest(), data[:16])
        # only the size asked for: the first bytes of a file that has grown since
        assert hash_mapped(fd, size - 1) == (hashlib.sha256(data[:-1]).hexdigest(), data[:16])
    finally:
        os.close(fd)
    # the agent's check of a file input takes the same path for a large file
    item = {"name": "blob", "role": "dataset", "path": str(path),
            "sha256": hashlib.sha256(data).hexdigest()}
    assert agent_inputs.check_input(item)["passed"] is True
    item["sha256"] = "0" * 64
    assert agent_inputs.check_input(item)["passed"] is False


def test_what_cannot_be_mapped_is_left_to_reading(tmp_path):
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    for path, size in ((empty, 0), (Path("/dev/null"), 5)):
        fd = os.open(path, os.O_RDONLY)
        try:
            assert hash_mapped(fd, size) is None
        finally:
            os.close(fd)

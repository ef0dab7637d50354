"""Inputs by digest, end to end: real dockerd, registry (127.0.0.1:5000) and gVisor.

A sharded checkpoint directory and a dataset directory (examples/sharded) are locked,
published as OCI artifacts next to the image, run under gVisor from the read-only
content cache, and re-run on an empty machine from the registry alone; a blob altered
in the registry, a registry that is down, a wrong checksum and an escaping entry are
each refused with their exit code. Remote inputs (https with a test CA, S3) are locked
and run too.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import socket
import tarfile
import time
import urllib.request
import uuid
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, Cli, predicate_of, with_signing_key
from test_input_sources_remote import https_server, s3, s3_env, upload  # noqa: F401

pytestmark = pytest.mark.docker

EXAMPLE = ROOT / "examples" / "sharded"
REGISTRY_DIR = Path(os.environ.get("EVALRUN_REGISTRY_DIR", "/var/lib/evalrun-registry"))
ARTIFACT_TYPE = "application/vnd.evalrun.input.v1"


def fresh(tmp_path: Path, name: str) -> Cli:
    """An empty machine: its own store (and key) and its own, empty, input cache."""
    home, cache = tmp_path / name / "home", tmp_path / name / "cache"
    env = {**os.environ, "EVALRUN_HOME": str(home), "EVALRUN_CACHE": str(cache)}
    return with_signing_key(Cli(home=home, env=env))


def copy_example(dest: Path, **changes: object) -> Path:
    shutil.copytree(EXAMPLE, dest, ignore=shutil.ignore_patterns("eval.lock.json", "__pycache__"))
    spec = yaml.safe_load((dest / "eval.yaml").read_text())
    spec["image"]["template"] = str(ROOT / "images" / "python-eval.Dockerfile.j2")
    spec.update(changes)
    (dest / "eval.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    return dest / "eval.yaml"


def registry_get(reference: str, *, accept: str | None = None) -> bytes:
    """A plain distribution-API GET (no evalrun code): ``host/repo@digest`` or a blob URL."""
    repo, digest = reference.split("@")
    host, name = repo.split("/", 1)
    kind = "manifests" if accept else "blobs"
    request = urllib.request.Request(
        f"http://{host}/v2/{name}/{kind}/{digest}", headers={"Accept": accept or "*/*"}
    )
    with urllib.request.urlopen(request, timeout=30) as resp:  # noqa: S310
        return resp.read()


def blob_file(digest: str) -> Path:
    hexd = digest.removeprefix("sha256:")
    return REGISTRY_DIR / "docker/registry/v2/blobs/sha256" / hexd[:2] / hexd / "data"


def closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


@pytest.fixture(scope="module")
def sharded(cli, tmp_path_factory) -> Path:
    """examples/sharded copied and locked once (image built, inputs published)."""
    spec = copy_example(tmp_path_factory.mktemp("sharded") / "sharded")
    proc = cli("lock", str(spec))
    assert proc.returncode == 0, proc.stderr
    return spec


@pytest.fixture(scope="module")
def sharded_run(cli, sharded) -> dict:
    code, out = cli.json("run", str(sharded))
    assert code == 0, out
    return out


def lock_of(spec: Path) -> dict:
    return json.loads(spec.with_name("eval.lock.json").read_text())


# --------------------------------------------------------------------------- lock + run


def test_sharded_directory_inputs_run_under_gvisor_and_the_bundle_verifies(
    cli, sharded, sharded_run
):
    lock = lock_of(sharded)
    model, data = lock["model"], lock["datasets"][0]
    assert model["kind"] == data["kind"] == "directory"
    assert [f["path"] for f in model["files"]] == [
        "model-00001-of-00003.safetensors",
        "model-00002-of-00003.safetensors",
        "model-00003-of-00003.safetensors",
        "model.safetensors.index.json",
    ]
    assert model["artifact"].startswith("127.0.0.1:5000/evalrun/sharded-logreg-inputs@sha256:")
    bundle = Path(sharded_run["bundle"])
    assert sharded_run["outcome"] == "passed"
    assert cli("verify", str(bundle), "--key", str(cli.pub)).returncode == 0
    pred = predicate_of(bundle)
    assert pred["sandbox"]["runtime_used"] == "runsc"
    assert pred["model"]["kind"] == "directory" and pred["model"]["artifact"] == model["artifact"]
    assert pred["datasets"][0]["sha256"] == data["sha256"]
    checked = json.loads((bundle / "results" / "preflight.json").read_text())["inputs"]
    assert [(c["name"], c["kind"], c["files"], c["passed"]) for c in checked] == [
        ("model", "directory", 4, True),
        ("digits-test", "directory", 3, True),
    ]
    # the same weights and samples as examples/digits: the same numbers
    accuracy = next(m for m in pred["metrics"] if m["name"] == "accuracy")
    assert accuracy["value"] == pytest.approx(416 / 450)
    stderr = (bundle / "results" / "logs" / "evaluation.stderr").read_text()
    assert "3 shards, scored 450 samples" in stderr


def test_inputs_are_mounted_read_only_from_the_cache(cli, sharded, sharded_run):
    pred = predicate_of(Path(sharded_run["bundle"]))
    mounts = {m["target"]: m for m in pred["sandbox"]["details"]["input_mounts"]}
    assert set(mounts) == {"/evalrun/inputs/model", "/evalrun/inputs/data/digits-test"}
    for mount in mounts.values():
        assert mount["read_only"] and "/inputs/trees/" in mount["source"]
    # the tree is the cache's own: hard links to its blobs, nothing copied for the run
    tree = Path(mounts["/evalrun/inputs/model"]["source"])
    shard = tree / "model-00001-of-00003.safetensors"
    blob = tree.parent.parent / "blobs" / "sha256" / hashlib.sha256(shard.read_bytes()).hexdigest()
    assert shard.stat().st_ino == blob.stat().st_ino


def test_the_published_artifact_gives_the_files_back_to_a_plain_client(sharded):
    lock = lock_of(sharded)
    for entry, folder in ((lock["model"], "model"), (lock["datasets"][0], "data")):
        manifest = json.loads(
            registry_get(entry["artifact"], accept="application/vnd.oci.image.manifest.v1+json")
        )
        assert manifest["artifactType"] == ARTIFACT_TYPE
        assert manifest["annotations"]["org.evalrun.input.digest"] == "sha256:" + entry["sha256"]
        repo = entry["artifact"].split("@")[0]
        for layer in manifest["layers"]:
            blob = registry_get(f"{repo}@{layer['digest']}")
            assert "sha256:" + hashlib.sha256(blob).hexdigest() == layer["digest"]
            with tarfile.open(fileobj=io.BytesIO(blob)) as tar:
                (member,) = tar.getmembers()
                title = layer["annotations"]["org.opencontainers.image.title"]
                assert member.name == title and member.mode == 0o444
                content = tar.extractfile(member).read()  # type: ignore[union-attr]
            assert content == (EXAMPLE / folder / title).read_bytes()


def test_locking_again_publishes_nothing_new(cli, sharded):
    before = lock_of(sharded)
    code, out = cli.json("lock", str(sharded))
    assert code == 0, out
    assert [i["artifact"] for i in out["inputs"]] == [
        before["model"]["artifact"],
        before["datasets"][0]["artifact"],
    ]


# --------------------------------------------------------------------------- rerun by digest


def test_rerun_on_an_empty_machine_fetches_inputs_by_digest_and_is_identical(
    cli, sharded_run, tmp_path
):
    empty = fresh(tmp_path, "empty")
    code, ready = empty.json("rerun", sharded_run["bundle"], "--check", "--pub", str(cli.pub))
    assert code == 0 and ready["ready"], ready
    assert all("/cache/inputs/trees/" in path for path in ready["inputs"].values())
    other = fresh(tmp_path, "other")
    code, out = other.json("rerun", sharded_run["bundle"], "--pub", str(cli.pub))
    assert code == 0, out
    assert out["verdict"] == "identical" and {m["verdict"] for m in out["metrics"]} == {
        "identical"
    }
    pred = predicate_of(Path(out["bundle"]))
    assert pred["reproduction_of"]["run_id"] == sharded_run["run_id"]


def test_a_cluster_rerun_checks_inputs_in_the_registry_and_downloads_nothing(
    cli, sharded_run, tmp_path
):
    """Kubernetes nodes pull inputs by digest: the runner's host never holds them."""
    empty = fresh(tmp_path, "cluster-runner")
    code, ready = empty.json(
        "rerun", sharded_run["bundle"], "--check", "--backend", "kubernetes", "--pub", str(cli.pub)
    )
    assert code == 0 and ready["ready"], ready
    lock = lock_of_bundle(sharded_run)
    artifacts = {lock["model"]["artifact"]} | {d["artifact"] for d in lock["datasets"]}
    assert len(ready["inputs"]) == 1 + len(lock["datasets"])
    for label, where in ready["inputs"].items():
        assert where.split()[0] in artifacts and "registry" in where, (label, where)
    cache = tmp_path / "cluster-runner" / "cache"
    held = [p for p in cache.rglob("*") if p.is_file()] if cache.exists() else []
    assert held == [], held


def test_a_cluster_run_refuses_an_input_missing_from_the_registry_naming_it(
    cli, sharded_run, tmp_path
):
    from runner._internal.settings import Settings
    from runner.model.lock import LockedSpec
    from runner.workflows.inputs import InputResolver, Published, UnresolvedInput, wanted_inputs

    lock = LockedSpec.model_validate(lock_of_bundle(sharded_run))
    settings = Settings(home=tmp_path / "home", cache=tmp_path / "cache")
    resolver = InputResolver(settings, remote=True)
    wants = wanted_inputs(lock)
    assert all(isinstance(resolver.resolve(w), Published) for w in wants)
    gone = wants[0].locked.model_copy(
        update={"artifact": wants[0].locked.artifact.split("@")[0] + "@sha256:" + "0" * 64}
    )
    missing = resolver.resolve(type(wants[0])(wants[0].role, wants[0].name, gone))
    assert isinstance(missing, UnresolvedInput)
    assert "not in the registry" in missing.reason and "0000000" in missing.reason
    cache = tmp_path / "cache"
    assert not cache.exists() or not [p for p in cache.rglob("*") if p.is_file()]


def lock_of_bundle(run: dict) -> dict:
    return json.loads((Path(run["bundle"]) / "eval.lock.json").read_text())


def test_an_input_blob_altered_in_the_registry_is_refused_before_the_evaluation(
    cli, sharded, sharded_run, tmp_path
):
    artifact = lock_of(sharded)["model"]["artifact"]
    manifest = json.loads(
        registry_get(artifact, accept="application/vnd.oci.image.manifest.v1+json")
    )
    shard = next(
        x
        for x in manifest["layers"]
        if x["annotations"]["org.opencontainers.image.title"].startswith("model-00002")
    )
    blob = blob_file(shard["digest"])
    good = blob.read_bytes()
    try:
        bad = bytearray(good)
        bad[1024] ^= 0x01  # inside the shard's bytes
        blob.write_bytes(bytes(bad))
        empty = fresh(tmp_path, "tampered")
        t0 = time.monotonic()
        proc = empty("rerun", sharded_run["bundle"], "--pub", str(cli.pub))
        assert proc.returncode == 3, proc.stderr
        assert "model-00002-of-00003.safetensors" in proc.stderr
        assert "digest mismatch" in proc.stderr or "not evalrun's" in proc.stderr
        assert time.monotonic() - t0 < 60
        code, listed = empty.json("runs", "ls")
        assert listed == []  # nothing was started
        model_tree = Path(empty.env["EVALRUN_CACHE"]) / "inputs" / "trees" / lock_of(sharded)[
            "model"
        ]["sha256"]
        assert not model_tree.exists()  # the altered input never entered the cache
    finally:
        blob.write_bytes(good)


# --------------------------------------------------------------------------- refusals at lock


def test_registry_down_while_publishing_is_exit_5_and_no_lock_is_written(cli, tmp_path):
    spec = copy_example(tmp_path / "down")
    data = yaml.safe_load(spec.read_text())
    data["image"]["repository"] = f"127.0.0.1:{closed_port()}/evalrun"
    spec.write_text(yaml.safe_dump(data, sort_keys=False))
    t0 = time.monotonic()
    proc = cli("lock", str(spec))
    assert proc.returncode == 5, proc.stderr
    assert "registry unreachable" in proc.stderr and "still failing after retries" in proc.stderr
    assert time.monotonic() - t0 < 90
    assert not spec.with_name("eval.lock.json").exists()


def test_wrong_checksum_is_exit_3_before_any_container(cli, sharded, tmp_path):
    spec = copy_example(tmp_path / "wrong")
    shard = spec.parent / "model" / "model-00001-of-00003.safetensors"
    shard.write_bytes(shard.read_bytes()[:-8] + b"\0" * 8)
    proc = cli("lock", str(spec))
    assert proc.returncode == 3, proc.stderr
    assert "model: digest mismatch" in proc.stderr
    # and a locked spec whose input changed afterwards does not start a container
    changed = tmp_path / "changed"
    shutil.copytree(sharded.parent, changed)
    part = changed / "data" / "part-00001.jsonl"
    part.write_text(part.read_text().replace('"label":4', '"label":5', 1))
    run_home = fresh(tmp_path, "changed-run")
    code, out = run_home.json("run", str(changed / "eval.yaml"))
    assert code == 3 and out["outcome"] == "integrity_failure", out
    assert "dataset digits-test" in out["reason"]
    pred = predicate_of(Path(out["bundle"]))
    assert pred["sandbox"]["runtime_used"] is None  # sealed without a container


def test_a_directory_entry_escaping_its_root_is_exit_2_naming_the_input(cli, tmp_path):
    spec = copy_example(tmp_path / "escape")
    (spec.parent / "data" / "leak.jsonl").symlink_to("/etc/passwd")
    proc = cli("lock", str(spec))
    assert proc.returncode == 2, proc.stderr
    assert "datasets[0] (digits-test)" in proc.stderr and "leak.jsonl" in proc.stderr


# --------------------------------------------------------------------------- remote sources


def _remote_variant(tmp_path: Path, sharded: Path, name: str, **inputs: object) -> Path:
    """The sharded example on the already built image, with other inputs."""
    dest = tmp_path / name
    shutil.copytree(sharded.parent, dest, ignore=shutil.ignore_patterns("eval.lock.json"))
    spec = yaml.safe_load((dest / "eval.yaml").read_text())
    spec["image"] = {"ref": lock_of(sharded)["image"]["ref"]}
    for key, value in inputs.items():
        if key == "model":
            spec["model"] = value
        else:
            spec["datasets"][0].update(value)  # type: ignore[arg-type]
    (dest / "eval.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    return dest / "eval.yaml"


def test_https_dataset_is_locked_published_and_run(cli, sharded, https_server, tmp_path):  # noqa: F811
    data = (ROOT / "examples" / "digits" / "data" / "digits_test.jsonl").read_bytes()
    url = https_server.serve("digits_test.jsonl", data)
    spec = _remote_variant(
        tmp_path,
        sharded,
        "https",
        dataset={"uri": url, "sha256": hashlib.sha256(data).hexdigest(), "ca_file": "../ca.pem"},
    )
    proc = cli("lock", str(spec))
    assert proc.returncode == 0, proc.stderr
    locked = lock_of(spec)["datasets"][0]
    assert locked["uri"] == url and locked["kind"] == "file" and locked["artifact"]
    assert locked["files"][0]["path"] == "digits_test.jsonl"
    code, out = cli.json("run", str(spec))
    assert code == 0, out
    accuracy = next(m for m in out["metrics"] if m["name"] == "accuracy")
    assert accuracy["value"] == pytest.approx(416 / 450)
    # the https server is not needed for a re-run: the registry has the bytes
    empty = fresh(tmp_path, "https-empty")
    https_server.files.clear()
    code, again = empty.json("rerun", out["bundle"], "--pub", str(cli.pub))
    assert code == 0 and again["verdict"] == "identical", again


def test_s3_directory_inputs_are_locked_published_and_run(cli, sharded, s3, tmp_path):  # noqa: F811
    prefix = f"{uuid.uuid4().hex}/sharded"
    objects = {
        f"{prefix}/{folder}/{f.name}": f.read_bytes()
        for folder in ("model", "data")
        for f in sorted((EXAMPLE / folder).iterdir())
    }
    upload(s3, objects)
    lock = lock_of(sharded)
    spec = _remote_variant(
        tmp_path,
        sharded,
        "s3",
        model={
            "uri": f"s3://{s3.bucket}/{prefix}/model/",
            "sha256": lock["model"]["sha256"],
            "endpoint": s3.endpoint,
        },
        dataset={
            "uri": f"s3://{s3.bucket}/{prefix}/data/",
            "sha256": lock["datasets"][0]["sha256"],
            "endpoint": s3.endpoint,
        },
    )
    env = {k: v for k, v in s3_env(s3).items() if k != "AWS_ENDPOINT_URL"}
    proc = cli("lock", str(spec), env=env)
    assert proc.returncode == 0, proc.stderr
    locked = lock_of(spec)
    assert locked["model"]["uri"].startswith("s3://") and locked["model"]["endpoint"] == s3.endpoint
    # the same directory from S3 has the same digest, and so the same artifact
    assert locked["model"]["artifact"] == lock["model"]["artifact"]
    code, out = cli.json("run", str(spec), env=env)
    assert code == 0, out

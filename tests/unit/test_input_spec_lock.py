"""Inputs in the spec and the lock: every URI kind, one digest form, old locks still load."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import yaml

from runner.errors import SpecError
from runner.model.lock import LockedArtifact, LockedDataset, LockedSpec, load_lock
from runner.model.predicate import DatasetInput, ModelInput
from runner.model.spec import load_spec
from runner.shared.inputs import tree_digest_of

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "digits" / "eval.yaml"
LEGACY = Path(__file__).resolve().parent / "fixtures" / "legacy" / "source"
HEX = "ab" * 32


def _spec(tmp_path: Path, **model: object) -> Path:
    data = yaml.safe_load(EXAMPLE.read_text())
    data["model"] = {"uri": "model/weights.json", "sha256": HEX, **model}
    path = tmp_path / "eval.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize(
    "uri",
    [
        "model/weights.json",
        "model/",
        "file:///srv/models/llama",
        "../shared/checkpoint",
        "https://models.example.org/llama/model.safetensors",
        "s3://models/llama/model-00001.safetensors",
        "s3://models/llama/",
        "oci://127.0.0.1:5000/evalrun/llama-inputs@sha256:" + "c" * 64,
    ],
)
def test_every_input_uri_kind_is_accepted(tmp_path, uri):
    spec = load_spec(_spec(tmp_path, uri=uri))
    assert spec.model.uri == uri


def test_sha256_prefix_is_accepted_and_recorded_bare(tmp_path):
    bare = load_spec(_spec(tmp_path, sha256=HEX))
    prefixed = load_spec(_spec(tmp_path, sha256="sha256:" + HEX))
    assert prefixed.model.sha256 == HEX
    assert prefixed.digest() == bare.digest()  # one canonical form, one spec digest


def test_optional_source_fields_do_not_move_the_digest_of_existing_specs():
    spec = load_spec(EXAMPLE)
    assert "ca_file" not in spec.canonical_json().decode()
    assert "endpoint" not in spec.canonical_json().decode()


@pytest.mark.parametrize(
    "model, field, problem",
    [
        ({"uri": "gs://bucket/model"}, "model.uri", "unsupported scheme 'gs'"),
        ({"uri": "http://example.org/m.bin"}, "model.uri", "plain http"),
        ({"uri": "https://u:p@example.org/m"}, "model.uri", "credentials"),
        ({"uri": "s3://bucket"}, "model.uri", "needs a key or a prefix"),
        ({"uri": "oci://reg.io/repo:latest"}, "model.uri", "pinned by digest"),
        ({"sha256": "sha512:" + HEX}, "model.sha256", "should match pattern"),
        ({"uri": "model/", "endpoint": "http://s3:9000"}, "model", "s3:// inputs only"),
        ({"uri": "s3://b1/k", "endpoint": "ftp://s3"}, "model.endpoint", "http[s]://host"),
        ({"uri": "model/", "ca_file": "ca.pem"}, "model", "https:// and s3://"),
    ],
)
def test_bad_inputs_are_named_with_file_and_field(tmp_path, model, field, problem):
    with pytest.raises(SpecError) as exc:
        load_spec(_spec(tmp_path, **model))
    problems = dict(exc.value.problems)
    assert field in problems, problems
    assert problem in problems[field]
    assert exc.value.fields["file"].endswith("eval.yaml") and exc.value.exit_code == 2


def test_cli_validate_names_file_and_field(tmp_path, capsys):
    from runner.cli.main import main

    path = _spec(tmp_path, uri="gs://bucket/model")
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert str(path) in err and "model.uri: unsupported scheme 'gs'" in err


# --------------------------------------------------------------------------- lock


def _files(*items: tuple[str, bytes]) -> list[dict]:
    return [{"path": p, "sha256": hashlib.sha256(b).hexdigest(), "size": len(b)} for p, b in items]


def test_old_locks_load_as_local_files_and_keep_their_digest():
    raw = (LEGACY / "eval.lock.json").read_text()
    lock = load_lock(LEGACY / "eval.lock.json")
    assert lock.model.kind == "file" and lock.model.path == "model/weights.json"
    assert lock.model.files == () and lock.model.artifact is None
    (entry,) = lock.model.entries()
    assert entry.path == "weights.json" and entry.sha256 == lock.model.sha256
    # the digest (and so every run id) of an old lock does not change
    data = json.loads(raw)
    canonical = json.loads(lock.canonical_json())
    assert canonical["model"] == data["model"]  # no new key appears in the digested form
    assert canonical["datasets"] == data["datasets"]
    assert lock.digest() == LockedSpec.model_validate(data).digest()
    # and the predicate says what old runs said about the inputs
    assert ModelInput.model_validate(lock.model.record()).to_json() == data["model"]
    assert DatasetInput.model_validate(lock.datasets[0].record()).to_json() == data["datasets"][0]


def test_directory_lock_records_every_file_and_their_tree_digest():
    files = _files(("a/b.bin", b"12"), ("c.json", b"{}"))
    digest = tree_digest_of((f["path"], f["sha256"], f["size"]) for f in files)
    locked = LockedArtifact.model_validate(
        {
            "kind": "directory",
            "uri": "s3://bucket/ckpt/",
            "endpoint": "http://127.0.0.1:8333",
            "sha256": digest.removeprefix("sha256:"),
            "size": 4,
            "files": files,
            "artifact": "127.0.0.1:5000/evalrun/x-inputs@sha256:" + "d" * 64,
        }
    )
    assert locked.digest == digest and locked.origin == "s3://bucket/ckpt/"
    assert [f.path for f in locked.entries()] == ["a/b.bin", "c.json"]
    record = locked.record()
    assert "files" not in record and record["kind"] == "directory"
    assert record["artifact"].endswith("d" * 64)


@pytest.mark.parametrize(
    "change, problem",
    [
        ({"sha256": "e" * 64}, "tree digest"),
        ({"size": 5}, "sum of the files"),
        ({"files": []}, "lists its files"),
        ({"path": "ckpt"}, "either 'path'"),
        ({"uri": None}, "either 'path'"),
        ({"artifact": "reg/x-inputs:latest"}, "not pinned by digest"),
        ({"files": _files(("../x", b"12"), ("c.json", b"{}"))}, "escapes"),
        ({"files": _files(("a", b"12"), ("a", b"{}"))}, "listed twice"),
    ],
)
def test_inconsistent_directory_locks_are_refused(change, problem):
    files = _files(("a/b.bin", b"12"), ("c.json", b"{}"))
    good = {
        "kind": "directory",
        "uri": "s3://bucket/ckpt/",
        "sha256": tree_digest_of((f["path"], f["sha256"], f["size"]) for f in files)[7:],
        "size": 4,
        "files": files,
    }
    with pytest.raises(ValueError, match=problem):
        LockedArtifact.model_validate({**good, **change})


def test_file_lock_names_its_file():
    data = b"weights"
    locked = LockedDataset.model_validate(
        {
            "uri": "https://example.org/d/data.jsonl",
            "sha256": hashlib.sha256(data).hexdigest(),
            "size": 7,
            "files": _files(("data.jsonl", data)),
            "name": "d",
            "split": "test",
            "license": "CC0-1.0",
            "source": "made here",
        }
    )
    assert locked.entries()[0].path == "data.jsonl" and locked.kind == "file"
    with pytest.raises(ValueError, match="exactly its one file"):
        LockedArtifact.model_validate(
            {"path": "x", "sha256": "0" * 64, "size": 7, "files": _files(("x", data))}
        )


def test_invalid_lock_file_names_file_and_field(tmp_path):
    shutil.copy(LEGACY / "eval.lock.json", tmp_path / "eval.lock.json")
    data = json.loads((tmp_path / "eval.lock.json").read_text())
    data["model"]["kind"] = "archive"
    (tmp_path / "eval.lock.json").write_text(json.dumps(data))
    with pytest.raises(SpecError) as exc:
        load_lock(tmp_path / "eval.lock.json")
    assert "model.kind" in dict(exc.value.problems)
    assert exc.value.fields["file"].endswith("eval.lock.json")

"""rerun without a sandbox: verifying the original, resolving inputs by sha256, the workspace."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from runner.bundle.build import build_bundle
from runner.errors import IntegrityError, VerificationFailed
from runner.workflows.inputs import host_inputs
from runner.workflows.rerun import (
    InputResolver,
    InputsUnavailable,
    load_original,
    resolve_inputs,
    wanted_inputs,
    workspace,
)
from runner._internal.settings import Settings
from runner.bundle.signing import generate_keypair, load_signer, load_verifier
from runner.build.lock import write_lock
from runner.model.spec import load_spec
from runner.model.lock import LockedSpec, load_lock
from runner.bundle.store import Store

pytestmark = pytest.mark.unit
EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "digits"


@pytest.fixture
def env(tmp_path: Path):
    settings = Settings(home=tmp_path / "home", cache=tmp_path / "cache")
    generate_keypair(tmp_path / "k", tmp_path / "k.pub", "ed25519")
    signer, verifier = load_signer(tmp_path / "k"), load_verifier(tmp_path / "k.pub")
    store = Store(settings.home)
    spec = load_spec(EXAMPLE / "eval.yaml")
    # A lock written here: the example's own lock is a local build artifact (not in git).
    lock = LockedSpec.model_validate({
        "schema": "evalrun/lock/v1", "spec_name": spec.metadata.name,
        "spec_digest": spec.digest(), "base": None, "wheels": [],
        "image": {"ref": "127.0.0.1:5000/evalrun/digits-logreg@sha256:" + "a" * 64,
                  "rootfs_digest": "sha256:" + "b" * 64},
        "model": {"path": "model/weights.json", "sha256": spec.model.sha256,
                  "size": (EXAMPLE / "model" / "weights.json").stat().st_size},
        "datasets": [{"path": "data/digits_test.jsonl", "sha256": d.sha256,
                      "size": (EXAMPLE / "data" / "digits_test.jsonl").stat().st_size,
                      "name": d.name, "split": d.split, "license": d.license,
                      "source": d.source} for d in spec.datasets],
        "source": {"commit": None, "dirty": False, "tree_sha256": "e" * 64},
    })
    with store.staging_dir() as stage:
        shutil.copy(EXAMPLE / "eval.yaml", stage / "spec.yaml")
        write_lock(lock, stage / "eval.lock.json")
        pred = {
            "run_id": "r-111111111111111111111111",
            "spec": {"name": spec.metadata.name, "digest": spec.digest()},
            "lock_digest": lock.digest(),
            "outcome": "passed",
            "metrics": [],
        }
        build_bundle(stage, pred, signer, stage)
        stored = store.put(stage)
    return settings, verifier, store, stored, tmp_path


def test_original_must_verify_with_the_given_key(env) -> None:
    settings, verifier, store, stored, tmp = env
    original = load_original(stored.path, verifier)
    assert original.run_id == "r-111111111111111111111111" and original.notes == ()
    generate_keypair(tmp / "other", tmp / "other.pub", "ed25519")
    with pytest.raises(VerificationFailed):
        load_original(stored.path, load_verifier(tmp / "other.pub"))


def test_inputs_resolve_by_sha256_and_are_cached(env) -> None:
    settings, verifier, store, stored, tmp = env
    original = load_original(stored.path, verifier)
    # a flat directory with the files under other names: found by size + sha256
    flat = tmp / "flat"
    flat.mkdir()
    shutil.copy(EXAMPLE / "model" / "weights.json", flat / "w.json")
    shutil.copy(EXAMPLE / "data" / "digits_test.jsonl", flat / "renamed.jsonl")
    (flat / "noise.bin").write_bytes(b"x" * 100)
    found = resolve_inputs(original, InputResolver(settings, [flat]))
    assert {w.name for w in found} == {"model", "digits-test"}
    cache = settings.input_cache / "blobs" / "sha256"
    for want, path in found.items():
        assert path == cache / want.sha256
        assert hashlib.sha256(path.read_bytes()).hexdigest() == want.sha256
        assert path.stat().st_mode & 0o222 == 0  # read-only
    # the next resolution needs no directories at all
    again = resolve_inputs(original, InputResolver(settings, []))
    assert set(again.values()) == set(found.values())


def test_changed_and_missing_inputs_are_listed_together(env) -> None:
    settings, verifier, store, stored, tmp = env
    original = load_original(stored.path, verifier)
    changed = tmp / "changed"
    shutil.copytree(EXAMPLE, changed)
    (changed / "data" / "digits_test.jsonl").write_text("{}\n")
    (changed / "model" / "weights.json").unlink()
    with pytest.raises(InputsUnavailable) as exc:
        resolve_inputs(original, InputResolver(settings, [changed]))
    err = exc.value
    assert err.exit_code == 3
    reasons = {m.wanted.name: m.reason for m in err.missing}
    assert "(changed)" in reasons["digits-test"]
    assert reasons["model"].startswith("not found")
    text = err.diagnostics()
    assert "dataset digits-test (data/digits_test.jsonl" in text and "model model" in text
    blobs = settings.input_cache / "blobs" / "sha256"
    assert not blobs.exists() or not any(blobs.iterdir())  # nothing cached from a refusal


def test_workspace_holds_spec_and_lock_and_the_run_finds_inputs_by_digest(env) -> None:
    settings, verifier, store, stored, tmp = env
    original = load_original(stored.path, verifier)
    found = resolve_inputs(original, InputResolver(settings, [EXAMPLE]))
    with workspace(original, store) as spec_path:
        root = spec_path.parent
        assert spec_path.read_bytes() == (EXAMPLE / "eval.yaml").read_bytes()
        assert (root / "eval.lock.json").is_file()
        # the inputs are not copied: the run takes them from the cache, by digest
        plan_inputs = host_inputs(original.lock, InputResolver(settings, spec_dir=root))
        assert [i.host_path for i in plan_inputs] == list(found.values())
        assert [i.container_path for i in plan_inputs] == [
            "/evalrun/inputs/model/weights.json",
            "/evalrun/inputs/data/digits-test/digits_test.jsonl",
        ]
    assert not root.exists()


def test_legacy_input_cache_is_still_read(env) -> None:
    settings, verifier, store, stored, tmp = env
    original = load_original(stored.path, verifier)
    legacy = settings.home / "inputs" / "sha256"
    legacy.mkdir(parents=True)
    for want in wanted_inputs(original.lock):
        shutil.copy(EXAMPLE / want.path, legacy / want.sha256)
    found = resolve_inputs(original, InputResolver(settings, []))
    assert all(p.is_relative_to(settings.input_cache) for p in found.values())


def test_lock_from_an_older_spec_model_is_repinned_with_a_note(env) -> None:
    settings, verifier, store, stored, tmp = env
    signer = load_signer(tmp / "k")
    lock = json.loads((store.bundle_path(stored.digest) / "eval.lock.json").read_text())
    lock["spec_digest"] = "sha256:" + "0" * 64  # what an older evalrun computed
    with store.staging_dir() as stage:
        shutil.copy(EXAMPLE / "eval.yaml", stage / "spec.yaml")
        (stage / "eval.lock.json").write_text(json.dumps(lock))
        pred = {
            "run_id": "r-222222222222222222222222",
            "spec": {"name": "digits-logreg", "digest": "sha256:" + "0" * 64},
            "lock_digest": "sha256:" + "1" * 64,
        }
        build_bundle(stage, pred, signer, stage)
        old = store.put(stage)
    original = load_original(old.path, verifier)
    assert len(original.notes) == 1 and "re-pinned" in original.notes[0]
    repinned = json.loads(original.lock_bytes)
    assert repinned["spec_digest"] == load_spec(EXAMPLE / "eval.yaml").digest()
    assert repinned["datasets"] == lock["datasets"] and repinned["image"] == lock["image"]
    # but a lock that names another spec than the signed predicate is refused
    with store.staging_dir() as stage:
        shutil.copy(EXAMPLE / "eval.yaml", stage / "spec.yaml")
        (stage / "eval.lock.json").write_text(json.dumps(lock))
        pred = {"run_id": "r-333333333333333333333333",
                "spec": {"name": "digits-logreg", "digest": "sha256:" + "9" * 64}}
        build_bundle(stage, pred, signer, stage)
        bad = store.put(stage)
    with pytest.raises(IntegrityError, match="names another spec"):
        load_original(bad.path, verifier)

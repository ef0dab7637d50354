"""The local bundle store: content addressed, write-once, atomic, idempotent."""

from __future__ import annotations

import hashlib
import json
import stat
import threading
from pathlib import Path

import pytest
from bundle_fixtures import PAYLOAD, Keys, make_keys, seal_bundle

from runner.bundle.metadata import ENVELOPE_NAME, STATEMENT_NAME
from runner.bundle.signing import Signer, Verifier
from runner.bundle.store import BundleNotFound, Store, StoreConflict, default_root, parse_digest
from runner.bundle.verify import verify_bundle
from runner.errors import InputError, IntegrityError, StoreFull

pytestmark = pytest.mark.unit


@pytest.fixture
def keys(tmp_path: Path) -> Keys:
    return make_keys(tmp_path)


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store(tmp_path / "home")


def statement_digest(bundle: Path) -> str:
    return "sha256:" + hashlib.sha256((bundle / STATEMENT_NAME).read_bytes()).hexdigest()


def test_put_moves_bundle_to_its_digest_and_indexes_the_run(
    store: Store, keys: tuple[Signer, Verifier]
) -> None:
    with store.staging_dir() as staging:
        bundle = seal_bundle(staging / "b", keys[0])
        digest = statement_digest(bundle)
        stored = store.put(bundle)
        assert not bundle.exists()
    assert stored.digest == digest
    assert stored.path == store.root / "bundles" / f"sha256-{digest.removeprefix('sha256:')}"
    assert stored.run_id == "run-a"
    assert stored.outcome == "passed"
    assert stored.created is not None
    assert verify_bundle(stored.path, keys[1]).bundle_digest == digest
    index = json.loads((store.root / "runs" / "run-a.json").read_text())
    assert index["bundle_digest"] == digest
    assert index["outcome"] == "passed"
    assert index["run_id"] == "run-a"


def test_staging_dirs_live_in_the_store_and_are_removed_afterwards(store: Store) -> None:
    with store.staging_dir() as staging:
        assert staging.parent == store.root / "tmp"
        assert list(staging.iterdir()) == []
        (staging / "leftover").write_text("x")
    assert not staging.exists()
    assert list((store.root / "tmp").iterdir()) == []


@pytest.mark.parametrize("exc", [RuntimeError("boom"), KeyboardInterrupt()])
def test_interrupted_run_leaves_nothing_half_written(
    store: Store, keys: tuple[Signer, Verifier], exc: BaseException
) -> None:
    with pytest.raises(type(exc)), store.staging_dir() as staging:
        seal_bundle(staging / "b", keys[0])
        raise exc
    assert list((store.root / "tmp").iterdir()) == []
    assert list((store.root / "bundles").iterdir()) == []
    assert list((store.root / "runs").iterdir()) == []


def test_failed_rename_leaves_store_unchanged(
    store: Store, keys: tuple[Signer, Verifier], monkeypatch: pytest.MonkeyPatch
) -> None:
    def fail_rename(self: Path, target: Path) -> Path:
        raise OSError(28, "No space left on device")

    with pytest.raises(StoreFull, match="no space left on device") as full:
        with store.staging_dir() as staging:
            bundle = seal_bundle(staging / "b", keys[0])
            monkeypatch.setattr(Path, "rename", fail_rename)
            store.put(bundle)
    monkeypatch.undo()
    assert str(store.root) in full.value.message and full.value.exit_code == 5
    assert list((store.root / "bundles").iterdir()) == []
    assert list((store.root / "runs").iterdir()) == []
    assert list((store.root / "tmp").iterdir()) == []


def test_index_write_failing_after_the_rename_leaves_no_unindexed_bundle(
    store: Store, keys: tuple[Signer, Verifier], monkeypatch: pytest.MonkeyPatch
) -> None:
    def full(self: Store, entry: object) -> object:
        raise OSError(28, "No space left on device", str(self.runs_dir / "run-a.json"))

    monkeypatch.setattr(Store, "_index", full)
    with pytest.raises(StoreFull, match="run-a.json"), store.staging_dir() as staging:
        store.put(seal_bundle(staging / "b", keys[0]))
    monkeypatch.undo()
    assert list((store.root / "bundles").iterdir()) == []
    assert list((store.root / "tmp").iterdir()) == []


def test_put_of_a_stored_digest_is_a_noop_returning_the_stored_bundle(
    store: Store, keys: tuple[Signer, Verifier]
) -> None:
    with store.staging_dir() as staging:
        first = store.put(seal_bundle(staging / "b", keys[0]))
    index_before = (store.root / "runs" / "run-a.json").read_bytes()
    with store.staging_dir() as staging:
        again_dir = seal_bundle(staging / "b", keys[0])  # ed25519: identical bundle, same digest
        second = store.put(again_dir)
        assert not again_dir.exists()
    assert second.digest == first.digest
    assert second.path == first.path
    assert second.created == first.created
    assert (store.root / "runs" / "run-a.json").read_bytes() == index_before
    assert len(list((store.root / "bundles").iterdir())) == 1


def test_put_repairs_a_missing_index_entry(store: Store, keys: tuple[Signer, Verifier]) -> None:
    # as if the process died between the rename and the index write
    with store.staging_dir() as staging:
        stored = store.put(seal_bundle(staging / "b", keys[0]))
    (store.root / "runs" / "run-a.json").unlink()
    assert store.find_run("run-a") is None
    with store.staging_dir() as staging:
        store.put(seal_bundle(staging / "b", keys[0]))
    found = store.find_run("run-a")
    assert found is not None and found.digest == stored.digest


def test_concurrent_puts_of_the_same_bundle_store_it_once(
    store: Store, keys: tuple[Signer, Verifier]
) -> None:
    results: list[str] = []
    errors: list[BaseException] = []
    barrier = threading.Barrier(4)

    def worker() -> None:
        try:
            with store.staging_dir() as staging:
                bundle = seal_bundle(staging / "b", keys[0])
                barrier.wait()
                results.append(store.put(bundle).digest)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(set(results)) == 1 and len(results) == 4
    assert len(list((store.root / "bundles").iterdir())) == 1
    assert list((store.root / "tmp").iterdir()) == []


def test_stored_bundles_are_read_only(store: Store, keys: tuple[Signer, Verifier]) -> None:
    with store.staging_dir() as staging:
        stored = store.put(seal_bundle(staging / "b", keys[0]))
    for path in [stored.path, *stored.path.rglob("*")]:
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode & 0o222 == 0, f"{path} is writable ({oct(mode)})"
    assert stat.S_IMODE((store.root / "runs" / "run-a.json").stat().st_mode) & 0o222 == 0


def test_a_run_id_is_never_reindexed_to_another_bundle(
    store: Store, keys: tuple[Signer, Verifier]
) -> None:
    with store.staging_dir() as staging:
        first = store.put(seal_bundle(staging / "b", keys[0]))
    with pytest.raises(StoreConflict) as err, store.staging_dir() as staging:
        changed = dict(PAYLOAD, **{"report.md": b"changed"})
        other = seal_bundle(staging / "b", keys[0], files=changed)
        store.put(other)
    assert err.value.exit_code == 3
    assert err.value.fields["expected"] == first.digest
    assert len(list((store.root / "bundles").iterdir())) == 1
    found = store.find_run("run-a")
    assert found is not None and found.digest == first.digest


def test_get_accepts_every_digest_spelling(store: Store, keys: tuple[Signer, Verifier]) -> None:
    with store.staging_dir() as staging:
        stored = store.put(seal_bundle(staging / "b", keys[0]))
    hexdigest = stored.digest.removeprefix("sha256:")
    for spelling in (stored.digest, f"sha256-{hexdigest}", hexdigest):
        assert store.get(spelling) == stored


def test_get_unknown_digest_raises_not_found(store: Store) -> None:
    with pytest.raises(BundleNotFound) as err:
        store.get("sha256:" + "0" * 64)
    assert err.value.exit_code == 2


@pytest.mark.parametrize("bad", ["", "sha256:abc", "md5:" + "0" * 32, "../" + "0" * 64])
def test_malformed_digests_are_input_errors(bad: str) -> None:
    with pytest.raises(InputError, match="not a bundle digest"):
        parse_digest(bad)


def test_find_run_of_unknown_run_is_none(store: Store) -> None:
    assert store.find_run("never-ran") is None


def test_find_run_refuses_unsafe_run_ids(store: Store) -> None:
    with pytest.raises(InputError, match="not a run id"):
        store.find_run("../../etc/passwd")


def test_outcome_may_be_a_mapping_with_status(store: Store, keys: tuple[Signer, Verifier]) -> None:
    with store.staging_dir() as staging:
        stored = store.put(
            seal_bundle(staging / "b", keys[0], outcome={"status": "failed", "reason": "timeout"})
        )
    assert stored.outcome == "failed"


def test_runs_lists_every_indexed_run(store: Store, keys: tuple[Signer, Verifier]) -> None:
    for run_id in ("run-a", "run-b"):
        with store.staging_dir() as staging:
            store.put(seal_bundle(staging / "b", keys[0], run_id=run_id))
    assert sorted(r.run_id for r in store.runs()) == ["run-a", "run-b"]


def test_put_refuses_bundles_staged_outside_the_store(
    tmp_path: Path, store: Store, keys: tuple[Signer, Verifier]
) -> None:
    bundle = seal_bundle(tmp_path / "elsewhere", keys[0])
    with pytest.raises(InputError, match="not staged inside the store"):
        store.put(bundle)
    assert bundle.exists()


def test_put_refuses_statement_that_is_not_the_signed_payload(
    store: Store, keys: tuple[Signer, Verifier]
) -> None:
    with pytest.raises(IntegrityError, match="not the payload signed"), store.staging_dir() as st:
        bundle = seal_bundle(st / "b", keys[0])
        data = json.loads((bundle / STATEMENT_NAME).read_bytes())
        data["predicate"]["outcome"] = "failed"
        (bundle / STATEMENT_NAME).write_text(json.dumps(data))
        store.put(bundle)
    assert list((store.root / "bundles").iterdir()) == []


def test_put_refuses_symlinks_in_the_bundle(store: Store, keys: tuple[Signer, Verifier]) -> None:
    with pytest.raises(IntegrityError, match="symlink"), store.staging_dir() as staging:
        bundle = seal_bundle(staging / "b", keys[0])
        (bundle / "results" / "l").symlink_to("/etc/hostname")
        store.put(bundle)
    assert list((store.root / "bundles").iterdir()) == []


def test_put_refuses_a_directory_that_is_not_a_bundle(store: Store) -> None:
    with pytest.raises(IntegrityError, match="not a bundle"), store.staging_dir() as staging:
        (staging / "b").mkdir()
        (staging / "b" / ENVELOPE_NAME).write_text("{}")
        store.put(staging / "b")


def test_store_root_defaults_to_evalrun_home(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("EVALRUN_HOME", str(tmp_path / "eh"))
    assert default_root() == tmp_path / "eh"
    assert Store().root == tmp_path / "eh"
    monkeypatch.delenv("EVALRUN_HOME")
    assert default_root().name == "evalrun"


def test_stale_staging_dirs_can_be_removed(store: Store) -> None:
    import os

    with store.staging_dir():
        pass
    stale = store.root / "tmp" / "stage-killed"
    stale.mkdir()
    (stale / "half").write_text("x")
    os.utime(stale, (0, 0))
    assert store.remove_stale_staging(older_than_s=3600) == [stale]
    assert not stale.exists()

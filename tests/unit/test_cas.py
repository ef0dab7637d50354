"""The content-addressed input cache: verified blobs, hard-linked read-only trees."""

import errno
import hashlib
import os
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from runner._internal.cas import ContentStore, remove_tree
from runner._internal.input_tree import InputFile, tree_digest
from runner.errors import DigestMismatch, IntegrityError

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def put(store: ContentStore, data: bytes) -> Path:
    with store.writer(what="test", expected=sha(data)) as w:
        w.write(data)
        return w.commit()


def leftovers(store: ContentStore) -> list[str]:
    return sorted(os.listdir(store.tmp_dir))


def test_blob_lands_under_its_sha256_read_only(tmp_path):
    store = ContentStore(tmp_path / "cache")
    path = put(store, b"weights")
    assert path == tmp_path / "cache" / "blobs" / "sha256" / sha(b"weights")
    assert path.read_bytes() == b"weights"
    assert stat.S_IMODE(path.stat().st_mode) == 0o444
    assert store.has_blob(sha(b"weights")) and store.has_blob("sha256:" + sha(b"weights"))
    assert leftovers(store) == []


def test_mismatch_never_lands_in_the_cache(tmp_path):
    store = ContentStore(tmp_path / "cache")
    with (
        pytest.raises(DigestMismatch) as err,
        store.writer(what="model", expected=sha(b"good")) as w,
    ):
        w.write(b"evil")
        w.commit()
    assert err.value.exit_code == 3
    assert err.value.expected == "sha256:" + sha(b"good")
    assert err.value.found == "sha256:" + sha(b"evil")
    assert "model" in err.value.message
    assert os.listdir(store.blobs_dir) == []
    assert leftovers(store) == []


def test_writer_left_without_commit_leaves_nothing(tmp_path):
    store = ContentStore(tmp_path / "cache")
    with pytest.raises(RuntimeError), store.writer(what="x", expected=sha(b"abc")) as w:
        w.write(b"ab")
        raise RuntimeError("transfer died")
    assert os.listdir(store.blobs_dir) == [] and leftovers(store) == []


def test_writer_reset_starts_over(tmp_path):
    store = ContentStore(tmp_path / "cache")
    with store.writer(what="x", expected=sha(b"hello")) as w:
        w.write(b"garbage")
        w.reset()
        w.write(b"hel")
        w.write(memoryview(b"lo"))
        assert w.commit().read_bytes() == b"hello"


def test_unverified_writer_is_named_by_its_content(tmp_path):
    store = ContentStore(tmp_path / "cache")
    with store.writer(what="x") as w:
        w.write(b"staged")
        assert w.seal() == sha(b"staged")
        assert not store.has_blob(sha(b"staged"))  # sealed is not published
        w.commit()
    assert store.has_blob(sha(b"staged"))


def test_second_writer_of_same_blob_keeps_first_inode(tmp_path):
    store = ContentStore(tmp_path / "cache")
    data = b"same bytes"
    with (
        store.writer(what="a", expected=sha(data)) as a,
        store.writer(what="b", expected=sha(data)) as b,
    ):
        a.write(data)
        b.write(data)
        first = a.commit()
        inode = first.stat().st_ino
        assert b.commit() == first
    assert first.stat().st_ino == inode
    assert leftovers(store) == []


def test_put_file_streams_and_verifies(tmp_path):
    store = ContentStore(tmp_path / "cache")
    src = tmp_path / "shard.bin"
    src.write_bytes(os.urandom(3 * 1024 * 1024 + 7))
    seen = []
    blob = store.put_file(src, what="model", expected=sha(src.read_bytes()), on_bytes=seen.append)
    assert blob.read_bytes() == src.read_bytes() and sum(seen) == src.stat().st_size
    with pytest.raises(DigestMismatch):
        store.put_file(src, what="model", expected=sha(b"other"))
    assert leftovers(store) == []


def test_verify_blob_notices_tampering(tmp_path):
    store = ContentStore(tmp_path / "cache")
    path = put(store, b"original")
    assert store.verify_blob(sha(b"original"))
    path.chmod(0o644)
    path.write_bytes(b"tampered")
    assert not store.verify_blob(sha(b"original"))
    assert not store.verify_blob(sha(b"never stored"))


CONCURRENT_FILL = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from runner._internal.cas import ContentStore
    store = ContentStore(Path(sys.argv[1]))
    data = bytes(range(256)) * 4096 * 4  # 4 MiB
    expected = sys.argv[2]
    start = float(sys.argv[3])
    while time.time() < start:
        time.sleep(0.001)
    with store.filling(expected):
        if store.has_blob(expected):
            print("hit")
            sys.exit(0)
        with store.writer(what="race", expected=expected) as w:
            for i in range(0, len(data), 65536):
                w.write(data[i:i + 65536])
                time.sleep(0.001)  # keep the race window open
            w.commit()
    print("filled")
    """
)


def test_two_processes_filling_the_same_blob(tmp_path):
    import time

    cache = tmp_path / "cache"
    ContentStore(cache)
    expected = sha(bytes(range(256)) * 4096 * 4)
    script = tmp_path / "fill.py"
    script.write_text(CONCURRENT_FILL)
    start = str(time.time() + 1.0)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(cache), expected, start],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=60) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    # the lock makes one process transfer and the other find the finished blob
    assert sorted(o[0].strip() for o in outs) == ["filled", "hit"]
    store = ContentStore(cache)
    assert store.verify_blob(expected)
    assert leftovers(store) == []


def test_two_writers_without_the_lock_are_safe_too(tmp_path):
    """Racing writers (no `filling` lock) both succeed and the blob is complete."""
    from concurrent.futures import ThreadPoolExecutor

    store = ContentStore(tmp_path / "cache")
    data = os.urandom(2 * 1024 * 1024)

    def fill(_):
        with store.writer(what="race", expected=sha(data)) as w:
            for i in range(0, len(data), 65536):
                w.write(data[i : i + 65536])
            return w.commit()

    with ThreadPoolExecutor(4) as pool:
        paths = set(pool.map(fill, range(8)))
    assert len(paths) == 1 and store.verify_blob(sha(data))
    assert leftovers(store) == []


def files_for(store: ContentStore, content: dict[str, bytes]) -> list[InputFile]:
    out = []
    for path, data in content.items():
        put(store, data)
        out.append(InputFile(path=path, sha256=sha(data), size=len(data)))
    return out


def test_tree_is_hard_links_to_blobs_and_read_only(tmp_path):
    store = ContentStore(tmp_path / "cache")
    files = files_for(
        store,
        {
            "config.json": b"{}",
            "shards/a.bin": b"A" * 100,
            "shards/b.bin": b"B" * 50,
            "copy.json": b"{}",
        },
    )
    tree = store.materialize_tree(files, what="model")
    assert tree == store.tree_path(tree_digest(files))
    for f in files:
        placed = tree / f.path
        blob = store.blob_path(f.sha256)
        assert placed.read_bytes() == blob.read_bytes()
        assert placed.stat().st_ino == blob.stat().st_ino  # a link, not a copy
        assert stat.S_IMODE(placed.stat().st_mode) == 0o444
    assert store.blob_path(sha(b"{}")).stat().st_nlink == 3  # blob + two names in the tree
    for d in (tree, tree / "shards"):
        assert stat.S_IMODE(d.stat().st_mode) == 0o555
    assert sorted(p.relative_to(tree).as_posix() for p in tree.rglob("*")) == [
        "config.json",
        "copy.json",
        "shards",
        "shards/a.bin",
        "shards/b.bin",
    ]
    if os.geteuid() != 0:  # root ignores modes
        with pytest.raises(PermissionError):
            (tree / "new").write_bytes(b"x")
    assert store.tree_files(tree_digest(files)) == tuple(sorted(files, key=lambda f: f.path))
    assert leftovers(store) == []


def test_tree_materialized_twice_is_the_same_tree(tmp_path):
    store = ContentStore(tmp_path / "cache")
    files = files_for(store, {"a": b"1", "d/b": b"2"})
    first = store.materialize_tree(files, what="data")
    inode = first.stat().st_ino
    assert store.materialize_tree(files, what="data") == first
    # lose the listing: the tree is rebuilt, then the rename finds the published one
    first.with_suffix(".json").unlink()
    assert store.materialize_tree(files, what="data") == first
    assert first.stat().st_ino == inode
    assert store.tree_files(tree_digest(files)) is not None
    assert leftovers(store) == []


@pytest.mark.parametrize("code", [errno.EXDEV, errno.EMLINK])
def test_tree_falls_back_to_copies_where_links_are_impossible(tmp_path, monkeypatch, code):
    store = ContentStore(tmp_path / "cache")
    files = files_for(store, {"x/y.bin": b"payload"})

    def no_link(*args, **kwargs):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(os, "link", no_link)
    tree = store.materialize_tree(files, what="model")
    placed = tree / "x" / "y.bin"
    assert placed.read_bytes() == b"payload"
    assert placed.stat().st_ino != store.blob_path(sha(b"payload")).stat().st_ino
    assert stat.S_IMODE(placed.stat().st_mode) == 0o444


def test_tree_refused_while_a_blob_is_missing(tmp_path):
    store = ContentStore(tmp_path / "cache")
    files = files_for(store, {"a": b"1"}) + [InputFile(path="b", sha256=sha(b"2"), size=1)]
    with pytest.raises(IntegrityError, match="not in the cache"):
        store.materialize_tree(files, what="model")
    assert not store.tree_path(tree_digest(files)).exists()
    assert leftovers(store) == []


def test_tree_listing_that_does_not_match_its_name_is_ignored(tmp_path):
    store = ContentStore(tmp_path / "cache")
    files = files_for(store, {"a": b"1"})
    digest = tree_digest(files)
    store.materialize_tree(files, what="m")
    listing = store.tree_path(digest).with_suffix(".json")
    listing.chmod(0o644)
    listing.write_text(listing.read_text().replace('"size":1', '"size":2'))
    assert store.tree_files(digest) is None


def test_remove_tree_deletes_read_only_trees(tmp_path):
    store = ContentStore(tmp_path / "cache")
    tree = store.materialize_tree(files_for(store, {"a/b/c": b"1"}), what="m")
    remove_tree(tree)
    assert not tree.exists()

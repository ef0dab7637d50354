"""Input scanning, tree digest, input URIs and acquisition without any network."""

import datetime as dt
import hashlib
import os
import socket
import stat
import threading
from pathlib import Path

import pytest
from minio.credentials.providers import AWSConfigProvider, StaticProvider
from pydantic import ValidationError

from runner._internal.cas import ContentStore
from runner._internal.input_tree import (
    TREE_TAG,
    InputFile,
    check_relative_path,
    hash_file,
    make_tree,
    scan_tree,
    sorted_files,
    tree_digest,
)
from runner._internal.retry import transient_policy
from runner.adapters import sources
from runner.adapters.sources import (
    ByteStream,
    HttpsUri,
    LocalUri,
    OciUri,
    RemoteListing,
    S3Uri,
    SourceOptions,
    acquire,
    parse_expected_digest,
    parse_input_uri,
    stream_into,
    tls_context,
)
from runner.adapters.sources import s3 as s3_source
from runner.errors import (
    DigestMismatch,
    InfrastructureError,
    InputError,
    TransientInfrastructureError,
)

pytestmark = pytest.mark.unit


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def no_sleep_options(attempts: int = 3, **kw) -> tuple[SourceOptions, list[float]]:
    slept: list[float] = []
    opts = SourceOptions(
        retry_policy=lambda: transient_policy(attempts=attempts, sleep=slept.append),
        environ={},
        **kw,
    )
    return opts, slept


def make_dir(root: Path, content: dict[str, bytes]) -> Path:
    for rel, data in content.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    return root


# ----------------------------------------------------------------------------- tree digest


def test_tree_digest_matches_its_documented_encoding():
    files = [InputFile(path="a.txt", sha256=sha(b"abc"), size=3)]
    assert tree_digest(files) == (
        "sha256:757e4f8ea3d93f138c0dba2fd2def74f978fa6ef40b00c2762fd0b916847978a"
    )
    # and independently: the encoding spelt out
    many = [
        InputFile(path="z", sha256=sha(b""), size=0),
        InputFile(path="a b/ü.bin", sha256=sha(b"x" * 10), size=10),
        InputFile(path="a-b", sha256=sha(b"y"), size=1),
    ]
    lines = sorted(many, key=lambda f: f.path.encode())
    encoded = (TREE_TAG + "\n" + "".join(f"{f.sha256} {f.size} {f.path}\n" for f in lines)).encode()
    assert tree_digest(many) == "sha256:" + hashlib.sha256(encoded).hexdigest()
    assert [f.path for f in lines] == ["a b/ü.bin", "a-b", "z"]


def test_tree_digest_ignores_order_and_executable_bit_but_not_names_or_bytes():
    a = InputFile(path="a", sha256=sha(b"1"), size=1)
    b = InputFile(path="d/b", sha256=sha(b"2"), size=1)
    base = tree_digest([a, b])
    assert tree_digest([b, a]) == base
    assert tree_digest([a.model_copy(update={"executable": True}), b]) == base
    assert tree_digest([a, b.model_copy(update={"path": "d/c"})]) != base
    assert tree_digest([a, b.model_copy(update={"sha256": sha(b"3")})]) != base
    assert "executable" not in a.model_dump()


@pytest.mark.parametrize(
    "files, problem",
    [
        ([("a", b"1"), ("a", b"2")], "listed twice"),
        ([("a", b"1"), ("a/b", b"2")], "both a file and a directory"),
    ],
)
def test_tree_refuses_ambiguous_listings(files, problem):
    with pytest.raises(ValueError, match=problem):
        sorted_files(InputFile(path=p, sha256=sha(d), size=len(d)) for p, d in files)


@pytest.mark.parametrize(
    "path",
    [
        "",
        "/etc/passwd",
        "..",
        "a/../b",
        "./a",
        "a//b",
        "a/",
        "a\x00b",
        "a\nb",
        "a\rb",
        "\udcff",
        "x" * 256,
    ],
)
def test_unsafe_relative_paths_are_refused(path):
    with pytest.raises(ValueError):
        check_relative_path(path)
    with pytest.raises(ValueError):
        InputFile(path=path, sha256=sha(b""), size=0)


@pytest.mark.parametrize(
    "path", ["a", "a/b/c.safetensors", "with space", "back\\slash", "ü", ".hidden"]
)
def test_ordinary_relative_paths_are_accepted(path):
    assert check_relative_path(path) == path


# ----------------------------------------------------------------------------- scanner


def test_scan_lists_every_file_sorted_with_digest(tmp_path):
    root = make_dir(
        tmp_path / "ckpt",
        {
            "model-00002.safetensors": b"B" * 5000,
            "model-00001.safetensors": b"A" * 7000,
            "config.json": b"{}",
            "tok/vocab.txt": b"a\nb\n",
            "empty": b"",
        },
    )
    (root / "empty-dir").mkdir()
    (root / "run.sh").write_bytes(b"#!/bin/sh\n")
    (root / "run.sh").chmod(0o755)
    tree = scan_tree(root, what="model")
    assert [f.path for f in tree.files] == [
        "config.json",
        "empty",
        "model-00001.safetensors",
        "model-00002.safetensors",
        "run.sh",
        "tok/vocab.txt",
    ]
    by = {f.path: f for f in tree.files}
    assert by["model-00001.safetensors"].sha256 == sha(b"A" * 7000)
    assert by["model-00001.safetensors"].size == 7000
    assert by["run.sh"].executable and not by["config.json"].executable
    assert tree.size == 7000 + 5000 + 2 + 4 + 10
    assert tree.digest == tree_digest(tree.files) == make_tree(tree.files).digest


def test_scan_is_the_same_with_one_or_many_threads(tmp_path):
    root = make_dir(
        tmp_path / "d",
        {f"s{i}/f{j}": os.urandom(1000 * (i + j)) for i in range(4) for j in range(5)},
    )
    assert scan_tree(root, what="d", workers=1) == scan_tree(root, what="d", workers=8)


def test_scan_hashes_big_files_like_hashlib(tmp_path):
    data = os.urandom(9 * 1024 * 1024 + 123)  # spans several reads
    root = make_dir(tmp_path / "d", {"big.bin": data})
    (f,) = scan_tree(root, what="d").files
    assert (f.sha256, f.size) == (sha(data), len(data))
    assert hash_file(root / "big.bin") == (sha(data), len(data))


def refused(root: Path, **kw) -> InputError:
    with pytest.raises(InputError) as err:
        scan_tree(root, what="datasets[0] (digits)", **kw)
    assert err.value.exit_code == 2
    assert "datasets[0] (digits)" in err.value.message
    return err.value


def test_scan_refuses_symlink_to_file_inside_root(tmp_path):
    root = make_dir(tmp_path / "d", {"real.bin": b"x"})
    (root / "alias.bin").symlink_to("real.bin")
    err = refused(root)
    assert err.fields["entry"] == "alias.bin" and "symbolic link" in err.message


def test_scan_refuses_symlink_escaping_root(tmp_path):
    (tmp_path / "secret").write_bytes(b"s")
    root = make_dir(tmp_path / "d", {"sub/ok": b"x"})
    (root / "sub" / "leak").symlink_to("../../secret")
    assert refused(root).fields["entry"] == "sub/leak"


def test_scan_refuses_symlinked_directory(tmp_path):
    make_dir(tmp_path / "elsewhere", {"f": b"x"})
    root = make_dir(tmp_path / "d", {"ok": b"x"})
    (root / "more").symlink_to(tmp_path / "elsewhere")
    assert refused(root).fields["entry"] == "more"


def test_scan_refuses_a_root_that_is_a_symlink(tmp_path):
    real = make_dir(tmp_path / "real", {"f": b"x"})
    (tmp_path / "link").symlink_to(real)
    err = refused(tmp_path / "link")
    assert "cannot open input directory" in err.message


def test_scan_refuses_fifo_without_blocking(tmp_path):
    root = make_dir(tmp_path / "d", {"ok": b"x"})
    os.mkfifo(root / "pipe")
    err = refused(root)
    assert err.fields["entry"] == "pipe" and "special file" in err.message


def test_scan_refuses_unix_socket(tmp_path):
    root = make_dir(tmp_path / "d", {"ok": b"x"})
    s = socket.socket(socket.AF_UNIX)
    try:
        s.bind(str(root / "sock"))
        assert refused(root).fields["entry"] == "sock"
    finally:
        s.close()


def test_scan_refuses_names_with_newline(tmp_path):
    root = make_dir(tmp_path / "d", {"ok": b"x", "bad\nname": b"y"})
    err = refused(root)
    assert "control character" in err.message and "bad\\nname" in err.message


def test_scan_refuses_empty_directory_and_limits(tmp_path):
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    assert "no files" in refused(tmp_path / "empty").message
    root = make_dir(tmp_path / "many", {f"f{i}": b"" for i in range(5)})
    assert "more than 4 files" in refused(root, max_files=4).message
    deep = make_dir(tmp_path / "deep", {"a/b/c/d/f": b""})
    assert "deeper" in refused(deep, max_depth=2).message


def test_scan_does_not_need_write_access(tmp_path):
    root = make_dir(tmp_path / "d", {"sub/f": b"x"})
    for p in (root / "sub" / "f", root / "sub", root):
        p.chmod(stat.S_IRUSR | (stat.S_IXUSR if p.is_dir() else 0))
    try:
        assert [f.path for f in scan_tree(root, what="d").files] == ["sub/f"]
    finally:
        for p in (root, root / "sub"):
            p.chmod(0o755)


# ----------------------------------------------------------------------------- URIs


@pytest.mark.parametrize(
    "uri, expected",
    [
        ("model/weights.bin", LocalUri(path="model/weights.bin")),
        ("../shared/data", LocalUri(path="../shared/data")),
        ("/abs/data", LocalUri(path="/abs/data")),
        ("file:///abs/data", LocalUri(path="/abs/data")),
        ("file://localhost/abs/data", LocalUri(path="/abs/data")),
        ("file://rel/data.jsonl", LocalUri(path="rel/data.jsonl")),
        (
            "https://example.org/m/model.safetensors?X-Amz-Signature=abc#frag",
            HttpsUri(url="https://example.org/m/model.safetensors?X-Amz-Signature=abc"),
        ),
        ("HTTPS://Example.org:8443/x", HttpsUri(url="https://Example.org:8443/x")),
        (
            "s3://models/llama/model.safetensors",
            S3Uri(bucket="models", key="llama/model.safetensors"),
        ),
        ("s3://datasets/digits/", S3Uri(bucket="datasets", key="digits/")),
        ("s3://datasets/", S3Uri(bucket="datasets", key="")),
        (
            "oci://127.0.0.1:5000/evalrun/inputs/llama@sha256:" + "a" * 64,
            OciUri(
                registry="127.0.0.1:5000",
                repository="evalrun/inputs/llama",
                digest="sha256:" + "a" * 64,
            ),
        ),
    ],
)
def test_input_uris_parse_to_typed_models(uri, expected):
    assert parse_input_uri(uri, field="model.uri") == expected


def test_parsed_uris_know_their_shape():
    assert S3Uri(bucket="b", key="p/").is_prefix and not S3Uri(bucket="b", key="p/k").is_prefix
    assert str(S3Uri(bucket="b", key="p/k")) == "s3://b/p/k"
    https = parse_input_uri("https://h/a/m%20odel.bin?token=secret", field="f")
    assert https.redacted == "https://h/a/m%20odel.bin" and https.name == "m odel.bin"
    oci = parse_input_uri("oci://reg.io/a/b@sha256:" + "0" * 64, field="f")
    assert str(oci) == "oci://reg.io/a/b@sha256:" + "0" * 64
    with pytest.raises(ValidationError, match="frozen"):
        oci.digest = "x"


@pytest.mark.parametrize(
    "uri, problem",
    [
        ("", "empty"),
        (" model.bin", "whitespace"),
        ("http://example.org/model.bin", "plain http"),
        ("gs://bucket/model", "unsupported scheme 'gs'"),
        ("https://user:pw@example.org/m", "credentials"),
        ("https:///nohost", "without a host"),
        ("https://example.org:99999/x", "malformed"),
        ("s3://bucket", "needs a key or a prefix"),
        ("s3://Bad_Bucket!/k", "not a valid bucket"),
        ("oci://registry/repo:tag", "pinned by digest"),
        ("oci://registry/repo:tag@sha256:" + "a" * 64, "not a tag and a digest"),
        ("oci://registry/repo@sha256:abc", "not a sha256"),
        ("oci://repo@sha256:" + "a" * 64, "registry host"),
        ("oci://reg/Repo@sha256:" + "a" * 64, "not a valid repository"),
        ("file://", "without a path"),
    ],
)
def test_bad_uris_are_input_errors_naming_the_field(uri, problem):
    with pytest.raises(InputError) as err:
        parse_input_uri(uri, field="datasets[1].uri")
    assert err.value.exit_code == 2
    assert problem in err.value.message
    assert err.value.fields["field"] == "datasets[1].uri"


def test_expected_digest_accepts_bare_or_prefixed_hex():
    h = sha(b"x")
    assert parse_expected_digest(h, field="f") == parse_expected_digest("sha256:" + h, field="f")
    for bad in ("", h.upper(), "sha512:" + h, h[:-1], "md5:abc"):
        with pytest.raises(InputError, match="expected a sha256"):
            parse_expected_digest(bad, field="model.sha256")


# ----------------------------------------------------------------------------- acquire: local


def test_acquire_local_file_caches_verified_bytes(tmp_path):
    store = ContentStore(tmp_path / "cache")
    (tmp_path / "spec").mkdir()
    (tmp_path / "spec" / "weights.json").write_bytes(b'{"w": 1}')
    seen = []
    got = acquire(
        "weights.json",
        sha(b'{"w": 1}'),
        field="model",
        spec_dir=tmp_path / "spec",
        store=store,
        progress=lambda d, t: seen.append((d, t)),
    )
    assert got.kind == "file" and got.source == "weights.json"
    assert got.digest == "sha256:" + sha(b'{"w": 1}') and got.sha256 == sha(b'{"w": 1}')
    assert got.size == 8 and got.path == store.blob_path(got.sha256)
    assert got.files == (InputFile(path="weights.json", sha256=got.sha256, size=8),)
    assert got.path.read_bytes() == b'{"w": 1}'
    assert seen[-1][0] == seen[-1][1]  # the bar ends full


def test_acquire_local_wrong_sha_is_exit_3_and_caches_nothing(tmp_path):
    store = ContentStore(tmp_path / "cache")
    (tmp_path / "data.jsonl").write_bytes(b"row\n")
    with pytest.raises(DigestMismatch) as err:
        acquire(
            "data.jsonl",
            sha(b"other"),
            field="datasets[0] (digits)",
            spec_dir=tmp_path,
            store=store,
        )
    assert err.value.exit_code == 3 and "datasets[0] (digits)" in err.value.message
    assert err.value.found == "sha256:" + sha(b"row\n")
    assert os.listdir(store.blobs_dir) == [] and os.listdir(store.tmp_dir) == []


def test_acquire_local_directory_materializes_a_tree(tmp_path):
    store = ContentStore(tmp_path / "cache")
    src = make_dir(
        tmp_path / "ckpt",
        {"a.safetensors": os.urandom(5000), "b.safetensors": os.urandom(3000), "cfg/x.json": b"{}"},
    )
    digest = scan_tree(src, what="m").digest
    got = acquire("ckpt", digest, field="model", spec_dir=tmp_path, store=store)
    assert got.kind == "directory" and got.digest == digest and got.size == 8002
    assert got.path == store.tree_path(digest)
    assert [f.path for f in got.files] == ["a.safetensors", "b.safetensors", "cfg/x.json"]
    assert scan_tree(got.path, what="cached").digest == digest
    assert (got.path / "cfg" / "x.json").stat().st_ino == store.blob_path(sha(b"{}")).stat().st_ino
    # a second lock re-hashes the source but copies nothing
    again = acquire(str(src), digest, field="model", spec_dir=tmp_path / "elsewhere", store=store)
    assert again.path == got.path and again.files == got.files


def test_acquire_local_directory_wrong_digest_caches_nothing(tmp_path):
    store = ContentStore(tmp_path / "cache")
    make_dir(tmp_path / "d", {"f": b"x"})
    with pytest.raises(DigestMismatch) as err:
        acquire("d", "sha256:" + sha(b"x"), field="model", spec_dir=tmp_path, store=store)
    assert "evalrun-input-tree/v1" in err.value.hint
    assert os.listdir(store.blobs_dir) == [] and os.listdir(store.trees_dir) == []


def test_acquire_notices_a_local_input_edited_after_caching(tmp_path):
    store = ContentStore(tmp_path / "cache")
    src = make_dir(tmp_path / "d", {"f": b"v1"})
    digest = scan_tree(src, what="d").digest
    acquire("d", digest, field="model", spec_dir=tmp_path, store=store)
    (src / "f").write_bytes(b"v2")
    with pytest.raises(DigestMismatch):
        acquire("d", digest, field="model", spec_dir=tmp_path, store=store)


def test_acquire_local_directory_with_symlink_names_input_and_entry(tmp_path):
    src = make_dir(tmp_path / "d", {"f": b"x"})
    (src / "evil").symlink_to("/etc/passwd")
    with pytest.raises(InputError) as err:
        acquire(
            "d",
            "sha256:" + "0" * 64,
            field="datasets[0] (digits)",
            spec_dir=tmp_path,
            store=ContentStore(tmp_path / "cache"),
        )
    assert err.value.fields["entry"] == "evil" and "datasets[0] (digits)" in err.value.message


def test_acquire_missing_local_input_is_an_input_error(tmp_path):
    with pytest.raises(InputError, match="not found"):
        acquire(
            "nope.bin",
            "0" * 64,
            field="model",
            spec_dir=tmp_path,
            store=ContentStore(tmp_path / "cache"),
        )


def test_acquire_refuses_oci_without_a_resolver(tmp_path):
    with pytest.raises(InputError, match="registry client"):
        acquire(
            "oci://r:5000/a@sha256:" + "1" * 64,
            "1" * 64,
            field="model",
            spec_dir=tmp_path,
            store=ContentStore(tmp_path / "cache"),
        )


# ----------------------------------------------------------------------------- acquire: oci plug-in


class FakeArtifact:
    """An in-memory stand-in for the registry client's resolver (a plug-in, not a server)."""

    def __init__(self, kind, content: dict[str, bytes], serve: dict[str, bytes] | None = None):
        self.kind = kind
        self.content = content
        self.serve = serve or content
        self.opened: list[tuple[str, int]] = []
        self.resolved = 0

    def __call__(self, uri: OciUri) -> RemoteListing:
        self.resolved += 1
        files = tuple(
            InputFile(path=p, sha256=sha(d), size=len(d)) for p, d in self.content.items()
        )
        return RemoteListing(kind=self.kind, files=files, open_file=self.open_file)

    def open_file(self, entry: InputFile, offset: int) -> ByteStream:
        self.opened.append((entry.path, offset))
        data = self.serve[entry.path]
        return ByteStream(iter([data[offset:]]), len(data), offset)


OCI = "oci://127.0.0.1:5000/evalrun/inputs/ckpt@sha256:" + "c" * 64


def test_acquire_oci_directory_through_the_plug_in(tmp_path):
    store = ContentStore(tmp_path / "cache")
    content = {"a.bin": b"A" * 100, "b/c.bin": b"C" * 10, "dup.bin": b"A" * 100}
    art = FakeArtifact("directory", content)
    want = make_tree(
        InputFile(path=p, sha256=sha(d), size=len(d)) for p, d in content.items()
    ).digest
    got = acquire(OCI, want, field="model", spec_dir=tmp_path, store=store, oci=art)
    assert got.kind == "directory" and got.source == OCI and got.size == 210
    assert (got.path / "b" / "c.bin").read_bytes() == b"C" * 10
    assert len(art.opened) == 2  # identical files are fetched once
    again = acquire(OCI, want, field="model", spec_dir=tmp_path, store=store, oci=art)
    assert again == got and art.resolved == 1  # a cache hit asks nobody


def test_acquire_oci_listing_that_is_not_the_pinned_input_fetches_nothing(tmp_path):
    store = ContentStore(tmp_path / "cache")
    art = FakeArtifact("directory", {"a": b"1"})
    with pytest.raises(DigestMismatch):
        acquire(OCI, "sha256:" + "d" * 64, field="model", spec_dir=tmp_path, store=store, oci=art)
    assert art.opened == [] and os.listdir(store.blobs_dir) == []


def test_acquire_oci_blob_with_altered_bytes_is_refused_and_not_cached(tmp_path):
    store = ContentStore(tmp_path / "cache")
    content = {"a": b"honest", "b": b"also honest"}
    art = FakeArtifact("directory", content, serve={"a": b"honest", "b": b"ALTERED!!!!"})
    want = tree_digest(InputFile(path=p, sha256=sha(d), size=len(d)) for p, d in content.items())
    with pytest.raises(DigestMismatch) as err:
        acquire(OCI, want, field="model", spec_dir=tmp_path, store=store, oci=art)
    assert "model: b" in err.value.message
    assert not store.has_blob(sha(b"ALTERED!!!!")) and not store.has_blob(sha(b"also honest"))
    assert not store.tree_path(want).exists()


def test_acquire_oci_file_artifact(tmp_path):
    store = ContentStore(tmp_path / "cache")
    art = FakeArtifact("file", {"model.safetensors": b"weights"})
    got = acquire(OCI, sha(b"weights"), field="model", spec_dir=tmp_path, store=store, oci=art)
    assert got.kind == "file" and got.path.read_bytes() == b"weights"
    # the file's name comes from the URI, so a cache hit records the same lock entry
    assert got.files[0].path == "ckpt"
    assert acquire(OCI, sha(b"weights"), field="model", spec_dir=tmp_path, store=store) == got


# ----------------------------------------------------------------------------- resumable streams


class FlakySource:
    """Serves ``data`` from an offset; the first ``cuts`` transfers die after ``cut_at`` bytes."""

    def __init__(self, data: bytes, cuts: int, cut_at: int, honour_range: bool = True):
        self.data, self.cuts, self.cut_at, self.honour_range = data, cuts, cut_at, honour_range
        self.offsets: list[int] = []

    def __call__(self, offset: int) -> ByteStream:
        self.offsets.append(offset)
        start = offset if self.honour_range else 0
        cut = self.cuts > 0
        self.cuts -= 1

        def chunks():
            end = start + self.cut_at if cut else len(self.data)
            for i in range(start, end, 1000):
                yield self.data[i : min(i + 1000, end)]
            if cut:
                raise TransientInfrastructureError("connection reset", url="test://x")

        return ByteStream(chunks(), len(self.data), start)


@pytest.mark.parametrize("honour_range", [True, False])
def test_stream_resumes_or_restarts_after_a_cut(tmp_path, honour_range):
    store = ContentStore(tmp_path / "cache")
    data = os.urandom(10_000)
    src = FlakySource(data, cuts=2, cut_at=3000, honour_range=honour_range)
    opts, slept = no_sleep_options(attempts=3)
    with store.writer(what="m", expected=sha(data)) as w:
        stream_into(w, src, what="m", source="test://x", options=opts)
        assert w.commit().read_bytes() == data
    assert src.offsets == ([0, 3000, 6000] if honour_range else [0, 3000, 3000])
    assert len(slept) == 2


def test_stream_gives_up_after_bounded_retries(tmp_path):
    store = ContentStore(tmp_path / "cache")
    calls = []

    def down(offset):
        calls.append(offset)
        raise TransientInfrastructureError("connection refused", url="https://h/x")

    opts, slept = no_sleep_options(attempts=4)
    with (
        pytest.raises(InfrastructureError) as err,
        store.writer(what="model", expected="0" * 64) as w,
    ):
        stream_into(w, down, what="model", source="https://h/x", options=opts)
    assert not isinstance(err.value, TransientInfrastructureError)
    assert err.value.exit_code == 5 and "https://h/x" in err.value.message
    assert len(calls) == 4 and len(slept) == 3


def test_stream_that_keeps_progressing_gets_fresh_retries_but_not_forever(tmp_path):
    store = ContentStore(tmp_path / "cache")
    data = os.urandom(20_000)
    src = FlakySource(data, cuts=5, cut_at=1000)  # progress every time
    opts, _ = no_sleep_options(attempts=2)  # each policy allows one retry only
    with store.writer(what="m", expected=sha(data)) as w:
        stream_into(w, src, what="m", source="s", options=opts)
        w.commit()
    src = FlakySource(data, cuts=100, cut_at=10)
    opts, _ = no_sleep_options(attempts=2, max_restarts=3)
    with pytest.raises(InfrastructureError), store.writer(what="m", expected=sha(data)) as w:
        stream_into(w, src, what="m", source="s", options=opts)
    assert len(src.offsets) == 8  # (1 restart budget + 3 restarts) x 2 attempts


def test_stream_refuses_more_bytes_than_announced(tmp_path):
    store = ContentStore(tmp_path / "cache")

    def liar(offset):
        return ByteStream(iter([b"x" * 100]), 10, 0)

    opts, _ = no_sleep_options()
    with pytest.raises(InputError, match="more bytes"), store.writer(what="m") as w:
        stream_into(w, liar, what="m", source="s", options=opts)


# ----------------------------------------------------------------------------- S3 and TLS setup


def test_s3_credentials_come_from_env_first(tmp_path):
    creds = tmp_path / "credentials"
    creds.write_text("[default]\naws_access_key_id = FILEKEY\naws_secret_access_key = filesecret\n")
    env = {
        "AWS_ACCESS_KEY_ID": "ENVKEY",
        "AWS_SECRET_ACCESS_KEY": "envsecret",
        "AWS_SESSION_TOKEN": "tok",
        "AWS_SHARED_CREDENTIALS_FILE": str(creds),
    }
    provider = s3_source._s3_credentials(env)
    assert isinstance(provider, StaticProvider)
    got = provider.retrieve()
    assert (got.access_key, got.secret_key, got.session_token) == ("ENVKEY", "envsecret", "tok")


def test_s3_credentials_from_a_named_profile(tmp_path):
    creds = tmp_path / "credentials"
    creds.write_text(
        "[default]\naws_access_key_id = D\naws_secret_access_key = d\n"
        "[lab]\naws_access_key_id = LABKEY\naws_secret_access_key = labsecret\n"
    )
    provider = s3_source._s3_credentials(
        {"AWS_SHARED_CREDENTIALS_FILE": str(creds), "AWS_PROFILE": "lab"}
    )
    assert isinstance(provider, AWSConfigProvider)
    assert provider.retrieve().access_key == "LABKEY"
    home = tmp_path / "home"
    (home / ".aws").mkdir(parents=True)
    (home / ".aws" / "credentials").write_text(creds.read_text())
    assert s3_source._s3_credentials({"HOME": str(home)}).retrieve().access_key == "D"


def test_s3_missing_named_profile_is_an_error_not_anonymous(tmp_path):
    with pytest.raises(InputError, match="AWS_PROFILE='nope'"):
        s3_source._s3_credentials({"AWS_PROFILE": "nope", "HOME": str(tmp_path)})
    assert s3_source._s3_credentials({"HOME": str(tmp_path)}) is None  # anonymous


def test_s3_endpoint_precedence():
    assert sources.s3_endpoint(SourceOptions(environ={})) == "https://s3.amazonaws.com"
    env = {"AWS_ENDPOINT_URL": "http://127.0.0.1:1", "AWS_ENDPOINT_URL_S3": "http://127.0.0.1:2/"}
    assert sources.s3_endpoint(SourceOptions(environ=env)) == "http://127.0.0.1:2"
    assert sources.s3_endpoint(SourceOptions(environ=env, s3_endpoint="https://s3.lab:9000")) == (
        "https://s3.lab:9000"
    )
    with pytest.raises(InputError, match="without a path"):
        sources.s3_endpoint(SourceOptions(environ={}, s3_endpoint="http://h:1/prefix"))


class StubObject:
    def __init__(self, name, size):
        self.object_name, self.size = name, size


class StubS3:
    def __init__(self, names):
        self.names = names

    def list_objects(self, bucket, prefix, recursive):
        return iter(StubObject(n, 0 if n.endswith("/") else 1) for n in self.names)


@pytest.mark.parametrize("key", ["ds/../etc/passwd", "ds/a//b", "ds/x\ny"])
def test_s3_keys_escaping_the_prefix_are_refused(key):
    opts, _ = no_sleep_options()
    with pytest.raises(InputError) as err:
        s3_source._list_prefix(
            StubS3(["ds/ok", key]),
            S3Uri(bucket="b", key="ds/"),
            what="model",
            options=opts,
            max_files=10,
        )
    assert err.value.fields["entry"] == key


def test_s3_folder_markers_are_not_files():
    opts, _ = no_sleep_options()
    listed = s3_source._list_prefix(
        StubS3(["ds/", "ds/a"]), S3Uri(bucket="b", key="ds/"), what="m", options=opts, max_files=10
    )
    assert [x.path for x in listed] == ["a"]


def _ca_pem(tmp_path: Path, name: str) -> Path:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    path = tmp_path / f"{name}.pem"
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path


def _trusted(ctx) -> set[str]:
    return {dict(x[0] for x in c["subject"])["commonName"] for c in ctx.get_ca_certs()}


def test_tls_trust_precedence(tmp_path):
    explicit, requests_ca, ssl_file = (
        _ca_pem(tmp_path, n) for n in ("explicit", "requests", "sslfile")
    )
    env = {"REQUESTS_CA_BUNDLE": str(requests_ca), "SSL_CERT_FILE": str(ssl_file)}
    assert _trusted(tls_context(SourceOptions(environ=env, ca_file=explicit))) == {"explicit"}
    assert _trusted(tls_context(SourceOptions(environ=env))) == {"requests"}
    assert _trusted(tls_context(SourceOptions(environ={"SSL_CERT_FILE": str(ssl_file)}))) == {
        "sslfile"
    }
    with pytest.raises(InputError, match="CA bundle"):
        tls_context(SourceOptions(environ={}, ca_file=tmp_path / "missing.pem"))


def test_meter_is_thread_safe():
    seen = []
    meter = sources.Meter(lambda d, t: seen.append(d), 1000)
    threads = [
        threading.Thread(target=lambda: [meter.advance(1) for _ in range(250)]) for _ in range(4)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert meter.done == 1000 and max(seen) == 1000


def test_stream_refuses_an_announced_size_over_the_limit_before_reading(tmp_path):
    store = ContentStore(tmp_path / "cache")
    read = []

    def huge(offset):
        def chunks():
            read.append(offset)
            yield b"x"

        return ByteStream(chunks(), 10_000, 0)

    opts, _ = no_sleep_options(max_file_bytes=100)
    with pytest.raises(InputError, match="over the size limit"), store.writer(what="m") as w:
        stream_into(w, huge, what="m", source="s", options=opts)
    assert read == []

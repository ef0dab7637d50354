"""The ``used`` rootfs check: the digest table, the trace hook and the per-file check."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import time
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from runner.agent.rootfs import rootfs_digest, rootfs_table
from runner.agent.usage import UsageVerifier, check_path, install_trace_hook
from runner.shared.inputs import MAP_FROM
from runner.shared.agent_plan import PlanError, parse_agent_plan
from runner.shared.rootfs_table import parse_table, table_digest

pytestmark = pytest.mark.unit


@pytest.fixture
def image_dir():
    # not under /tmp: /tmp is a runtime path the check leaves out
    root = Path(tempfile.mkdtemp(prefix="evalrun-usage-", dir="/var/tmp"))
    (root / "app").mkdir()
    (root / "app" / "model.py").write_text("VALUE = 1\n")
    (root / "app" / "data.txt").write_text("data\n")
    (root / "app" / "current").symlink_to("model.py")
    yield root
    shutil.rmtree(root)


def _table_of(root: Path) -> dict:
    """The table of ``root`` with the paths the host sees (as the agent sees /)."""
    return {f"{root}{path}": entry for path, entry in parse_table(rootfs_table(str(root))).items()}


def test_table_hashes_to_the_rootfs_digest(image_dir):
    table = rootfs_table(str(image_dir))
    digest, count = rootfs_digest(str(image_dir))
    assert table_digest(table.splitlines(keepends=True)) == digest
    assert len(parse_table(table)) == count == 4


def test_check_path_accepts_unchanged_and_names_a_changed_file(image_dir):
    table = _table_of(image_dir)
    assert check_path(str(image_dir / "app" / "model.py"), table) is None
    assert check_path(str(image_dir / "app" / "current"), table) is None
    (image_dir / "app" / "model.py").write_text("VALUE = 2\n")
    reason = check_path(str(image_dir / "app" / "current"), table)
    assert reason is not None and "model.py: expected sha256" in reason


def test_check_path_rejects_files_and_links_the_image_does_not_have(image_dir):
    table = _table_of(image_dir)
    (image_dir / "app" / "extra.py").write_text("x = 1\n")
    assert "not in the image's digest table" in (
        check_path(str(image_dir / "app" / "extra.py"), table) or ""
    )
    (image_dir / "app" / "current").unlink()
    (image_dir / "app" / "current").symlink_to("data.txt")
    assert "expected link to model.py" in (
        check_path(str(image_dir / "app" / "current"), table) or ""
    )
    # a file that does not exist was never read; a runtime path is not the image's
    assert check_path(str(image_dir / "app" / "absent.py"), table) is None
    assert check_path("/tmp/anything", table) is None


def test_trace_hook_reports_opens_imports_and_maps(image_dir, tmp_path):
    trace = tmp_path / "trace"
    hook = install_trace_hook(trace)
    script = (
        f"import json, sys; sys.path.insert(0, {str(image_dir / 'app')!r}); import model\n"
        f"open({str(image_dir / 'app' / 'data.txt')!r}).read()\n"
        "import subprocess; subprocess.run(['true'])\n"
    )
    env = {**os.environ, "PYTHONPATH": str(hook), "EVALRUN_TRACE_DIR": str(trace)}
    proc = subprocess.run(
        [sys.executable, "-c", script], env=env, check=True, capture_output=True, text=True
    )
    assert proc.stderr == ""  # no "Error in sitecustomize" where the image has none of its own
    reported = {
        os.fsdecode(path) for f in trace.glob("*.paths") for path in f.read_bytes().split(b"\0")
    }
    assert all(f.read_bytes().endswith(b"\0") for f in trace.glob("*.paths"))
    # the hook loads no module from a file the interpreter had not: no json, re, __future__
    listing = "import sys; print(chr(10).join(sys.modules))"
    hooked = subprocess.run(
        [sys.executable, "-c", listing], env=env, check=True, capture_output=True, text=True
    ).stdout.split()
    bare = subprocess.run(
        [sys.executable, "-c", listing],
        env={k: v for k, v in env.items() if k not in ("PYTHONPATH", "EVALRUN_TRACE_DIR")},
        check=True, capture_output=True, text=True,
    ).stdout.split()
    loaded = set(hooked) - set(bare) - {"sitecustomize"}
    assert loaded <= set(sys.builtin_module_names), loaded
    assert str(image_dir / "app" / "model.py") in reported
    assert str(image_dir / "app" / "data.txt") in reported
    assert sys.executable in reported or os.path.realpath(sys.executable) in reported
    assert any(p.endswith("/true") for p in reported)  # the program it started
    assert any(".so" in p for p in reported)  # mapped libraries
    # json is loaded from its bytecode: that is what is reported, not the unread source
    assert json.__cached__ in reported and json.__file__ not in reported


def test_usage_verifier_fails_on_a_file_changed_after_the_table(image_dir, tmp_path):
    table = _table_of(image_dir)
    trace = tmp_path / "trace"
    trace.mkdir()
    verifier = UsageVerifier(table, trace)
    verifier.start()
    # (named as a process no longer running: the verifier also reads a live one's maps)
    (trace / "999999991.paths").write_bytes(os.fsencode(image_dir / "app" / "data.txt") + b"\0")
    (image_dir / "app" / "model.py").write_text("VALUE = 3\n")  # changed, but never used
    ok = verifier.finish()
    assert ok["failure_count"] == 0 and ok["traced_processes"] == 1
    # what the check read, and the CPU it took (the sandbox's, under the spec's limit)
    assert ok["bytes_hashed"] == (image_dir / "app" / "data.txt").stat().st_size
    assert ok["check_cpu_s"] >= 0 and ok["files_verified"] == 1

    verifier = UsageVerifier(table, trace)
    (trace / "999999992.paths").write_bytes(os.fsencode(image_dir / "app" / "model.py") + b"\0")
    bad = verifier.finish()
    assert bad["failure_count"] == 1 and "model.py: expected sha256" in bad["failures"][0]


def test_usage_verifier_checks_what_a_traced_process_maps_while_it_runs(image_dir, tmp_path):
    # an extension module's libraries are mapped, never opened: at exit the process lists
    # its mappings, and while it runs the verifier reads them from /proc/<pid>/maps
    table = _table_of(image_dir)
    trace = tmp_path / "trace"
    trace.mkdir()
    mapped = image_dir / "app" / "data.txt"
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import mmap, sys, time; f = open(sys.argv[1], 'rb'); "
         "m = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ); print('ok', flush=True); "
         "time.sleep(30)", str(mapped)],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "ok\n"
        (trace / f"{holder.pid}.paths").write_text("")
        # the table's bytes, with the paths the host sees (as _table_of)
        table_bytes = rootfs_table(str(image_dir)).replace(b" /", f" {image_dir}/".encode())
        verifier = UsageVerifier(table_bytes, trace)
        verifier.start()
        deadline = time.monotonic() + 10
        while str(mapped) not in verifier._seen and time.monotonic() < deadline:
            time.sleep(0.02)
        assert str(mapped) in verifier._seen  # reported while the process still runs
    finally:
        holder.kill()
        holder.wait()
    record = verifier.finish()
    # the holder's interpreter and libraries are not in this table; the file it mapped is
    assert not [f for f in record["failures"] if str(image_dir) in f]
    # indexed from the table's bytes on the thread: the same entries as the parsed table
    assert len(verifier.table) == len(table)
    assert all(verifier.table.get(path) == entry for path, entry in table.items())


def test_a_table_that_cannot_be_read_fails_the_check(tmp_path):
    # a line without a path: nothing can be looked up in the table
    verifier = UsageVerifier(b"d / 0755 0:0\nf\n", tmp_path)
    verifier.start()
    record = verifier.finish(["/usr/bin/true"])
    assert record["failure_count"] == 1
    assert verifier.table_error is not None and "digest table line 2" in verifier.table_error


def test_a_table_line_that_cannot_be_read_fails_the_check_of_its_file(image_dir, tmp_path):
    # the lines are read as their paths are looked up: a bad one fails its file's check
    used = image_dir / "app" / "data.txt"
    line = f"f {used} 0644 0:0 notanumber sha256:00\n".encode()
    verifier = UsageVerifier(line, tmp_path)
    verifier.start()
    record = verifier.finish([str(used)])
    assert verifier.table_error is None
    assert any("digest table line 1" in failure for failure in record["failures"])


def test_plan_verify_rootfs_is_checked():
    base = {
        "run_id": "r",
        "image_ref": "x@sha256:" + "0" * 64,
        "expected_rootfs_digest": "sha256:" + "1" * 64,
        "seed": 0,
        "command": ["true"],
        "timeout_s": 1,
        "metrics": [],
        "inputs": [],
    }
    assert "verify_rootfs" not in parse_agent_plan(base)
    assert parse_agent_plan({**base, "verify_rootfs": "used"})["verify_rootfs"] == "used"
    with pytest.raises(PlanError, match="verify_rootfs"):
        parse_agent_plan({**base, "verify_rootfs": "some"})


def test_agent_paths_name_the_bytecode_a_module_runs_from_and_a_changed_one_fails(image_dir):
    # a module imported from an unchecked-hash .pyc (as the agent is in evalrun-built
    # images) runs the .pyc, never reading its source: the .pyc must be among what is checked
    package = image_dir / "pkg"
    package.mkdir()
    (package / "compiled_mod.py").write_text("VALUE = 1\n")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "compileall",
            "-q",
            "--invalidation-mode",
            "unchecked-hash",
            str(package),
        ],
        check=True,
    )
    table = _table_of(image_dir)
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); import compiled_mod; "
        "from runner.agent.usage import agent_paths; import json; "
        "print(json.dumps(agent_paths()))"
    )
    env = {
        **os.environ,
        "PYTHONPATH": str(Path(__file__).resolve().parents[2]),
        "PYTHONDONTWRITEBYTECODE": "1",
    }
    out = subprocess.run(
        [sys.executable, "-c", code, str(package)],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    ).stdout
    pyc = next(p for p in json.loads(out) if p.endswith(".pyc") and "compiled_mod" in p)
    assert check_path(pyc, table) is None

    Path(pyc).write_bytes(Path(pyc).read_bytes() + b"\0")
    assert "expected mode" in (check_path(pyc, table) or "")  # its size changed


def test_lookup_resolves_paths_as_os_path_realpath_does(tmp_path):
    import random

    from runner.agent.usage import Lookup

    rng = random.Random(7)
    root = Path(tempfile.mkdtemp(prefix="evalrun-lookup-", dir="/var/tmp"))
    try:
        dirs = [root]
        for i in range(12):
            d = rng.choice(dirs) / f"d{i}"
            d.mkdir()
            dirs.append(d)
            (d / "f").write_text(str(i))
        names = []
        for i in range(25):
            home = rng.choice(dirs)
            target = rng.choice([
                os.path.relpath(rng.choice(dirs), home),  # relative, often with ..
                str(rng.choice(dirs)),  # absolute
                str(rng.choice(dirs) / "f"),
                "missing/../f", "../../..", ".", f"l{rng.randrange(25)}",  # odd and loops
            ])
            (home / f"l{i}").symlink_to(target)
            names.append(home / f"l{i}")
        probes = [str(p) for p in names]
        for _ in range(400):
            parts = [str(rng.choice(dirs + names))]
            for _ in range(rng.randrange(4)):
                parts.append(rng.choice(["f", "..", ".", "nope", "", *[f"l{i}" for i in range(25)],
                                         *[f"d{i}" for i in range(12)]]))
            probes.append("/".join(parts))
        lookup = Lookup()  # one for all: its caches must not leak between paths
        for probe in probes:
            assert lookup.realpath(probe) == os.path.realpath(probe), probe
    finally:
        shutil.rmtree(root)


def _compiled(folder: Path, name: str, source: str, mode: str) -> Path:
    """``folder/name.py`` compiled into ``__pycache__`` with invalidation ``mode``."""
    py = folder / f"{name}.py"
    py.write_text(source)
    subprocess.run(
        [sys.executable, "-m", "compileall", "-q", "--invalidation-mode", mode, str(py)],
        check=True,
    )
    return Path(importlib.util.cache_from_source(str(py)))


def test_source_read_for_follows_the_import_systems_rule(tmp_path):
    from runner.agent.usage import source_read_for

    def head(pyc: Path) -> bytes:
        return pyc.read_bytes()[:16]

    stamp = _compiled(tmp_path, "stamp", "A = 1\n", "timestamp")
    source = str(tmp_path / "stamp.py")
    assert source_read_for(str(stamp), head(stamp)) is None  # fresh: only the bytecode
    os.utime(source, (1, 1))
    assert source_read_for(str(stamp), head(stamp)) == source  # stale: the source compiled
    unchecked = _compiled(tmp_path, "unchecked", "B = 1\n", "unchecked-hash")
    (tmp_path / "unchecked.py").write_text("B = 2  # never read\n")
    assert source_read_for(str(unchecked), head(unchecked)) is None
    checked = _compiled(tmp_path, "checked", "C = 1\n", "checked-hash")
    assert source_read_for(str(checked), head(checked)) == str(tmp_path / "checked.py")
    other = bytes([0, 0, 13, 10]) + head(unchecked)[4:]  # another interpreter's magic
    assert source_read_for(str(unchecked), other) == str(tmp_path / "unchecked.py")
    assert source_read_for(str(unchecked), b"") == str(tmp_path / "unchecked.py")
    # not a cache file, or no source beside it: nothing else can have been read
    assert source_read_for(str(tmp_path / "stamp.py"), b"") is None
    (tmp_path / "unchecked.py").unlink()
    assert source_read_for(str(unchecked), head(unchecked)) is None


def test_a_module_compiled_from_a_changed_source_fails_through_its_bytecode(image_dir):
    from runner.agent.usage import Lookup, check_used

    pyc = _compiled(image_dir / "app", "mod", "VALUE = 1\n", "timestamp")
    table = _table_of(image_dir)
    assert check_used(str(pyc), table, Lookup()) is None
    source = image_dir / "app" / "mod.py"
    source.write_text("VALUE = 22\n")  # the bytecode is stale: an import compiles this
    reason = check_used(str(pyc), table, Lookup()) or ""
    assert reason.startswith(f"{source}: expected mode 0644 owner")
    # a change that keeps the recorded timestamp and size leaves the bytecode in use
    source.write_text("VALUE = 3\n")
    recorded = int.from_bytes(pyc.read_bytes()[8:12], "little")
    os.utime(source, (recorded, recorded))
    assert table[str(source)].size == source.stat().st_size
    assert check_used(str(pyc), table, Lookup()) is None


def test_agent_paths_leave_out_sources_their_bytecode_stands_for():
    import json as json_module

    from runner.agent.usage import agent_paths

    paths = agent_paths()
    assert json_module.__cached__ in paths and json_module.__file__ not in paths
    if os.__spec__.origin == "frozen":  # its code is inside the interpreter, checked with it
        assert not any(p.endswith("/os.py") for p in paths)


def _within(seconds: float, check: Callable[[], object]) -> object:
    """``check()``'s answer, failing (not hanging) when it blocks longer than ``seconds``."""
    answer: list[object] = []
    worker = threading.Thread(target=lambda: answer.append(check()), daemon=True)
    worker.start()
    worker.join(seconds)
    assert answer, f"the check still blocks after {seconds} s"
    return answer[0]


def test_a_fifo_or_folder_where_the_table_has_a_file_is_named_without_blocking(image_dir):
    table = _table_of(image_dir)
    data = image_dir / "app" / "data.txt"
    data.unlink()
    os.mkfifo(data)  # opening it for reading would wait for a writer without O_NONBLOCK
    reason = _within(10, lambda: check_path(str(data), table))
    assert "expected a f entry, found another type" in (reason or "")
    data.unlink()
    data.mkdir()
    assert "expected a f entry, found another type" in (check_path(str(data), table) or "")


def test_bytecode_on_a_runtime_path_is_not_opened(tmp_path):
    # /tmp is the sandbox's own: not checked, and never opened (a FIFO there would block)
    from runner.agent.usage import Lookup, check_used

    cache = Path(tempfile.mkdtemp(prefix="evalrun-fifo-", dir="/tmp")) / "__pycache__"
    try:
        cache.mkdir()
        os.mkfifo(cache / "mod.cpython-311.pyc")
        (cache.parent / "mod.py").write_text("A = 1\n")
        pyc = str(cache / "mod.cpython-311.pyc")
        assert _within(10, lambda: check_used(pyc, {}, Lookup())) is None
    finally:
        shutil.rmtree(cache.parent)


def test_a_large_used_file_is_checked_from_a_mapping_and_a_changed_byte_fails(image_dir):
    # from MAP_FROM on the agent hashes the file where it lies (runner.shared.inputs)
    big = image_dir / "app" / "libbig.so"
    data = bytearray(os.urandom(MAP_FROM + 3 * 1024 * 1024 + 5))
    big.write_bytes(data)
    table = _table_of(image_dir)
    assert check_path(str(big), table) is None
    data[MAP_FROM + 2 * 1024 * 1024] ^= 1  # one bit, far into the mapping
    big.write_bytes(data)
    reason = check_path(str(big), table)
    assert reason is not None and "libbig.so: expected sha256" in reason


def _plan_for(expected: str, mode: str = "used") -> dict:
    """A plan's fields the rootfs check reads."""
    return {"verify_rootfs": mode, "expected_rootfs_digest": expected,
            "command": [sys.executable, "-c", "pass"]}


@pytest.fixture
def early_table(image_dir, tmp_path, monkeypatch):
    """The image's table (with the paths the host sees) where the agent reads it; the
    trace folders in ``tmp_path``: (table bytes, its digest)."""
    from runner.agent import verification

    table_bytes = rootfs_table(str(image_dir)).replace(b" /", f" {image_dir}/".encode())
    monkeypatch.setattr(verification, "read_table", lambda: table_bytes)
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    return table_bytes, table_digest(table_bytes.splitlines(keepends=True))


def test_a_check_begun_before_the_plan_goes_on_when_the_plan_locks_that_table(early_table):
    from runner.agent.verification import EarlyCheck, RootfsVerification

    table_bytes, digest = early_table
    early = EarlyCheck()
    assert early.usage is not None and early.trace_dir is not None
    deadline = time.monotonic() + 10
    while sys.executable not in early.usage._seen and time.monotonic() < deadline:
        time.sleep(0.01)  # the agent's own files, queued on the checking thread
    assert sys.executable in early.usage._seen
    usage, trace_dir = early.usage, early.trace_dir
    rootfs = RootfsVerification(_plan_for(digest), early)  # type: ignore[arg-type]
    record = rootfs.begin()
    assert record["mode"] == "used" and record["found"] == digest and "passed" not in record
    assert rootfs._usage is usage and rootfs.child_env()["EVALRUN_TRACE_DIR"] == str(trace_dir)
    done = rootfs.finish()
    # the test's interpreter is not in this image's table: checked, and named
    assert done["files_reported"] > 0 and done["passed"] is False
    assert not trace_dir.exists()


@pytest.mark.parametrize("mode", ["used", "full"])
def test_a_check_begun_before_the_plan_is_dropped_when_the_plan_asks_for_another(
    early_table, mode, monkeypatch
):
    from runner.agent import usage as usage_module
    from runner.agent.verification import EarlyCheck, RootfsVerification

    _, digest = early_table
    monkeypatch.setattr(usage_module, "rootfs_digest", lambda _: (digest, 4))
    early = EarlyCheck()
    trace_dir = early.trace_dir
    assert trace_dir is not None and trace_dir.exists()
    expected = digest if mode == "full" else "sha256:" + "0" * 64  # "used": another table
    rootfs = RootfsVerification(_plan_for(expected, mode), early)  # type: ignore[arg-type]
    record = rootfs.begin()
    assert early.usage is None and not trace_dir.exists()  # stopped, its folder gone
    if mode == "used":
        assert record["passed"] is False
        assert record["reason"] == "the image's digest table does not match"
    else:
        assert record["mode"] == "full" and rootfs.child_env() == {}
        assert rootfs.finish()["passed"] is True


@pytest.mark.parametrize("sizes", [(3 << 20, 5, 0, 1 << 20, (1 << 20) + 7, 16, 17)])
def test_files_read_into_one_buffer_hash_and_head_as_their_own_bytes(tmp_path, sizes):
    # one read buffer per thread: what a longer file left in it never leaks into the next
    from runner.agent.usage import _sha256_and_head

    for index, size in enumerate(sizes):
        data = bytes((index * 7 + i) % 251 for i in range(size))
        path = tmp_path / f"f{index}"
        path.write_bytes(data)
        fd = os.open(path, os.O_RDONLY)
        try:
            assert _sha256_and_head(fd, size) == (hashlib.sha256(data).hexdigest(), data[:16])
        finally:
            os.close(fd)
    # a file shorter than fstat said hashes to what it has now: never to the table's line
    path = tmp_path / "short"
    path.write_bytes(b"abc")
    fd = os.open(path, os.O_RDONLY)
    try:
        assert _sha256_and_head(fd, 10) == (hashlib.sha256(b"abc").hexdigest(), b"abc")
    finally:
        os.close(fd)


def test_the_trace_hook_stays_importable_by_python_3_8():
    # it runs as the evaluation's sitecustomize, whatever its Python: 3.8 syntax, and no
    # annotation that 3.8 would evaluate and refuse (``X | Y``, ``list[str]``) unquoted
    import ast

    import runner.agent.trace_hook as hook

    tree = ast.parse(Path(hook.__file__).read_text(), feature_version=(3, 8))
    annotations = [
        node.returns for node in ast.walk(tree) if isinstance(node, ast.FunctionDef)
    ] + [node.annotation for node in ast.walk(tree) if isinstance(node, (ast.arg, ast.AnnAssign))]
    for annotation in annotations:
        if annotation is not None and not isinstance(annotation, ast.Constant):
            assert isinstance(annotation, ast.Name), ast.unparse(annotation)
    assert not any(
        isinstance(node, ast.ImportFrom) and node.module == "__future__" for node in ast.walk(tree)
    )

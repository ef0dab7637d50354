"""The runner–agent protocol: one plan schema, one set of exit codes, one results frame."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Any

import pytest

import runner.agent.__main__ as agent
from runner.backends.collect import extract_results_frame
from runner.backends.manifests import NON_RETRYABLE_EXIT_CODES
from runner.model.plan import PlanInput, RunPlan
from runner.shared.protocol import (
    FINAL_EXITS,
    FRAME_BEGIN,
    FRAME_END,
    MAX_FRAME_BYTES,
    AgentExit,
    decode_frame,
    encode_frame,
)
from runner.shared.agent_plan import PlanError, encode_agent_plan, parse_agent_plan

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]


def _run_plan(**overrides: Any) -> RunPlan:
    fields: dict[str, Any] = {
        "run_id": "r-1",
        "attempt": 1,
        "image_ref": "127.0.0.1:5000/x@sha256:" + "a" * 64,
        "expected_rootfs_digest": "sha256:" + "b" * 64,
        "runtime": "gvisor",
        "command": ["python", "-m", "e"],
        "params": {"k": 1},
        "seed": 7,
        "metrics": [{"name": "accuracy", "compute": "accuracy"}],
        "perturbations": [{"name": "p", "kind": "subsample", "fraction": 0.5}],
        "expect": {"driver": ">=550"},
        "inputs": [
            PlanInput(role="model", name="m", host_path=Path("/cache/m.bin"), sha256="c" * 64),
            PlanInput(role="dataset", name="d", host_path=Path("/c/d.jsonl"), sha256="d" * 64),
        ],
        "timeout_s": 60,
        "cpus": 1.0,
        "memory_mib": 512,
        "pids": 64,
        "spec_digest": "s",
        "lock_digest": "l",
        "spec_name": "n",
    }
    return RunPlan(**{**fields, **overrides})


# --- the plan ------------------------------------------------------------------------


def test_the_plan_the_host_writes_is_the_plan_the_agent_reads() -> None:
    for emit in (False, True):
        written = _run_plan().agent_plan(emit_results=emit)
        parsed = parse_agent_plan(json.loads(encode_agent_plan(written)))
        assert parsed == written
        assert parsed["emit_results"] is emit


def test_plan_json_keeps_its_historical_shape() -> None:
    # bundles carry plan.json and images carry agents that read it: the keys are a contract
    data = json.loads(encode_agent_plan(_run_plan().agent_plan()))
    assert data == {
        "command": ["python", "-m", "e"],
        "emit_results": False,
        "expect": {"driver": ">=550"},
        "expected_rootfs_digest": "sha256:" + "b" * 64,
        "image_ref": "127.0.0.1:5000/x@sha256:" + "a" * 64,
        "inputs": [
            {"name": "m", "path": "/evalrun/inputs/model/m.bin", "role": "model",
             "sha256": "c" * 64},
            {"name": "d", "path": "/evalrun/inputs/data/d/d.jsonl", "role": "dataset",
             "sha256": "d" * 64},
        ],
        "metrics": [{"compute": "accuracy", "name": "accuracy"}],
        "params": {"k": 1},
        "perturbations": [{"fraction": 0.5, "kind": "subsample", "name": "p"}],
        "run_id": "r-1",
        "seed": 7,
        "timeout_s": 60,
        # added with the digest-table check; agents that predate it ignore it (full check)
        "verify_rootfs": "used",
    }


def test_write_agent_plan_writes_the_encoded_bytes(tmp_path: Path) -> None:
    plan = _run_plan()
    path = plan.write_agent_plan(tmp_path / "plan")
    assert path.read_bytes() == encode_agent_plan(plan.agent_plan())


def test_a_minimal_plan_gets_defaults_and_unknown_fields_are_ignored() -> None:
    minimal = {
        "run_id": "gpu-validate", "image_ref": "host/x@sha256:" + "0" * 64,
        "expected_rootfs_digest": "sha256:x", "seed": 0, "command": ["true"],
        "timeout_s": 300, "metrics": [], "inputs": [], "from_a_newer_runner": {"x": 1},
    }
    plan = parse_agent_plan(minimal)
    assert (plan["emit_results"], plan["params"], plan["perturbations"], plan["expect"]) == (
        False, {}, [], {})
    assert "from_a_newer_runner" not in plan


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"run_id": None}, "run_id"),
        ({"seed": True}, "seed"),
        ({"seed": -1}, "seed"),
        ({"timeout_s": "60"}, "timeout_s"),
        ({"command": []}, "command"),
        ({"command": ["python", 3]}, "command"),
        ({"emit_results": "yes"}, "emit_results"),
        ({"metrics": {"name": "accuracy"}}, "metrics"),
        ({"params": None}, "params"),
        ({"perturbations": [{"name": "p"}]}, "perturbations[0].kind"),
        ({"inputs": [{"role": "weights", "name": "m", "path": "/p", "sha256": "c" * 64}]},
         "inputs[0].role"),
        ({"inputs": [{"role": "model", "name": "m", "path": "/p", "sha256": "sha256:x"}]},
         "inputs[0].sha256"),
    ],
)
def test_a_bad_plan_names_the_field(change: dict[str, Any], field: str) -> None:
    data = {**_run_plan().agent_plan(), **change}
    with pytest.raises(PlanError) as err:
        parse_agent_plan(json.loads(json.dumps(data)))
    assert err.value.field == field
    assert repr(field) in str(err.value)


def test_a_plan_that_is_not_an_object_is_refused() -> None:
    with pytest.raises(PlanError, match="expected an object, found list"):
        parse_agent_plan([])


def test_agent_exits_2_naming_the_field_of_a_bad_plan(tmp_path: Path) -> None:
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({**_run_plan().agent_plan(emit_results=True), "seed": "7"}))
    proc = subprocess.run(
        [sys.executable, "-m", "runner.agent", "run", "--plan", str(plan),
         "--results", str(tmp_path / "results")],
        capture_output=True, text=True, cwd=ROOT, check=False,
    )
    assert proc.returncode == AgentExit.BAD_PLAN == 2
    assert "plan field 'seed'" in proc.stderr
    assert FRAME_BEGIN not in proc.stdout


def test_exits_a_job_never_retries_are_the_protocols() -> None:
    assert tuple(NON_RETRYABLE_EXIT_CODES) == FINAL_EXITS


# --- the results frame ---------------------------------------------------------------


def _results(tmp_path: Path) -> Path:
    results = tmp_path / "results"
    (results / "logs").mkdir(parents=True)
    (results / "summary.json").write_text('{"outcome": "completed"}\n')
    (results / "logs" / "events.jsonl").write_text("{}\n")
    (results / "predictions.jsonl").write_bytes(os.urandom(3000))
    (results / "a-c").write_text("sorts after a/ in path order")
    (results / "back\\slash").write_text("harmless on disk; collect_results decides")
    return results


def _emit(results: Path) -> tuple[str, str]:
    out, notes = io.StringIO(), io.StringIO()
    out.write(encode_frame(agent.results_tar(results, notes)))
    return out.getvalue(), notes.getvalue()


def test_what_the_agent_frames_the_runner_unpacks_byte_for_byte(tmp_path: Path) -> None:
    results = _results(tmp_path)
    text, notes = _emit(results)
    collected = extract_results_frame("pod log line\n" + text + "more log\n", tmp_path / "out")
    assert collected.problems == [] and notes == ""
    expected = sorted(
        p.relative_to(results).as_posix() for p in results.rglob("*") if p.is_file()
    )
    assert sorted(collected.files) == expected
    for rel in expected:
        assert (tmp_path / "out" / rel).read_bytes() == (results / rel).read_bytes()
    assert collected.total_bytes == sum((results / r).stat().st_size for r in expected)


def test_the_agent_leaves_links_and_specials_out_of_the_frame_and_says_so(
    tmp_path: Path,
) -> None:
    results = _results(tmp_path)
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "secret").write_text("host")
    (results / "link").symlink_to(tmp_path / "outside" / "secret")
    (results / "linked-dir").symlink_to(tmp_path / "outside")
    os.mkfifo(results / "pipe")
    text, notes = _emit(results)
    collected = extract_results_frame(text, tmp_path / "out")
    assert collected.problems == []
    assert not {"link", "linked-dir/secret", "pipe"} & set(collected.files)
    assert "'link' not framed: a symlink" in notes
    assert "'linked-dir' not framed: a symlink" in notes
    assert "'pipe' not framed: not a regular file" in notes


def test_the_agent_frame_is_deterministic(tmp_path: Path) -> None:
    results = _results(tmp_path)
    first = agent.results_tar(results)
    os.utime(results / "summary.json", (1, 1))
    (results / "summary.json").chmod(0o600)
    assert agent.results_tar(results) == first
    with tarfile.open(fileobj=io.BytesIO(first)) as tar:
        members = tar.getmembers()
    assert {(m.mtime, m.mode, m.uid, m.gid, m.uname, m.gname) for m in members} == {
        (0, 0o644, 0, 0, "", "")
    }


def _frame_of(*members: tuple[tarfile.TarInfo, bytes | None]) -> str:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return encode_frame(buf.getvalue())


def _file(name: str, data: bytes = b"x") -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    return info, data


def _special(name: str, kind: bytes, link: str = "") -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = link
    return info, None


@pytest.mark.parametrize(
    ("member", "expected"),
    [
        (_file("../escape"), "results entry '../escape': path contains '..'"),
        (_file("/etc/cron.d/x"), "results entry '/etc/cron.d/x': absolute path"),
        (_file("a//b"), "results entry 'a//b': path has an empty or '.' component"),
        (_special("l", tarfile.SYMTYPE, "/etc/shadow"), "results entry 'l' is a symlink"),
        (_special("h", tarfile.LNKTYPE, "summary.json"), "results entry 'h' is a hard link"),
        (_special("dev", tarfile.CHRTYPE), "results entry 'dev' is a device"),
        (_file("summary.json"), "results entry 'summary.json' appears more than once"),
        (_file("summary.json/inner"), "lies under the file 'summary.json'"),
        (_file("x" * 300), "a path component is longer than 255 bytes"),
    ],
    ids=["dotdot", "absolute", "empty-component", "symlink", "hardlink", "device", "duplicate",
         "file-under-file", "long-name"],
)
def test_a_frame_with_any_unsafe_member_extracts_nothing(
    tmp_path: Path, member: tuple[tarfile.TarInfo, bytes | None], expected: str
) -> None:
    text = _frame_of(_file("summary.json", b"{}"), member)
    collected = extract_results_frame(text, tmp_path / "out")
    assert any(expected in p for p in collected.problems), collected.problems
    assert collected.files == []
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_a_frame_accepts_dot_slash_names_and_directory_entries(tmp_path: Path) -> None:
    directory = tarfile.TarInfo("./logs")
    directory.type = tarfile.DIRTYPE
    text = _frame_of((directory, None), _file("./logs/events.jsonl", b"{}\n"))
    collected = extract_results_frame(text, tmp_path / "out")
    assert collected.problems == [] and collected.files == ["logs/events.jsonl"]


def test_frame_problems_are_named(tmp_path: Path) -> None:
    text = encode_frame(b"not a tar at all" * 64)
    assert "not a tar archive" in extract_results_frame(text, tmp_path / "a").problems[0]
    good = encode_frame(b"\0" * 1024)
    lines = good.strip("\n").split("\n")
    body = base64.b64decode("".join(lines[1:-1]))
    forged = good.replace(lines[1], base64.b64encode(b"\1" * 57).decode(), 1)
    with pytest.raises(ValueError, match="checksum mismatch"):
        decode_frame(forged)
    with pytest.raises(ValueError, match="2 results frames"):
        decode_frame(good + good)
    with pytest.raises(ValueError, match="truncated"):
        decode_frame(good.replace(FRAME_END, ""))
    with pytest.raises(ValueError, match="no results frame"):
        decode_frame("the agent crashed\n")
    with pytest.raises(ValueError, match="not valid base64"):
        decode_frame(good.replace(lines[1], "!!!!" + lines[1][4:], 1))
    huge = f"{FRAME_BEGIN} sha256={hashlib.sha256(body).hexdigest()} bytes={MAX_FRAME_BYTES + 1}-----"
    with pytest.raises(ValueError, match="the limit is"):
        decode_frame(good.replace(lines[0], huge))
    assert decode_frame(good) == body


def test_a_frame_from_an_agent_baked_into_an_older_image_still_unpacks(tmp_path: Path) -> None:
    # older agents kept each file's mode and used gettarinfo(); the reader ignores modes
    results = _results(tmp_path)
    (results / "summary.json").chmod(0o600)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for path in sorted(results.rglob("*")):
            if path.is_file() and not path.is_symlink():
                info = tar.gettarinfo(str(path), arcname=path.relative_to(results).as_posix())
                info.uid = info.gid = 0
                info.uname = info.gname = ""
                info.mtime = 0
                with path.open("rb") as fh:
                    tar.addfile(info, fh)
    collected = extract_results_frame(encode_frame(buf.getvalue()), tmp_path / "out")
    assert collected.problems == []
    assert (tmp_path / "out" / "summary.json").read_bytes() == (
        results / "summary.json"
    ).read_bytes()

"""Results by exec: the agent holds, emits a checksummed stream, exits on ack; the runner
refuses any stream that is cut, altered or unsafe, and leaves nothing half-written.

The agent side runs as real subprocesses (a short hold, a Unix socket under tmp_path);
the exec transport is the scripted frame sequence the API server would send.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from websocket import ABNF, WebSocketConnectionClosedException

import runner.agent.__main__ as agent
from kubernetes import client as k8s

from runner.adapters.kube_streams import LOG_QUIET_S, PodLogFollower, read_exec_frames
from runner.backends.collect import StreamReceiver
from runner.backends.pod_states import pod_problem
from runner.backends.live import MAX_LINE_BYTES, LineRelay, OutputLine
from runner.errors import TransientKubernetesError
from runner.model.plan import PlanInput, RunPlan
from runner.shared.protocol import (
    NOT_HOLDING_EXIT,
    READY_RE,
    STREAM_CHUNK_BYTES,
    STREAM_MAGIC,
    FrameError,
    StreamReader,
    StreamWriter,
    ready_line,
)
from runner.shared.agent_plan import PlanError, encode_agent_plan, parse_agent_plan

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]


def _stream(payload: bytes) -> bytes:
    sink = io.BytesIO()
    writer = StreamWriter(sink)
    for i in range(0, len(payload), 7000):
        writer.write(payload[i : i + 7000])
    writer.close()
    return sink.getvalue()


def _read(data: bytes, step: int, max_bytes: int = 1 << 30) -> bytes:
    reader = StreamReader(max_bytes)
    out = b""
    for i in range(0, len(data), step):
        out += b"".join(reader.feed(data[i : i + step]))
    reader.finish()
    return out


# --------------------------------------------------------------------------- the stream


@pytest.mark.parametrize("size", [0, 1, STREAM_CHUNK_BYTES, STREAM_CHUNK_BYTES * 2 + 17])
@pytest.mark.parametrize("step", [1 << 20, 4099])
def test_the_stream_carries_any_payload_in_any_pieces(size: int, step: int) -> None:
    payload = os.urandom(size)
    data = _stream(payload)
    assert data.startswith(STREAM_MAGIC)
    assert _read(data, step) == payload


def test_a_stream_cut_anywhere_is_refused() -> None:
    data = _stream(os.urandom(STREAM_CHUNK_BYTES + 500))
    cuts = [3, len(STREAM_MAGIC) + 2, len(STREAM_MAGIC) + 4 + 1000, len(data) - 40, len(data) - 1]
    for cut in cuts:
        reader = StreamReader(1 << 30)
        reader.feed(data[:cut])
        with pytest.raises(FrameError, match=r"truncated|bad magic"):
            reader.finish()


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda d: b"X" + d[1:], "bad magic"),
        (lambda d: d[:40] + bytes([d[40] ^ 1]) + d[41:], "checksum mismatch"),
        (lambda d: d + b"extra", "after its trailer"),
        (lambda d: d[:-11] + b"0000000000\n", "malformed|checksum"),
        (lambda d: STREAM_MAGIC + (STREAM_CHUNK_BYTES + 1).to_bytes(4, "big"), "chunk of"),
    ],
    ids=["magic", "flipped-bit", "trailing-bytes", "forged-trailer", "oversized-chunk"],
)
def test_an_altered_stream_is_refused(damage: Any, message: str) -> None:
    data = damage(_stream(os.urandom(5000)))
    reader = StreamReader(1 << 30)
    with pytest.raises(FrameError, match=message):
        reader.feed(data)
        reader.finish()


def test_a_stream_over_the_limit_is_refused_before_it_is_kept() -> None:
    reader = StreamReader(max_bytes=10_000)
    with pytest.raises(FrameError, match="exceeds 10000 bytes"):
        reader.feed(_stream(os.urandom(20_000)))


# --------------------------------------------------------------------------- the plan


def _run_plan() -> RunPlan:
    return RunPlan(
        run_id="r-1",
        attempt=0,
        image_ref="127.0.0.1:5000/x@sha256:" + "a" * 64,
        expected_rootfs_digest="sha256:" + "b" * 64,
        runtime="gvisor",
        command=["true"],
        params={},
        seed=1,
        metrics=[],
        expect={},
        inputs=[PlanInput(role="model", name="m", host_path=Path("/m"), sha256="c" * 64)],
        timeout_s=60,
        cpus=1.0,
        memory_mib=256,
        pids=64,
        spec_digest="s",
        lock_digest="l",
        spec_name="n",
    )


def test_the_hold_travels_in_the_plan_and_older_plans_keep_their_shape() -> None:
    held = _run_plan().agent_plan(emit_results=True, hold_s=90)
    parsed = parse_agent_plan(json.loads(encode_agent_plan(held)))
    assert parsed == held and (parsed["collect"], parsed["hold_s"]) == ("exec", 90)
    plain = parse_agent_plan(json.loads(encode_agent_plan(_run_plan().agent_plan())))
    assert "collect" not in plain and "hold_s" not in plain


@pytest.mark.parametrize(
    ("change", "field"),
    [({"collect": "log"}, "collect"), ({"hold_s": 0}, "hold_s"), ({"hold_s": 10**9}, "hold_s"),
     ({"hold_s": "600"}, "hold_s")],
)
def test_a_bad_hold_is_named(change: dict[str, Any], field: str) -> None:
    with pytest.raises(PlanError) as err:
        parse_agent_plan({**_run_plan().agent_plan(hold_s=60), **change})
    assert err.value.field == field


# --------------------------------------------------------------------------- the agent side

# A stand-in for the evaluation: writes results, then the real agent main() holds them.
AGENT = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    import runner.agent.__main__ as agent

    def run_plan(plan, results, plan_sha256=None, before=None):
        (results / "logs").mkdir(parents=True, exist_ok=True)
        (results / "summary.json").write_text('{"outcome": "completed"}')
        (results / "logs" / "big.bin").write_bytes(bytes(range(256)) * 8192)
        return int(sys.argv[2])

    agent.run_plan = run_plan
    sys.exit(agent.main(["run", "--plan", sys.argv[1], "--results", sys.argv[3]]))
    """
)


def _agent_env(tmp_path: Path) -> dict[str, str]:
    return {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "EVALRUN_AGENT_SOCKET": str(tmp_path / "agent.sock"),
    }


def _start_holding_agent(tmp_path: Path, exit_code: int, hold_s: int) -> subprocess.Popen[str]:
    plan = tmp_path / "plan.json"
    plan.write_bytes(encode_agent_plan(_run_plan().agent_plan(emit_results=True, hold_s=hold_s)))
    proc = subprocess.Popen(
        [sys.executable, "-c", AGENT, str(plan), str(exit_code), str(tmp_path / "results")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_agent_env(tmp_path),
        cwd=tmp_path,
    )
    assert proc.stdout is not None
    for line in proc.stdout:
        if READY_RE.match(line.strip()):
            assert line.strip() == ready_line(exit_code)
            return proc
    raise AssertionError(f"no ready line; stderr: {proc.stderr.read() if proc.stderr else ''}")


def _agent_cmd(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "runner.agent", *args],
        capture_output=True,
        env=_agent_env(tmp_path),
        cwd=tmp_path,
        timeout=60,
        check=False,
    )


def test_the_agent_holds_emits_and_exits_with_its_real_code_on_ack(tmp_path: Path) -> None:
    proc = _start_holding_agent(tmp_path, exit_code=20, hold_s=60)
    try:
        emitted = _agent_cmd(tmp_path, "emit-results", "--results", str(tmp_path / "results"))
        assert emitted.returncode == 0, emitted.stderr
        again = _agent_cmd(tmp_path, "emit-results", "--results", str(tmp_path / "results"))
        assert again.stdout == emitted.stdout  # a retry gets the same bytes
        receiver = StreamReceiver(tmp_path / "spool")
        receiver.feed(emitted.stdout)
        collected = receiver.unpack(tmp_path / "collected")
        assert collected.problems == []
        assert sorted(collected.files) == ["logs/big.bin", "summary.json"]
        assert (tmp_path / "collected" / "logs" / "big.bin").read_bytes() == (
            tmp_path / "results" / "logs" / "big.bin"
        ).read_bytes()
        assert proc.poll() is None  # still holding until acknowledged
        acked = _agent_cmd(tmp_path, "ack", "--plan", str(tmp_path / "plan.json"))
        assert acked.returncode == 0 and acked.stdout.decode().strip() == "ok exit=20"
        assert proc.wait(timeout=30) == 20
        assert "acknowledged" in (proc.stderr.read() if proc.stderr else "")
        late = _agent_cmd(tmp_path, "emit-results", "--results", str(tmp_path / "results"))
        assert late.returncode == NOT_HOLDING_EXIT and late.stdout == b""
        assert _agent_cmd(tmp_path, "ack").returncode == NOT_HOLDING_EXIT
    finally:
        proc.kill()


def test_an_unacknowledged_hold_expires_with_the_real_exit_code(tmp_path: Path) -> None:
    t0 = time.monotonic()
    proc = _start_holding_agent(tmp_path, exit_code=3, hold_s=1)
    assert proc.wait(timeout=30) == 3
    assert time.monotonic() - t0 < 20
    assert "hold expired after 1 s" in (proc.stderr.read() if proc.stderr else "")


def test_emit_refuses_while_no_agent_holds(tmp_path: Path) -> None:
    (tmp_path / "results").mkdir()
    proc = _agent_cmd(tmp_path, "emit-results", "--results", str(tmp_path / "results"))
    assert proc.returncode == NOT_HOLDING_EXIT and proc.stdout == b""
    assert b"no agent holds finished results" in proc.stderr


def test_the_agent_tees_the_evaluation_output_live_and_to_its_files(tmp_path: Path) -> None:
    script = textwrap.dedent(
        """
        import sys
        from pathlib import Path
        from runner.agent.__main__ import run_teed
        cmd = [sys.executable, "-c",
               "import sys; print('to stdout'); print('to stderr', file=sys.stderr); sys.exit(7)"]
        rc = run_teed(cmd, {"PATH": "/usr/bin:/bin"}, Path(sys.argv[1]), 30)
        print(f"rc={rc}")
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path)],
        capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)},
        timeout=60, check=False,
    )
    assert proc.stdout.splitlines() == ["to stdout", "rc=7"]
    assert proc.stderr.splitlines() == ["to stderr"]
    assert (tmp_path / "evaluation.stdout").read_text() == "to stdout\n"
    assert (tmp_path / "evaluation.stderr").read_text() == "to stderr\n"


def test_an_evaluation_past_its_timeout_is_killed(tmp_path: Path) -> None:
    rc = agent.run_teed([sys.executable, "-c", "import time; time.sleep(60)"], {}, tmp_path, 1)
    assert rc is None


# --------------------------------------------------------------------------- the runner side


def _tar(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _previous(dest: Path) -> None:
    dest.mkdir()
    (dest / "earlier.txt").write_text("from an earlier pod")


def test_a_stream_cut_half_way_writes_nothing_and_a_retry_collects(tmp_path: Path) -> None:
    dest = tmp_path / "results"
    _previous(dest)
    data = _stream(_tar({"summary.json": b"{}", "big.bin": os.urandom(3 * STREAM_CHUNK_BYTES)}))
    cut = StreamReceiver(tmp_path)
    cut.feed(data[: len(data) // 2])
    collected = cut.unpack(dest)
    assert collected.files == [] and "truncated" in collected.problems[0]
    assert sorted(p.name for p in dest.iterdir()) == ["earlier.txt"]
    retry = StreamReceiver(tmp_path)
    for i in range(0, len(data), 65536):
        retry.feed(data[i : i + 65536])
    collected = retry.unpack(dest)
    assert collected.problems == [] and sorted(collected.files) == ["big.bin", "summary.json"]
    assert sorted(p.name for p in dest.iterdir()) == ["big.bin", "summary.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results"]  # no spool left behind


@pytest.mark.parametrize("bad", ["../escape", "/etc/passwd", "a//b"])
def test_a_stream_with_an_unsafe_member_extracts_nothing(tmp_path: Path, bad: str) -> None:
    dest = tmp_path / "results"
    _previous(dest)
    receiver = StreamReceiver(tmp_path)
    receiver.feed(_stream(_tar({"summary.json": b"{}", bad: b"x"})))
    collected = receiver.unpack(dest)
    assert collected.files == [] and collected.problems
    assert sorted(p.name for p in dest.iterdir()) == ["earlier.txt"]
    assert not (tmp_path / "escape").exists()


def test_exec_frames_are_demultiplexed_until_the_status() -> None:
    frames = [
        (ABNF.OPCODE_BINARY, b"\x01" + STREAM_MAGIC),
        (ABNF.OPCODE_PING, b""),
        (ABNF.OPCODE_BINARY, b"\x02agent: note\n"),
        (ABNF.OPCODE_BINARY, b"\x01more"),
        (ABNF.OPCODE_BINARY, b"\x03" + json.dumps({"status": "Success"}).encode()),
    ]
    out = bytearray()
    ran = read_exec_frames(iter(frames).__next__, out.extend, what="exec")
    assert bytes(out) == STREAM_MAGIC + b"more"
    assert (ran.exit_code, ran.stderr, ran.stdout_bytes) == (0, "agent: note\n", len(out))
    failure = {
        "status": "Failure",
        "reason": "NonZeroExitCode",
        "message": "command terminated with non-zero exit code: 75",
        "details": {"causes": [{"reason": "ExitCode", "message": "75"}]},
    }
    ran = read_exec_frames(
        iter([(ABNF.OPCODE_BINARY, b"\x03" + json.dumps(failure).encode())]).__next__,
        out.extend,
        what="exec",
    )
    assert ran.exit_code == NOT_HOLDING_EXIT


def test_an_exec_stream_that_breaks_before_its_status_is_transient() -> None:
    def broken() -> tuple[int, bytes]:
        raise WebSocketConnectionClosedException("gone")

    with pytest.raises(TransientKubernetesError, match="cut after 0 bytes"):
        read_exec_frames(broken, lambda b: None, what="exec emit-results", name="p")
    closed = iter([(ABNF.OPCODE_BINARY, b"\x01abc"), (ABNF.OPCODE_CLOSE, b"")]).__next__
    with pytest.raises(TransientKubernetesError, match="closed after 3 bytes without a status"):
        read_exec_frames(closed, lambda b: None, what="exec")


class _LogResponse:
    def __init__(self, chunks: list[bytes]) -> None:
        self.chunks = chunks

    def stream(self, amt: int, decode_content: bool) -> Any:
        yield from self.chunks

    def release_conn(self) -> None:
        pass


def test_the_log_follower_streams_through_the_client_and_resumes_without_repeats() -> None:
    # the real generated client (it validates every argument), answering from a script
    api = k8s.ApiClient(k8s.Configuration(host="http://api.invalid"))
    sessions = [[b"line 1\nli", b"ne 2\n"], [b"line 1\nline 2\nline 3\n"]]
    calls: list[dict[str, Any]] = []

    def call_api(*args: Any, **kwargs: Any) -> Any:
        calls.append(kwargs)
        return SimpleNamespace(status=200, response=_LogResponse(sessions[len(calls) - 1]))

    api.call_api = call_api  # type: ignore[method-assign]
    running = iter([True, False])  # the stream breaks once while the container runs
    got = bytearray()
    follower = PodLogFollower(
        api, "ns", "pod", "agent", got.extend, still_running=lambda: next(running, False)
    ).start()
    assert follower.done.wait(30)
    assert follower.error is None
    assert bytes(got) == b"line 1\nline 2\nline 3\n"
    assert [c["_request_timeout"] for c in calls] == [(30, LOG_QUIET_S)] * 2


@pytest.mark.parametrize("wrap", [str, lambda body: repr(body.encode())])
def test_a_refused_exec_handshake_names_the_api_servers_reason(wrap: Any) -> None:
    from runner.adapters.kube_streams import _handshake_message

    body = json.dumps({"kind": "Status", "code": 403, "message": 'pods "p" is forbidden: '
                       'cannot get resource "pods/exec"'})
    text = f"Handshake status 403 Forbidden -+-+- {{'audit-id': 'x'}} -+-+- {wrap(body)}"
    assert _handshake_message(text) == 'pods "p" is forbidden: cannot get resource "pods/exec"'
    assert _handshake_message("Handshake status 500 oops") == "Handshake status 500 oops"


# --------------------------------------------------------------------------- live output


def test_live_lines_are_split_intercepted_logged_and_kept() -> None:
    seen: list[OutputLine] = []
    relay = LineRelay("r-1", seen.append, keep=3, intercept=lambda t: bool(READY_RE.match(t)))
    relay.feed("log", b"one\r\ntw")
    relay.feed("log", b"o\n" + ready_line(0).encode() + b"\n" + b"x" * (MAX_LINE_BYTES + 5))
    relay.close()
    texts = [line.text for line in seen]
    assert texts[:2] == ["one", "two"]
    assert texts[2:] == ["x" * MAX_LINE_BYTES, "xxxxx"]
    assert ready_line(0) not in texts
    assert list(relay.tail) == texts[-3:]


# --------------------------------------------------------------------------- pod problems


def _waiting_pod(reason: str, message: str) -> Any:
    waiting = SimpleNamespace(reason=reason, message=message)
    status = SimpleNamespace(
        name="agent", image="img", state=SimpleNamespace(waiting=waiting)
    )
    return SimpleNamespace(
        metadata=SimpleNamespace(creation_timestamp=None),
        status=SimpleNamespace(conditions=[], container_statuses=[status], reason=None),
    )


def test_pod_problems_name_image_volume_support_and_altered_blobs_at_once() -> None:
    grace = {"unschedulable": 60.0, "image_pull": 60.0}
    unsupported = _waiting_pod(
        "CreateContainerConfigError", "failed to create: image volumes are not supported"
    )
    assert pod_problem(unsupported, time.time(), grace) == (
        "ImageVolumeUnsupported", "failed to create: image volumes are not supported")
    digest = "sha256:" + "1" * 64
    altered = _waiting_pod(
        "ErrImagePull",
        f"failed commit: unexpected commit digest {digest}, expected sha256:{'2' * 64}",
    )
    assert pod_problem(altered, time.time(), grace)[0] == "DigestMismatch"
    assert pod_problem(_waiting_pod("ErrImagePull", "timeout"), time.time(), grace) is None
    # a malformed artifact fails to mount: an infrastructure problem after the grace, not exit 4
    mount = _waiting_pod(
        "CreateContainerError",
        "failed to mount image volume: ImageVolumeMountFailed: failed to unpack image volume: "
        "mismatched image rootfs and manifest layers",
    )
    assert pod_problem(mount, time.time(), grace) is None
    assert pod_problem(mount, time.time(), {**grace, "image_pull": -1.0})[0] == (
        "CreateContainerError")

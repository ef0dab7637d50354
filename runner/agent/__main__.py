"""Agent entry point: ``python -m runner.agent {run,rootfs-digest,emit-results,ack}``.

``run`` executes one evaluation inside the sandbox:
preflight (rootfs digest, input digests, expected environment) → environment
capture → the evaluation command → metrics from the per-sample outputs.
Everything it learns goes to the results directory; the runner collects,
re-checks and signs it. The plan, the exit codes (:class:`AgentExit`) and the
results frame are defined once, in :mod:`runner.shared.protocol`.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import resource
import stat
import subprocess
import sys
import tarfile
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, Any

from runner.agent.capture import capture_environment
from runner.agent.hints import missing_input_hint, stderr_text
from runner.agent.hold import acknowledge, emit_stream, hold, is_holding
from runner.agent.inputs import check_input, failure_reason
from runner.agent.rootfs import rootfs_digest, rootfs_table
from runner.agent.verification import RootfsVerification
from runner.shared.metrics import (
    SampleFormatError,
    compute_available,
    partial_reason,
    perturbation_effects,
    read_outputs,
    read_samples,
    select_perturbed,
)
from runner.shared.protocol import (
    DEFAULT_HOLD_S,
    MAX_RESULT_FILE_BYTES,
    MAX_RESULT_FILES,
    NOT_HOLDING_EXIT,
    PLAN_FILE,
    RESULTS_MOUNT,
    AgentExit,
    AgentPlan,
    PlanError,
    encode_frame,
    read_agent_plan,
)
from runner.shared.tarformat import MAX_DEPTH, file_header, member_name_reason


class EventLog:
    """JSON-lines events with a stable schema: ts, level, event, run_id, plus fields."""

    def __init__(self, path: Path, run_id: str) -> None:
        self._fh = path.open("a", encoding="utf-8")
        self._run_id = run_id

    def emit(self, event: str, level: str = "info", **fields: Any) -> None:
        record = {
            "ts": time.time(),
            "level": level,
            "event": event,
            "run_id": self._run_id,
            "source": "agent",
            **fields,
        }
        self._fh.write(json.dumps(record, sort_keys=True, default=str) + "\n")
        self._fh.flush()

    def close(self) -> None:
        self._fh.close()


def _version_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", text))


def version_satisfies(version: str, specifier: str) -> bool:
    """Check ``version`` against a comma-separated specifier like ``>=550,<600``.

    ``==550`` and ``==550.*`` match every 550.x; a version with no number never
    satisfies anything. Raises ValueError for a clause it cannot read.
    """
    have = _version_tuple(version)
    clauses = [c.strip() for c in specifier.split(",") if c.strip()]
    if not clauses:
        raise ValueError(f"empty version specifier {specifier!r}")
    for clause in clauses:
        match = re.fullmatch(r"(==|!=|>=|<=|>|<)\s*([0-9]+(?:\.[0-9]+)*)(\.\*)?", clause)
        if not match or (match.group(3) and match.group(1) not in ("==", "!=")):
            raise ValueError(f"unsupported version specifier clause {clause!r}")
        if not have:
            return False
        op, want_text, _ = match.groups()
        want = _version_tuple(want_text)
        width = max(len(have), len(want))
        a = have + (0,) * (width - len(have))
        b = want + (0,) * (width - len(want))
        prefix_equal = have[: len(want)] == want
        ok = {
            "==": prefix_equal,
            "!=": not prefix_equal,
            ">=": a >= b,
            "<=": a <= b,
            ">": a > b,
            "<": a < b,
        }[op]
        if not ok:
            return False
    return True


GPU_EXPECTATIONS = (
    "driver",
    "cuda",
    "gpu_product",
    "gpu_count",
    "mig",
    "mig_profile",
    "mig_count",
    "ecc",
)


def _failed(check: str, expected: Any, found: Any, reason: str) -> dict[str, Any]:
    return {"check": check, "expected": expected, "found": found, "passed": False, "reason": reason}


def _version_check(check: str, specifier: str, found: Any) -> dict[str, Any]:
    if not isinstance(found, str) or not found:
        return _failed(check, specifier, found, "version not readable from NVML")
    try:
        passed = version_satisfies(found, specifier)
    except ValueError as exc:
        return _failed(check, specifier, found, f"invalid specifier: {exc}")
    return {"check": check, "expected": specifier, "found": found, "passed": passed}


def _per_gpu(gpus: list[Any], field: str) -> list[Any]:
    return [g.get(field) if isinstance(g, dict) else None for g in gpus]


def _mode(state: Any) -> str:
    """'enabled', 'disabled', 'not_supported' (the GPU cannot have it) or 'unknown'."""
    if isinstance(state, dict):
        if state.get("current") in ("enabled", "disabled"):
            return str(state["current"])
        if str(state.get("unsupported", "")).startswith("NVMLError_NotSupported"):
            return "not_supported"
    return "unknown"


def _mig_profile_of(name: Any) -> str | None:
    """'NVIDIA H100 80GB HBM3 MIG 1g.10gb' → '1g.10gb' (NVML's MIG device names)."""
    if not isinstance(name, str):
        return None
    match = re.search(r"\bMIG\s+([0-9]+g\.[0-9]+gb(?:\+[a-z]+)?)\s*$", name)
    return match.group(1) if match else None


def _mig_device_checks(expect: dict[str, Any], gpus: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The MIG devices NVML shows the container: their profile and their number."""
    if expect.get("mig_profile") is None and expect.get("mig_count") is None:
        return []
    devices = [d for g in gpus for d in g.get("mig_devices") or [] if isinstance(d, dict)]
    profiles = [_mig_profile_of(d.get("name")) for d in devices]
    checks: list[dict[str, Any]] = []
    if expect.get("mig_profile") is not None:
        want = expect["mig_profile"]
        ok = bool(profiles) and all(p == want for p in profiles)
        checks.append({"check": "mig_profile", "expected": want, "found": profiles, "passed": ok})
    if expect.get("mig_count") is not None:
        checks.append(
            {
                "check": "mig_count",
                "expected": expect["mig_count"],
                "found": len(devices),
                "passed": len(devices) == expect["mig_count"],
            }
        )
    return checks


def check_expected_environment(expect: dict[str, Any], gpu: dict[str, Any]) -> list[dict[str, Any]]:
    """Compare the spec's expected environment with what NVML saw; one entry per check.

    Fails closed: an expectation this agent does not know, a field NVML could not
    read, or a specifier it cannot parse is a failed check, never a pass.
    Every entry has ``check``, ``expected``, ``found`` and ``passed``.
    """
    checks: list[dict[str, Any]] = []
    for key in sorted(expect):
        if key not in GPU_EXPECTATIONS and expect[key] is not None:
            checks.append(
                _failed(key, expect[key], None, "this agent does not know how to check it")
            )
    wants_gpu = any(expect.get(k) is not None for k in GPU_EXPECTATIONS)
    if not wants_gpu:
        return checks
    if not gpu.get("visible"):
        checks.append(
            {"check": "gpu_visible", "expected": True, "found": gpu.get("reason"), "passed": False}
        )
        return checks
    gpus = [g for g in gpu.get("gpus") or [] if isinstance(g, dict)]
    if expect.get("driver") is not None:
        checks.append(_version_check("driver", expect["driver"], gpu.get("driver_version")))
    if expect.get("cuda") is not None:
        checks.append(_version_check("cuda", expect["cuda"], gpu.get("cuda_driver_version")))
    if expect.get("gpu_product") is not None:
        pattern = expect["gpu_product"]
        names = _per_gpu(gpus, "name")
        try:
            regex = re.compile(pattern)
        except re.error as exc:
            checks.append(_failed("gpu_product", pattern, names, f"invalid pattern: {exc}"))
        else:
            ok = bool(names) and all(isinstance(n, str) and regex.search(n) for n in names)
            checks.append(
                {"check": "gpu_product", "expected": pattern, "found": names, "passed": ok}
            )
    if expect.get("gpu_count") is not None:
        count = gpu.get("count")
        checks.append(
            {
                "check": "gpu_count",
                "expected": expect["gpu_count"],
                "found": count,
                "passed": isinstance(count, int) and count == expect["gpu_count"],
            }
        )
    if expect.get("mig") is not None:
        modes = [_mode(state) for state in _per_gpu(gpus, "mig")]
        if expect["mig"] == "required":
            ok = bool(modes) and all(m == "enabled" for m in modes)
        elif expect["mig"] == "forbidden":
            ok = bool(modes) and all(m in ("disabled", "not_supported") for m in modes)
        else:
            ok = False
        checks.append({"check": "mig", "expected": expect["mig"], "found": modes, "passed": ok})
    checks.extend(_mig_device_checks(expect, gpus))
    if expect.get("ecc") is not None:
        modes = [_mode(state) for state in _per_gpu(gpus, "ecc")]
        ok = expect["ecc"] == "required" and bool(modes) and all(m == "enabled" for m in modes)
        checks.append({"check": "ecc", "expected": expect["ecc"], "found": modes, "passed": ok})
    return checks


def _write_json(path: Path, data: Any) -> None:
    path.write_text(
        json.dumps(data, indent=2, sort_keys=True, default=str) + "\n", encoding="utf-8"
    )


def run(plan_path: Path, results: Path) -> int:
    """Read the plan at ``plan_path`` and run it (:func:`run_plan`); a bad plan exits 2."""
    try:
        plan = read_agent_plan(plan_path)
    except (OSError, PlanError) as exc:
        print(f"agent: cannot use the plan {plan_path}: {exc}", file=sys.stderr)
        return AgentExit.BAD_PLAN
    return run_plan(plan, results)


def run_plan(plan: AgentPlan, results: Path) -> int:
    """Preflight, evaluation and metrics for ``plan``; always leaves ``summary.json`` behind."""
    (results / "logs").mkdir(parents=True, exist_ok=True)
    log = EventLog(results / "logs" / "events.jsonl", plan["run_id"])
    summary: dict[str, Any] = {"run_id": plan["run_id"], "started": time.time()}
    try:
        code = _run(plan, results, log, summary)
    except Exception as exc:  # the agent must always leave a summary behind
        log.emit("agent_error", level="error", error=repr(exc))
        summary.update(outcome="agent_error", reason=repr(exc))
        code = AgentExit.AGENT_ERROR
    summary["finished"] = time.time()
    summary["exit_code"] = int(code)
    _write_json(results / "summary.json", summary)
    log.close()
    return code


def _run(plan: AgentPlan, results: Path, log: EventLog, summary: dict[str, Any]) -> AgentExit:
    # --- preflight: image content (the digest table now; what is used, while it runs)
    t0 = time.monotonic()
    rootfs = RootfsVerification(plan)
    preflight: dict[str, Any] = {"rootfs": rootfs.begin(), "inputs": []}
    log.emit(
        "preflight_rootfs",
        mode=preflight["rootfs"]["mode"],
        digest=preflight["rootfs"].get("found"),
        entries=preflight["rootfs"].get("entries"),
        duration_s=round(time.monotonic() - t0, 4),
        passed=preflight["rootfs"].get("passed"),
    )
    # --- preflight: every input file, before use (streamed; directories file by file)
    t_inputs = time.monotonic()
    preflight["inputs"] = [check_input(item) for item in plan["inputs"]]
    log.emit(
        "preflight_inputs",
        inputs=len(preflight["inputs"]),
        bytes=sum(int(i.get("bytes", 0)) for i in preflight["inputs"]),
        duration_s=round(time.monotonic() - t_inputs, 4),
        passed=all(i["passed"] for i in preflight["inputs"]),
    )
    env = capture_environment(plan["image_ref"])
    _write_json(results / "env.json", env)
    preflight["environment"] = check_expected_environment(plan["expect"], env["gpu"])
    preflight["duration_s"] = round(time.monotonic() - t0, 4)
    _write_json(results / "preflight.json", preflight)
    log.emit("preflight_done", duration_s=preflight["duration_s"])
    bad_inputs = [i for i in preflight["inputs"] if not i["passed"]]
    if rootfs.failed_early or bad_inputs:
        summary.update(
            outcome="integrity_failure",
            reason=preflight["rootfs"]["reason"]
            if rootfs.failed_early
            else failure_reason(bad_inputs),
        )
        log.emit("preflight_failed", level="error", reason=summary["reason"])
        return AgentExit.INTEGRITY
    bad_env = [c for c in preflight["environment"] if not c["passed"]]
    if bad_env:
        summary.update(
            outcome="environment_mismatch",
            reason="; ".join(
                f"{c['check']}: expected {c['expected']}, found {c['found']}" for c in bad_env
            ),
        )
        log.emit("environment_mismatch", level="error", reason=summary["reason"])
        return AgentExit.ENVIRONMENT
    try:
        code = _evaluate(plan, results, log, summary, rootfs.child_env())
    finally:
        preflight["rootfs"] = rootfs.finish()
        _write_json(results / "preflight.json", preflight)
        log.emit(
            "rootfs_verified",
            level="info" if preflight["rootfs"]["passed"] else "error",
            **{k: v for k, v in preflight["rootfs"].items() if k not in ("how", "failures")},
        )
    if not preflight["rootfs"]["passed"]:
        # results of an evaluation that ran on other content are never accepted
        summary.update(outcome="integrity_failure", reason=preflight["rootfs"]["reason"])
        return AgentExit.INTEGRITY
    return code


def _evaluate(
    plan: AgentPlan,
    results: Path,
    log: EventLog,
    summary: dict[str, Any],
    extra_env: dict[str, str],
) -> AgentExit:
    """The evaluation command, then metrics from its per-sample outputs."""
    seed = int(plan["seed"])
    output = results / "predictions.jsonl"
    child_env = {
        "PATH": os.environ.get("PATH", "/usr/local/bin:/usr/bin:/bin"),
        "HOME": "/tmp",
        "LANG": "C.UTF-8",
        "PYTHONHASHSEED": str(seed),
        "PYTHONDONTWRITEBYTECODE": "1",
        "CUBLAS_WORKSPACE_CONFIG": ":4096:8",
        "EVALRUN_RUN_ID": plan["run_id"],
        "EVALRUN_SEED": str(seed),
        "EVALRUN_PARAMS": json.dumps(plan["params"], sort_keys=True),
        "EVALRUN_OUTPUT": str(output),
        **extra_env,
    }
    datasets = {}
    for item in plan["inputs"]:
        if item["role"] == "model":
            child_env["EVALRUN_MODEL"] = item["path"]
        else:
            datasets[item["name"]] = item["path"]
            child_env["EVALRUN_DATA_" + re.sub(r"[^A-Z0-9]", "_", item["name"].upper())] = item[
                "path"
            ]
    child_env["EVALRUN_DATASETS"] = json.dumps(datasets, sort_keys=True)
    summary["determinism"] = {
        "PYTHONHASHSEED": str(seed),
        "EVALRUN_SEED": str(seed),
        "CUBLAS_WORKSPACE_CONFIG": ":4096:8",
    }
    log.emit("evaluation_start", command=plan["command"])
    t1 = time.monotonic()
    try:
        rc = run_teed(plan["command"], child_env, results / "logs", plan["timeout_s"])
    except OSError as exc:
        summary.update(outcome="evaluation_failed", reason=f"cannot start command: {exc}")
        log.emit("evaluation_failed", level="error", reason=summary["reason"])
        return AgentExit.EVAL_FAILED
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    duration = round(time.monotonic() - t1, 4)
    log.emit("evaluation_end", returncode=rc, duration_s=duration, peak_rss_kib=peak_kib)
    summary["evaluation"] = {"returncode": rc, "duration_s": duration, "peak_rss_kib": peak_kib}
    if rc is None:
        summary.update(outcome="timeout", reason=f"evaluation exceeded {plan['timeout_s']} s")
        return AgentExit.EVAL_TIMEOUT
    if rc != 0:
        reason = f"evaluation command exited {rc}"
        hint = missing_input_hint(
            stderr=stderr_text(results / "logs" / "evaluation.stderr"),
            command=plan["command"],
            env=child_env,
            datasets=datasets,
        )
        summary.update(outcome="evaluation_failed", reason=reason)
        if hint:
            summary["hint"] = hint
        return AgentExit.EVAL_FAILED

    # --- metrics from the per-sample outputs
    t2 = time.monotonic()
    try:
        read = read_outputs(output, plan["metrics"])
    except (OSError, SampleFormatError) as exc:
        summary.update(outcome="bad_output", reason=f"per-sample output unusable: {exc}")
        log.emit("bad_output", level="error", reason=summary["reason"])
        return AgentExit.EVAL_OUTPUT
    samples = read.samples
    log.emit("data_loaded", samples=len(samples))
    values, unusable = compute_available(plan["metrics"], samples, seed, read.unusable)
    if unusable:
        # What could be computed is still written (the runner recomputes it); the run fails.
        computed = [v.as_dict() for v in values]
        _write_json(
            results / "metrics.json", {"seed": seed, "metrics": computed, "unusable": unusable}
        )
        summary.update(
            outcome="bad_output", reason=partial_reason([v.name for v in values], unusable)
        )
        log.emit("bad_output", level="error", reason=summary["reason"])
        return AgentExit.EVAL_OUTPUT
    try:
        perturbations = _run_perturbations(plan, samples, child_env, results, log, seed)
    except (OSError, SampleFormatError, subprocess.SubprocessError) as exc:
        summary.update(outcome="bad_output", reason=f"perturbation failed: {exc}")
        log.emit("bad_output", level="error", reason=summary["reason"])
        return AgentExit.EVAL_OUTPUT
    report: dict[str, Any] = {"seed": seed, "metrics": [v.as_dict() for v in values]}
    if perturbations:
        report["perturbations"] = perturbations
    _write_json(results / "metrics.json", report)
    log.emit(
        "metrics_done",
        duration_s=round(time.monotonic() - t2, 4),
        metrics={v.name: v.value for v in values},
    )
    summary.update(outcome="completed")
    return AgentExit.OK


# After the evaluation exits, its output pipes get this long to drain (a leftover child
# process may keep them open; its output is then cut, never waited for).
_DRAIN_S = 5.0


def _tee(source: IO[bytes], keep: IO[bytes], live: IO[bytes]) -> None:
    """Copy ``source`` to the file ``keep`` and, as it arrives, to the agent's own ``live``."""
    try:
        while chunk := source.read1(64 * 1024):  # type: ignore[attr-defined]
            keep.write(chunk)
            live.write(chunk)
            live.flush()
    except (OSError, ValueError):
        pass  # the file was closed after the drain time, or the live stream is gone


def run_teed(command: list[str], env: dict[str, str], logs: Path, timeout_s: int) -> int | None:
    """Run the evaluation; its stdout/stderr go to ``logs/evaluation.{stdout,stderr}`` and,
    live, to the agent's own stdout/stderr (the container log the runner follows).

    Returns the exit code, or None when it ran past ``timeout_s`` (then it is killed).
    """
    with (
        (logs / "evaluation.stdout").open("wb") as out,
        (logs / "evaluation.stderr").open("wb") as err,
    ):
        proc = subprocess.Popen(
            command,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
        )
        assert proc.stdout is not None and proc.stderr is not None
        pumps = [
            threading.Thread(target=_tee, args=(proc.stdout, out, sys.stdout.buffer), daemon=True),
            threading.Thread(target=_tee, args=(proc.stderr, err, sys.stderr.buffer), daemon=True),
        ]
        for pump in pumps:
            pump.start()
        try:
            rc: int | None = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            rc = None
        drain_until = time.monotonic() + _DRAIN_S
        for pump in pumps:
            pump.join(max(0.0, drain_until - time.monotonic()))
    return rc


def _run_perturbations(
    plan: AgentPlan,
    baseline: list[dict[str, Any]],
    child_env: dict[str, str],
    results: Path,
    log: EventLog,
    seed: int,
) -> list[dict[str, Any]]:
    """Evaluate each declared perturbation: by selection, or by re-running the command."""
    out = []
    for pert in plan["perturbations"]:
        t0 = time.monotonic()
        perturbed: Sequence[Mapping[str, Any]]
        if pert["kind"] in ("subsample", "slice"):
            perturbed = select_perturbed(pert, baseline, seed)
        else:
            folder = results / "perturbations"
            folder.mkdir(exist_ok=True)
            target = folder / f"{pert['name']}.jsonl"
            env = {
                **child_env,
                "EVALRUN_OUTPUT": str(target),
                "EVALRUN_PERTURBATION": json.dumps(
                    {**pert, "seed": pert.get("seed") or seed}, sort_keys=True
                ),
            }
            with (results / "logs" / f"perturbation-{pert['name']}.stderr").open("wb") as err:
                proc = subprocess.run(
                    plan["command"],
                    env=env,
                    stdout=subprocess.DEVNULL,
                    stderr=err,
                    stdin=subprocess.DEVNULL,
                    timeout=plan["timeout_s"],
                    check=False,
                )
            if proc.returncode != 0:
                raise SampleFormatError(
                    f"{pert['name']}: the evaluation exited {proc.returncode} under the "
                    "perturbation (does it read EVALRUN_PERTURBATION?)"
                )
            perturbed = read_samples(target, plan["metrics"])
        effects = perturbation_effects(plan["metrics"], pert, baseline, perturbed, seed)
        log.emit(
            "perturbation_done",
            name=pert["name"],
            kind=pert["kind"],
            duration_s=round(time.monotonic() - t0, 4),
        )
        out.append(effects)
    return out


def results_tar(results: Path, notes: IO[str] | None = None) -> bytes:
    """The results directory as one tar the runner's strict reader accepts.

    Regular files only, walked without following links, each with the shared
    deterministic header; a link, a special file, a name the reader would refuse,
    a file over :data:`MAX_RESULT_FILE_BYTES` or beyond :data:`MAX_RESULT_FILES`
    is left out, with one line on ``notes`` (stderr) saying so.
    """
    buf = io.BytesIO()
    write_results_tar(results, buf, notes)
    return buf.getvalue()


def write_results_tar(results: Path, fileobj: Any, notes: IO[str] | None = None) -> None:
    """:func:`results_tar`, written as it is made to ``fileobj`` (anything with ``write``)."""
    notes = notes or sys.stderr
    count = 0
    # Stream mode: the tar is written as it is made, never held whole in memory.
    with tarfile.open(fileobj=fileobj, mode="w|", format=tarfile.PAX_FORMAT) as tar:
        for rel, path in _result_files(results, "", notes):
            reason = member_name_reason(rel, portable=False)
            if reason is None and count >= MAX_RESULT_FILES:
                reason = f"more than {MAX_RESULT_FILES} result files"
            if reason:
                print(f"agent: results entry {rel!r} not framed: {reason}", file=notes)
                continue
            try:
                fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
            except OSError as exc:
                print(f"agent: results entry {rel!r} not framed: {exc.strerror}", file=notes)
                continue
            with os.fdopen(fd, "rb") as fh:
                st = os.fstat(fd)
                if not stat.S_ISREG(st.st_mode) or st.st_size > MAX_RESULT_FILE_BYTES:
                    print(
                        f"agent: results entry {rel!r} not framed: not a regular file "
                        f"of at most {MAX_RESULT_FILE_BYTES} bytes",
                        file=notes,
                    )
                    continue
                tar.addfile(file_header(rel, st.st_size), fh)
                count += 1


def _result_files(
    folder: Path, prefix: str, notes: IO[str], depth: int = 0
) -> list[tuple[str, Path]]:
    """(relative name, path) of the regular files under ``folder``, in path order; no links."""
    out: list[tuple[str, Path]] = []
    with os.scandir(folder) as it:
        entries = sorted(it, key=lambda e: e.name)
    for entry in entries:
        rel = prefix + entry.name
        if entry.is_symlink():
            print(f"agent: results entry {rel!r} not framed: a symlink", file=notes)
        elif entry.is_dir(follow_symlinks=False):
            if depth >= MAX_DEPTH:
                print(f"agent: results entry {rel!r} not framed: too deep", file=notes)
            else:
                out += _result_files(Path(entry.path), rel + "/", notes, depth + 1)
        elif entry.is_file(follow_symlinks=False):
            out.append((rel, Path(entry.path)))
        else:
            print(f"agent: results entry {rel!r} not framed: not a regular file", file=notes)
    return out


def emit_results(results: Path, out: IO[str] | None = None) -> None:
    """Write the results directory to stdout as one framed, checksummed tar (base64).

    Used where the runner cannot read the results volume (Kubernetes): the frame
    travels on the log stream; the runner checks the checksum and every member.
    """
    stream = out or sys.stdout
    stream.write(encode_frame(results_tar(results)))
    stream.flush()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m runner.agent")
    sub = parser.add_subparsers(dest="command", required=True)
    p_run = sub.add_parser("run", help="run one evaluation from a plan")
    p_run.add_argument("--plan", type=Path, default=Path(PLAN_FILE))
    p_run.add_argument("--results", type=Path, default=Path(RESULTS_MOUNT))
    p_run.add_argument(
        "--emit-results",
        action="store_true",
        help="also write the results as a framed, checksummed tar on stdout",
    )
    sub.add_parser("rootfs-digest", help="print the rootfs content digest of this container")
    sub.add_parser("rootfs-table", help="print the rootfs digest table of this container")
    p_emit = sub.add_parser(
        "emit-results", help="write the held results as one checksummed stream on stdout"
    )
    p_emit.add_argument("--results", type=Path, default=Path(RESULTS_MOUNT))
    p_ack = sub.add_parser("ack", help="tell the holding agent its results are collected")
    p_ack.add_argument("--plan", type=Path, default=Path(PLAN_FILE))
    args = parser.parse_args(argv)
    if args.command == "rootfs-digest":
        digest, count = rootfs_digest("/")
        print(json.dumps({"rootfs_digest": digest, "entries": count}))
        return 0
    if args.command == "rootfs-table":
        sys.stdout.buffer.write(rootfs_table("/"))
        return 0
    if args.command == "emit-results":
        return _emit_held(args.results)
    if args.command == "ack":
        return _ack(args.plan)
    if not args.plan.is_file():
        print(f"agent: plan not found: {args.plan}", file=sys.stderr)
        return AgentExit.BAD_PLAN
    try:
        plan = read_agent_plan(args.plan)
    except (OSError, PlanError) as exc:
        print(f"agent: cannot use the plan {args.plan}: {exc}", file=sys.stderr)
        return AgentExit.BAD_PLAN
    code = run_plan(plan, args.results)
    if plan.get("collect") == "exec":
        # Small results also stay in the pod log, so a runner that attaches after another
        # one collected them (another store) can still seal them; large ones leave by exec only.
        if plan["emit_results"] and _tree_size(args.results) <= LOG_FRAME_MAX_BYTES:
            emit_results(args.results)
        return hold(plan["run_id"], code, plan.get("hold_s", DEFAULT_HOLD_S))
    if args.emit_results or plan["emit_results"]:
        emit_results(args.results)
    return code


# Results up to this size are also left in the pod log as a frame (base64: ~1.4x, under
# the kubelet's default 10 MiB log rotation).
LOG_FRAME_MAX_BYTES = 4 << 20


def _tree_size(root: Path) -> int:
    """Bytes of the regular files under ``root`` (links not followed)."""
    total = 0
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            with contextlib.suppress(OSError):
                st = (Path(dirpath) / name).lstat()
                if stat.S_ISREG(st.st_mode):
                    total += st.st_size
    return total


def _emit_held(results: Path) -> int:
    """``emit-results``: only while the agent holds, so the results are final."""
    if not is_holding():
        print(
            "agent: no agent holds finished results here (still running, or already acknowledged)",
            file=sys.stderr,
        )
        return NOT_HOLDING_EXIT
    emit_stream(results, write_results_tar, sys.stdout.buffer)
    return 0


def _ack(plan_path: Path) -> int:
    """``ack``: the holding agent answers with the exit code it now ends with."""
    try:
        code = acknowledge(read_agent_plan(plan_path)["run_id"])
    except (PlanError, ValueError) as exc:
        print(f"agent: {exc}", file=sys.stderr)
        return 1
    except OSError:
        print("agent: no agent holds results here (already acknowledged?)", file=sys.stderr)
        return NOT_HOLDING_EXIT
    print(f"ok exit={code}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

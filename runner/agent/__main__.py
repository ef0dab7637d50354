"""Agent entry point: ``python -m runner.agent {run,rootfs-digest}``.

``run`` executes one evaluation inside the sandbox:
preflight (rootfs digest, input digests, expected environment) → environment
capture → the evaluation command → metrics from the per-sample outputs.
Everything it learns goes to the results directory; the runner collects,
re-checks and signs it. Exit codes: 0 ok, 3 integrity, 4 environment mismatch,
20 evaluation failed, 21 evaluation output unusable, 2 bad plan.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import resource
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from runner.agent.capture import capture_environment
from runner.agent.rootfs import rootfs_digest
from runner.shared.metrics import (
    SampleFormatError,
    compute_metrics,
    perturbation_effects,
    read_samples,
    select_perturbed,
)

EXIT_OK = 0
EXIT_BAD_PLAN = 2
EXIT_INTEGRITY = 3
EXIT_ENVIRONMENT = 4
EXIT_EVAL_FAILED = 20
EXIT_EVAL_OUTPUT = 21
EXIT_EVAL_TIMEOUT = 22


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


def _sha256_file(path: Path) -> str:
    with path.open("rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


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


GPU_EXPECTATIONS = ("driver", "cuda", "gpu_product", "gpu_count", "mig", "ecc")


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
    plan = json.loads(plan_path.read_text(encoding="utf-8"))
    (results / "logs").mkdir(parents=True, exist_ok=True)
    log = EventLog(results / "logs" / "events.jsonl", plan["run_id"])
    summary: dict[str, Any] = {"run_id": plan["run_id"], "started": time.time()}
    try:
        code = _run(plan, results, log, summary)
    except Exception as exc:  # the agent must always leave a summary behind
        log.emit("agent_error", level="error", error=repr(exc))
        summary.update(outcome="agent_error", reason=repr(exc))
        code = 1
    summary["finished"] = time.time()
    summary["exit_code"] = code
    _write_json(results / "summary.json", summary)
    log.close()
    return code


def _run(plan: dict[str, Any], results: Path, log: EventLog, summary: dict[str, Any]) -> int:
    # --- preflight: image content
    t0 = time.monotonic()
    found_rootfs, entries = rootfs_digest("/")
    expected_rootfs = plan["expected_rootfs_digest"]
    preflight: dict[str, Any] = {
        "rootfs": {
            "expected": expected_rootfs,
            "found": found_rootfs,
            "entries": entries,
            "passed": found_rootfs == expected_rootfs,
        },
        "inputs": [],
    }
    log.emit(
        "preflight_rootfs",
        digest=found_rootfs,
        entries=entries,
        duration_s=round(time.monotonic() - t0, 4),
        passed=found_rootfs == expected_rootfs,
    )
    # --- preflight: every input file, before use
    for item in plan["inputs"]:
        path = Path(item["path"])
        found = _sha256_file(path) if path.is_file() else "missing"
        preflight["inputs"].append(
            {
                "name": item["name"],
                "role": item["role"],
                "expected": item["sha256"],
                "found": found,
                "passed": found == item["sha256"],
            }
        )
    env = capture_environment(plan["image_ref"])
    _write_json(results / "env.json", env)
    preflight["environment"] = check_expected_environment(plan.get("expect") or {}, env["gpu"])
    preflight["duration_s"] = round(time.monotonic() - t0, 4)
    _write_json(results / "preflight.json", preflight)
    log.emit("preflight_done", duration_s=preflight["duration_s"])
    bad_inputs = [i for i in preflight["inputs"] if not i["passed"]]
    if not preflight["rootfs"]["passed"] or bad_inputs:
        summary.update(
            outcome="integrity_failure",
            reason="rootfs digest mismatch"
            if not preflight["rootfs"]["passed"]
            else f"input digest mismatch: {[i['name'] for i in bad_inputs]}",
        )
        log.emit("preflight_failed", level="error", reason=summary["reason"])
        return EXIT_INTEGRITY
    bad_env = [c for c in preflight["environment"] if not c["passed"]]
    if bad_env:
        summary.update(
            outcome="environment_mismatch",
            reason="; ".join(
                f"{c['check']}: expected {c['expected']}, found {c['found']}" for c in bad_env
            ),
        )
        log.emit("environment_mismatch", level="error", reason=summary["reason"])
        return EXIT_ENVIRONMENT

    # --- the evaluation
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
        "EVALRUN_PARAMS": json.dumps(plan.get("params") or {}, sort_keys=True),
        "EVALRUN_OUTPUT": str(output),
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
    with (
        (results / "logs" / "evaluation.stdout").open("wb") as out,
        (results / "logs" / "evaluation.stderr").open("wb") as err,
    ):
        try:
            proc = subprocess.run(
                plan["command"],
                env=child_env,
                stdout=out,
                stderr=err,
                stdin=subprocess.DEVNULL,
                timeout=plan["timeout_s"],
                check=False,
            )
            rc = proc.returncode
        except subprocess.TimeoutExpired:
            rc = None
        except OSError as exc:
            summary.update(outcome="evaluation_failed", reason=f"cannot start command: {exc}")
            log.emit("evaluation_failed", level="error", reason=summary["reason"])
            return EXIT_EVAL_FAILED
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    duration = round(time.monotonic() - t1, 4)
    log.emit("evaluation_end", returncode=rc, duration_s=duration, peak_rss_kib=peak_kib)
    summary["evaluation"] = {"returncode": rc, "duration_s": duration, "peak_rss_kib": peak_kib}
    if rc is None:
        summary.update(outcome="timeout", reason=f"evaluation exceeded {plan['timeout_s']} s")
        return EXIT_EVAL_TIMEOUT
    if rc != 0:
        summary.update(outcome="evaluation_failed", reason=f"evaluation command exited {rc}")
        return EXIT_EVAL_FAILED

    # --- metrics from the per-sample outputs
    t2 = time.monotonic()
    try:
        samples = read_samples(output, plan["metrics"])
    except (OSError, SampleFormatError) as exc:
        summary.update(outcome="bad_output", reason=f"per-sample output unusable: {exc}")
        log.emit("bad_output", level="error", reason=summary["reason"])
        return EXIT_EVAL_OUTPUT
    log.emit("data_loaded", samples=len(samples))
    values = compute_metrics(plan["metrics"], samples, seed)
    try:
        perturbations = _run_perturbations(plan, samples, child_env, results, log, seed)
    except (OSError, SampleFormatError, subprocess.SubprocessError) as exc:
        summary.update(outcome="bad_output", reason=f"perturbation failed: {exc}")
        log.emit("bad_output", level="error", reason=summary["reason"])
        return EXIT_EVAL_OUTPUT
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
    return EXIT_OK


def _run_perturbations(
    plan: dict[str, Any],
    baseline: list[dict[str, Any]],
    child_env: dict[str, str],
    results: Path,
    log: EventLog,
    seed: int,
) -> list[dict[str, Any]]:
    """Evaluate each declared perturbation: by selection, or by re-running the command."""
    out = []
    for pert in plan.get("perturbations") or []:
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


RESULTS_FRAME_BEGIN = "-----BEGIN EVALRUN RESULTS"
RESULTS_FRAME_END = "-----END EVALRUN RESULTS-----"


def emit_results(results: Path, out: Any = None) -> None:
    """Write the results directory to stdout as one framed, checksummed tar (base64).

    Used where the runner cannot read the results volume (Kubernetes): the frame
    travels on the log stream; the runner checks the checksum and every member.
    """
    import base64
    import io
    import tarfile

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
    data = buf.getvalue()
    digest = hashlib.sha256(data).hexdigest()
    stream = out or sys.stdout
    stream.write(f"\n{RESULTS_FRAME_BEGIN} sha256={digest} bytes={len(data)}-----\n")
    encoded = base64.b64encode(data).decode()
    for i in range(0, len(encoded), 76):
        stream.write(encoded[i : i + 76] + "\n")
    stream.write(RESULTS_FRAME_END + "\n")
    stream.flush()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m runner.agent")
    sub = parser.add_subparsers(dest="command", required=True)
    p_run = sub.add_parser("run", help="run one evaluation from a plan")
    p_run.add_argument("--plan", type=Path, default=Path("/evalrun/plan/plan.json"))
    p_run.add_argument("--results", type=Path, default=Path("/evalrun/results"))
    p_run.add_argument(
        "--emit-results",
        action="store_true",
        help="also write the results as a framed, checksummed tar on stdout",
    )
    sub.add_parser("rootfs-digest", help="print the rootfs content digest of this container")
    args = parser.parse_args(argv)
    if args.command == "rootfs-digest":
        digest, count = rootfs_digest("/")
        print(json.dumps({"rootfs_digest": digest, "entries": count}))
        return 0
    if not args.plan.is_file():
        print(f"agent: plan not found: {args.plan}", file=sys.stderr)
        return EXIT_BAD_PLAN
    code = run(args.plan, args.results)
    try:
        wants_frame = bool(json.loads(args.plan.read_text(encoding="utf-8")).get("emit_results"))
    except (OSError, ValueError):
        wants_frame = False
    if args.emit_results or wants_frame:
        emit_results(args.results)
    return code


if __name__ == "__main__":
    sys.exit(main())

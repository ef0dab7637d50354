"""Agent entry point: ``python -m runner.agent {run,rootfs-digest,emit-results,ack}``.

``run`` executes one evaluation inside the sandbox:
preflight (rootfs digest, input digests, expected environment) → environment
capture → the evaluation command → metrics from the per-sample outputs.
Everything it learns goes to the results directory; the runner collects,
re-checks and signs it. The plan, the exit codes (:class:`AgentExit`) and the
results frame are defined once, in :mod:`runner.shared.protocol`.
"""

from __future__ import annotations

from runner.agent.module_pack import install_pack

if __name__ == "__main__":
    # What follows from one file when the image has it (see runner.agent.module_pack).
    install_pack()

import hashlib
import json
import os
import re
import resource
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from runner.agent.capture import EnvironmentCapture, capture_environment
from runner.agent.expectations import (
    GPU_EXPECTATIONS,
    _failed,
    _mode,
    _per_gpu,
    _version_check,
    _version_tuple,
    check_expected_environment,
    version_satisfies,
)
from runner.agent.hints import missing_input_hint, stderr_text
from runner.agent.hold import acknowledge, hold
from runner.agent.inputs import check_input, failure_reason
from runner.agent.module_pack import PACK_FILE, build_pack
from runner.agent.records import AgentSummary, MetricsReport, Preflight
from runner.agent.results_out import (
    LOG_FRAME_MAX_BYTES,
    _emit_held,
    _result_files,
    _tree_size,
    emit_results,
    prepare,
    results_tar,
    write_results_tar,
)
from runner.agent.rootfs import rootfs_digest, rootfs_table
from runner.agent.teeing import (
    _DRAIN_S,
    _tee,
    run_teed,
)
from runner.agent.verification import EarlyCheck, RootfsVerification
from runner.shared.agent_plan import (
    DEFAULT_HOLD_S,
    AgentPlan,
    PlanError,
    parse_agent_plan,
    read_agent_plan,
)
from runner.shared.definitions import MetricDefinition
from runner.shared.metrics import SampleFormatError, compute_available, partial_reason
from runner.shared.perturbations import (
    PerturbationRecord,
    perturbation_effects,
    select_perturbed,
)
from runner.shared.protocol import NOT_HOLDING_EXIT, PLAN_FILE, RESULTS_MOUNT, AgentExit
from runner.shared.quick_exit import leave
from runner.shared.sample_fields import Sample
from runner.shared.sample_file import SampleRow, read_outputs, read_samples


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


def _write_json(path: Path, data: Any) -> None:
    path.write_text(
        json.dumps(data, indent=2, sort_keys=True, default=str) + "\n", encoding="utf-8"
    )


def _read_plan(plan_path: Path) -> tuple[AgentPlan, str]:
    """The plan at ``plan_path`` and the sha256 of the very bytes it was parsed from."""
    data = plan_path.read_bytes()
    try:
        parsed = json.loads(data.decode("utf-8"))
    except ValueError as exc:  # not UTF-8, not JSON
        raise PlanError("(root)", f"not JSON: {exc}") from exc
    return parse_agent_plan(parsed), hashlib.sha256(data).hexdigest()


def run(plan_path: Path, results: Path) -> int:
    """Read the plan at ``plan_path`` and run it (:func:`run_plan`); a bad plan exits 2."""
    try:
        plan, plan_sha256 = _read_plan(plan_path)
    except (OSError, PlanError) as exc:
        print(f"agent: cannot use the plan {plan_path}: {exc}", file=sys.stderr)
        return AgentExit.BAD_PLAN
    return run_plan(plan, results, plan_sha256=plan_sha256)


class BeforePlan:
    """The preflight's parts that need no plan: the image's digest table read and hashed,
    the agent's own files checked against it (:class:`EarlyCheck`), the environment
    captured. An agent whose sandbox was started ahead of its plan (``--plan-wait``) does
    them while the runner is still making the plan, rather than after it; what they find
    is the same (the image's files are read-only, the sandbox's limits are set at its
    start), and the plan is still checked against it."""

    def __init__(self) -> None:
        t0 = time.monotonic()
        self.check = EarlyCheck()
        try:
            self.environment = capture_environment("")
        except BaseException:
            self.check.cancel()
            raise
        self.duration_s = round(time.monotonic() - t0, 4)
        self.waited_s = 0.0  # for the plan, once these were done: the runner was later

    def wait_for(self, plan: Path, seconds: float) -> None:
        """Wait for ``plan`` (:func:`_wait_for`), timed."""
        t0 = time.monotonic()
        _wait_for(plan, seconds)
        self.waited_s = round(time.monotonic() - t0, 4)

    @classmethod
    def done(cls) -> BeforePlan | None:
        """The parts done, or None when one failed (then they are done after the plan,
        where a failure is the run's outcome)."""
        try:
            return cls()
        except Exception:
            return None

    def environment_for(self, image_ref: str) -> EnvironmentCapture:
        return {**self.environment, "image_ref": image_ref}


def run_plan(
    plan: AgentPlan,
    results: Path,
    *,
    plan_sha256: str | None = None,
    before: BeforePlan | None = None,
) -> int:
    """Preflight, evaluation and metrics for ``plan``; always leaves ``summary.json`` behind
    (with the sha256 of the plan's bytes as read, for the runner to compare with what it
    sent). ``before``: the parts done before the plan came."""
    (results / "logs").mkdir(parents=True, exist_ok=True)
    log = EventLog(results / "logs" / "events.jsonl", plan["run_id"])
    summary: AgentSummary = {"run_id": plan["run_id"], "started": time.time()}
    if plan_sha256:
        summary["plan_sha256"] = plan_sha256
    try:
        code = _run(plan, results, log, summary, before)
    except Exception as exc:  # the agent must always leave a summary behind
        log.emit("agent_error", level="error", error=repr(exc))
        summary.update({"outcome": "agent_error", "reason": repr(exc)})
        code = AgentExit.AGENT_ERROR
    summary["finished"] = time.time()
    summary["exit_code"] = int(code)
    _write_json(results / "summary.json", summary)
    log.close()
    return code


def _run(
    plan: AgentPlan,
    results: Path,
    log: EventLog,
    summary: AgentSummary,
    before: BeforePlan | None,
) -> AgentExit:
    # --- preflight: image content (the digest table now; what is used, while it runs)
    t0 = time.monotonic()
    rootfs = RootfsVerification(plan, before.check if before is not None else None)
    preflight: Preflight = {"rootfs": rootfs.begin(), "inputs": []}
    if before is not None:
        preflight["before_plan_s"] = before.duration_s
        preflight["plan_waited_s"] = before.waited_s
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
    if before is not None:
        env = before.environment_for(plan["image_ref"])
    else:
        env = capture_environment(plan["image_ref"])
    _write_json(results / "env.json", env)
    preflight["environment"] = check_expected_environment(plan["expect"], env["gpu"])
    preflight["duration_s"] = round(time.monotonic() - t0, 4)
    _write_json(results / "preflight.json", preflight)
    log.emit("preflight_done", duration_s=preflight["duration_s"])
    bad_inputs = [i for i in preflight["inputs"] if not i["passed"]]
    if rootfs.failed_early or bad_inputs:
        summary.update(
            {
                "outcome": "integrity_failure",
                "reason": preflight["rootfs"]["reason"]
                if rootfs.failed_early
                else failure_reason(bad_inputs),
            }
        )
        log.emit("preflight_failed", level="error", reason=summary["reason"])
        return AgentExit.INTEGRITY
    bad_env = [c for c in preflight["environment"] if not c["passed"]]
    if bad_env:
        summary.update(
            {
                "outcome": "environment_mismatch",
                "reason": "; ".join(
                    f"{c['check']}: expected {c['expected']}, found {c['found']}" for c in bad_env
                ),
            }
        )
        log.emit("environment_mismatch", level="error", reason=summary["reason"])
        return AgentExit.ENVIRONMENT
    try:
        code = _evaluate(plan, results, log, summary, rootfs.child_env())
    finally:
        prepare(plan)  # what hands the results back is used too
        preflight["rootfs"] = rootfs.finish()
        _write_json(results / "preflight.json", preflight)
        log.emit(
            "rootfs_verified",
            level="info" if preflight["rootfs"]["passed"] else "error",
            **{k: v for k, v in preflight["rootfs"].items() if k not in ("how", "failures")},
        )
    if not preflight["rootfs"]["passed"]:
        # results of an evaluation that ran on other content are never accepted
        summary.update({"outcome": "integrity_failure", "reason": preflight["rootfs"]["reason"]})
        return AgentExit.INTEGRITY
    return code


def _evaluate(
    plan: AgentPlan,
    results: Path,
    log: EventLog,
    summary: AgentSummary,
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
        summary.update({"outcome": "evaluation_failed", "reason": f"cannot start command: {exc}"})
        log.emit("evaluation_failed", level="error", reason=summary["reason"])
        return AgentExit.EVAL_FAILED
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    duration = round(time.monotonic() - t1, 4)
    log.emit("evaluation_end", returncode=rc, duration_s=duration, peak_rss_kib=peak_kib)
    summary["evaluation"] = {"returncode": rc, "duration_s": duration, "peak_rss_kib": peak_kib}
    if rc is None:
        summary.update(
            {"outcome": "timeout", "reason": f"evaluation exceeded {plan['timeout_s']} s"}
        )
        return AgentExit.EVAL_TIMEOUT
    if rc != 0:
        reason = f"evaluation command exited {rc}"
        hint = missing_input_hint(
            stderr=stderr_text(results / "logs" / "evaluation.stderr"),
            command=plan["command"],
            env=child_env,
            datasets=datasets,
        )
        summary.update({"outcome": "evaluation_failed", "reason": reason})
        if hint:
            summary["hint"] = hint
        return AgentExit.EVAL_FAILED

    # --- metrics from the per-sample outputs
    t2 = time.monotonic()
    try:
        read = read_outputs(output, plan["metrics"])
    except (OSError, SampleFormatError) as exc:
        summary.update({"outcome": "bad_output", "reason": f"per-sample output unusable: {exc}"})
        log.emit("bad_output", level="error", reason=summary["reason"])
        return AgentExit.EVAL_OUTPUT
    samples = read.samples
    log.emit("data_loaded", samples=len(samples))
    # Point values only: the runner recomputes every metric with its interval from these
    # same per-sample outputs, and only its numbers are sealed; the bootstrap in here would
    # repeat that work on the evaluation's CPUs (a fifth of a second for digits).
    values, unusable = compute_available(
        [_point_only(d) for d in plan["metrics"]],
        samples,
        seed,
        read.unusable,
    )
    if unusable:
        # What could be computed is still written (the runner recomputes it); the run fails.
        computed = [v.as_dict() for v in values]
        _write_json(
            results / "metrics.json", {"seed": seed, "metrics": computed, "unusable": unusable}
        )
        summary.update(
            {"outcome": "bad_output", "reason": partial_reason([v.name for v in values], unusable)}
        )
        log.emit("bad_output", level="error", reason=summary["reason"])
        return AgentExit.EVAL_OUTPUT
    try:
        perturbations = _run_perturbations(plan, samples, child_env, results, log, seed)
    except (OSError, SampleFormatError, subprocess.SubprocessError) as exc:
        summary.update({"outcome": "bad_output", "reason": f"perturbation failed: {exc}"})
        log.emit("bad_output", level="error", reason=summary["reason"])
        return AgentExit.EVAL_OUTPUT
    report: MetricsReport = {"seed": seed, "metrics": [v.as_dict() for v in values]}
    if perturbations:
        report["perturbations"] = perturbations
    _write_json(results / "metrics.json", report)
    log.emit(
        "metrics_done",
        duration_s=round(time.monotonic() - t2, 4),
        metrics={v.name: v.value for v in values},
    )
    summary.update({"outcome": "completed"})
    return AgentExit.OK


def _point_only(definition: MetricDefinition) -> MetricDefinition:
    """``definition`` without its interval (``method: none``), for the agent's own numbers."""
    ci = definition.get("ci")
    level = float(ci.get("level", 0.95)) if ci else 0.95
    return {**definition, "ci": {"method": "none", "level": level, "resamples": 0}}


# After the evaluation exits, its output pipes get this long to drain (a leftover child
def _run_perturbations(
    plan: AgentPlan,
    baseline: list[SampleRow],
    child_env: dict[str, str],
    results: Path,
    log: EventLog,
    seed: int,
) -> list[PerturbationRecord]:
    """Evaluate each declared perturbation: by selection, or by re-running the command."""
    out = []
    for pert in plan["perturbations"]:
        t0 = time.monotonic()
        perturbed: Sequence[Sample]
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


def _parser() -> Any:
    """The agent's command line, every subcommand (``argparse``, imported only here)."""
    import argparse

    class _Parser(argparse.ArgumentParser):
        """argparse's parser with its help laid out at a fixed width (its subcommands' too).

        Without a width argparse imports ``shutil`` to ask the terminal's, for every parser
        it makes: with it ``bz2`` and ``lzma`` and their libraries, ~15 ms under gVisor."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs.setdefault(
                "formatter_class", lambda prog: argparse.HelpFormatter(prog, width=100)
            )
            super().__init__(*args, **kwargs)

    parser = _Parser(prog="python -m runner.agent")
    sub = parser.add_subparsers(dest="command", required=True)
    p_run = sub.add_parser("run", help="run one evaluation from a plan")
    p_run.add_argument("--plan", type=Path, default=Path(PLAN_FILE))
    p_run.add_argument("--results", type=Path, default=Path(RESULTS_MOUNT))
    p_run.add_argument(
        "--emit-results",
        action="store_true",
        help="also write the results as a framed, checksummed tar on stdout",
    )
    p_run.add_argument(
        "--plan-wait",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="wait up to SECONDS for the plan to appear (a sandbox started before its plan)",
    )
    sub.add_parser("rootfs-digest", help="print the rootfs content digest of this container")
    sub.add_parser("rootfs-table", help="print the rootfs digest table of this container")
    p_emit = sub.add_parser(
        "emit-results", help="write the held results as one checksummed stream on stdout"
    )
    p_emit.add_argument("--results", type=Path, default=Path(RESULTS_MOUNT))
    p_ack = sub.add_parser("ack", help="tell the holding agent its results are collected")
    p_ack.add_argument("--plan", type=Path, default=Path(PLAN_FILE))
    sub.add_parser(
        "pack", help="write the modules a run imports into one file (an image build step)"
    )
    return parser


class _RunArgs:
    """``run``'s arguments, as :func:`_parser` would give them."""

    command = "run"

    def __init__(self, plan: Path, results: Path, emit_results: bool, plan_wait: float) -> None:
        self.plan, self.results, self.emit_results = plan, results, emit_results
        self.plan_wait = plan_wait


def _run_args(argv: Sequence[str]) -> _RunArgs | None:
    """The arguments of a ``run`` command line as the backends write it (``run`` with
    ``--plan P``, ``--results R``, ``--plan-wait S``, ``--emit-results``, each at most once,
    in any order); None for anything else, which argparse reads.

    Building argparse's parser costs ~15 ms under gVisor (gettext looks for a translation
    of every help text, each look a few file system calls through the sandbox) and
    importing it ~10 ms more, in every run, before the evaluation starts."""
    if not argv or argv[0] != "run":
        return None
    values: dict[str, str] = {}
    emit = False
    rest = list(argv[1:])
    while rest:
        flag = rest.pop(0)
        if flag == "--emit-results" and not emit:
            emit = True
        elif flag in ("--plan", "--results", "--plan-wait") and flag not in values and rest:
            value = rest.pop(0)
            if not value or value.startswith("-"):
                return None
            values[flag] = value
        else:
            return None
    wait = values.get("--plan-wait", "0")
    if not wait.isdigit():
        return None  # argparse says what is wrong with it
    return _RunArgs(
        Path(values.get("--plan", PLAN_FILE)),
        Path(values.get("--results", RESULTS_MOUNT)),
        emit,
        float(wait),
    )


def _wait_for(plan: Path, seconds: float) -> None:
    """Return once ``plan`` exists, or ``seconds`` from now. The runner that started this
    sandbox ahead of its plan writes it whole, by a rename (runner.adapters.docker_ahead);
    each look is one file system call through the sandbox."""
    deadline = time.monotonic() + seconds
    while not plan.exists() and time.monotonic() < deadline:
        time.sleep(0.005)


def main(argv: list[str] | None = None) -> int:
    args: Any = _run_args(sys.argv[1:] if argv is None else argv)
    if args is None:
        args = _parser().parse_args(argv)
    if args.command == "pack":
        count = build_pack()
        print(f"agent: {count} modules packed into {PACK_FILE}")
        return 0
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
    before = None
    if args.plan_wait > 0:
        before = BeforePlan.done()
        if before is not None:
            before.wait_for(args.plan, args.plan_wait)
        else:
            _wait_for(args.plan, args.plan_wait)
    if not args.plan.is_file():
        print(f"agent: plan not found: {args.plan}", file=sys.stderr)
        return AgentExit.BAD_PLAN
    try:
        plan, plan_sha256 = _read_plan(args.plan)
    except (OSError, PlanError) as exc:
        print(f"agent: cannot use the plan {args.plan}: {exc}", file=sys.stderr)
        return AgentExit.BAD_PLAN
    if args.emit_results:
        plan["emit_results"] = True  # as if the plan said so (its digest is of its bytes)
    code = run_plan(plan, args.results, plan_sha256=plan_sha256, before=before)
    if plan.get("collect") == "exec":
        # Small results also stay in the pod log, so a runner that attaches after another
        # one collected them (another store) can still seal them; large ones leave by exec only.
        if plan["emit_results"] and _tree_size(args.results) <= LOG_FRAME_MAX_BYTES:
            emit_results(args.results)
        return hold(plan["run_id"], code, plan.get("hold_s", DEFAULT_HOLD_S))
    if plan["emit_results"]:
        emit_results(args.results)
    return code


# Results up to this size are also left in the pod log as a frame (base64: ~1.4x, under
# the kubelet's default 10 MiB log rotation).
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


# names moved to expectations, teeing and results_out stay importable from here
__all__ = [
    "GPU_EXPECTATIONS",
    "LOG_FRAME_MAX_BYTES",
    "_DRAIN_S",
    "_emit_held",
    "_failed",
    "_mode",
    "_per_gpu",
    "_result_files",
    "_tee",
    "_tree_size",
    "_version_check",
    "_version_tuple",
    "check_expected_environment",
    "emit_results",
    "results_tar",
    "run_teed",
    "version_satisfies",
    "write_results_tar",
]


if __name__ == "__main__":
    leave(main())  # without the teardown of every module (runner.shared.quick_exit)

"""Long runs under CI control: ``run --detach``, ``status``, ``wait``, ``logs``, ``cancel``.

A run started with ``--detach`` (Kubernetes) is known to the store it was started from
by its run id; these commands find it there, sealed or still going (see
:mod:`runner.workflows.detached`). A sealed run of any backend answers ``status``,
``logs``, ``wait`` and ``cancel`` from its bundle.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Required, TypedDict

from runner._internal.settings import Settings
from runner.cli.ci_reports import CiReports, add_junit_arg, ci_reports
from runner.cli.common import (
    add_keyring_arg,
    add_no_verify_arg,
    add_signing_key_args,
    add_tar_arg,
    live_printer,
    opened_bundle,
    signer_for,
    trust_for,
)
from runner.cli.output import Terminal, emit_json
from runner.errors import InputError

if TYPE_CHECKING:
    from runner.backends.kubernetes_control import JobStateRecord

ReportRun = Callable[[argparse.Namespace, Any, Any, CiReports], int]
# The evaluation's own output in a bundle (what the agent kept), and the most shown of each.
OUTPUT_FILES = ("results/logs/evaluation.stdout", "results/logs/evaluation.stderr")
MAX_LOG_BYTES = 64 << 20


def _overrides(args: argparse.Namespace) -> Any:
    from runner.workflows.detached import ClusterOverrides

    return ClusterOverrides(
        kubeconfig=args.kubeconfig, context=args.context, namespace=args.namespace
    )


def run_detached(
    args: argparse.Namespace,
    settings: Settings,
    term: Terminal,
    backend: Any,
    reports: CiReports,
) -> int:
    """``run --detach``: print the run id once the Job is accepted (exit 0); a run that
    ended before submission (or earlier) exits with its own code."""
    from runner.model.spec import load_spec
    from runner.workflows.detached import refuse_detach, start_detached

    refuse_detach(backend)
    if load_spec(args.spec).run_set_seeds():
        raise InputError(
            "--detach starts one evaluation; this spec is a run set (several seeds)",
            file=str(args.spec),
            hint="run it without --detach",
        )
    signer = signer_for(args, settings, term)
    started = start_detached(
        args.spec,
        backend,
        signer,
        settings,
        rerun=args.rerun,
        progress=term,
        reason=args.reason,
    )
    sealed = started.sealed
    if args.json:
        emit_json(
            {
                "run_id": started.run_id,
                "state": started.state,
                "job": started.job,
                "namespace": started.namespace,
                "outcome": sealed.outcome if sealed else None,
                "reason": sealed.reason if sealed else None,
                "bundle": str(sealed.bundle.path) if sealed else None,
                "exit_code": started.exit_code,
            }
        )
    else:
        print(started.run_id)
        if sealed is not None:
            term(f"run {started.run_id} has ended: {sealed.outcome} — {sealed.reason or ''}")
    return started.exit_code


class RunStatus(TypedDict, total=False):
    """What ``evalrun status --json`` prints: a sealed run, or a detached one still running."""

    run_id: Required[str]
    state: str
    outcome: str | None
    exit_code: int
    bundle: str
    bundle_digest: str
    backend: str
    started: str
    cancel_requested: bool
    kubernetes: JobStateRecord


def cmd_status(args: argparse.Namespace, settings: Settings, term: Terminal) -> int:
    from runner.backends.kubernetes_control import job_state
    from runner.bundle.store import Store
    from runner.model.outcome import exit_code_of
    from runner.workflows.detached import backend_for_record
    from runner.workflows.detached_record import DetachedRun

    detached = DetachedRun(settings, args.run)
    stored = Store(settings.home).find_run(args.run)
    data: RunStatus = {"run_id": args.run}
    if stored is not None:
        data["state"] = "sealed"
        data["outcome"] = stored.outcome
        data["exit_code"] = exit_code_of(stored.outcome)
        data["bundle"] = str(stored.path)
        data["bundle_digest"] = stored.digest
    elif detached.exists():
        record = detached.record()
        job = job_state(backend_for_record(record, _overrides(args)), record.job, args.run)
        data["state"] = job.state
        data["backend"] = record.backend
        data["started"] = record.started
        data["cancel_requested"] = detached.cancel_requested
        data["kubernetes"] = job.to_json()
    else:
        raise InputError(
            f"no run {args.run} in this store ({settings.home})",
            hint="use the EVALRUN_HOME the run was started with",
        )
    if args.json:
        emit_json(data)
        return 0
    print(f"run id   {args.run}")
    print(f"state    {data['state']}")
    if stored is not None:
        print(f"outcome  {data['outcome']} (exit {data['exit_code']})")
        print(f"bundle   {data['bundle']}")
        return 0
    k = data["kubernetes"]
    print(f"job      {k['namespace']}/{k['job']}")
    if k["detail"]:
        print(f"detail   {k['detail']}")
    if data["cancel_requested"]:
        print("cancel   requested")
    for pod in k["pods"]:
        print(
            f"pod      {pod['name']}: {pod['phase']} on {pod['node'] or '—'}, agent {pod['agent']}"
        )
    return 0


def cmd_wait(
    args: argparse.Namespace, settings: Settings, term: Terminal, report_run: ReportRun
) -> int:
    from runner.workflows.detached import require_known, wait_for

    if args.timeout is not None and args.timeout < 0:
        raise InputError(f"--timeout {args.timeout}: expected seconds >= 0")
    require_known(settings, args.run)
    with ci_reports(args, "wait", args.run) as reports:
        signer = signer_for(args, settings, term)
        outcome = wait_for(
            args.run,
            settings,
            signer,
            _overrides(args),
            timeout_s=args.timeout,
            progress=term,
            output=live_printer(term),
        )
        return report_run(args, outcome, signer, reports)


def cmd_cancel(args: argparse.Namespace, settings: Settings, term: Terminal) -> int:
    from runner.workflows.detached import cancel, require_known

    require_known(settings, args.run)
    signer = signer_for(args, settings, term)
    done = cancel(args.run, settings, signer, _overrides(args), progress=term)
    outcome = done.outcome
    if args.json:
        emit_json(
            {
                "run_id": outcome.run_id,
                "cancelled_now": done.cancelled_now,
                "job_deleted": done.job_deleted,
                "outcome": outcome.outcome,
                "exit_code": outcome.exit_code,
                "reason": outcome.reason,
                "bundle": str(outcome.bundle.path),
                "bundle_digest": outcome.bundle.digest,
            }
        )
        return 0
    if done.cancelled_now:
        print(f"cancelled {outcome.run_id}: {outcome.reason}")
    else:
        print(f"run {outcome.run_id} had already ended: {outcome.outcome}; nothing to cancel")
    print(f"bundle   {outcome.bundle.path}")
    print(f"digest   {outcome.bundle.digest}")
    return 0


def cmd_logs(args: argparse.Namespace, settings: Settings, term: Terminal) -> int:
    from runner.bundle.store import Store
    from runner.workflows.detached_record import DetachedRun

    store = Store(settings.home)
    detached = DetachedRun(settings, args.run)
    if store.find_run(args.run) is None and detached.exists():
        return _live_logs(args, settings, term, detached)
    if store.find_run(args.run) is None:
        raise InputError(
            f"no run {args.run} in this store ({settings.home})",
            hint="use the EVALRUN_HOME the run was started with",
        )
    with opened_bundle(args.run, settings, args, term, trust_for(args, settings)) as opened:
        texts = {
            name.rsplit(".", 1)[1]: (
                opened.read_optional(name, max_bytes=MAX_LOG_BYTES) or b""
            ).decode("utf-8", "replace")
            for name in OUTPUT_FILES
        }
        verification = opened.verification
    if args.json:
        emit_json({"run_id": args.run, "source": "bundle", "verified": verification, **texts})
        return 0
    term(f"{args.run}: the evaluation's output from its bundle ({verification})")
    sys.stdout.write(texts["stdout"])
    if texts["stderr"]:
        sys.stderr.write(texts["stderr"])
    return 0


def _live_logs(args: argparse.Namespace, settings: Settings, term: Terminal, detached: Any) -> int:
    from runner.backends.kubernetes_control import newest_pod, pod_log
    from runner.bundle.store import Store
    from runner.workflows.detached import backend_for_record

    record = detached.record()
    backend = backend_for_record(record, _overrides(args))
    pod = newest_pod(backend, args.run)
    while pod is None and args.follow and Store(settings.home).find_run(args.run) is None:
        time.sleep(1.0)
        pod = newest_pod(backend, args.run)
    lines: list[str] = []
    if pod is not None:
        term(f"{args.run}: live log of pod {pod} (namespace {backend.namespace})")
        sink = lines.append if args.json else print
        pod_log(backend, pod, sink, follow=args.follow)
    else:
        term(f"{args.run}: no pod yet")
    if args.json:
        emit_json({"run_id": args.run, "source": "pod", "pod": pod, "lines": lines})
    return 0


def register(
    sub: argparse._SubParsersAction,  # type: ignore[type-arg]
    common: argparse.ArgumentParser,
    report_run: ReportRun,
) -> None:
    """Add ``status``, ``wait``, ``logs`` and ``cancel``."""
    p = sub.add_parser(
        "status", parents=[common], help="where a run is: submitted, running, …, sealed"
    )
    p.add_argument("run", help="run id (as `evalrun run --detach` printed it)")
    p.set_defaults(fn=cmd_status)

    p = sub.add_parser(
        "wait",
        parents=[common],
        help="wait for a detached run, collect and seal it; exits with the run's code",
    )
    p.add_argument("run", help="run id")
    p.add_argument(
        "--timeout",
        type=float,
        metavar="SECONDS",
        help="give up after this long (exit 124, nothing sealed, the run goes on)",
    )
    p.add_argument("--pub", type=Path, help="public key to verify the sealed bundle with")
    add_signing_key_args(p)
    add_junit_arg(p)
    add_tar_arg(p, "run")
    p.set_defaults(fn=lambda a, s, t: cmd_wait(a, s, t, report_run))

    p = sub.add_parser(
        "logs",
        parents=[common],
        help="the evaluation's output: from the bundle, or live from the running pod",
    )
    p.add_argument("run", help="run id")
    p.add_argument(
        "-f", "--follow", action="store_true", help="keep following until the evaluation ends"
    )
    p.add_argument("--pub", type=Path, help="public key to verify the bundle with")
    add_keyring_arg(p)
    add_no_verify_arg(p)
    p.set_defaults(fn=cmd_logs)

    p = sub.add_parser(
        "cancel", parents=[common], help="stop a detached run and seal a signed cancelled bundle"
    )
    p.add_argument("run", help="run id")
    add_signing_key_args(p)
    p.set_defaults(fn=cmd_cancel)

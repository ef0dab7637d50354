"""``evalrun run`` and ``evalrun sweep``: run a locked evaluation (or a run set, or a
matrix of them), verify the sealed bundle, write the CI reports and print the outcome.

:func:`report_run` is shared with ``evalrun wait`` (:mod:`runner.cli.runs`).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any

from runner import entry
from runner._internal.settings import Settings
from runner._internal.startup import loading
from runner.cli import runs as cli_runs
from runner.cli.ci_reports import CiReports, add_junit_arg, ci_reports, properties_of
from runner.cli.common import (
    add_backend_args,
    add_tar_arg,
    backend_for,
    bundle_tar,
    live_printer,
    signer_for,
)
from runner.cli.output import Terminal, emit_json
from runner.cli.progress import TransferBars

if TYPE_CHECKING:
    from runner.bundle.signing import Keyring, Signer, Verifier
    from runner.model.plan import Backend
    from runner.workflows.run import RunOutcome


def cmd_sweep(args: argparse.Namespace, settings: Settings, term: Terminal) -> int:
    from runner.render.junit import error_suite, run_suite
    from runner.render.step_summary import SweepCellSummary, sweep_summary
    from runner.workflows.sweep import (
        load_matrix,
        run_sweep,
        summary_rows,
        summary_table,
        sweep_exit_code,
    )

    with ci_reports(args, "sweep", str(args.spec)) as reports:
        cells = load_matrix(args.matrix)
        term(f"sweep: {len(cells)} cells, at most {args.parallel} at once, backend {args.backend}")
        results = run_sweep(
            args.spec,
            cells,
            backend_for(args),
            signer_for(args, settings, term),
            settings,
            parallel=args.parallel,
            progress=term,
        )
        code = sweep_exit_code(results)
        suites = [
            run_suite(
                r.outcome.predicate,
                name=f"{r.outcome.predicate.spec.name} [{r.cell.label()}]",
                properties=properties_of(r.outcome),
            )
            if r.outcome is not None
            else error_suite(
                f"cell {r.cell.index} [{r.cell.label()}]",
                error=r.error.kind if r.error else "internal",
                message=r.error.diagnostics() if r.error else "no result",
                exit_code=r.exit_code,
            )
            for r in results
        ]
        spec_name = next((r.outcome.predicate.spec.name for r in results if r.outcome), None)
        summary = sweep_summary(
            spec_name,
            [
                SweepCellSummary(
                    label=r.cell.label(),
                    exit_code=r.exit_code,
                    predicate=r.outcome.predicate if r.outcome else None,
                    error=r.error.message if r.error else None,
                )
                for r in results
            ],
            code,
        )
        reports.write(suites, summary)
    if args.json:
        emit_json({"cells": summary_rows(results), "exit_code": code})
    else:
        print(summary_table(results))
    return code


def _run_set(
    args: argparse.Namespace,
    settings: Settings,
    term: Terminal,
    seeds: list[int],
    backend: Backend,
    signer: Signer,
    reports: CiReports,
) -> int:
    from runner.render.junit import run_set_suites
    from runner.render.markdown import percent
    from runner.render.step_summary import run_set_summary
    from runner.workflows.runset import run_set

    result = run_set(args.spec, seeds, backend, signer, settings, progress=term)
    tar = bundle_tar(args.out, result.bundle.path, result.run_id)
    reports.write(
        run_set_suites(result.predicate, {"bundle": str(result.bundle.path)}),
        run_set_summary(
            result.predicate, bundle=str(result.bundle.path), digest=result.bundle.digest
        ),
    )
    if args.json:
        emit_json(
            {
                "run_set": result.run_id,
                "outcome": result.outcome,
                "exit_code": result.exit_code,
                "bundle": str(result.bundle.path),
                "tar": str(tar) if tar else None,
                "reused": result.reused,
                "members": [m.to_json() for m in result.predicate.members],
                "across_seeds": [s.to_json() for s in result.predicate.across_seeds],
            }
        )
    else:
        print(f"run set  {result.run_id}{' (existing)' if result.reused else ''}")
        print(f"outcome  {result.outcome}")
        print()
        print(f"{'metric':12} {'n':>3} {'mean':>8} {'sd':>8}  CI across seeds (Student t)")
        for s in result.predicate.across_seeds:
            ci = s.ci
            if s.mean is None or s.sd is None or ci is None or ci.low is None or ci.high is None:
                print(f"{s.name!s:12} {s.n!s:>3}  —  ({s.note})")
                continue
            print(
                f"{s.name!s:12} {s.n!s:>3} {s.mean:8.4f} {s.sd:8.4f}  "
                f"[{ci.low:.4f}, {ci.high:.4f}] ({percent(ci.level)}%)"
            )
        print()
        for m in result.predicate.members:
            run = m.run_id if "run_id" in m.model_fields_set else "—"
            print(f"  seed {m.seed!s:>10}  {run}  {m.outcome}")
        print(f"bundle   {result.bundle.path}")
        if tar is not None:
            print(f"tar      {tar}")
    return result.exit_code


def cmd_run(args: argparse.Namespace, settings: Settings, term: Terminal) -> int:
    with ci_reports(args, "run", str(args.spec)) as reports:
        return _run(args, settings, term, reports)


def _run(args: argparse.Namespace, settings: Settings, term: Terminal, reports: CiReports) -> int:
    early = None
    if args.backend == "docker" and not args.detach:
        # the Docker SDK imported and the engine connected on the other core while this
        # process reads the spec (runner.adapters.docker_early); with --rerun it starts the
        # sandbox the last run of the same spec and lock asked for, handed over only if
        # this run asks for the same; the program may have forked it before this
        # command's modules loaded (runner.entry)
        from runner.adapters.docker_early import EarlyEngine

        key = entry.key_for(
            settings.home, str(args.spec), rerun=bool(args.rerun), verify_rootfs=args.verify_rootfs
        )
        early = entry.take(key) or EarlyEngine.fork(key)
    else:
        entry.release()  # a helper forked for another command line (none is)
    try:
        return _run_with(args, settings, term, reports, early)
    finally:
        if early is not None:
            early.close()


def _run_with(
    args: argparse.Namespace,
    settings: Settings,
    term: Terminal,
    reports: CiReports,
    early: Any,
) -> int:
    with loading():
        from runner.model.spec import load_spec
        from runner.workflows.run import run_evaluation

        backend = backend_for(args, output=live_printer(term), early=early)
    if args.detach:
        return cli_runs.run_detached(args, settings, term, backend, reports)
    with loading():
        signer = signer_for(args, settings, term)
        spec = load_spec(args.spec)
    seeds = spec.run_set_seeds()
    if seeds:
        return _run_set(args, settings, term, seeds, backend, signer, reports)
    outcome = run_evaluation(
        args.spec,
        backend,
        signer,
        settings,
        rerun=args.rerun,
        progress=term,
        reason=args.reason,
        transfer=TransferBars(quiet=args.json),
        verify_rootfs=args.verify_rootfs,
        spec=spec,
        preload=REPORT_MODULES,
    )
    return report_run(args, outcome, signer, reports)


# What report_run loads beyond the run itself: the bundle's verification (_self_check) and
# the verdict's words. A new run loads them while its sandbox runs (run_evaluation's
# preload), not after it, where ~10 ms of imports stood between the evaluation's end and
# the command's.
REPORT_MODULES = ("runner.bundle.verify", "runner.render.step_summary")


def report_run(
    args: argparse.Namespace, outcome: RunOutcome, signer: Signer, reports: CiReports
) -> int:
    """Verify a sealed run's bundle, write its CI reports and print it (``run``, ``wait``);
    returns the run's exit code."""
    from runner.bundle.signing import load_verifier
    from runner.render.markdown import metric_table, stderr_lines
    from runner.render.step_summary import run_summary, verdict_text

    # --pub checks against the key the user trusts; without it, against the signing key itself
    if args.pub:
        verified = _self_check(outcome, load_verifier(args.pub), explicit=True)
    else:
        verified = _self_check(outcome, signer.verifier(), explicit=False)
    tar = bundle_tar(args.out, outcome.bundle.path, outcome.run_id)
    if reports.wanted:  # the JUnit renderer loads only when a CI report is asked for
        from runner.render.junit import run_suite

        reports.write(
            [run_suite(outcome.predicate, properties=properties_of(outcome, verified))],
            run_summary(
                outcome.predicate,
                exit_code=outcome.exit_code,
                bundle=str(outcome.bundle.path),
                digest=outcome.bundle.digest,
                verified=verified,
                reused=outcome.reused,
            ),
        )
    if args.json:
        emit_json(
            {
                "run_id": outcome.run_id,
                "outcome": outcome.outcome,
                "exit_code": outcome.exit_code,
                "reason": outcome.reason,
                "stderr_tail": list(outcome.predicate.stderr_tail or []),
                "bundle": str(outcome.bundle.path),
                "bundle_digest": outcome.bundle.digest,
                "tar": str(tar) if tar else None,
                "junit": str(args.junit) if args.junit else None,
                "reused": outcome.reused,
                "verified": verified,
                "metrics": outcome.predicate.to_json().get("metrics"),
            }
        )
    else:
        print(f"run id   {outcome.run_id}{' (existing run)' if outcome.reused else ''}")
        print(f"outcome  {outcome.outcome}" + (f" — {outcome.reason}" if outcome.reason else ""))
        tail = stderr_lines(outcome.predicate)
        if tail:
            print(f"\nthe evaluation's stderr (last {len(tail)} lines):")
            for line in tail:
                print(f"  \u2502 {line}")
        print()
        print(metric_table(outcome.predicate.metrics))
        print()
        partial = bool(outcome.predicate.metrics)
        verdict = verdict_text(outcome.exit_code, outcome.outcome, plain=True, partial=partial)
        print(f"verdict  {verdict}")
        print(f"bundle   {outcome.bundle.path}")
        if tar is not None:
            print(f"tar      {tar}")
        print(f"digest   {outcome.bundle.digest}")
        print(f"verify   {verified}")
    return int(outcome.exit_code)


def _self_check(outcome: RunOutcome, verifier: Verifier | Keyring, *, explicit: bool) -> str:
    """Verify the run's bundle with ``verifier`` (--pub, or the signing key's public half).

    Without --pub, a run found in the store (not signed now) may have been signed by an
    earlier key: that is said, not failed. Any other problem fails (exit 3).
    """
    from runner.bundle.verify import verify_bundle
    from runner.errors import VerificationFailed

    try:
        vb = verify_bundle(outcome.bundle.path, verifier)
    except VerificationFailed as exc:
        wrong_key_only = all(p.startswith("wrong key:") for p in exc.problems)
        if outcome.reused and not explicit and wrong_key_only and exc.problems:
            return "not checked: the existing run was signed by another key (pass --pub)"
        raise
    return f"valid ({len(vb.checks)} checks, keyid {vb.keyid[:16]}…)"


def register(
    sub: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser
) -> None:
    p = sub.add_parser("run", parents=[common], help="run a locked evaluation, seal a bundle")
    p.add_argument("spec", type=Path)
    p.add_argument("--rerun", action="store_true", help="start a new attempt even if one exists")
    p.add_argument(
        "--reason",
        metavar="TEXT",
        help="why this run exists; recorded in the bundle (wins over metadata.rationale)",
    )
    p.add_argument(
        "--detach",
        action="store_true",
        help="kubernetes: return once the Job is accepted, printing the run id (then "
        "`evalrun status|logs|wait|cancel RUN`)",
    )
    add_backend_args(p)
    p.add_argument(
        "--verify-rootfs",
        choices=["used", "full"],
        help="what the agent checks of the image before results are accepted: 'used' (the "
        "files the evaluation uses) or 'full' (every file, hashed while it runs); default: "
        "the spec's sandbox.verify_rootfs",
    )
    p.add_argument("--pub", type=Path, help="public key to verify the new bundle with")
    add_junit_arg(p)
    add_tar_arg(p, "run")
    p.set_defaults(fn=cmd_run)

    p = sub.add_parser(
        "sweep",
        parents=[common],
        help="run a locked spec over a matrix (seeds, params, models, datasets)",
    )
    p.add_argument("spec", type=Path)
    p.add_argument("--matrix", type=Path, required=True, help="YAML: axis → list of values")
    p.add_argument("--parallel", type=int, default=4, help="runs in flight at once")
    add_backend_args(p)
    add_junit_arg(p)
    p.set_defaults(fn=cmd_sweep)

"""CLI commands over past runs: runs ls|show|reindex, rerun, diff, audit, report (and,
through :mod:`runner.cli.exchange`, push and pull).

Wired into ``evalrun`` by :func:`register`. Each command is ``fn(args, settings,
term) -> int`` and raises :mod:`runner.errors` exceptions; ``cli.main`` maps
them to exit codes and messages.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from runner._internal.settings import Settings
from runner.cli import exchange
from runner.cli.ci_reports import CiReports, add_junit_arg, ci_reports, properties_of
from runner.cli.common import (
    add_backend_args,
    add_keyring_arg,
    add_no_verify_arg,
    backend_for,
    bundle_for,
    opened_bundle,
    signer_for,
    trust_for,
    verifier_for,
)
from runner.cli.output import Term, emit_json
from runner.cli.progress import TransferBars

if TYPE_CHECKING:
    from runner.bundle.reader import OpenedBundle


# --------------------------------------------------------------------------- runs


def cmd_runs_ls(args: argparse.Namespace, settings: Settings, term: Term) -> int:
    # not runner.bundle.store: listing needs only where the store is, not pydantic
    from runner.bundle.index import History
    from runner.bundle.run_records import RunFilter
    from runner.bundle.store_paths import StorePaths
    from runner.render.run_list import HEADER_WIDTHS, format_lines

    flt = RunFilter(
        spec=args.spec,
        model=args.model,
        dataset=args.dataset,
        image=args.image,
        outcome=args.outcome,
        since=args.since,
        until=args.until,
        kind=None if args.all else ("audit" if args.audits else "run"),
        reproduction_of=args.reproduces,
        limit=args.limit,
    )
    history = History(StorePaths(settings.home))
    if args.json:
        emit_json([r.as_dict() for r in history.query(flt)])
    else:
        # straight from the index, laid out by SQLite: no record, no Python per cell
        print(format_lines(*history.listing_lines(flt, HEADER_WIDTHS)))
    return 0


def cmd_runs_show(args: argparse.Namespace, settings: Settings, term: Term) -> int:
    from runner.bundle.index import History
    from runner.bundle.run_records import RunFilter
    from runner.bundle.store import Store
    from runner.model.predicate import RunPredicate
    from runner.render.markdown import metric_table

    trust = trust_for(args, settings)
    with opened_bundle(args.run, settings, args, term, trust) as opened:
        if args.json:
            emit_json(
                {
                    "bundle": str(opened.path),
                    "bundle_digest": opened.digest,
                    "verified": opened.verified is not None,
                    "verification": opened.verification,
                    "predicate": opened.predicate.to_json(),
                }
            )
            return 0
        predicate = opened.predicate
        print(_render(opened, "md"), end="")
        if isinstance(predicate, RunPredicate):
            print()
            print(metric_table(predicate.metrics))
            reruns = History(Store(settings.home)).query(
                RunFilter(reproduction_of=predicate.run_id)
            )
            if reruns:
                print()
                print("re-run as:")
                for r in reruns:
                    print(f"  {r.run_id}  {r.reproduction_verdict}  {r.started}")
    return 0


def cmd_runs_reindex(args: argparse.Namespace, settings: Settings, term: Term) -> int:
    from runner.bundle.index import History
    from runner.bundle.store import Store

    history = History(Store(settings.home))
    report = history.rebuild()
    summary = {
        "index": str(history.path),
        "indexed": report.total,
        "unreadable": list(report.unreadable),
    }
    if args.json:
        emit_json(summary)
    else:
        print(f"reindexed {report.total} bundle(s) into {history.path}")
        for digest in report.unreadable:
            print(f"  unreadable bundle skipped: {digest}", file=sys.stderr)
    return 0


# --------------------------------------------------------------------------- rerun


def cmd_rerun(args: argparse.Namespace, settings: Settings, term: Term) -> int:
    with ci_reports(args, "rerun", args.ref) as reports:
        return _rerun(args, settings, term, reports)


def _rerun(args: argparse.Namespace, settings: Settings, term: Term, reports: CiReports) -> int:
    from runner.render.junit import reproduction_suite
    from runner.render.markdown import metric_table
    from runner.render.step_summary import rerun_summary
    from runner.workflows.inputs import Published
    from runner.workflows.rerun import load_original, prepare, rerun

    verifier = verifier_for(args, settings, args.pub)
    with bundle_for(args.ref, settings, args, term) as bundle:
        original = load_original(bundle, verifier)
        term(f"original {original.run_id} verified (keyid {original.keyid[:16]}…)")
        transfer = TransferBars(quiet=args.json)
        if args.check:
            inputs = prepare(
                original,
                settings,
                search_dirs=args.inputs or [],
                progress=term,
                transfer=transfer,
                remote=args.backend == "kubernetes",
            )
            located = {
                f"{w.role} {w.name}": (
                    f"{where.artifact} (registry; the node pulls it)"
                    if isinstance(where, Published)
                    else str(where)
                )
                for w, where in inputs.items()
            }
            summary = {
                "original": original.run_id,
                "original_bundle": original.digest,
                "image": original.lock.image.ref,
                "inputs": located,
                "notes": list(original.notes),
                "ready": True,
            }
            if args.json:
                emit_json(summary)
            else:
                print(f"{original.run_id}: ready to re-run (nothing was started)")
                for label, path in located.items():
                    print(f"  {label}: {path}")
                print(f"  image: {original.lock.image.ref}")
            return 0
        result = rerun(
            original,
            backend_for(args),
            signer_for(args, settings, term),
            settings,
            search_dirs=args.inputs or [],
            tolerance=args.tolerance,
            progress=term,
            transfer=transfer,
        )
    repro = result.reproduction
    rerun_predicate = result.outcome.predicate
    reports.write(
        [reproduction_suite(rerun_predicate, result.exit_code, properties_of(result.outcome))],
        rerun_summary(
            rerun_predicate,
            exit_code=result.exit_code,
            bundle=str(result.outcome.bundle.path),
            digest=result.outcome.bundle.digest,
        ),
    )
    if args.json:
        emit_json(
            {
                "original": original.run_id,
                "original_bundle": original.digest,
                "run_id": result.outcome.run_id,
                "outcome": result.outcome.outcome,
                "bundle": str(result.outcome.bundle.path),
                "bundle_digest": result.outcome.bundle.digest,
                "verdict": repro.verdict,
                "reason": repro.reason,
                "metrics": [m.to_json() for m in repro.record(args.tolerance).metrics],
                "exit_code": result.exit_code,
            }
        )
        return result.exit_code
    print(f"original {original.run_id} ({original.digest})")
    print(f"re-run   {result.outcome.run_id} — outcome {result.outcome.outcome}")
    print()
    print(metric_table(result.outcome.predicate.metrics))
    print()
    for d in repro.deltas:
        delta = "—" if d.delta is None else f"{d.delta:+.6f}"
        print(f"  {d.name}: {d.a} → {d.b} (delta {delta}): {d.verdict}")
    print(f"verdict  {repro.verdict}" + (f" — {repro.reason}" if repro.reason else ""))
    print(f"bundle   {result.outcome.bundle.path}")
    print(f"digest   {result.outcome.bundle.digest}")
    return result.exit_code


# --------------------------------------------------------------------------- diff


def cmd_diff(args: argparse.Namespace, settings: Settings, term: Term) -> int:
    from runner.bundle.reader import expect_kind
    from runner.model.predicate import RunPredicate
    from runner.workflows.diff import diff_runs, format_diff

    trust = trust_for(args, settings)
    with (
        opened_bundle(args.a, settings, args, term, trust) as a,
        opened_bundle(args.b, settings, args, term, trust) as b,
    ):
        result = diff_runs(
            expect_kind(a.predicate, RunPredicate, a.path),
            expect_kind(b.predicate, RunPredicate, b.path),
            tolerance=args.tolerance,
        )
    if args.json:
        emit_json({**result.as_dict(), "exit_code": result.exit_code})
    else:
        print(format_diff(result))
    return result.exit_code


# --------------------------------------------------------------------------- audit


def cmd_audit(args: argparse.Namespace, settings: Settings, term: Term) -> int:
    from runner.bundle.archive import write_bundle_tar
    from runner.workflows.audit import run_audit

    result = run_audit(
        n=args.sample,
        seed=args.seed,
        since=args.since,
        until=args.until,
        spec=args.spec,
        backend=backend_for(args),
        signer=signer_for(args, settings, term),
        verifier=verifier_for(args, settings, args.pub),
        settings=settings,
        search_dirs=args.inputs or [],
        tolerance=args.tolerance,
        progress=term,
    )
    tar_path: Path | None = None
    if args.out is not None:
        # a directory (existing, or given with a trailing /) collects one tar per audit
        out: Path = args.out
        if out.is_dir() or str(out).endswith("/"):
            out.mkdir(parents=True, exist_ok=True)
            out = out / f"{result.audit_id}.tar"
        tar_path = write_bundle_tar(result.bundle.path, out)
    if args.json:
        emit_json({**result.as_dict(), "tar": str(tar_path) if tar_path else None})
        return result.exit_code
    print(
        f"audit {result.audit_id} (seed {result.seed}, {len(result.entries)} of "
        f"{result.sampled_from} runs)"
    )
    for e in result.entries:
        mark = "reproduced    " if e.reproduced else "NOT reproduced"
        print(f"  {mark} {e.run_id}  {e.category}: {e.detail}")
    print(f"bundle   {result.bundle.path}")
    print(f"digest   {result.bundle.digest}")
    if tar_path is not None:
        print(f"tar      {tar_path}")
    return result.exit_code


# --------------------------------------------------------------------------- report


def _render(opened: OpenedBundle, fmt: str) -> str:
    """The opened bundle's report in ``fmt`` (``md`` or ``html``), laid out for its kind."""
    from runner.model.predicate import AuditPredicate, RunSetPredicate
    from runner.render.html import render_audit_html, render_html
    from runner.render.run_report import load_report_data, render_markdown_full
    from runner.workflows.audit import render_audit_markdown

    predicate, verification = opened.predicate, opened.verification
    if isinstance(predicate, AuditPredicate):
        if fmt == "html":
            return render_audit_html(predicate, verification)
        return render_audit_markdown(predicate) + f"\nverification: {verification}\n"
    if isinstance(predicate, RunSetPredicate):
        from runner.render.html import render_run_set_html
        from runner.workflows.runset import render_run_set

        if fmt == "html":
            return render_run_set_html(predicate, verification)
        return render_run_set(predicate) + f"\nverification: {verification}\n"
    data = load_report_data(opened)
    return render_html(data) if fmt == "html" else render_markdown_full(data)


def cmd_report(args: argparse.Namespace, settings: Settings, term: Term) -> int:
    from runner._internal.sanitize import terminal_text

    trust = trust_for(args, settings)
    with opened_bundle(args.run, settings, args, term, trust) as opened:
        text = _render(opened, args.format)
    if args.out is None:
        if args.json:  # one JSON object on stdout, the report inside it
            emit_json({"format": args.format, "content": text})
        else:
            sys.stdout.write(text)
        return 0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    # a report file is read in a terminal too: no control character reaches it
    args.out.write_text(terminal_text(text), encoding="utf-8")
    if args.json:
        emit_json({"report": str(args.out), "format": args.format, "bytes": len(text.encode())})
    else:
        term(f"wrote {args.out}")
    return 0


# --------------------------------------------------------------------------- parser


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:  # type: ignore[type-arg]
    """Add ``runs``, ``rerun``, ``diff``, ``audit``, ``report``, ``push``, ``pull``."""
    keys = argparse.ArgumentParser(add_help=False)
    keys.add_argument(
        "--pub", type=Path, help="public key to verify bundles (default: $EVALRUN_HOME/keys)"
    )
    add_keyring_arg(keys)
    signing = argparse.ArgumentParser(add_help=False)
    add_backend_args(signing)
    signing.add_argument(
        "--inputs",
        type=Path,
        action="append",
        metavar="DIR",
        help="where to look for inputs by sha256 (repeatable; also $EVALRUN_INPUTS)",
    )
    signing.add_argument(
        "--tolerance",
        type=float,
        help="absolute difference a metric may move and still count as reproduced",
    )

    runs = sub.add_parser("runs", parents=[common], help="run history").add_subparsers(
        dest="runs_cmd", required=True, metavar="COMMAND"
    )
    p = runs.add_parser(
        "ls",
        parents=[common],
        help="list stored runs (filters combine) from the run index, a cache: bundles are "
        "verified when a command acts on them",
    )
    p.add_argument("--spec", help="spec name")
    p.add_argument("--model", metavar="SHA256", help="model digest (or prefix)")
    p.add_argument("--dataset", metavar="SHA256", help="dataset digest (or prefix)")
    p.add_argument("--image", metavar="DIGEST", help="image digest (or prefix)")
    p.add_argument("--outcome", help="e.g. passed, thresholds_failed, integrity_failure")
    p.add_argument("--since", metavar="DATE", help="started on or after (YYYY-MM-DD or ISO)")
    p.add_argument("--until", metavar="DATE", help="started on or before")
    p.add_argument("--limit", type=int, help="only the newest N")
    p.add_argument("--reproduces", metavar="RUN_ID", help="only re-runs of this run")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--audits", action="store_true", help="list audit reports instead")
    group.add_argument("--all", action="store_true", help="runs and audit reports")
    p.set_defaults(fn=cmd_runs_ls)
    p = runs.add_parser(
        "show", parents=[common, keys], help="a run's report in the terminal (verified first)"
    )
    p.add_argument("run", help="run id, bundle digest (or prefix), bundle path, registry ref")
    add_no_verify_arg(p)
    p.set_defaults(fn=cmd_runs_show)
    p = runs.add_parser("reindex", parents=[common], help="rebuild the run index from bundles")
    p.set_defaults(fn=cmd_runs_reindex)

    p = sub.add_parser(
        "rerun",
        parents=[common, keys, signing],
        help="re-run a past evaluation by run id, bundle, image digest or registry ref",
    )
    p.add_argument("ref", help="run id | bundle digest | BUNDLE_PATH | IMAGE_DIGEST | registry ref")
    p.add_argument(
        "--check",
        action="store_true",
        help="verify, resolve every input and check the image, but start nothing",
    )
    add_junit_arg(p)
    p.set_defaults(fn=cmd_rerun)

    p = sub.add_parser(
        "diff",
        parents=[common, keys],
        help="what differs between two runs (verified first); exit 6 when a gating metric of "
        "B regressed beyond A's confidence interval",
    )
    p.add_argument("a", help="the baseline run (run id, digest, bundle path, registry ref)")
    p.add_argument("b", help="the candidate run")
    p.add_argument(
        "--tolerance",
        type=float,
        help="absolute tolerance for metric deltas (a regression must also exceed it)",
    )
    add_no_verify_arg(p)
    p.set_defaults(fn=cmd_diff)

    p = sub.add_parser(
        "audit", parents=[common, keys, signing], help="re-run a sample of past runs, sign a report"
    )
    p.add_argument("--sample", type=int, default=3, metavar="N", help="how many runs (default 3)")
    p.add_argument("--seed", type=int, help="sampling seed (default: today's date, YYYYMMDD)")
    p.add_argument("--since", metavar="DATE")
    p.add_argument("--until", metavar="DATE")
    p.add_argument("--spec", help="only runs of this spec name")
    p.add_argument(
        "-o",
        "--out",
        type=Path,
        help="also write the audit bundle as a .tar (a directory: DIR/<audit id>.tar)",
    )
    p.set_defaults(fn=cmd_audit)

    p = sub.add_parser(
        "report", parents=[common, keys], help="a run's report as HTML or Markdown (verified first)"
    )
    p.add_argument("run", help="run id, bundle digest (or prefix), bundle path, registry ref")
    add_no_verify_arg(p)
    p.add_argument("--format", choices=["html", "md"], default="html")
    p.add_argument("-o", "--out", type=Path, help="output file (default: stdout)")
    p.set_defaults(fn=cmd_report)

    exchange.register(sub, common, keys)


__all__ = ["register"]

"""The ``evalrun`` command line. The only place that configures logging and exits.

Commands live by area (:mod:`~runner.cli.build`, :mod:`~runner.cli.history`,
:mod:`~runner.cli.blueprints`, :mod:`~runner.cli.compare`; run, sweep, verify and keys
here), each added to the parser by its ``register``; how output and logs look is
:mod:`runner.cli.output`. :func:`main` turns every error into an exit code and a
one-line message (a JSON error object under ``--json``).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
import tempfile
import threading
import traceback
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, NoReturn

from runner._internal.settings import Settings
from runner.cli import blueprints as cli_blueprints
from runner.cli import build as cli_build
from runner.cli import compare as cli_compare
from runner.cli import history as cli_history
from runner.cli import inputs as cli_inputs
from runner.cli import runs as cli_runs
from runner.cli.ci_reports import CiReports, add_junit_arg, ci_reports, properties_of
from runner.cli.common import (
    GLOBAL_OPTIONS_TITLE,
    add_backend_args,
    add_global_options,
    add_keyring_arg,
    add_tar_arg,
    add_unlock_args,
    backend_for,
    bundle_tar,
    key_access,
    live_printer,
    signer_for,
    verifier_for,
)
from runner.cli.output import Terminal, configure_logging, emit_json, safe_streams
from runner.cli.progress import TransferBars
from runner.errors import EvalrunError, InputError, Interrupted, StopRequested

log = logging.getLogger("evalrun")


# --------------------------------------------------------------------------- commands


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
    backend: Any,
    signer: Any,
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
    from runner.model.spec import load_spec
    from runner.workflows.run import run_evaluation

    backend = backend_for(args, output=live_printer(term))
    if args.detach:
        return cli_runs.run_detached(args, settings, term, backend, reports)
    signer = signer_for(args, settings, term)
    seeds = load_spec(args.spec).run_set_seeds()
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
    )
    return report_run(args, outcome, signer, reports)


def report_run(args: argparse.Namespace, outcome: Any, signer: Any, reports: CiReports) -> int:
    """Verify a sealed run's bundle, write its CI reports and print it (``run``, ``wait``);
    returns the run's exit code."""
    from runner.bundle.signing import load_verifier
    from runner.render.junit import run_suite
    from runner.render.markdown import metric_table, stderr_lines
    from runner.render.step_summary import run_summary, verdict_text

    # --pub checks against the key the user trusts; without it, against the signing key itself
    if args.pub:
        verified = _self_check(outcome, load_verifier(args.pub), explicit=True)
    else:
        verified = _self_check(outcome, signer.verifier(), explicit=False)
    tar = bundle_tar(args.out, outcome.bundle.path, outcome.run_id)
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


def _self_check(outcome: Any, verifier: Any, *, explicit: bool) -> str:
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


def cmd_verify(args: argparse.Namespace, settings: Settings, term: Terminal) -> int:
    from runner.bundle.verify import verify_bundle

    if args.key is None and args.keyring is None:
        raise InputError(
            "verify needs the key(s) to trust: --key PUB and/or --keyring PATH",
            hint="the .pub file of the signing key, or a keyring of every key you trust",
        )
    verifier = verifier_for(args, settings, args.key)
    from runner.bundle.oci_artifacts import fetch_bundle, is_registry_ref

    if is_registry_ref(str(args.bundle)) and not args.bundle.exists():
        # A bundle stored as an OCI artifact: fetch (every blob digest-checked), then verify.
        with tempfile.TemporaryDirectory(prefix="evalrun-verify-") as tmp:
            fetched = fetch_bundle(str(args.bundle), Path(tmp) / "bundle")
            vb = verify_bundle(fetched, verifier)
    else:
        vb = verify_bundle(args.bundle, verifier)
    if args.json:
        emit_json(
            {
                "valid": True,
                "bundle": str(args.bundle),
                "run_id": vb.run_id,
                "bundle_digest": vb.bundle_digest,
                "keyid": vb.keyid,
                "files": vb.file_count,
                "checks": [c.name for c in vb.checks],
            }
        )
    else:
        print(f"{args.bundle}: valid")
        print(f"  run id   {vb.run_id}")
        print(f"  digest   {vb.bundle_digest}")
        print(f"  signer   {vb.keyid}")
        print(f"  files    {vb.file_count} ({vb.total_size} bytes), all hashes match")
        print(f"  checks   {', '.join(c.name for c in vb.checks)}")
    return 0


def cmd_keys_generate(args: argparse.Namespace, settings: Settings, term: Terminal) -> int:
    from runner.bundle.keys import FileKey, describe_key
    from runner.bundle.signing import generate_keypair

    private: Path = args.out or settings.default_private_key
    public = private.with_suffix(".pub")
    if args.if_absent and (private.exists() or private.is_symlink()):
        ref = FileKey(public if public.is_file() else private)
        found = describe_key(ref, key_access(args))
        if args.json:
            emit_json(
                {
                    "private_key": str(private),
                    "public_key": str(public),
                    "keyid": found.keyid,
                    "algorithm": found.algorithm,
                    "created": False,
                }
            )
        else:
            print(f"signing key exists: {private} (keyid {found.keyid})")
        return 0
    password = None
    if args.encrypt:
        var = args.key_passphrase_env or "EVALRUN_KEY_PASSPHRASE"
        value = os.environ.get(var)
        if not value:
            raise InputError(
                f"--encrypt takes the passphrase from ${var}, which is not set",
                hint="set it, or name another variable with --key-passphrase-env",
            )
        password = value.encode("utf-8")
    if args.out is None:
        private.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    info = generate_keypair(private, public, args.algorithm, password=password)
    if args.json:
        emit_json(
            {
                "private_key": str(private),
                "public_key": str(public),
                "keyid": info.keyid,
                "algorithm": args.algorithm,
                "created": True,
            }
        )
    else:
        print(f"private key {private} (mode 0600; never leaves this machine)")
        print(f"public key  {public}")
        print(f"keyid       {info.keyid}")
    return 0


def _key_row(d: Any) -> str:
    return f"{d.keyid[:16]}  {d.algorithm:10}  {d.holds:19}  {d.source}"


def cmd_keys_list(args: argparse.Namespace, settings: Settings, term: Terminal) -> int:
    from runner.bundle.keys import (
        FileKey,
        KeyDescription,
        describe_key,
        key_ref_from_env,
        list_token_keys,
        load_keyring,
    )

    access = key_access(args)
    found: list[KeyDescription] = []
    unreadable: list[dict[str, str]] = []
    sources: list[Any] = []
    keys_dir = settings.default_private_key.parent
    if keys_dir.is_dir():
        sources.extend(
            FileKey(p)
            for p in sorted(keys_dir.iterdir())
            if p.suffix in (".key", ".pub", ".pem") and p.is_file()
        )
    from_env = key_ref_from_env(access.environ)
    if from_env is not None:
        sources.append(from_env)
    for ref in sources:
        try:
            found.append(describe_key(ref, access))
        except EvalrunError as err:
            unreadable.append({"source": str(ref), "problem": err.message})
    if args.keyring is not None:
        for verifier in load_keyring(args.keyring).verifiers:
            found.append(
                KeyDescription(
                    keyid=verifier.keyid,
                    algorithm=verifier.algorithm,
                    source=f"keyring {args.keyring}",
                    holds="public key",
                    public_pem=verifier.public_pem().decode("ascii"),
                )
            )
    if args.pkcs11 is not None:
        found.extend(list_token_keys(args.pkcs11, access))
    if args.json:
        emit_json(
            {
                "keys": [d.model_dump(mode="json", exclude={"public_pem"}) for d in found],
                "unreadable": unreadable,
            }
        )
        return 0
    if not found and not unreadable:
        print(f"no keys in {keys_dir} (create one with `evalrun keys generate`)")
        return 0
    print(f"{'KEYID':16}  {'ALGORITHM':10}  {'HOLDS':19}  SOURCE")
    for d in found:
        print(_key_row(d))
    for u in unreadable:
        print(f"{'?':16}  {'?':10}  {'(unreadable)':19}  {u['source']}: {u['problem']}")
    return 0


def cmd_keys_describe(args: argparse.Namespace, settings: Settings, term: Terminal) -> int:
    from runner.bundle.keys import describe_key, parse_key_ref

    d = describe_key(parse_key_ref(args.key), key_access(args))
    if args.json:
        emit_json(d.model_dump(mode="json"))
        return 0
    print(f"keyid       {d.keyid}")
    print(f"algorithm   {d.algorithm}")
    print(f"holds       {d.holds}")
    print(f"source      {d.source}")
    if d.encrypted is not None:
        print(f"encrypted   {'yes' if d.encrypted else 'no'}")
    if d.token is not None:
        print(
            f"token       {d.token.token} (serial {d.token.serial}, {d.token.manufacturer}, "
            f"{d.token.model})"
        )
        print(f"object      label {d.token.object or '—'}, id {d.token.id or '—'}")
        print(f"mechanisms  {', '.join(d.token.mechanisms) or 'none usable'}")
    return 0


def cmd_keys_public(args: argparse.Namespace, settings: Settings, term: Terminal) -> int:
    from runner.bundle.keys import describe_key, parse_key_ref

    d = describe_key(parse_key_ref(args.key), key_access(args))
    if args.out is None:
        if args.json:
            emit_json({"keyid": d.keyid, "algorithm": d.algorithm, "public_pem": d.public_pem})
        else:
            sys.stdout.write(d.public_pem)
        return 0
    try:
        with args.out.open("x", encoding="ascii") as f:
            f.write(d.public_pem)
    except FileExistsError as exc:
        raise InputError("refusing to overwrite an existing file", file=str(args.out)) from exc
    if args.json:
        emit_json({"public_key": str(args.out), "keyid": d.keyid, "algorithm": d.algorithm})
    else:
        print(f"public key {args.out} (keyid {d.keyid})")
    return 0


# --------------------------------------------------------------------------- parser


def build_parser(
    parser_class: type[argparse.ArgumentParser] = argparse.ArgumentParser,
) -> argparse.ArgumentParser:
    """The whole ``evalrun`` command tree.

    ``common`` (given to every command's parser, and to each area's ``register``) holds
    the global options without defaults; the top-level parser holds them with defaults.
    So ``evalrun --json validate X`` and ``evalrun validate X --json`` mean the same.
    """
    common = argparse.ArgumentParser(add_help=False)
    add_global_options(common, defaults=False)

    parser = parser_class(
        prog="evalrun",
        usage="evalrun [global options] COMMAND [options]",
        description="Build digest-pinned evaluation images, run them sandboxed, and seal "
        "the results into signed, verifiable bundles.",
    )
    add_global_options(parser, defaults=True)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", prog="evalrun")
    cli_build.register(sub, common)

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

    p = sub.add_parser("verify", parents=[common], help="verify a bundle offline")
    p.add_argument(
        "bundle", type=Path, help="bundle directory, .tar, or registry reference (repo@sha256:…)"
    )
    p.add_argument("--key", type=Path, help="the trusted public key (PEM)")
    add_keyring_arg(p)
    p.set_defaults(fn=cmd_verify)

    keys = sub.add_parser("keys", parents=[common], help="signing keys").add_subparsers(
        dest="keys_cmd", required=True, metavar="COMMAND"
    )
    p = keys.add_parser("generate", parents=[common], help="create a signing key pair")
    p.add_argument("--out", type=Path, help="private key path (public key: same name, .pub)")
    p.add_argument("--algorithm", choices=["ecdsa-p256", "ed25519"], default="ecdsa-p256")
    p.add_argument(
        "--if-absent",
        action="store_true",
        help="do nothing (and say so) if the private key file exists",
    )
    p.add_argument(
        "--encrypt",
        action="store_true",
        help="encrypt the private key with the passphrase in $EVALRUN_KEY_PASSPHRASE "
        "(or the variable --key-passphrase-env names)",
    )
    add_unlock_args(p)
    p.set_defaults(fn=cmd_keys_generate)
    p = keys.add_parser(
        "list",
        parents=[common],
        help="keys in $EVALRUN_HOME/keys and $EVALRUN_KEY (plus a keyring or a token)",
    )
    add_keyring_arg(p)
    p.add_argument("--pkcs11", metavar="URI", help="also list the keys in this token")
    add_unlock_args(p)
    p.set_defaults(fn=cmd_keys_list)
    p = keys.add_parser(
        "describe", parents=[common], help="keyid, algorithm and source of a key (no secrets)"
    )
    p.add_argument("key", help="a PEM file (private or public), env:VAR, -, k8s://… or pkcs11:…")
    add_unlock_args(p)
    p.set_defaults(fn=cmd_keys_describe)
    p = keys.add_parser(
        "public-key", parents=[common], help="print (or --out) a key's public half as PEM"
    )
    p.add_argument("key", help="a PEM file, env:VAR, -, k8s://… or pkcs11:…")
    p.add_argument("--out", type=Path, help="write it to this new file")
    add_unlock_args(p)
    p.set_defaults(fn=cmd_keys_public)

    cli_runs.register(sub, common, report_run)
    cli_history.register(sub, common)
    cli_blueprints.register(sub, common)
    cli_compare.register(sub, common)
    cli_inputs.register(sub, common)
    describe_command_tree(parser)
    return parser


def command_tree(parser: argparse.ArgumentParser) -> list[tuple[str, str]]:
    """Every command under ``parser`` as (``"keys generate"``, its one-line help), in order."""
    rows: list[tuple[str, str]] = []
    for action in parser._actions:
        if not isinstance(action, argparse._SubParsersAction):
            continue
        helps = {a.dest: a.help or "" for a in action._choices_actions}
        for name, child in action.choices.items():
            nested = command_tree(child)
            rows += [(f"{name} {n}", h) for n, h in nested] or [(name, helps.get(name, ""))]
    return rows


def describe_command_tree(parser: argparse.ArgumentParser) -> None:
    """Make ``parser`` and every command under it describe themselves the same way.

    A command's usage line shows its own options and ``[global options]`` once (the
    group is in its help); a command with commands of its own lists the full tree
    below it, nested commands included, as ``evalrun --help`` does.
    """
    if parser.prog != "evalrun":
        own = [a for a in parser._actions if not _is_global(parser, a)]
        formatter = parser._get_formatter()
        formatter.add_usage(None, own, parser._mutually_exclusive_groups, prefix="usage: ")
        text = formatter.format_help().strip().removeprefix("usage: ")
        parser.usage = text.replace("%", "%%") + " [global options]"
    for action in parser._actions:
        if not isinstance(action, argparse._SubParsersAction):
            continue
        rows = command_tree(parser)
        width = max(len(n) for n, _ in rows) + 2
        prefix = parser.prog.removeprefix("evalrun").strip()
        prefix += " " if prefix else ""
        lines = [f"  {prefix}{n:{width}}{h}" for n, h in rows]
        parser.epilog = "commands (COMMAND --help for its options):\n" + "\n".join(lines)
        parser.formatter_class = argparse.RawDescriptionHelpFormatter
        action.help = argparse.SUPPRESS
        for child in action.choices.values():
            describe_command_tree(child)


def _is_global(parser: argparse.ArgumentParser, action: argparse.Action) -> bool:
    return any(
        g.title == GLOBAL_OPTIONS_TITLE and action in g._group_actions
        for g in parser._action_groups
    )


class _Parser(argparse.ArgumentParser):
    """An argparse parser whose usage errors are raised (as InputError), not printed."""

    def error(self, message: str) -> NoReturn:
        raise InputError(message, command=self.prog, usage=self.format_usage().strip())


def main(argv: Sequence[str] | None = None) -> int:
    # everything any command prints passes one sanitiser (control characters shown escaped)
    with safe_streams(), _stop_on_sigterm():
        return _main(argv)


@contextlib.contextmanager
def _stop_on_sigterm() -> Iterator[None]:
    """SIGTERM (a CI runner cancelling the job) stops evalrun exactly as Ctrl-C does.

    The first SIGTERM raises :class:`StopRequested` in the main thread; later ones are
    ignored so that the clean-up and the sealing of the ``interrupted`` bundle finish.
    """

    def stop(signum: int, _frame: object) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise StopRequested(signal.Signals(signum).name)

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _main(argv: Sequence[str] | None) -> int:
    words = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(parser_class=_Parser)
    try:
        args = parser.parse_args(words)
    except InputError as usage:  # under --json (anywhere), a usage error is a JSON object too
        if "--json" in words:
            emit_json(usage.as_dict())
        else:
            f = usage.fields
            print(f"{f['usage']}\n{f['command']}: error: {usage.message}", file=sys.stderr)
        return usage.exit_code
    settings = Settings()
    configure_logging(settings, getattr(args, "log_json", False), getattr(args, "verbose", False))
    term = Terminal(quiet=getattr(args, "json", False))
    try:
        code: int = args.fn(args, settings, term)
    except KeyboardInterrupt as stop:
        by = getattr(stop, "signal_name", "Ctrl-C")
        err = Interrupted(f"interrupted ({by}); nothing was left half-written")
        print(f"evalrun: {err.diagnostics()}", file=sys.stderr)
        return err.exit_code
    except EvalrunError as err:
        log.error(err.message, extra={"event": "error", "error": err.as_dict()})
        if getattr(args, "json", False):
            emit_json(err.as_dict())
        else:
            print(f"evalrun: error: {err.diagnostics()}", file=sys.stderr)
        return err.exit_code
    except Exception as exc:  # a bug: the user still gets one line and exit 1, the log the rest
        return _internal_error(exc, settings, as_json=getattr(args, "json", False))
    return code


def _internal_error(exc: Exception, settings: Settings, *, as_json: bool) -> int:
    """Report an unexpected exception: the traceback to the log file, one line to the user.

    Under ``--json`` the line is a JSON error object on stdout. Returns exit code 1.
    """
    summary = f"{type(exc).__name__}: " + " ".join(str(exc).splitlines())
    logged = any(isinstance(h, logging.FileHandler) for h in logging.getLogger().handlers)
    log.error(
        summary,
        extra={
            "event": "internal_error",
            "traceback": "".join(traceback.format_exception(exc)),
        },
    )
    where = str(settings.log_file) if logged else "stderr"
    if not logged:  # no log file could be opened: the traceback must still go somewhere
        traceback.print_exception(exc, file=sys.stderr)
    if as_json:
        emit_json({"error": "internal", "exit_code": 1, "message": summary, "log": where})
    else:
        print(f"evalrun: internal error: {summary} (traceback in {where})", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())

"""The ``evalrun`` command line. The only place that configures logging and exits.

Human output goes to the terminal (progress on stderr, results on stdout);
``--json`` prints one structured summary object on stdout instead. Structured
JSON-lines logs (``ts``, ``level``, ``event``, ``run_id``, …) always go to the
log file, and to stderr with ``--log-json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from runner._internal.settings import Settings
from runner.cli import blueprints as cli_blueprints
from runner.cli import compare as cli_compare
from runner.cli import history as cli_history
from runner.cli.common import add_backend_args, backend_for, live_printer, signer_for
from runner.errors import EvalrunError, Interrupted

log = logging.getLogger("evalrun")

_RESERVED = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


class JsonLinesFormatter(logging.Formatter):
    """Stable schema: ts, level, event, run_id, logger, message, then the extra fields."""

    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, Any] = {
            "ts": round(record.created, 6),
            "level": record.levelname.lower(),
            "event": getattr(record, "event", record.getMessage()),
            "run_id": getattr(record, "run_id", None),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _RESERVED and key not in data:
                data[key] = value
        return json.dumps(data, default=str, sort_keys=True)


def _configure_logging(settings: Settings, log_json: bool, verbose: bool) -> None:
    root = logging.getLogger()
    root.handlers.clear()
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    try:
        settings.log_file.parent.mkdir(parents=True, exist_ok=True)
        file_handler = logging.FileHandler(settings.log_file, encoding="utf-8")
        file_handler.setFormatter(JsonLinesFormatter())
        root.addHandler(file_handler)
    except OSError:
        pass
    if log_json:
        stream = logging.StreamHandler(sys.stderr)
        stream.setFormatter(JsonLinesFormatter())
        root.addHandler(stream)
    for noisy in ("urllib3", "docker", "kubernetes"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


class Terminal:
    """Progress lines on stderr with elapsed time; silent in --json mode."""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet
        self.t0 = time.monotonic()

    def __call__(self, message: str) -> None:
        if not self.quiet:
            print(f"[{time.monotonic() - self.t0:6.1f}s] {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- commands


def cmd_validate(args: argparse.Namespace, settings: Settings, term: Terminal) -> int:
    from runner.model.spec import load_spec

    spec = load_spec(args.spec)
    if args.json:
        _emit_json(
            {
                "valid": True,
                "file": str(args.spec),
                "name": spec.metadata.name,
                "spec_digest": spec.digest(),
            }
        )
    else:
        print(f"{args.spec}: valid ({spec.metadata.name}, {spec.digest()})")
    return 0


def cmd_schema(args: argparse.Namespace, settings: Settings, term: Terminal) -> int:
    from runner.model.spec import spec_json_schema

    print(json.dumps(spec_json_schema(), indent=2, sort_keys=True))
    return 0


def cmd_lock(args: argparse.Namespace, settings: Settings, term: Terminal) -> int:
    from runner.build.lock import lock_spec
    from runner.model.spec import load_spec, lock_path_for

    spec = load_spec(args.spec)
    t0 = time.monotonic()
    lock, built = lock_spec(spec, args.spec, settings, progress=term, rebuild=args.rebuild)
    summary = {
        "lock": str(lock_path_for(args.spec)),
        "lock_digest": lock.digest(),
        "image": lock.image.ref,
        "rootfs_digest": lock.image.rootfs_digest,
        "built": bool(built and not built.skipped),
        "seconds": round(time.monotonic() - t0, 3),
    }
    if args.json:
        _emit_json(summary)
    else:
        print(f"locked {args.spec} → {summary['lock']}")
        print(f"  image  {lock.image.ref}")
        print(f"  rootfs {lock.image.rootfs_digest}")
        print(f"  lock   {lock.digest()}")
    return 0


def cmd_build(args: argparse.Namespace, settings: Settings, term: Terminal) -> int:
    from runner.build.reproducibility import (
        check_reproducible,
        format_check_report,
        record_reproducibility,
    )
    from runner.errors import IntegrityError
    from runner.workflows.run import load_locked

    if not args.check:
        return cmd_lock(args, settings, term)
    spec, lock = load_locked(args.spec)
    report = check_reproducible(
        spec, args.spec, lock, settings, progress=term, fresh_base=not args.cached_base
    )
    record_reproducibility(args.spec, report)
    if args.json:
        _emit_json(report)
    else:
        print("\n".join(format_check_report(report)))
    if report["image_identical"]:
        return 0
    err = IntegrityError(
        "the rebuild does not reproduce the locked image digest",
        expected=report["locked_image"],
        found=report["rebuilt_image"],
    )
    if not args.json:
        print(f"evalrun: error: {err.message}", file=sys.stderr)
    return err.exit_code


def cmd_base_image(args: argparse.Namespace, settings: Settings, term: Terminal) -> int:
    from runner.build.base_image import ensure_base_image

    base = ensure_base_image(args.recipe, settings, progress=term)
    if args.json:
        _emit_json(base.model_dump(mode="json"))
    else:
        print(f"base image {args.recipe}: {base.ref}")
    return 0


def cmd_sweep(args: argparse.Namespace, settings: Settings, term: Terminal) -> int:
    from runner.workflows.sweep import (
        load_matrix,
        run_sweep,
        summary_rows,
        summary_table,
        sweep_exit_code,
    )

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
    if args.json:
        _emit_json({"cells": summary_rows(results), "exit_code": sweep_exit_code(results)})
    else:
        print(summary_table(results))
    return sweep_exit_code(results)


def _run_set(
    args: argparse.Namespace,
    settings: Settings,
    term: Terminal,
    seeds: list[int],
    backend: Any,
    signer: Any,
) -> int:
    from runner.workflows.runset import run_set

    result = run_set(args.spec, seeds, backend, signer, settings, progress=term)
    if args.json:
        _emit_json(
            {
                "run_set": result.run_id,
                "outcome": result.outcome,
                "exit_code": result.exit_code,
                "bundle": str(result.bundle.path),
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
                f"[{ci.low:.4f}, {ci.high:.4f}] ({int((ci.level or 0) * 100)}%)"
            )
        print()
        for m in result.predicate.members:
            run = m.run_id if "run_id" in m.model_fields_set else "—"
            print(f"  seed {m.seed!s:>10}  {run}  {m.outcome}")
        print(f"bundle   {result.bundle.path}")
    return result.exit_code


def cmd_run(args: argparse.Namespace, settings: Settings, term: Terminal) -> int:
    from runner.bundle.signing import load_verifier
    from runner.bundle.verify import verify_bundle
    from runner.render.markdown import metric_table
    from runner.workflows.run import run_evaluation

    backend = backend_for(args, output=live_printer(term))
    signer = signer_for(args, settings, term)
    from runner.model.spec import load_spec

    seeds = load_spec(args.spec).run_set_seeds()
    if seeds:
        return _run_set(args, settings, term, seeds, backend, signer)
    outcome = run_evaluation(
        args.spec, backend, signer, settings, rerun=args.rerun, progress=term, reason=args.reason
    )
    public = args.pub or (settings.default_public_key if args.key is None else None)
    verified: str = "not checked (pass --pub to verify with a public key)"
    if public is not None:
        vb = verify_bundle(outcome.bundle.path, load_verifier(public))
        verified = f"valid ({len(vb.checks)} checks, keyid {vb.keyid[:16]}…)"
    if args.json:
        _emit_json(
            {
                "run_id": outcome.run_id,
                "outcome": outcome.outcome,
                "exit_code": outcome.exit_code,
                "reason": outcome.reason,
                "bundle": str(outcome.bundle.path),
                "bundle_digest": outcome.bundle.digest,
                "reused": outcome.reused,
                "verified": verified,
                "metrics": outcome.predicate.to_json().get("metrics"),
            }
        )
    else:
        print(f"run id   {outcome.run_id}{' (existing run)' if outcome.reused else ''}")
        print(f"outcome  {outcome.outcome}" + (f" — {outcome.reason}" if outcome.reason else ""))
        print()
        print(metric_table(outcome.predicate.metrics))
        print()
        verdict = {
            0: "PASS: every metric meets its threshold",
            6: "FAIL: the evaluation did not meet its thresholds",
        }
        print(f"verdict  {verdict.get(outcome.exit_code, 'NOT EVALUATED: ' + outcome.outcome)}")
        print(f"bundle   {outcome.bundle.path}")
        print(f"digest   {outcome.bundle.digest}")
        print(f"verify   {verified}")
    return outcome.exit_code


def cmd_verify(args: argparse.Namespace, settings: Settings, term: Terminal) -> int:
    from runner.bundle.signing import load_verifier
    from runner.bundle.verify import verify_bundle

    verifier = load_verifier(args.key)
    from runner.bundle.oci_artifacts import fetch_bundle, is_registry_ref

    if is_registry_ref(str(args.bundle)) and not args.bundle.exists():
        # A bundle stored as an OCI artifact: fetch (every blob digest-checked), then verify.
        with tempfile.TemporaryDirectory(prefix="evalrun-verify-") as tmp:
            fetched = fetch_bundle(str(args.bundle), Path(tmp) / "bundle")
            vb = verify_bundle(fetched, verifier)
    else:
        vb = verify_bundle(args.bundle, verifier)
    if args.json:
        _emit_json(
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
    from runner.bundle.signing import generate_keypair

    private = args.out or settings.default_private_key
    public = private.with_suffix(".pub")
    info = generate_keypair(private, public, args.algorithm)
    if args.json:
        _emit_json(
            {
                "private_key": str(private),
                "public_key": str(public),
                "keyid": info.keyid,
                "algorithm": args.algorithm,
            }
        )
    else:
        print(f"private key {private} (mode 0600; never leaves this machine)")
        print(f"public key  {public}")
        print(f"keyid       {info.keyid}")
    return 0


def _emit_json(data: Any) -> None:
    print(json.dumps(data, indent=2, sort_keys=True, default=str))


# --------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", help="one JSON summary on stdout")
    common.add_argument("--log-json", action="store_true", help="JSON-lines logs on stderr")
    common.add_argument("-v", "--verbose", action="store_true")

    parser = argparse.ArgumentParser(
        prog="evalrun",
        description="Build digest-pinned evaluation images, run them sandboxed, and seal "
        "the results into signed, verifiable bundles.",
        parents=[common],
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("validate", parents=[common], help="check an eval.yaml")
    p.add_argument("spec", type=Path)
    p.set_defaults(fn=cmd_validate)

    p = sub.add_parser("schema", parents=[common], help="print the JSON Schema of eval.yaml")
    p.set_defaults(fn=cmd_schema)

    for name, fn, text in (
        ("lock", cmd_lock, "resolve every input to a digest (builds the image)"),
        ("build", cmd_build, "build the image; --check rebuilds and compares"),
    ):
        p = sub.add_parser(name, parents=[common], help=text)
        p.add_argument("spec", type=Path)
        p.add_argument("--rebuild", action="store_true", help="build even if nothing changed")
        if name == "build":
            p.add_argument(
                "--check",
                action="store_true",
                help="rebuild from nothing (fresh mmdebstrap base, no cache) and compare "
                "with the lock; exit 3 with a per-file diff if the image digest differs",
            )
            p.add_argument(
                "--cached-base",
                action="store_true",
                help="with --check: reuse the cached base tar instead of running mmdebstrap",
            )
        else:
            p.set_defaults(check=False, cached_base=False)
        p.set_defaults(fn=fn)

    p = sub.add_parser(
        "base-image",
        parents=[common],
        help="build (if absent) and push a base image from images/base/",
    )
    p.add_argument("recipe", nargs="?", default="bookworm-python")
    p.set_defaults(fn=cmd_base_image)

    p = sub.add_parser("run", parents=[common], help="run a locked evaluation, seal a bundle")
    p.add_argument("spec", type=Path)
    p.add_argument("--rerun", action="store_true", help="start a new attempt even if one exists")
    p.add_argument(
        "--reason",
        metavar="TEXT",
        help="why this run exists; recorded in the bundle (wins over metadata.rationale)",
    )
    add_backend_args(p)
    p.add_argument("--pub", type=Path, help="public key to verify the new bundle with")
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
    p.set_defaults(fn=cmd_sweep)

    p = sub.add_parser("verify", parents=[common], help="verify a bundle offline")
    p.add_argument(
        "bundle", type=Path, help="bundle directory, .tar, or registry reference (repo@sha256:…)"
    )
    p.add_argument("--key", type=Path, required=True, help="public key (PEM)")
    p.set_defaults(fn=cmd_verify)

    keys = sub.add_parser("keys", help="signing keys").add_subparsers(
        dest="keys_cmd", required=True
    )
    p = keys.add_parser("generate", parents=[common], help="create a signing key pair")
    p.add_argument("--out", type=Path, help="private key path (public key: same name, .pub)")
    p.add_argument("--algorithm", choices=["ecdsa-p256", "ed25519"], default="ecdsa-p256")
    p.set_defaults(fn=cmd_keys_generate)

    cli_history.register(sub, common)
    cli_blueprints.register(sub, common)
    cli_compare.register(sub, common)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    settings = Settings()
    _configure_logging(settings, getattr(args, "log_json", False), getattr(args, "verbose", False))
    term = Terminal(quiet=getattr(args, "json", False))
    try:
        code: int = args.fn(args, settings, term)
    except KeyboardInterrupt:
        err = Interrupted("interrupted; nothing was left half-written")
        print(f"evalrun: {err.diagnostics()}", file=sys.stderr)
        return err.exit_code
    except EvalrunError as err:
        log.error(err.message, extra={"event": "error", "error": err.as_dict()})
        if getattr(args, "json", False):
            _emit_json(err.as_dict())
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
        _emit_json({"error": "internal", "exit_code": 1, "message": summary, "log": where})
    else:
        print(f"evalrun: internal error: {summary} (traceback in {where})", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())

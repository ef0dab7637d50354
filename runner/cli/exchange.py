"""CLI commands that move bundles through a registry: push (attached to the evaluated
image) and pull (verified before anything is stored). Wired in by
:func:`runner.cli.history.register`."""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from runner._internal.settings import Settings
from runner.cli.common import bundle_for, verifier_for
from runner.cli.output import Term, emit_json


def cmd_push(args: argparse.Namespace, settings: Settings, term: Term) -> int:
    from runner.bundle.oci_artifacts import push_bundle
    from runner.bundle.store import Store
    from runner.bundle.verify import verify_bundle

    store = Store(settings.home)
    verifier = verifier_for(args, settings, args.pub)
    with bundle_for(args.run, settings, args, term) as bundle:
        verify_bundle(bundle, verifier)  # never publish what does not verify
        store.tmp_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="push-", dir=store.tmp_dir) as tmp:
            pushed = push_bundle(bundle, Path(tmp), progress=term, verifier=verifier)
    if args.json:
        emit_json(
            {
                "reference": pushed.reference,
                "digest": pushed.manifest_digest,
                "subject": pushed.subject,
                "already_present": pushed.already_present,
                "referrers_fallback_tag": pushed.referrers_fallback,
            }
        )
    else:
        print(f"{'already pushed' if pushed.already_present else 'pushed'} {pushed.reference}")
        print(f"  subject  {pushed.subject}")
    return 0


def cmd_pull(args: argparse.Namespace, settings: Settings, term: Term) -> int:
    from runner.bundle.oci_artifacts import pull_bundle
    from runner.bundle.store import Store

    pulled = pull_bundle(
        args.ref, Store(settings.home), verifier_for(args, settings, args.pub), progress=term
    )
    if args.json:
        emit_json(
            [
                {
                    "reference": p.reference,
                    "run_id": p.run_id,
                    "bundle": str(p.stored.path),
                    "bundle_digest": p.stored.digest,
                }
                for p in pulled
            ]
        )
    else:
        for p in pulled:
            print(f"{p.run_id}  {p.stored.digest}  {p.stored.path}")
    return 0


def register(
    sub: argparse._SubParsersAction,  # type: ignore[type-arg]
    common: argparse.ArgumentParser,
    keys: argparse.ArgumentParser,
) -> None:
    """Add ``push`` and ``pull`` (``keys``: the verification key options)."""
    p = sub.add_parser(
        "push", parents=[common, keys], help="push a bundle to the registry, attached to its image"
    )
    p.add_argument("run", help="run id, bundle digest (or prefix) or bundle path")
    p.set_defaults(fn=cmd_push)

    p = sub.add_parser("pull", parents=[common, keys], help="pull a bundle (or an image's bundles)")
    p.add_argument("ref", help="registry/repo@sha256:… of a bundle artifact or an evaluated image")
    p.set_defaults(fn=cmd_pull)

"""CLI commands that check a spec and build its image: validate, schema, lock, build, base-image.

Wired into ``evalrun`` by :func:`register`. Each command is ``fn(args, settings,
term) -> int`` and raises :mod:`runner.errors` exceptions; ``cli.main`` maps
them to exit codes and messages.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from runner._internal.settings import Settings
from runner.cli.output import Terminal, emit_json
from runner.cli.progress import TransferBars


def cmd_validate(args: argparse.Namespace, settings: Settings, term: Terminal) -> int:
    from runner.build.custom_metrics import custom_metric_records
    from runner.model.spec import load_spec

    spec = load_spec(args.spec)
    custom_metric_records(spec, Path(args.spec))
    if args.json:
        emit_json(
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
    from runner.model.lock import lock_path_for
    from runner.model.spec import load_spec

    t0 = time.monotonic()
    pins: list[dict[str, str | bool]] = []
    if getattr(args, "refresh_pins", False):
        from runner.build.pins import describe, refresh_pins

        refreshed = refresh_pins(args.spec)
        for line in describe(refreshed):
            if not args.json:
                print(f"pin {line}")
        pins = [
            {"input": p.label, "old": p.old, "new": p.new, "changed": p.changed}
            for p in refreshed.pins
        ]
    spec = load_spec(args.spec)
    lock, built = lock_spec(
        spec,
        args.spec,
        settings,
        progress=term,
        rebuild=args.rebuild,
        transfer=TransferBars(quiet=args.json),
    )
    inputs = [("model", lock.model), *((f"dataset {d.name}", d) for d in lock.datasets)]
    summary = {
        "lock": str(lock_path_for(args.spec)),
        "lock_digest": lock.digest(),
        "image": lock.image.ref,
        "rootfs_digest": lock.image.rootfs_digest,
        "built": bool(built and not built.skipped),
        "inputs": [
            {"input": what, "kind": a.kind, "digest": a.digest, "artifact": a.artifact}
            for what, a in inputs
        ],
        "seconds": round(time.monotonic() - t0, 3),
    }
    if getattr(args, "refresh_pins", False):
        summary["pins"] = pins
    if args.json:
        emit_json(summary)
    else:
        print(f"locked {args.spec} → {summary['lock']}")
        print(f"  image  {lock.image.ref}")
        print(f"  rootfs {lock.image.rootfs_digest}")
        print(f"  lock   {lock.digest()}")
        for what, a in inputs:
            print(f"  {what}: {a.kind} {a.digest} → {a.artifact}")
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
        emit_json(report)
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
        emit_json(base.model_dump(mode="json"))
    else:
        print(f"base image {args.recipe}: {base.ref}")
    return 0


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:  # type: ignore[type-arg]
    """Add ``validate``, ``schema``, ``lock``, ``build``, ``base-image``."""
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
        if name == "lock":
            p.add_argument(
                "--refresh-pins",
                action="store_true",
                help="first set each local input's declared sha256 in the spec to what the "
                "file (or directory) is now, printing each change; only those values are "
                "edited (comments and formatting kept); remote inputs keep their pins",
            )
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

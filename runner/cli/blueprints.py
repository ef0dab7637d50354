"""CLI commands for blueprints: ``init --blueprint NAME DIR`` and ``blueprints ls``.

Wired into ``evalrun`` by :func:`register`. Each command is ``fn(args, settings,
term) -> int`` and raises :mod:`runner.errors` exceptions; ``cli.main`` maps
them to exit codes and messages.
"""

from __future__ import annotations

import argparse
import os
import shlex
from pathlib import Path
from typing import NotRequired, TypedDict

from runner._internal.settings import Settings
from runner.cli.output import Term, emit_json
from runner.errors import EvalrunError

REQUIRES = {
    "docker": "local Docker backend (CPU, gVisor)",
    "gpu": "an NVIDIA GPU node: --backend kubernetes",
}


def _as_typed(path: Path) -> str:
    """``path`` as the user would type it from the current directory."""
    try:
        rel = os.path.relpath(path)
    except ValueError:
        return str(path)
    return rel if not rel.startswith("../..") else str(path)


def cmd_blueprints_ls(args: argparse.Namespace, settings: Settings, term: Term) -> int:
    from runner.workflows.blueprints import list_blueprints

    catalogue = list_blueprints()
    if args.json:
        emit_json(
            [
                {
                    "name": b.name,
                    "description": b.description,
                    "requires": b.manifest.requires,
                    "locked_on_init": b.manifest.lock_on_init,
                }
                for b in catalogue
            ]
        )
        return 0
    width = max(len(b.name) for b in catalogue)
    for b in catalogue:
        print(f"{b.name:<{width}}  {b.description}")
    print()
    print("needs:")
    for b in catalogue:
        print(f"  {b.name:<{width}}  {REQUIRES[b.manifest.requires]}")
    print("\nscaffold one: evalrun init --blueprint NAME DIR")
    return 0


def cmd_init(args: argparse.Namespace, settings: Settings, term: Term) -> int:
    from runner.workflows.blueprints import get_blueprint, scaffold

    blueprint = get_blueprint(args.blueprint)
    project = scaffold(blueprint, args.dir, name=args.name)
    typed = _as_typed(project.root)
    term(f"scaffolded {blueprint.name} → {typed} ({len(project.files)} files)")
    lock = args.lock if args.lock is not None else blueprint.manifest.lock_on_init
    summary: InitSummary = {
        "blueprint": blueprint.name,
        "dir": str(project.root),
        "spec": str(project.spec_path),
        "name": project.spec.metadata.name,
        "files": list(project.files),
        "requires": blueprint.manifest.requires,
        "locked": False,
        "next": [f"cd {shlex.quote(typed)}", *blueprint.manifest.next],
    }
    if lock:
        locked = _lock(project.spec_path, settings, term)
        summary["locked"] = locked["locked"]
        summary["lock"] = locked["lock"]
        summary["lock_digest"] = locked["lock_digest"]
        summary["image"] = locked["image"]
    elif not any(cmd.startswith("evalrun lock") for cmd in blueprint.manifest.next):
        summary["next"].insert(1, "evalrun lock eval.yaml")
    if args.json:
        emit_json(summary)
        return 0
    print(f"scaffolded {blueprint.name} → {typed}")
    print(f"  spec   {project.spec_path} ({project.spec.metadata.name})")
    if summary["locked"]:
        print(f"  lock   {summary['lock']}")
        print(f"  image  {summary['image']}")
    elif args.lock is False:
        print("  lock   not locked (--no-lock)")
    else:
        print(f"  lock   {blueprint.manifest.lock_note or 'not locked'}")
    print(f"  needs  {REQUIRES[blueprint.manifest.requires]}")
    print("next:")
    for command in summary["next"]:
        print(f"  {command}")
    return 0


class _Locked(TypedDict):
    locked: bool
    lock: str
    lock_digest: str
    image: str


class InitSummary(TypedDict):
    """What ``evalrun init --json`` prints."""

    blueprint: str
    dir: str
    spec: str
    name: str
    files: list[str]
    requires: str
    locked: bool
    next: list[str]
    lock: NotRequired[str]
    lock_digest: NotRequired[str]
    image: NotRequired[str]


def _lock(spec_path: Path, settings: Settings, term: Term) -> _Locked:
    """Lock the new project exactly as ``evalrun lock`` does."""
    from runner.build.lock import lock_spec
    from runner.model.lock import lock_path_for
    from runner.model.spec import load_spec

    try:
        lock, _ = lock_spec(load_spec(spec_path), spec_path, settings, progress=term)
    except EvalrunError as err:
        # The project is written and valid; only the lock is missing. Say how to finish.
        err.fields.setdefault("project", str(spec_path.parent))
        finish = f"the project is scaffolded; once fixed, run `evalrun lock {spec_path}`"
        err.hint = f"{err.hint}; {finish}" if err.hint else finish
        raise
    return {
        "locked": True,
        "lock": str(lock_path_for(spec_path)),
        "lock_digest": lock.digest(),
        "image": lock.image.ref,
    }


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:  # type: ignore[type-arg]
    """Add ``init`` and ``blueprints ls``."""
    p = sub.add_parser(
        "init",
        parents=[common],
        help="scaffold a working, locked evaluation project from a blueprint",
    )
    p.add_argument(
        "--blueprint",
        required=True,
        metavar="NAME",
        help="which blueprint (`evalrun blueprints ls` lists them)",
    )
    p.add_argument("dir", type=Path, metavar="DIR", help="new or empty directory to create")
    p.add_argument("--name", help="the evaluation's metadata.name (default: the blueprint's)")
    group = p.add_mutually_exclusive_group()
    group.add_argument(
        "--no-lock",
        dest="lock",
        action="store_false",
        default=None,
        help="scaffold only (offline): no image build, no registry",
    )
    group.add_argument(
        "--lock",
        dest="lock",
        action="store_true",
        help="lock even a blueprint that is not locked on init by default (torch-gpu)",
    )
    p.set_defaults(fn=cmd_init)

    blueprints = sub.add_parser(
        "blueprints", parents=[common], help="evaluation blueprints"
    ).add_subparsers(dest="blueprints_cmd", required=True, metavar="COMMAND")
    p = blueprints.add_parser("ls", parents=[common], help="list blueprints with a description")
    p.set_defaults(fn=cmd_blueprints_ls)

"""CLI commands about inputs: ``evalrun digest PATH…`` (what to pin in ``sha256:``)."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, NotRequired, TypedDict

from runner._internal.settings import Settings

Term = Callable[[str], None]


class Digested(TypedDict):
    """One path of ``evalrun digest --json``."""

    path: str
    kind: Literal["file", "directory"]
    sha256: str
    size: int
    files: NotRequired[int]


def cmd_digest(args: argparse.Namespace, settings: Settings, term: Term) -> int:
    """Print each path's pinned digest: a file's sha256, a directory's tree digest."""
    from runner._internal.input_tree import hash_file, scan_tree
    from runner.errors import InputError

    found: list[Digested] = []
    for path in args.paths:
        if path.is_dir() and not path.is_symlink():
            tree = scan_tree(path, what=str(path))
            found.append(
                {
                    "path": str(path),
                    "kind": "directory",
                    "sha256": tree.digest,
                    "size": tree.size,
                    "files": len(tree.files),
                }
            )
        elif path.is_file() and not path.is_symlink():
            try:
                hexdigest, size = hash_file(path)
            except OSError as exc:
                raise InputError(f"{path}: cannot read ({exc})") from None
            found.append(
                {"path": str(path), "kind": "file", "sha256": f"sha256:{hexdigest}", "size": size}
            )
        else:
            raise InputError(f"{path}: not a regular file or directory (links are not followed)")
    if args.json:
        print(json.dumps(found if len(found) != 1 else found[0], indent=2, sort_keys=True))
    else:
        for item in found:
            extra = f", {item['files']} files" if item["kind"] == "directory" else ""
            print(f"{item['sha256']}  {item['path']} ({item['kind']}, {item['size']} bytes{extra})")
    return 0


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    """Add ``digest``."""
    p = sub.add_parser(
        "digest",
        parents=[common],
        help="print the digest to pin an input by (a file's sha256, a directory's tree digest)",
    )
    p.add_argument("paths", type=Path, nargs="+", metavar="PATH")
    p.set_defaults(fn=cmd_digest)
